"""Length evaluation of qa stories for RMT and ARMT checkpoints (rmt_fast.tasks.length_eval)."""

import json
import os
import random

import pytest
import torch
from models import random_mv
from transformers import GPT2Config, GPT2LMHeadModel

from rmt_fast.models import ARMTForCausalLM, RMTForCausalLM
from rmt_fast.tasks import make_task
from rmt_fast.tasks.babilong import PLACES, babilong_sample, default_vocab
from rmt_fast.tasks.length_eval import answer, length_accuracy, load, main, story_batch


def _base(vocab, seed):
    torch.manual_seed(seed)
    return GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_positions=64, n_embd=32, n_layer=2,
                                      n_head=2, bos_token_id=0, eos_token_id=0))


def _save(kind, path, seed=0, segment_size=24):
    vocab = default_vocab()
    if kind == "armt":
        model = random_mv(ARMTForCausalLM(_base(vocab, seed), num_mem_tokens=3, d_mem=4,
                                          segment_size=segment_size), seed + 1, 0.3)
    else:
        model = RMTForCausalLM(_base(vocab, seed), num_mem_tokens=3, segment_size=segment_size, mask="rmt")
    model.eval().save_pretrained(path)
    vocab.save(path)
    return model, vocab


def test_qa1_story_batch_layout_and_answer():
    vocab = default_vocab()
    stories = story_batch("qa1", 6, 24, 5, vocab, seed=7, num_facts=3)
    assert stories.shape == (5, 144)
    assert torch.equal(stories, story_batch("qa1", 6, 24, 5, vocab, seed=7, num_facts=3))
    for row in stories.tolist():
        words = vocab.decode(row).split()
        assert words[-5:-2] == ["where", "is", words[-3]] and words[-2] == "?"
        person, place = words[-3], words[-1]
        assert place in PLACES
        # the answer is the place of the person's last move, which comes before the question
        last = max(i for i, w in enumerate(words[:-5]) if w == person)
        fact = words[last:]
        assert fact[fact.index(".") - 1] == place
    # the training task draws the same stories (one generator for both)
    rng = random.Random(3)
    assert babilong_sample(rng, "qa1", 144, 3, vocab)[-1] in [vocab.stoi[p] for p in PLACES]
    with pytest.raises(ValueError, match="task must be one of"):
        story_batch("qa3", 6, 24, 1, vocab)


@pytest.mark.parametrize("kind", ["rmt", "armt"])
def test_answer_equals_the_full_forward_prediction(tmp_path, kind):
    saved, _ = _save(kind, tmp_path)
    model, vocab = load(tmp_path)  # whichever wrapper the directory holds
    assert type(model) is type(saved) and not model.training
    stories = story_batch("qa1", 4, 24, 3, vocab, seed=1)
    with torch.no_grad():
        logits = model(stories[:, :-1]).logits  # 95 tokens: the last segment is 23 long
    assert torch.equal(answer(model, stories), logits[:, -1].argmax(-1))
    row = length_accuracy(model, vocab, 4, samples=5, batch_size=2, task="qa1")
    assert row["samples"] == 5 and row["tokens"] == 96 and 0.0 <= row["accuracy"] <= 1.0
    assert row["ci95"][0] <= row["accuracy"] <= row["ci95"][1]


