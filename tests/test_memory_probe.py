"""scripts/memory_probe.py: the other fact's question, the two readings of one memory against
the model's own forward, and probes that read a linear code but not noise."""

from __future__ import annotations

import dataclasses
import random

import pytest
import torch
from helpers import load_script
from test_babi_qa import noise, solve, tokenizer  # noqa: F401  (fixtures)
from test_train_qa import tiny_base  # noqa: F401  (fixture)
from transformers import BertConfig, BertForSequenceClassification

from rmt_fast.tasks.babi_qa import (
    DIRECTIONS,
    LOCATIONS,
    BabiQA,
    Story,
    anchor_of,
    asked_and_other_fact,
    fact_parts,
    fact_targets,
    make_story,
    other_question,
)

probe = load_script("memory_probe")
S = 64


def test_other_question_asks_for_the_other_fact():
    """Checked with the independent solver: the twin's question has one answer, the other
    fact's place, in the story's question form; the facts stay."""
    rng = random.Random(0)
    for _ in range(400):
        story = make_story("reasoning", rng)
        twin = other_question(story)
        assert twin.facts == story.facts and twin.answer != story.answer
        assert solve(twin.facts, twin.question) == twin.answer
        assert asked_and_other_fact(twin) == asked_and_other_fact(story)[::-1]
        assert twin.question.startswith("What is the ") == story.question.startswith("What is the ")
        anchor = anchor_of(story)
        assert anchor in story.question and {fact_parts(f, anchor)[0] for f in story.facts} == \
            {story.answer, twin.answer}
        # the targets of an auxiliary fact loss: each fact's place and where it lies from the anchor
        for (place, d), fact in zip(fact_targets(story), story.facts, strict=True):
            question = f"What is {DIRECTIONS[d]} of the {anchor}?"
            assert solve(story.facts, question) == LOCATIONS[place] and LOCATIONS[place] in fact
    with pytest.raises(ValueError, match="not about"):
        fact_parts("The garden is north of the office.", "kitchen")


def test_read_gives_the_models_answers_to_both_questions(tokenizer, noise):  # noqa: F811
    """read(): the memory is the forward's memory after all but the last segment; the two
    logits are the full forward's on the sample and on the sample rebuilt with the twin
    story (its question swapped in by the data, not by the script)."""
    from rmt_fast.models import RMTEncoderForSequenceClassification

    torch.manual_seed(0)
    base = BertForSequenceClassification(BertConfig(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=S + 16, num_labels=len(LOCATIONS),
        initializer_range=0.3))  # large enough weights that one word moves the logits
    model = RMTEncoderForSequenceClassification(
        base, num_mem_tokens=3, segment_size=S, cls_token_id=tokenizer.cls_token_id,
        sep_token_id=tokenizer.sep_token_id).eval()
    data = BabiQA("reasoning", tokenizer, S, noise=noise)
    plans = data.plans("valid", 3, range(5))
    memory, got = probe.read(model, data, plans, torch.float32, batch_size=2)
    twin_plans = [dataclasses.replace(p, story=other_question(p.story)) for p in plans]
    with torch.no_grad():
        prefix = data.batch("valid", 3, range(5))
        ids, mask = prefix["input_ids"], prefix["attention_mask"]
        want_memory = model(ids[:, :2 * S], attention_mask=mask[:, :2 * S]).memory
        logits = []
        for ps in (plans, twin_plans):
            ids = torch.stack([torch.from_numpy(data.tokens(p).astype("int64")) for p in ps])
            logits.append(model(ids, attention_mask=mask).logits)
    torch.testing.assert_close(memory, want_memory, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got, torch.stack(logits, dim=1), rtol=1e-5, atol=1e-5)
    assert (logits[0] - logits[1]).abs().max() > 0.01  # the question matters
    story = plans[0].story
    wrong = Story(story.facts, "What is north of the kitchen and more?", story.answer)
    with pytest.raises(ValueError, match="cannot swap"):
        probe.swap_question(data, torch.from_numpy(data.tokens(plans[0]).astype("int64")), story, wrong)


def test_probe_reads_a_linear_code_and_not_noise():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 6, (600,), generator=g)
    code = torch.randn(6, 40, generator=g)
    x = code[y] + 0.5 * torch.randn(600, 40, generator=g)
    coded = probe.probe(x, y, 400)
    assert coded["test_accuracy"] > 0.9 and coded["mlp_test_accuracy"] > 0.9 and coded["test_rows"] == 200
    noise_only = probe.probe(torch.randn(600, 40, generator=g), y, 400)
    assert noise_only["test_accuracy"] < 0.35 and noise_only["fit_accuracy"] > noise_only["test_accuracy"]
    assert noise_only["mlp_test_accuracy"] < 0.35


def test_the_hidden_layer_probe_reads_what_a_linear_one_cannot():
    """XOR of two signs: no linear probe beats chance by much, one hidden layer does."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(800, 10, generator=g)
    y = ((x[:, 0] > 0) ^ (x[:, 1] > 0)).long()
    got = probe.probe(x, y, 600)
    assert got["test_accuracy"] < 0.65 and got["mlp_test_accuracy"] > 0.85


def test_both_questions_counts():
    label, twin = torch.tensor([0, 1, 2, 3]), torch.tensor([1, 2, 3, 4])
    story_pred = torch.tensor([0, 1, 3, 5])  # right, right, twin's answer, wrong
    twin_pred = torch.tensor([1, 1, 2, 0])  # right, story's answer, story's answer, wrong
    got = probe.both_questions(story_pred, twin_pred, label, twin)
    assert got == {"stories": 4, "both right": 0.25, "only one right": 0.25, "neither right": 0.5,
                   "same place for both questions": 0.25, "answers swapped": 0.25}


def test_main_end_to_end(tiny_base, tmp_path):  # noqa: F811
    """The command on a tiny saved checkpoint: its JSON agrees with read() on the same stories
    (the story question's accuracy, both-questions shares) and probes every target."""
    import json

    from rmt_fast.models.lora import LoRARMTEncoderForSequenceClassification

    torch.manual_seed(0)
    model = LoRARMTEncoderForSequenceClassification.from_base(tiny_base, labels=LOCATIONS, num_mem_tokens=2,
                                                              segment_size=32)
    model.save_pretrained(tmp_path / "ckpt")
    out = tmp_path / "probe.json"
    probe.main([str(tmp_path / "ckpt"), "--segments", "3", "--samples", "60", "--dtype", "float32",
                "--json", str(out)])
    got = json.loads(out.read_text())
    data = BabiQA("reasoning", model.tokenizer, 32)
    carried = [p for p in data.plans("valid", 3, range(60)) if max(p.fact_starts) // 32 < 2]
    assert got["carried_stories"] == len(carried) >= 10
    _, logits = probe.read(model.eval(), data, carried, torch.float32)
    pred = logits.argmax(-1)
    labels = torch.tensor([p.story.label for p in carried])
    twins = torch.tensor([other_question(p.story).label for p in carried])
    assert got["story_question_accuracy"] == pytest.approx((pred[:, 0] == labels).float().mean().item())
    assert got["both_questions"] == probe.both_questions(pred[:, 0], pred[:, 1], labels, twins)
    assert set(got["probes"]) == {f"{age} fact's {what}" for age in ("older", "newer")
                                  for what in ("place", "direction", "direction word")} | {
        "anchor", "place the answer named", "place the answer did not name"}
    assert all(0 <= r["test_accuracy"] <= 1 for r in got["probes"].values())
