"""Triton kernels for ``rmt_fast.memory_attention`` (installed as ``rmt_fast.kernels``).

Layering (as in Liger-Kernel): ``memory_attention_fwd`` / ``memory_attention_bwd`` / ``decode``
hold the ``@triton.jit`` kernels, ``launch`` allocates and launches, ``function`` wires autograd
and the ``rmt_fast::triton_memory_attention`` custom op. On CPU tensors the kernels run under
the Triton interpreter (``TRITON_INTERPRET=1``).
"""

from __future__ import annotations

import os
import sys

import torch


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
    *,
    num_read: int = 0,
    num_write: int = 0,
    mask: str = "causal",
    past_k: torch.Tensor | None = None,
    past_v: torch.Tensor | None = None,
    past_visible_to_read: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    scale: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton memory attention; inputs as in :func:`rmt_fast.memory_attention` (validated there).

    q ``[B, Hq, L, D]``, k/v ``[B, Hkv, L, D]``, past_k/past_v ``[B, Hkv, P, D]``,
    key_padding_mask bool ``[B, P + L]``. Returns ``(out [B, Hq, L, D], lse [B, Hq, L] float32)``;
    differentiable in q, k, v, past_k, past_v (lse is not).
    """
    _ensure_interpreter(q.device)
    from .function import apply

    scale = float(q.shape[-1] ** -0.5 if scale is None else scale)
    return apply(q, k, v, num_read=num_read, num_write=num_write, mask=mask, past_k=past_k,
                 past_v=past_v, past_visible_to_read=past_visible_to_read,
                 key_padding_mask=key_padding_mask, scale=scale)


__all__ = ["triton_memory_attention"]
