"""scripts/fact_position.py: the stories of each (position, distance) cell, and branching from a
saved reader state answers as reading each whole story from scratch."""

import json

import pytest
import torch
from models import random_mv
from transformers import GPT2Config, GPT2LMHeadModel

from rmt_fast.models import ARMTForCausalLM, RMTForCausalLM
from rmt_fast.streaming import StreamingReader
from rmt_fast.tasks.babilong import PEOPLE, PLACES, default_vocab
from rmt_fast.tasks.length_eval import answer
from tests.helpers import load_script

fp = load_script("fact_position")
SIZE = 24


def _model(kind, vocab):
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_positions=64, n_embd=32, n_layer=2,
                                      n_head=2, bos_token_id=0, eos_token_id=0))
    if kind == "armt":
        return random_mv(ARMTForCausalLM(base, num_mem_tokens=3, d_mem=4, segment_size=SIZE), 1, 0.3).eval()
    return RMTForCausalLM(base, num_mem_tokens=3, segment_size=SIZE, mask="rmt").eval()


@pytest.mark.parametrize("kind", ["rmt", "armt"])
def test_branches_answer_as_whole_stories(kind):
    vocab = default_vocab()
    model = _model(kind, vocab)
    positions, distances = [3, 0, 5], [2, 1]
    seen = set()
    for p, d, got, want, (stories, state) in fp.cells(model, vocab, positions, distances, stories=3,
                                                     batch_size=2, seed=7, keep_stories=True):
        seen.add((p, d, len(want)))
        whole = StreamingReader(model, batch_size=len(want), progress=False)
        whole.feed(stories[:, :-SIZE])  # the state branched from == the whole story read at once
        assert whole.tokens_read == int(state["tokens_read"]) == (p + d) * SIZE
        for key, value in whole.state_dict().items():
            torch.testing.assert_close(state[key], value, rtol=1e-5, atol=1e-6, msg=key)
        assert stories.shape[1] == (p + d + 1) * SIZE
        for row in stories:
            words = vocab.decode(row.tolist(), skip_pad=False).split()
            assert words[p * SIZE] in PEOPLE and words[p * SIZE + 4] in PLACES  # the fact starts segment p
            assert words[-5:-2] == ["where", "is", words[p * SIZE]] and words[-1] == words[p * SIZE + 4]
            assert "<pad>" not in words and sum(w in PLACES for w in words[:-1]) == 1
        assert torch.equal(want, stories[:, -1])
        assert torch.equal(got, answer(model, stories))
    assert seen == {(p, d, n) for p in positions for d in distances for n in (2, 1)}


def test_evaluate_counts_and_main_writes(tmp_path):
    vocab = default_vocab()
    model = _model("armt", vocab)
    rows = fp.evaluate(model, vocab, [0, 2], [1, 3], stories=3, batch_size=2, seed=1)
    manual = {}
    for p, d, got, want, _ in fp.cells(model, vocab, [0, 2], [1, 3], 3, 2, 1):
        c, t = manual.get((p, d), (0, 0))
        manual[p, d] = (c + int((got == want).sum()), t + len(want))
    assert [(r["position"], r["distance"], r["correct"], r["samples"]) for r in rows] == \
        [(p, d, *manual[p, d]) for p, d in sorted(manual)]
    model.save_pretrained(tmp_path / "ck")
    vocab.save(tmp_path / "ck")
    runs = fp.main(["--checkpoint", f"tiny={tmp_path / 'ck'}", "--positions", "0", "2",
                    "--distances", "1", "3", "--stories", "3", "--batch-size", "2", "--seed", "1",
                    "--out", str(tmp_path / "out")])
    assert runs["tiny"] == json.loads(json.dumps(rows))
    saved = json.loads((tmp_path / "out" / "fact_position.json").read_text())
    assert saved["runs"]["tiny"] == runs["tiny"]
    assert "| 2 |" in (tmp_path / "out" / "fact_position.md").read_text()
    assert (tmp_path / "out" / "fact_position.png").stat().st_size > 5_000
    with pytest.raises(SystemExit):  # one label for two runs
        fp.main(["--checkpoint", f"tiny={tmp_path / 'ck'}", "--checkpoint", f"tiny={tmp_path / 'ck'}",
                 "--out", str(tmp_path / "twice")])
    assert not (tmp_path / "twice").exists()
    other = json.loads(json.dumps(saved))
    other["runs"] = {"other": rows[:1]}
    (tmp_path / "other.json").write_text(json.dumps(other))
    both = fp.main(["--merge", str(tmp_path / "out" / "fact_position.json"), str(tmp_path / "other.json"),
                    "--out", str(tmp_path / "merged")])
    assert both == {"tiny": runs["tiny"], "other": runs["tiny"][:1]}
    with pytest.raises(ValueError, match="repeats the run"):
        fp.merge([str(tmp_path / "other.json")] * 2)
    other["seed"] = 2
    (tmp_path / "other.json").write_text(json.dumps(other))
    with pytest.raises(ValueError, match="has seed 2"):
        fp.merge([str(tmp_path / "out" / "fact_position.json"), str(tmp_path / "other.json")])


def test_branch_needs_room():
    import random

    with pytest.raises(ValueError, match="cannot hold the fact"):
        fp.branch(random.Random(0), ["mary", "went", "to", "the", "kitchen", "."],
                  ["where", "is", "mary", "?"], "kitchen", 1, 4)
