"""Cutting a sequence into segments."""

from __future__ import annotations

import math

import torch


def segment_bounds(length: int, segment_size: int, alignment: str = "left") -> list[tuple[int, int]]:
    """``[(start, end), ...]`` covering ``range(length)``.

    ``left``: fixed chunks from the start (the last may be short); ``right``: fixed chunks from the
    end (the first may be short); ``center``: ``ceil(length / segment_size)`` near-equal chunks
    as ``torch.chunk`` makes them.
    """
    if length <= 0:
        return []
    if alignment == "left":
        starts = list(range(0, length, segment_size))
        return [(s, min(s + segment_size, length)) for s in starts]
    if alignment == "right":
        ends = list(range(length, 0, -segment_size))[::-1]
        return [(max(e - segment_size, 0), e) for e in ends]
    if alignment == "center":
        n = math.ceil(length / segment_size)
        chunk = math.ceil(length / n)  # torch.chunk's rule
        return [(s, min(s + chunk, length)) for s in range(0, length, chunk)]
    raise ValueError(f"alignment must be 'left', 'right' or 'center', got {alignment!r}")


def next_token_targets(labels: torch.Tensor, labels_mask: torch.Tensor | None = None) -> torch.Tensor:
    """``[B, T]`` targets of a causal LM under the official RMT semantics: position ``p``
    predicts ``labels[:, p + 1]`` (-100 at the last position), kept where ``labels_mask[:, p]``
    (``[B, T]``, bool or 0/1) is set when given, -100 elsewhere."""
    targets = torch.full_like(labels, -100)
    targets[:, :-1] = labels[:, 1:]
    if labels_mask is not None:
        targets = targets.masked_fill(~labels_mask.to(torch.bool), -100)
    return targets
