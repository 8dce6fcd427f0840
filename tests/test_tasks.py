"""rmt_fast.tasks: generator formats, determinism, uniqueness, splits, metrics, BABILong, needle."""

from __future__ import annotations

import json
import re

import pytest
import torch

from rmt_fast.tasks import (
    Task,
    TaskData,
    Vocab,
    babilong_task,
    copy_task,
    default_vocab,
    load_babilong,
    make_task,
    needle_task,
    quadratic_task,
    retrieval_task,
    reverse_task,
    sequence_accuracy,
    token_accuracy,
)
from rmt_fast.tasks.algorithmic import LETTER_IDS, PAD_ID, quadratic_decode
from rmt_fast.tasks.babilong import _BACKGROUND_WORDS, _FACT_WORDS, PEOPLE, PLACES

SMALL = dict(train_size=200, valid_size=50, test_size=50)


def _rows(data: TaskData) -> set[tuple[int, ...]]:
    return {tuple(r) for r in data.input_ids.tolist()}


GENERATORS = {
    "copy": lambda seed: copy_task(6, 2, 10, seed=seed, **SMALL),
    "reverse": lambda seed: reverse_task(6, 10, seed=seed, **SMALL),
    "retrieval": lambda seed: retrieval_task(4, 12, seed=seed, **SMALL),
    "quadratic": lambda seed: quadratic_task(seed=seed, **SMALL),
    "qa1": lambda seed: babilong_task("qa1", 64, 3, seed=seed, **SMALL),
    "qa2": lambda seed: babilong_task("qa2", 80, 4, seed=seed, **SMALL),
    "needle": lambda seed: needle_task(48, 16, seed=seed, **SMALL),
}


@pytest.mark.parametrize("name", sorted(GENERATORS))
def test_deterministic_unique_disjoint(name):
    a, b, c = GENERATORS[name](0), GENERATORS[name](0), GENERATORS[name](1)
    for split in ("train", "valid", "test"):
        assert torch.equal(a[split].input_ids, b[split].input_ids)
        assert torch.equal(a[split].labels_mask, b[split].labels_mask)
        assert a[split].labels_mask.dtype == torch.bool
    assert len(a["train"]) == 200 and len(a["valid"]) == 50 and len(a["test"]) == 50
    assert not torch.equal(a["train"].input_ids, c["train"].input_ids)
    rows = [_rows(a[s]) for s in ("train", "valid", "test")]
    assert [len(r) for r in rows] == [200, 50, 50]  # unique inside each split
    assert not (rows[0] & rows[1]) and not (rows[0] & rows[2]) and not (rows[1] & rows[2])
    # every sample has at least one target, and never at the last position
    assert a["train"].labels_mask.any(dim=1).all()
    assert not a["train"].labels_mask[:, -1].any()


def test_copy_format_by_hand():
    s = copy_task(src_len=3, copies=2, num_tokens=6, seed=3, train_size=5, valid_size=0, test_size=0)
    ids, mask = s["train"].input_ids, s["train"].labels_mask
    assert ids.shape == (5, 9)
    for row in ids.tolist():
        assert row == row[:3] * 3
        assert all(2 <= t <= 5 for t in row)
    # position p predicts p + 1: the 6 copied tokens at 3..8 are predicted from 2..7
    assert mask[0].tolist() == [False, False, True, True, True, True, True, True, False]
    # the paper's copy: 24 + 48 tokens, 48 targets, divisible into 3, 6 and 9 segments
    paper = copy_task(seed=0, train_size=10, valid_size=0, test_size=0)["train"]
    assert paper.length == 72 and int(paper.labels_mask[0].sum()) == 48


def test_reverse_format_by_hand():
    s = reverse_task(src_len=4, num_tokens=10, seed=0, train_size=5, valid_size=0, test_size=0)
    for row in s["train"].input_ids.tolist():
        assert row[4:] == row[:4][::-1]
    assert s["train"].labels_mask[0].tolist() == [False] * 3 + [True] * 4 + [False]
    assert reverse_task(seed=0, train_size=1, valid_size=0, test_size=0)["train"].length == 48