def test_cli_compares_runs_side_by_side(tmp_path, capsys):
    _save("rmt", tmp_path / "rmt")
    _save("armt", tmp_path / "armt", seed=2)
    runs = main(["--task", "qa1", "--num-facts", "2", "--checkpoint", f"RMT={tmp_path / 'rmt'}",
                 "--checkpoint", str(tmp_path / "armt"), "--segments", "2", "5", "--samples", "3",
                 "--batch-size", "2", "--trained-segments", "2", "--out", str(tmp_path / "out")])
    assert list(runs) == ["RMT", "ARMTForCausalLM"]
    assert [r["segments"] for r in runs["RMT"]] == [2, 5] == [r["segments"] for r in runs["ARMTForCausalLM"]]
    with open(tmp_path / "out" / "qa1_lengths.json") as f:
        saved = json.load(f)
    assert saved["runs"] == json.loads(json.dumps(runs)) and saved["num_facts"] == 2
    table = (tmp_path / "out" / "qa1_lengths.md").read_text()
    assert "| 5 | 120 |" in table and "RMT (95% CI)" in table
    assert os.path.getsize(tmp_path / "out" / "qa1_lengths.png") > 1000
    # runs evaluated in separate processes combine into one table
    main(["--task", "qa1", "--num-facts", "2", "--checkpoint", f"B={tmp_path / 'armt'}", "--segments", "2",
          "--samples", "3", "--batch-size", "2", "--out", str(tmp_path / "b")])
    first, second = str(tmp_path / "out" / "qa1_lengths.json"), str(tmp_path / "b" / "qa1_lengths.json")
    merged = main(["--merge", first, second, "--out", str(tmp_path / "merged")])
    assert list(merged) == ["RMT", "ARMTForCausalLM", "B"] and merged["B"][0]["segments"] == 2
    # the same stories: the ARMT read alike in both processes
    assert merged["B"][0]["accuracy"] == runs["ARMTForCausalLM"][0]["accuracy"]
    assert "| B (95% CI) |" in (tmp_path / "merged" / "qa1_lengths.md").read_text()
    # one run's lengths from two files (e.g. the longest with fewer stories)
    main(["--task", "qa1", "--num-facts", "2", "--checkpoint", f"B={tmp_path / 'armt'}", "--segments", "9",
          "--samples", "1", "--out", str(tmp_path / "c")])
    both = main(["--merge", second, str(tmp_path / "c" / "qa1_lengths.json"), "--out", str(tmp_path / "m3")])
    assert [(r["segments"], r["samples"]) for r in both["B"]] == [(2, 3), (9, 1)]
    with pytest.raises(ValueError, match="more than one file"):
        main(["--merge", first, first, "--out", str(tmp_path / "m2")])
    with pytest.raises(ValueError, match="given twice"):
        main(["--checkpoint", f"A={tmp_path / 'rmt'}", "--checkpoint", f"A={tmp_path / 'armt'}",
              "--segments", "2", "--samples", "1"])
    # runs of another segment size read other stories: refused, side by side and in a merge
    _save("rmt", tmp_path / "rmt16", segment_size=16)
    with pytest.raises(ValueError, match="one segment size"):
        main(["--checkpoint", f"A={tmp_path / 'rmt'}", "--checkpoint", f"B={tmp_path / 'rmt16'}",
              "--segments", "2", "--samples", "1"])
    main(["--task", "qa1", "--num-facts", "2", "--checkpoint", f"D={tmp_path / 'rmt16'}", "--segments", "2",
          "--samples", "1", "--out", str(tmp_path / "d")])
    with pytest.raises(ValueError, match="segment_size=16"):
        main(["--merge", first, str(tmp_path / "d" / "qa1_lengths.json"), "--out", str(tmp_path / "m4")])
    assert not os.path.exists(tmp_path / "m4")


def test_load_refuses_an_encoder(tmp_path):
    from transformers import BertConfig, BertForSequenceClassification

    from rmt_fast.models import RMTEncoderForSequenceClassification

    base = BertForSequenceClassification(BertConfig(vocab_size=50, hidden_size=32, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=64))
    RMTEncoderForSequenceClassification(base, num_mem_tokens=2, segment_size=16, cls_token_id=1,
                                        sep_token_id=2).save_pretrained(tmp_path)
    default_vocab().save(tmp_path)
    with pytest.raises(TypeError, match="RMTForCausalLM or an ARMTForCausalLM"):
        load(tmp_path)


def test_training_task_uses_the_same_generator():
    """make_task('qa1') and story_batch draw from one sampler: same layout, answer last."""
    task = make_task("qa1", 24, train_size=4, valid_size=2, test_size=2, num_facts=2)
    data = task.splits(3)["train"]
    ids = data.input_ids[0].tolist()
    assert task.vocab.decode(ids).split()[-5:-3] == ["where", "is"]
    assert ids[-1] in [task.vocab.stoi[p] for p in PLACES]
