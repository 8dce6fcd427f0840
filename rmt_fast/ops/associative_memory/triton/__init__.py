"""Triton kernels of the associative memory (``backend="triton"``).

Layering as in :mod:`rmt_fast.ops.memory_attention.triton`: ``kernels`` holds the ``@triton.jit``
functions, ``launch`` allocates and launches them with the same signatures as
:mod:`rmt_fast.ops.associative_memory.chunked`, ``aot`` compiles them ahead of time for
sm_80/sm_90. On CPU tensors the kernels run under the Triton interpreter (``TRITON_INTERPRET=1``),
which must be set before Triton is first imported; this package therefore imports ``launch``
(and Triton) only when a primitive is first used.
"""

from __future__ import annotations

import importlib

import torch

from rmt_fast.ops.memory_attention.triton import _ensure_interpreter

_PRIMITIVES = ("phi_matmul", "phi_outer", "phi_grad", "rowdot", "feature_norm")


def ensure_interpreter(device: torch.device) -> None:
    """CPU tensors need the interpreter; raise a clear error when Triton was imported without it."""
    _ensure_interpreter(device)


def __getattr__(name: str):
    if name in _PRIMITIVES:
        return getattr(importlib.import_module(f"{__name__}.launch"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ensure_interpreter", *_PRIMITIVES]
