"""Triton kernels for :func:`rmt_fast.memory_attention` (``backend="triton"``).

Layering (as in Liger-Kernel): ``fwd`` / ``bwd`` / ``decode`` (with ``common``)
hold the ``@triton.jit`` kernels, ``launch`` allocates and launches, ``function`` wires autograd
and the ``rmt_fast::triton_memory_attention`` custom op. On CPU tensors the kernels run under
the Triton interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os
import sys

import torch

from rmt_fast.masks import AttentionLayout, layout_from


def _ensure_interpreter(device: torch.device) -> None:
    """CPU tensors need the interpreter, which Triton reads when it is first imported."""
    if device.type == "cuda":
        return
    if "triton" not in sys.modules:
        os.environ["TRITON_INTERPRET"] = "1"
        return
    if os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            "rmt_fast triton backend on CPU tensors needs the Triton interpreter, but triton was "
            "already imported without it: set TRITON_INTERPRET=1 before importing triton (or "
            "use backend='torch' on CPU)")


def triton_memory_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    layout: AttentionLayout | None = None,
    *,
    past_k: torch.Tensor | None = None,
    past_v: torch.Tensor | None = None,
    key_padding_mask: torch.Tensor | None = None,
    **layout_fields,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton memory attention; inputs as in :func:`rmt_fast.memory_attention` (validated there).

    q ``[B, Hq, L, D]``, k/v ``[B, Hkv, L, D]``, past_k/past_v ``[B, Hkv, P, D]``,
    key_padding_mask bool ``[B, P + L]``; ``layout`` an :class:`AttentionLayout` or its fields as
    keywords. Returns ``(out [B, Hq, L, D], lse [B, Hq, L] float32)``; differentiable in q, k, v,
    past_k, past_v (lse is not).
    """
    _ensure_interpreter(q.device)
    from .function import apply

    layout = layout_from(layout, layout_fields).with_head_dim(q.shape[-1])
    return apply(q, k, v, past_k, past_v, key_padding_mask, layout)


__all__ = ["triton_memory_attention"]
