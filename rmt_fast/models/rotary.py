"""Moving rotary-embedded keys to other positions (the Transformer-XL cache of rotary models).

A Transformer-XL cache holds keys computed in an earlier segment. With rotary position
embeddings (Llama, Mistral, Qwen, GPT-NeoX, ...) a key ``k`` at position ``p`` is ``R(p) k``,
and ``R(p + delta) k = R(delta) R(p) k``: cached keys can be moved to the positions they have
relative to the next segment by one more rotation, so attention sees the true distances (what
Transformer-XL's relative positions give). Models with absolute position embeddings (GPT-2)
have no such move: their cached keys keep the positions of their own segment.

Written here because transformers applies rotary embeddings only inside its attention modules,
to fresh positions; it offers no re-rotation of already-rotated keys.
"""

from __future__ import annotations

import torch
from torch import nn


def find_rotary(model: nn.Module) -> nn.Module | None:
    """The model's rotary-embedding module (transformers' ``*RotaryEmbedding`` with an
    ``inv_freq`` buffer, the ``rotate_half`` convention), or None for models without one.
    Raises if the model has several with different frequencies (e.g. local/global layers)."""
    found = [m for m in model.modules()
             if type(m).__name__.endswith("RotaryEmbedding") and isinstance(getattr(m, "inv_freq", None),
                                                                           torch.Tensor)]
    if not found:
        return None
    first = found[0]
    for other in found[1:]:
        if other.inv_freq.shape != first.inv_freq.shape or not torch.equal(other.inv_freq, first.inv_freq):
            raise NotImplementedError(
                f"{type(model).__name__} has rotary embeddings with different frequencies per layer; "
                "moving cached keys is implemented for one set of frequencies only")
    return first


def shift_keys(keys: torch.Tensor, delta: torch.Tensor, rotary: nn.Module) -> torch.Tensor:
    """``keys`` ``[B, H, P, D]`` rotated at some positions -> the same keys ``delta`` positions
    further (``delta`` ``[B]`` int, may be negative), computed in float32, returned in
    ``keys.dtype``. A partial rotary (``2 * len(inv_freq) < D``, GPT-NeoX) rotates the first
    ``2 * len(inv_freq)`` features and leaves the rest, as transformers does."""
    inv_freq = rotary.inv_freq.to(device=keys.device, dtype=torch.float32)
    rot = 2 * inv_freq.numel()
    if rot > keys.shape[-1]:
        raise ValueError(f"rotary dim {rot} exceeds the key dim {keys.shape[-1]}")
    if delta.shape != (keys.shape[0],):
        raise ValueError(f"delta must have shape [{keys.shape[0]}] (one shift per row), "
                         f"got {list(delta.shape)}")
    angle = delta.to(device=keys.device, dtype=torch.float32)[:, None] * inv_freq  # [B, rot/2]
    angle = torch.cat([angle, angle], dim=-1)[:, None, None, :]                       # [B,1,1,rot]
    cos, sin = angle.cos(), angle.sin()
    k = keys[..., :rot].float()
    half = rot // 2
    rotated = torch.cat([-k[..., half:], k[..., :half]], dim=-1)
    moved = (k * cos + rotated * sin).to(keys.dtype)
    return torch.cat([moved, keys[..., rot:]], dim=-1) if rot < keys.shape[-1] else moved