def test_retrieval_format_by_hand():
    s = retrieval_task(num_pairs=4, length=12, seed=0, train_size=300, valid_size=0, test_size=0)
    ids, mask = s["train"].input_ids, s["train"].labels_mask
    assert ids.shape == (300, 12)
    assert (ids[:, :2] == 0).all()  # 10 tokens left-padded to 12 (4 segments of 3)
    assert mask.sum(dim=1).eq(1).all() and mask[:, 10].all()
    for row in ids.tolist():
        body = row[2:]
        letters, digits = body[0:8:2], body[1:8:2]
        assert len(set(letters)) == 4 and all(t in LETTER_IDS for t in letters)
        assert all(1 <= d <= 10 for d in digits)  # digit d -> id d + 1, never the pad id 0
        q, a = body[8], body[9]
        assert a == digits[letters.index(q)]
    assert retrieval_task(seed=0, train_size=1, valid_size=0, test_size=0)["train"].length == 10


def test_quadratic_format_and_math():
    s = quadratic_task(seed=0, train_size=500, valid_size=0, test_size=0)["train"]
    assert s.length == 180
    no_roots = 0
    for row, mask in zip(s.input_ids.tolist(), s.labels_mask.tolist(), strict=True):
        steps = [quadratic_decode(row[30 * k: 30 * (k + 1)]) for k in range(6)]
        assert all(st.endswith(";") for st in steps)
        a, b, c = map(int, re.fullmatch(r"(\d)\*x\^2([+-]\d+)\*x([+-]\d+)=0;", steps[0]).groups())
        p, q = map(int, re.fullmatch(r"x\^2([+-]\d+)\*x([+-]\d+)=0;", steps[1]).groups())
        assert (b, c) == (a * p, a * q)
        d = int(steps[2].split("=")[-1].rstrip(";"))
        assert d == p * p - 4 * q
        if d < 0:
            no_roots += 1
            assert steps[3:] == ["x=();"] * 3
        else:
            r1, r2 = map(int, steps[5][2:-1].split(","))
            assert r1 <= r2 and -100 < r1 and r2 < 100
            for r in (r1, r2):
                assert a * r * r + b * r + c == 0
        # targets: the characters of steps 2..6, never the first step or padding
        for k in range(6):
            chunk = row[30 * k: 30 * (k + 1)]
            for j, tok in enumerate(chunk):
                pos = 30 * k + j
                assert mask[pos - 1] == (k > 0 and tok != 0) if pos > 0 else True
    assert 0.12 < no_roots / 500 < 0.28


def _onehot(ids: torch.Tensor, vocab: int) -> torch.Tensor:
    """Logits predicting ``ids[p + 1]`` at every position ``p``: ``[N, T, V]``."""
    logits = torch.zeros(*ids.shape, vocab)
    logits[:, :-1].scatter_(2, ids[:, 1:, None], 1.0)
    return logits


def test_token_accuracy_on_hand_made_logits():
    ids = torch.tensor([[2, 3, 4, 2, 3, 4], [5, 6, 7, 5, 6, 7]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 0]] * 2, dtype=torch.bool)
    logits = _onehot(ids, 10)
    assert token_accuracy(logits, ids, mask) == 1.0
    assert sequence_accuracy(logits, ids, mask) == 1.0
    wrong = logits.clone()
    wrong[0, 3] = 0
    wrong[0, 3, 9] = 1.0  # position 3 (a target position) now predicts 9 instead of 3
    assert token_accuracy(wrong, ids, mask) == pytest.approx(5 / 6)
    assert sequence_accuracy(wrong, ids, mask) == 0.5
    other = logits.clone()
    other[1, 0] = 0
    other[1, 0, 9] = 1.0  # a non-target position: no effect
    assert token_accuracy(other, ids, mask) == 1.0
    with pytest.raises(ValueError, match="logits"):
        token_accuracy(logits[:, :3], ids, mask)


