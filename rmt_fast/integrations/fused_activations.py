"""Swap a base model's tanh-approximation GELU and LayerNorm modules for the extension's kernels.

GPT-2's ``gelu_new`` (``NewGELUActivation``) computes the tanh approximation with five separate
element-wise kernels, and ATen's fused ``F.gelu(approximate="tanh")`` is itself about 5x slower
than the erf GELU on CPU; :class:`TanhGELU` runs the extension's one-pass kernel instead
(:func:`rmt_fast._extension.gelu_tanh`). ATen's CPU LayerNorm is slow in bfloat16 (0.5 ns an
element); :class:`FastLayerNorm` runs :func:`rmt_fast._extension.layer_norm`. Same functions,
outputs equal to float rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from rmt_fast._extension import gelu_tanh, layer_norm


class TanhGELU(nn.Module):
    """GELU, tanh approximation: ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``, any shape,
    differentiable. float32 and bfloat16 CPU inputs use the extension's kernel; the rest
    ``F.gelu``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gelu_tanh(x)


def fuse_activations(model: nn.Module) -> int:
    """Replace ``NewGELUActivation`` and ``GELUTanh`` (``gelu_pytorch_tanh``) modules in place by
    :class:`TanhGELU`. Returns the number of modules replaced."""
    try:
        from transformers import activations
    except ImportError:
        return 0
    names = ("NewGELUActivation", "GELUTanh")
    types = tuple(getattr(activations, n) for n in names if hasattr(activations, n))
    replaced = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) in types:
                setattr(parent, name, TanhGELU())
                replaced += 1
    return replaced


class FastLayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` whose forward is :func:`rmt_fast._extension.layer_norm` (the extension's
    kernel for float32/bfloat16 CPU inputs, ``F.layer_norm`` otherwise and while
    ``torch.compile`` traces, so that the compiler fuses it as it would). Parameters, state-dict
    keys and ``isinstance(m, nn.LayerNorm)`` are unchanged; :func:`fuse_layer_norms` swaps it
    in."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if torch.compiler.is_compiling():
            return super().forward(x)
        return layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


def fuse_layer_norms(model: nn.Module) -> int:
    """Swap the class of every ``nn.LayerNorm`` in ``model`` (exactly that type, not subclasses)
    to :class:`FastLayerNorm`, in place. Returns the number of modules swapped."""
    swapped = 0
    for m in model.modules():
        if type(m) is nn.LayerNorm:
            m.__class__ = FastLayerNorm
            swapped += 1
    return swapped
