"""Swap unfused activation modules of transformers models for fused PyTorch equivalents.

GPT-2's ``gelu_new`` (``NewGELUActivation``) computes the tanh approximation with five separate
element-wise kernels; ``nn.GELU(approximate="tanh")`` is the same function in one fused kernel.
"""

from __future__ import annotations

from torch import nn


def fuse_activations(model: nn.Module) -> int:
    """Replace ``NewGELUActivation`` (and the identical ``GELUTanh`` variants) in place.

    Returns the number of modules replaced. Outputs agree to float rounding.
    """
    try:
        from transformers.activations import NewGELUActivation
    except ImportError:
        return 0
    replaced = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is NewGELUActivation:
                setattr(parent, name, nn.GELU(approximate="tanh"))
                replaced += 1
    return replaced
