"""Batching for RMTs: :class:`RMTDataCollator` (a ``data_collator`` for ``transformers.Trainer``
and ``torch.utils.data.DataLoader``).

An RMT cuts each row into segments of ``segment_size`` tokens; padding a batch to whole
segments keeps every row's segments aligned, so rows of different lengths share segment
boundaries and a padded segment is empty for the rows it pads (their memory passes through it
unchanged).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

PADDING_SIDES = ("right", "left")


class RMTDataCollator:
    """Pads a list of examples into a batch of whole segments.

    Each example is a mapping with ``input_ids`` (a list or 1-D tensor of token ids) and
    optionally ``attention_mask`` (same length, 1 = real token), ``labels`` (token-level, same
    length, ``-100`` = ignore; or one class id per example for sequence classification) and
    ``labels_mask`` (same length, True = this position predicts). Returns tensors
    ``input_ids [B, T]``, ``attention_mask [B, T]`` and the others when present, with ``T`` the
    longest example rounded up to a multiple of ``segment_size`` (``pad_to_segments=True``).

    Args:
        segment_size: tokens per segment of the model (its ``rmt_config.segment_size``).
        pad_token_id: id written at padded positions (masked out by ``attention_mask``).
        padding_side: ``"right"`` (decoders, left-aligned segments) or ``"left"`` (encoders with
            right-aligned segments, where the question sits in the last segment).
        pad_to_segments: round ``T`` up to whole segments (else to the longest example).
        max_length: refuse examples longer than this (None: no limit).
    """

    def __init__(self, segment_size: int, pad_token_id: int = 0, padding_side: str = "right",
                 pad_to_segments: bool = True, max_length: int | None = None):
        if isinstance(segment_size, bool) or not isinstance(segment_size, int) or segment_size < 1:
            raise ValueError(f"segment_size must be an int >= 1, got {segment_size!r}")
        if isinstance(pad_token_id, bool) or not isinstance(pad_token_id, int) or pad_token_id < 0:
            raise ValueError(f"pad_token_id must be a token id (int >= 0), got {pad_token_id!r}")
        if padding_side not in PADDING_SIDES:
            raise ValueError(f"padding_side must be one of {PADDING_SIDES}, got {padding_side!r}")
        self.segment_size, self.pad_token_id = segment_size, pad_token_id
        self.padding_side, self.pad_to_segments, self.max_length = padding_side, pad_to_segments, max_length

    @classmethod
    def for_model(cls, model, **kwargs) -> RMTDataCollator:
        """A collator matching ``model`` (an rmt_fast wrapper): its segment size, left padding for
        right-aligned segments, and the base model's pad token when it has one."""
        cfg = model.rmt_config
        pad = getattr(model.base.config, "pad_token_id", None)
        kwargs.setdefault("padding_side", "left" if cfg.segment_alignment == "right" else "right")
        kwargs.setdefault("pad_token_id", pad if isinstance(pad, int) else 0)
        return cls(cfg.segment_size, **kwargs)

    def _row(self, value: Any, name: str, index: int) -> torch.Tensor:
        t = torch.as_tensor(value)
        if t.dim() != 1:
            raise ValueError(f"example {index}: {name} must be a 1-D sequence, got shape {list(t.shape)}")
        return t

    def __call__(self, examples: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        if not examples:
            raise ValueError("RMTDataCollator: got an empty list of examples")
        rows = []
        for i, ex in enumerate(examples):
            if not isinstance(ex, Mapping) or "input_ids" not in ex:
                raise ValueError(f"example {i} must be a mapping with 'input_ids', got "
                                 f"{type(ex).__name__}")
            ids = self._row(ex["input_ids"], "input_ids", i)
            if ids.dtype.is_floating_point or ids.dtype == torch.bool:
                raise ValueError(f"example {i}: input_ids must be integer token ids, got {ids.dtype}")
            if len(ids) == 0:
                raise ValueError(f"example {i}: input_ids is empty")
            if self.max_length is not None and len(ids) > self.max_length:
                raise ValueError(f"example {i}: {len(ids)} tokens > max_length {self.max_length}")
            row = {"input_ids": ids.long()}
            for name in ("attention_mask", "labels", "labels_mask"):
                if name not in ex or ex[name] is None:
                    continue
                value = torch.as_tensor(ex[name])
                if name == "labels" and value.dim() == 0:  # one class id per example
                    row[name] = value.long()
                    continue
                value = self._row(value, name, i)
                if len(value) != len(ids):
                    raise ValueError(f"example {i}: {name} has {len(value)} entries, input_ids "
                                     f"{len(ids)}")
                row[name] = value
            rows.append(row)
        keys = set(rows[0])
        for i, row in enumerate(rows):
            if set(row) != keys:
                raise ValueError(f"example {i} has fields {sorted(row)}, example 0 {sorted(keys)}")
        longest = max(len(r["input_ids"]) for r in rows)
        size = self.segment_size
        length = -(-longest // size) * size if self.pad_to_segments else longest
        fill = {"input_ids": self.pad_token_id, "attention_mask": 0, "labels": -100, "labels_mask": False}
        dtype = {"input_ids": torch.long, "attention_mask": torch.long, "labels": torch.long,
                 "labels_mask": torch.bool}
        batch = {}
        for name in sorted(keys):
            if name == "labels" and rows[0]["labels"].dim() == 0:
                batch[name] = torch.stack([r["labels"] for r in rows])
                continue
            out = torch.full((len(rows), length), fill[name], dtype=dtype[name])
            for i, r in enumerate(rows):
                n = len(r[name])
                where = slice(0, n) if self.padding_side == "right" else slice(length - n, length)
                out[i, where] = r[name].to(dtype[name])
            batch[name] = out
        if "attention_mask" not in batch:
            mask = torch.zeros(len(rows), length, dtype=torch.long)
            for i, r in enumerate(rows):
                n = len(r["input_ids"])
                mask[i, slice(0, n) if self.padding_side == "right" else slice(length - n, length)] = 1
            batch["attention_mask"] = mask
        return batch