def test_small_task_and_bad_arguments_raise():
    with pytest.raises(ValueError, match="distinct samples"):
        copy_task(2, 2, 4, train_size=5, valid_size=1, test_size=0)  # only 2^2 = 4 sources
    with pytest.raises(ValueError, match="src_len"):
        copy_task(0)
    with pytest.raises(ValueError, match="length"):
        retrieval_task(4, 8)
    with pytest.raises(ValueError, match="train_size"):
        reverse_task(4, train_size=-1)
    with pytest.raises(ValueError, match="task must be"):
        babilong_task("qa9")


def test_make_task_lengths():
    copy = make_task("copy", 12, **SMALL)
    assert isinstance(copy, Task) and copy.vocab_size == 10
    for n in (3, 6, 9):
        assert copy.splits(n)["train"].length == 12 * n
    with pytest.raises(ValueError, match="divisible by 3"):
        make_task("copy", 5, **SMALL).splits(1)
    assert make_task("quadratic", 30, **SMALL).splits(6)["train"].length == 180
    with pytest.raises(ValueError, match="180"):
        make_task("quadratic", 30, **SMALL).splits(5)
    assert make_task("retrieval", 3, **SMALL).splits(4)["train"].length == 12
    needle = make_task("needle", 16, **SMALL)
    assert needle.vocab is not None and needle.splits(5)["train"].length == 80
    with pytest.raises(ValueError, match="unknown task"):
        make_task("nope", 4)


def test_retrieval_pairs_fit_makes_the_segment_curriculum_one_over_pairs():
    fit = make_task("retrieval", 6, num_pairs=16, pairs_fit=True, **SMALL)
    for segments, pairs in ((1, 2), (2, 5), (3, 8), (4, 11), (5, 14), (6, 16), (8, 16)):
        ids = fit.splits(segments)["valid"].input_ids
        assert ids.shape[1] == 6 * segments
        # every sample: PAD..., K letter-digit pairs, query letter, answer digit
        assert ((ids != PAD_ID).sum(1) == 2 * pairs + 2).all(), (segments, pairs)
    with pytest.raises(ValueError, match="length"):  # without it, 16 pairs need 34 tokens
        make_task("retrieval", 6, num_pairs=16, **SMALL).splits(5)
    with pytest.raises(ValueError, match="pairs_fit needs a length >= 4"):
        make_task("retrieval", 3, num_pairs=16, pairs_fit=True, **SMALL).splits(1)


def _simulate_qa(words: list[str]) -> tuple[dict, dict, dict]:
    """Replay the facts of a story: person -> place, object -> holder, object -> dropped place."""
    where, holder, dropped = {}, {}, {}
    sentences, current = [], []
    for word in words:
        if word == ".":
            sentences.append(current)
            current = []
        else:
            current.append(word)
    for w in sentences:
        if not w or w[0] not in PEOPLE:
            continue
        if w[-1] in PLACES:
            where[w[0]] = w[-1]
        elif w[1] in ("picked", "got", "grabbed"):
            holder[w[-1]] = w[0]
            dropped.pop(w[-1], None)
        else:
            holder.pop(w[-1], None)
            dropped[w[-1]] = where[w[0]]
    return where, holder, dropped


@pytest.mark.parametrize("qa", ["qa1", "qa2"])
def test_babilong_answers_follow_the_facts(qa):
    vocab = default_vocab()
    data = babilong_task(qa, 96, 5, seed=0, train_size=100, valid_size=0, test_size=0)["train"]
    assert data.input_ids.shape == (100, 96)
    assert data.labels_mask.sum(dim=1).eq(1).all() and data.labels_mask[:, -2].all()
    assert not set(_BACKGROUND_WORDS) & set(_FACT_WORDS) - {"the"}
    for row in data.input_ids.tolist():
        words = vocab.decode(row).split()
        assert "<unk>" not in words
        q = words.index("where")
        answer = words[-1]
        where, holder, dropped = _simulate_qa(words[:q])
        if qa == "qa1":
            assert answer == where[words[q + 2]]
        else:
            obj = words[q + 3]
            assert answer == where[holder[obj]]  # qa2 asks for a carried object
        # background text does surround the facts
        assert sum(w in _BACKGROUND_WORDS for w in words) > 20


