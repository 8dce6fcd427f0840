"""Needle evaluation and the demo on a tiny randomly initialised checkpoint."""

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from rmt_fast import demo
from rmt_fast.models import RMTForCausalLM
from rmt_fast.tasks.babilong import default_vocab
from rmt_fast.tasks.length_eval import answer, length_accuracy, load, story_batch


def tiny_needle_model(tmp_path):
    vocab = default_vocab()
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=len(vocab), n_positions=48, n_embd=32, n_layer=1,
                                      n_head=2, bos_token_id=0, eos_token_id=0))
    model = RMTForCausalLM(base, num_mem_tokens=4, segment_size=32, mask="rmt").eval()
    model.save_pretrained(tmp_path)
    vocab.save(tmp_path)
    return model, vocab


def test_needle_batch_layout():
    vocab = default_vocab()
    stories = story_batch("needle", 5, 32, 4, vocab, seed=3)
    assert stories.shape == (4, 160)
    for row in stories.tolist():
        words = vocab.decode(row, skip_pad=False).split()
        assert words[-6:-1] == ["what", "is", "the", "key", "?"]
        first = vocab.decode(row[:64]).split()  # the fact ends within 32 words of the story,
        at = first.index("key")                  # which starts after up to a sentence of padding
        assert first[at - 1: at + 2] == ["the", "key", "is"] and first[at + 2] == words[-1]
    assert torch.equal(stories, story_batch("needle", 5, 32, 4, vocab, seed=3))


def test_answer_equals_the_full_forward_prediction(tmp_path):
    model, vocab = tiny_needle_model(tmp_path)
    stories = story_batch("needle", 4, 32, 3, vocab, seed=1)
    with torch.no_grad():
        logits = model(stories[:, :-1]).logits  # 127 tokens: the last segment is 31 long
    assert torch.equal(answer(model, stories), logits[:, -1].argmax(-1))
    row = length_accuracy(model, vocab, 4, samples=5, batch_size=2, task="needle")
    assert row["samples"] == 5 and 0.0 <= row["accuracy"] <= 1.0 and row["tokens"] == 128


def test_demo_runs_on_a_checkpoint(tmp_path, capsys):
    tiny_needle_model(tmp_path)
    result = demo.main(["--model", "needle", "--checkpoint", str(tmp_path), "--tokens", "640",
                        "--haystacks", "2", "--no-progress"])
    out = capsys.readouterr().out
    assert "accuracy:" in out and "tokens/s" in out and "peak RSS" in out
    assert result["tokens"] == 640 and result["haystacks"] == 2
    assert 0.0 <= result["accuracy"] <= 1.0


def test_shipped_checkpoint_finds_the_needle():
    """The packaged checkpoint (the demo's) on fresh 256-segment stories (8,192 tokens, 4x its
    longest training length); docs/results.md has the curve up to 131,072 tokens."""
    model, vocab = load(demo.NEEDLE_CHECKPOINT)
    assert not model.training and sum(p.numel() for p in model.parameters()) < 5_000_000
    row = length_accuracy(model, vocab, 256, samples=16, batch_size=16, seed=99, task="needle")
    assert row["accuracy"] >= 0.9, row
