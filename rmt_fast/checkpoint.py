"""Segment-level gradient checkpointing for any recurrent-memory step function (RMT BPTT).

A recurrent-memory model runs ``N`` segments in order; segment ``t`` maps the memory entering it
(``[B, M, d]``) and its inputs to a loss and the memory entering segment ``t + 1``. Training
backpropagates through time (BPTT) over the segments, optionally truncated to the last ``k``.

:func:`segment_bptt` is that loop for a step written as
``step_fn(memory, segment_inputs, t) -> (loss_t, new_memory, aux)``. It is a thin front of the
one segment loop the models use, :func:`rmt_fast.models.segment_loop.run_segments`:

* ``checkpoint=False``: the plain loop; autograd keeps every segment's activations (memory grows
  linearly with ``N``).
* ``checkpoint=True``: each segment runs under ``torch.utils.checkpoint.checkpoint(...,
  use_reentrant=False)``. Between forward and backward only the segment inputs are kept, the
  memory states in a :class:`rmt_fast._extension.MemoryStore` (the C++ store when the extension is
  loaded, a dict otherwise; optionally offloaded to the host), plus the RNG state, so dropout is
  replayed exactly when autograd recomputes segment ``t`` in backward. Peak memory is one
  segment's activations plus ``N`` memory states. Being PyTorch's own checkpoint,
  ``loss.backward()``, ``torch.autograd.grad(loss, params)`` and ``backward(inputs=...)`` all work.

Truncated BPTT (``bptt_depth=k``): the memory entering segment ``t`` is detached when
``t < N - k``, so gradients flow through the memory only across the last ``k`` segments (``k = -1``:
full BPTT; ``k = 0``: never through memory). This is what the official RMT ``RecurrentWrapper``
means to do with ``k2``; its ``manage_gradients`` detaches a local copy and never returns it, so
there it is a no-op (and it also never cuts the memory leaving segment 0, and counts ``k2`` from
``max_n_segments``); here the cut is applied.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch

from rmt_fast._extension import MemoryStore
from rmt_fast.models.segment_loop import is_cut, run_segments

__all__ = ["BPTTResult", "is_cut", "segment_bptt"]

StepFn = Callable[[torch.Tensor, Any, int], tuple[torch.Tensor | None, torch.Tensor, Any]]
REDUCTIONS = ("sum", "mean")


class BPTTResult(NamedTuple):
    """What :func:`segment_bptt` returns.

    Attributes:
        loss: scalar tensor, the sum (or mean) of the per-segment losses, differentiable; None
            when no segment returned a loss.
        memory: ``[B, M, d]`` memory leaving the last segment, differentiable.
        aux: list of the ``N`` per-segment ``aux`` values returned by ``step_fn``.
        kept_bytes: bytes of the memory states the store held after the forward
            (``checkpoint=True``); 0 for the plain loop.
        store: the store of those states (None for the plain loop); backward empties it.
    """

    loss: torch.Tensor | None
    memory: torch.Tensor
    aux: list[Any]
    kept_bytes: int
    store: MemoryStore | None = None


def _call_step(step_fn: StepFn, memory: torch.Tensor, seg: Any, t: int):
    out = step_fn(memory, seg, t)
    if not isinstance(out, tuple) or len(out) != 3:
        raise TypeError(f"step_fn must return (loss or None, new_memory, aux); segment {t} "
                        f"returned {type(out).__name__}")
    loss, new_memory, aux = out
    if loss is not None and (not isinstance(loss, torch.Tensor) or loss.dim() != 0):
        raise ValueError(f"step_fn: the loss of segment {t} must be a scalar tensor or None, got "
                         f"{getattr(loss, 'shape', type(loss).__name__)}")
    if not isinstance(new_memory, torch.Tensor):
        raise TypeError(f"step_fn: the new memory of segment {t} must be a tensor, got "
                        f"{type(new_memory).__name__}")
    return loss, new_memory, aux


def segment_bptt(
    step_fn: StepFn,
    memory: torch.Tensor,
    segments: Sequence[Any],
    *,
    bptt_depth: int = -1,
    checkpoint: bool = True,
    store: MemoryStore | None = None,
    offload: bool = False,
    reduction: str = "sum",
    preserve_rng_state: bool = True,
) -> BPTTResult:
    """Run ``step_fn`` over ``segments`` with (optionally checkpointed, truncated) BPTT.

    Args:
        step_fn: ``step_fn(memory [B, M, d], segment_inputs, t) -> (loss_t, new_memory, aux)``
            where ``segment_inputs`` is ``segments[t]`` (any object: tensors in it that require
            grad get gradients in both modes), ``loss_t`` a scalar tensor or None (e.g. only the
            last segment has a loss), ``new_memory`` ``[B, M, d]`` the memory entering segment
            ``t + 1`` and ``aux`` anything (e.g. logits). With ``checkpoint=True`` it is called
            twice per segment (forward, then the recomputation in backward) and must be
            deterministic given the RNG state.
        memory: ``[B, M, d]`` initial memory; may require grad (e.g. a learned
            ``nn.Parameter`` expanded over the batch).
        segments: the ``N >= 1`` per-segment inputs.
        bptt_depth: ``k``; the memory entering segment ``t`` is detached when ``t < N - k``.
            ``-1``: full BPTT.
        checkpoint: keep only the segment inputs and recompute segments in backward. Ignored
            (plain loop) when grad mode is off.
        store: where the memory states go with ``checkpoint=True`` (backward empties it);
            default a new ``MemoryStore(offload=offload)`` (offloading accelerator states).
        offload: with the default store, keep accelerator states on the host (pinned, prefetched
            in reverse order in backward); CPU states stay in place.
        reduction: ``"sum"`` (default) or ``"mean"`` of the per-segment losses that are not None.
        preserve_rng_state: restore the RNG state when recomputing (dropout replayed exactly).

    Returns:
        :class:`BPTTResult`.
    """
    if not isinstance(bptt_depth, int) or bptt_depth < -1:
        raise ValueError(f"bptt_depth must be -1 (full BPTT) or >= 0, got {bptt_depth}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(memory, torch.Tensor) or memory.dim() != 3:
        raise ValueError(f"memory must be a [B, M, d] tensor, got "
                         f"{getattr(memory, 'shape', type(memory).__name__)}")
    segments = list(segments)
    if not segments:
        raise ValueError("segments must hold at least one segment")

    def step(mem: torch.Tensor, seg: Any, t: int):
        loss, new_memory, aux = _call_step(step_fn, mem, seg, t)
        return new_memory, {"loss": loss, "aux": (aux,), "has_loss": None if loss is None else (t,)}

    res = run_segments(step, memory, segments, bptt_depth=bptt_depth, checkpoint=checkpoint,
                       offload=offload, store=store, preserve_rng_state=preserve_rng_state)
    aux = [a[0] for a in res.outputs.get("aux", [])]
    loss = res.loss
    if loss is not None and reduction == "mean":
        loss = loss / len(res.outputs["has_loss"])
    return BPTTResult(loss, res.state, aux, res.kept_bytes, res.store)
