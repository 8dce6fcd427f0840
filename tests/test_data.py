"""RMTDataCollator: whole segments, both padding sides, class labels, clear errors."""

from __future__ import annotations

import pytest
import torch

from rmt_fast.data import RMTDataCollator


def test_pads_to_whole_segments_on_the_right():
    coll = RMTDataCollator(segment_size=4, pad_token_id=9)
    batch = coll([{"input_ids": [1, 2, 3, 4, 5], "labels": [1, 2, 3, 4, 5], "labels_mask": [0, 0, 1, 1, 1]},
                  {"input_ids": torch.tensor([6, 7]), "labels": [6, 7], "labels_mask": [1, 1]}])
    assert batch["input_ids"].tolist() == [[1, 2, 3, 4, 5, 9, 9, 9], [6, 7, 9, 9, 9, 9, 9, 9]]
    assert batch["attention_mask"].tolist() == [[1] * 5 + [0] * 3, [1, 1] + [0] * 6]
    assert batch["labels"].tolist() == [[1, 2, 3, 4, 5] + [-100] * 3, [6, 7] + [-100] * 6]
    assert batch["labels_mask"].dtype == torch.bool
    assert batch["labels_mask"].tolist()[1] == [True, True] + [False] * 6


def test_left_padding_and_class_labels():
    coll = RMTDataCollator(segment_size=3, padding_side="left")
    batch = coll([{"input_ids": [5, 6, 7, 8], "labels": 2}, {"input_ids": [1], "labels": 0}])
    assert batch["input_ids"].tolist() == [[0, 0, 5, 6, 7, 8], [0, 0, 0, 0, 0, 1]]
    assert batch["attention_mask"].tolist() == [[0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 0, 1]]
    assert batch["labels"].tolist() == [2, 0]


def test_for_model_takes_the_model_settings():
    from models import tiny_gpt2

    import rmt_fast

    model = rmt_fast.RMTForCausalLM(tiny_gpt2(), num_mem_tokens=2, segment_size=8,
                                    segment_alignment="right")
    coll = RMTDataCollator.for_model(model)
    assert (coll.segment_size, coll.padding_side) == (8, "left")
    out = model(**coll([{"input_ids": [3, 4, 5], "labels": [3, 4, 5]}, {"input_ids": list(range(1, 12)),
                                                                         "labels": list(range(1, 12))}]))
    assert out.logits.shape[:2] == (2, 16) and torch.isfinite(out.loss)


@pytest.mark.parametrize("examples, match", [
    ([], "empty list"),
    ([{"labels": [1]}], "'input_ids'"),
    ([{"input_ids": [[1, 2]]}], "1-D sequence"),
    ([{"input_ids": [1.5, 2.0]}], "integer token ids"),
    ([{"input_ids": [1, 2], "labels": [1]}], "labels has 1 entries, input_ids 2"),
    ([{"input_ids": [1], "labels": [1]}, {"input_ids": [2]}], "fields"),
])
def test_bad_examples_are_named(examples, match):
    with pytest.raises(ValueError, match=match):
        RMTDataCollator(segment_size=4)(examples)


def test_bad_settings():
    with pytest.raises(ValueError, match="segment_size"):
        RMTDataCollator(segment_size=0)
    with pytest.raises(ValueError, match="padding_side"):
        RMTDataCollator(segment_size=2, padding_side="middle")
