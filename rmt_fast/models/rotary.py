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

import sys

import torch
from torch import nn


def inv_freq(rotary: nn.Module) -> torch.Tensor:
    """The rotary module's frequencies ``[rot / 2]``: its ``inv_freq`` buffer, or the
    ``<layer type>_inv_freq`` ones of a module serving several layer types (Gemma 3), which
    must then be equal."""
    freqs = [b for name, b in rotary.named_buffers(recurse=False)
             if (name == "inv_freq" or name.endswith("_inv_freq")) and "original" not in name]
    if not freqs and isinstance(getattr(rotary, "inv_freq", None), torch.Tensor):
        freqs = [rotary.inv_freq]
    if not freqs:
        raise NotImplementedError(f"{type(rotary).__name__} has no inv_freq buffer: moving cached "
                                  "keys is implemented for transformers' rotary embeddings only")
    for other in freqs[1:]:
        if other.shape != freqs[0].shape or not torch.equal(other, freqs[0]):
            raise NotImplementedError(
                f"{type(rotary).__name__} has different rotary frequencies per layer type; moving "
                "cached keys is implemented for one set of frequencies only")
    return freqs[0]


def find_rotary(model: nn.Module) -> nn.Module | None:
    """The model's rotary-embedding module (transformers' ``*RotaryEmbedding``), or None for
    models without one. Raises if the model has several with different frequencies (e.g.
    local/global layers) or one whose frequencies or pairing of features (:func:`interleaved`)
    cannot be read."""
    found = [m for m in model.modules() if type(m).__name__.endswith("RotaryEmbedding")]
    if not found:
        return None
    first = inv_freq(found[0])
    for other in found[1:]:
        freq = inv_freq(other)
        if freq.shape != first.shape or not torch.equal(freq, first):
            raise NotImplementedError(
                f"{type(model).__name__} has rotary embeddings with different frequencies per layer; "
                "moving cached keys is implemented for one set of frequencies only")
    interleaved(found[0])
    return found[0]


_PAIRING: dict[type, bool] = {}


def interleaved(rotary: nn.Module) -> bool:
    """Whether the model rotates feature pairs ``(2i, 2i + 1)`` (Cohere) rather than
    ``(i, i + rot / 2)`` (Llama's ``rotate_half``): read off the ``rotate_half`` of the modeling
    file that defines the rotary module, on a probe vector."""
    cls = type(rotary)
    if cls not in _PAIRING:
        fn = getattr(sys.modules.get(cls.__module__), "rotate_half", None)
        got = None if fn is None else fn(torch.arange(4.0)[None]).flatten().tolist()
        if got == [-2.0, -3.0, 0.0, 1.0]:
            _PAIRING[cls] = False
        elif got == [-1.0, 0.0, -3.0, 2.0]:
            _PAIRING[cls] = True
        else:
            raise NotImplementedError(
                f"cannot tell how {cls.__name__}'s model pairs features for its rotary embedding "
                f"(rotate_half in {cls.__module__}: {'missing' if fn is None else got}); moving "
                "cached keys is implemented for Llama's rotate_half and interleaved pairs")
    return _PAIRING[cls]


def shift_keys(keys: torch.Tensor, delta: torch.Tensor, rotary: nn.Module,
               pairs: bool | None = None) -> torch.Tensor:
    """``keys`` ``[B, H, P, D]`` rotated at some positions -> the same keys ``delta`` positions
    further (``delta`` ``[B]`` int, may be negative), computed in float32, returned in
    ``keys.dtype``. A partial rotary (``2 * len(inv_freq) < D``, GPT-NeoX) rotates the first
    ``2 * len(inv_freq)`` features and leaves the rest, as transformers does. ``pairs``:
    whether features pair as ``(2i, 2i + 1)``; None reads it off the model (:func:`interleaved`)."""
    freq = inv_freq(rotary).to(device=keys.device, dtype=torch.float32)
    pairs = interleaved(rotary) if pairs is None else pairs
    rot = 2 * freq.numel()
    if rot > keys.shape[-1]:
        raise ValueError(f"rotary dim {rot} exceeds the key dim {keys.shape[-1]}")
    if delta.shape != (keys.shape[0],):
        raise ValueError(f"delta must have shape [{keys.shape[0]}] (one shift per row), "
                         f"got {list(delta.shape)}")
    angle = delta.to(device=keys.device, dtype=torch.float32)[:, None] * freq  # [B, rot/2]
    k = keys[..., :rot].float()
    if pairs:  # (2i, 2i + 1) turn by angle i
        angle = angle.repeat_interleave(2, dim=-1)[:, None, None, :]
        rotated = torch.stack([-k[..., 1::2], k[..., ::2]], dim=-1).flatten(-2)
    else:  # (i, i + rot / 2) turn by angle i
        angle = torch.cat([angle, angle], dim=-1)[:, None, None, :]
        half = rot // 2
        rotated = torch.cat([-k[..., half:], k[..., :half]], dim=-1)
    moved = (k * angle.cos() + rotated * angle.sin()).to(keys.dtype)
    return torch.cat([moved, keys[..., rot:]], dim=-1) if rot < keys.shape[-1] else moved
