"""Swap transformers' tanh-approximation GELU modules for one fast kernel.

GPT-2's ``gelu_new`` (``NewGELUActivation``) computes the tanh approximation with five separate
element-wise kernels, and ATen's fused ``F.gelu(approximate="tanh")`` is itself about 5x slower
than the erf GELU on CPU; :class:`TanhGELU` runs the extension's one-pass kernel instead
(:func:`rmt_fast._extension.gelu_tanh`). Same function, outputs equal to float rounding.
"""

from __future__ import annotations

import torch
from torch import nn

from rmt_fast._extension import gelu_tanh


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
