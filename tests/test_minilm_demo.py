"""The shipped MiniLM bAbI checkpoint (the demo's model) and the demo's minilm path."""

import os

import pytest
import torch

from rmt_fast import demo
from rmt_fast.models.lora import LoRARMTEncoderForSequenceClassification
from rmt_fast.tasks.babi_eval import evaluate_length
from rmt_fast.tasks.babi_qa import BabiQA

SHIPPED = demo.minilm_checkpoint("memorize")
# fresh test-split stories: the demo's default seed starts at 2026, these start past it
FIRST = 5000


@pytest.fixture(scope="module")
def shipped():
    torch.set_num_threads(max(1, torch.get_num_threads()))
    return LoRARMTEncoderForSequenceClassification.from_pretrained(SHIPPED)


def test_shipped_checkpoint_is_small_and_loads_in_eval_mode(shipped):
    size = sum(os.path.getsize(os.path.join(SHIPPED, f)) for f in os.listdir(SHIPPED))
    assert size < 5 * 2**20, size
    assert not shipped.training and shipped.rmt_config.segment_size == 128


def test_shipped_checkpoint_answers_from_memory(shipped):
    """64 segments (8,192 tokens, twice the longest training length) on freshly generated test
    stories: the fact is only in the first segment, so the last segment alone is at chance (6
    rooms) and the model must carry the fact in its memory; docs/minilm_babi.md has the curve to
    1,000,000 tokens."""
    data = BabiQA("memorize", shipped.tokenizer, shipped.rmt_config.segment_size)
    row = evaluate_length(shipped, data, 64, 16, batch_size=16, first=FIRST)
    assert row["accuracy"] >= 0.9, row
    assert row["no_memory_accuracy"] <= 0.5, row


def test_minilm_demo_prints_the_story_and_the_answer(capsys):
    result = demo.main(["--tokens", "600", "--haystacks", "2", "--no-progress", "--dtype", "float32"])
    out = capsys.readouterr().out
    assert "haystack 1: facts" in out and "(true: " in out and "accuracy:" in out
    assert result["tokens"] == 640 and result["haystacks"] == 2  # 600 rounds up to 5 segments
    assert len(result["predicted"]) == len(result["truth"]) == 2
    hits = sum(p == t for p, t in zip(result["predicted"], result["truth"], strict=True))
    assert result["accuracy"] == hits / 2


def test_minilm_demo_reads_one_haystack_by_default_in_float32(capsys):
    result = demo.main(["--tokens", "200", "--no-progress", "--dtype", "float32"])
    assert result["haystacks"] == 1 and result["dtype"] == "float32" and len(result["predicted"]) == 1
    assert demo.minilm_haystacks(torch.bfloat16) == 2