def test_needle_any_length():
    vocab = default_vocab()
    smallest = needle_task(11, 16, seed=1, train_size=10, valid_size=0, test_size=0)["train"]
    assert vocab.decode(smallest.input_ids[0].tolist()).startswith("the key is")  # no room for noise
    for length in (24, 37, 100, 300):
        data = needle_task(length, 16, seed=1, train_size=30, valid_size=0, test_size=0)["train"]
        assert data.length == length
        for row in data.input_ids.tolist():
            words = vocab.decode(row, skip_pad=False).split()
            story = [w for w in words if w != "<pad>"]
            k = story.index("key")
            assert story[k - 1: k + 2] == ["the", "key", "is"] and k + 3 <= 16
            assert story[-6:-1] == ["what", "is", "the", "key", "?"]
            assert story[-1] == story[k + 2] and story[-1].isdigit()
        assert data.labels_mask[:, -2].all() and data.labels_mask.sum() == 30


def test_vocab_round_trip(tmp_path):
    v = Vocab(["mary", "went"])
    ids = v.encode("Mary went home.")
    assert ids == [2, 3, 1, 1]  # unknown words -> <unk>
    v.add("home")
    v.add(".")
    assert v.decode(v.encode("Mary went home.")) == "mary went home ."
    v.save(tmp_path)
    w = Vocab.load(tmp_path)
    assert w.itos == v.itos
    with pytest.raises(KeyError, match="zzz"):
        v.encode("zzz", strict=True)
    with pytest.raises(ValueError, match="outside"):
        v.decode([99])


def test_load_babilong_file(tmp_path):
    records = [
        {"input": "Mary went to the kitchen. The sky is blue.", "question": "Where is Mary?",
         "target": "kitchen"},
        {"input": "John moved to the garden.", "question": "Where is John?", "target": "garden"},
    ]
    jsonl = tmp_path / "qa1.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in records) + "\n")
    data, vocab = load_babilong(jsonl, pad_to_multiple=8)
    assert data.input_ids.shape == (2, 16)  # longest: 10 + 4 + 1 = 15 tokens -> 16
    first = vocab.decode(data.input_ids[0].tolist())
    assert first == "mary went to the kitchen . the sky is blue . where is mary ? kitchen"
    assert vocab.decode(data.input_ids[1].tolist()) == "john moved to the garden . where is john ? garden"
    assert data.input_ids[1, :5].eq(0).all() and data.input_ids[1, 5] != 0  # 11 tokens, left-padded
    assert data.labels_mask.sum() == 2 and data.labels_mask[:, 14].all()
    logits = _onehot(data.input_ids, len(vocab))
    assert token_accuracy(logits, data.input_ids, data.labels_mask) == 1.0
    # a JSON list gives the same, and a fixed vocabulary maps new words to <unk>
    listed = tmp_path / "qa1.json"
    listed.write_text(json.dumps(records))
    again, _ = load_babilong(listed, vocab=vocab, length=16)
    assert torch.equal(again.input_ids, data.input_ids)
    with pytest.raises(ValueError, match="truncate"):
        load_babilong(jsonl, length=10)
    cut, _ = load_babilong(jsonl, length=10, truncate=True)
    assert vocab.decode(cut.input_ids[0].tolist()).endswith("where is mary ? kitchen")
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"input": "x", "question": "y"}) + "\n")
    with pytest.raises(ValueError, match="target"):
        load_babilong(bad)
    task = make_task("babilong-file", 8, path=str(jsonl))
    assert task.splits(2)["train"].length == 16 and task.vocab_size == len(vocab)
