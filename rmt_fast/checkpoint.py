"""Segment-level gradient checkpointing for recurrent-memory models (RMT BPTT).

A recurrent-memory model runs ``N`` segments in order; segment ``t`` maps the memory entering it
(``[B, M, d]``) and its inputs to a loss and the memory entering segment ``t + 1``. Training
backpropagates through time (BPTT) over the segments, optionally truncated to the last ``k``.

:func:`segment_bptt` runs such a loop for any ``step_fn``:

* ``checkpoint=False``: the plain loop; autograd keeps every segment's activations (memory grows
  linearly with ``N``).
* ``checkpoint=True``: the forward runs under ``torch.no_grad()`` and keeps only the memory state
  entering each segment (in a :class:`rmt_fast._extension.MemoryStore`: the C++ store when the
  extension is loaded, a dict otherwise; optionally offloaded to the host) plus the RNG state.
  ``loss.backward()`` then walks the segments in reverse: segment ``t`` is recomputed from its
  stored memory with grad enabled and the same RNG state (dropout is replayed exactly), and ONE
  ``torch.autograd.backward([loss_t, new_memory], [grad_loss, grad_new_memory])`` call
  backpropagates its loss and the gradient arriving at its output memory together, accumulating
  parameter ``.grad`` and yielding the gradient of its input memory for segment ``t - 1``. Peak
  memory is one segment's activations plus ``N`` memory states.

Because parameter gradients are accumulated by the recomputation itself (like reentrant
``torch.utils.checkpoint``), the checkpointed loss supports ``loss.backward()`` but not
``torch.autograd.grad(loss, params)`` or ``backward(inputs=...)``; those raise a RuntimeError.

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
from torch.utils import _pytree as pytree

from rmt_fast._extension import MemoryStore

StepFn = Callable[[torch.Tensor, Any, int], tuple[torch.Tensor | None, torch.Tensor, Any]]
REDUCTIONS = ("sum", "mean")


class BPTTResult(NamedTuple):
    """What :func:`segment_bptt` returns.

    Attributes:
        loss: scalar tensor, the sum (or mean) of the per-segment losses, differentiable; None
            when no segment returned a loss.
        memory: ``[B, M, d]`` memory leaving the last segment. Differentiable in both modes (its
            gradient enters the last segment's backward).
        aux: list of the ``N`` per-segment ``aux`` values returned by ``step_fn``. With
            ``checkpoint=True`` (and grad enabled) they come from the no-grad forward: they carry
            no autograd graph.
        kept_bytes: bytes kept between forward and backward outside autograd's saved tensors
            (memory states + RNG states) by ``checkpoint=True``; 0 for the plain loop.
    """

    loss: torch.Tensor | None
    memory: torch.Tensor
    aux: list[Any]
    kept_bytes: int


def is_cut(t: int, num_segments: int, bptt_depth: int) -> bool:
    """Whether the memory entering segment ``t`` (of ``num_segments``) is detached."""
    return bptt_depth >= 0 and t < num_segments - bptt_depth


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


def _reduce(losses: list[torch.Tensor], reduction: str) -> torch.Tensor | None:
    if not losses:
        return None
    total = losses[0]
    for loss in losses[1:]:
        total = total + loss
    return total / len(losses) if reduction == "mean" else total


def _cuda_devices(memory: torch.Tensor, segments: Sequence[Any]) -> list[int]:
    devices = {memory.device.index} if memory.is_cuda else set()
    for seg in segments:
        for leaf in pytree.tree_leaves(seg):
            if isinstance(leaf, torch.Tensor) and leaf.is_cuda:
                devices.add(leaf.device.index)
    return sorted(d if d is not None else torch.cuda.current_device() for d in devices)


class _RngState:
    """CPU and CUDA RNG states (and autocast settings) entering one segment."""

    def __init__(self, cuda_devices: list[int]) -> None:
        self.devices = cuda_devices
        self.cpu = torch.get_rng_state()
        self.cuda = [torch.cuda.get_rng_state(d) for d in cuda_devices]

    @property
    def nbytes(self) -> int:
        return self.cpu.nbytes + sum(s.nbytes for s in self.cuda)

    def restore(self) -> None:
        torch.set_rng_state(self.cpu)
        for d, s in zip(self.devices, self.cuda, strict=True):
            torch.cuda.set_rng_state(s, d)


def _autocast_state() -> list[tuple[str, bool, torch.dtype]]:
    kinds = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    return [(k, torch.is_autocast_enabled(k), torch.get_autocast_dtype(k)) for k in kinds]


class _Engine:
    """State shared by the forward and backward of one checkpointed segment_bptt call."""

    def __init__(self, step_fn: StepFn, segments: Sequence[Any], bptt_depth: int,
                 store: MemoryStore, reduction: str, preserve_rng_state: bool) -> None:
        self.step_fn = step_fn
        self.segments = list(segments)
        self.n = len(self.segments)
        self.bptt_depth = bptt_depth
        self.store = store
        self.reduction = reduction
        self.preserve_rng_state = preserve_rng_state
        self.rng: list[_RngState | None] = []
        self.autocast = _autocast_state()
        # Per segment: (flat leaves, spec, positions of the leaves that require grad).
        self.flat = []
        for seg in self.segments:
            leaves, spec = pytree.tree_flatten(seg)
            grad_pos = [i for i, x in enumerate(leaves)
                        if isinstance(x, torch.Tensor) and x.requires_grad]
            self.flat.append((leaves, spec, grad_pos))
        self.memory_requires_grad = False
        self.aux: list[Any] = []
        self.num_losses = 0
        self.backward_done = False

    def grad_leaves(self) -> list[torch.Tensor]:
        return [leaves[i] for leaves, _, pos in self.flat for i in pos]

    def forward(self, memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        devices = _cuda_devices(memory, self.segments) if torch.cuda.is_available() else []
        self.store.clear()
        losses = []
        mem = memory.detach()
        for t, seg in enumerate(self.segments):
            self.store.put(t, mem)
            self.rng.append(_RngState(devices) if self.preserve_rng_state else None)
            loss, mem, aux = _call_step(self.step_fn, mem, seg, t)
            if loss is not None:
                losses.append(loss.detach())
            self.aux.append(aux)
        self.num_losses = len(losses)
        total = _reduce(losses, self.reduction)
        if total is None:
            total = torch.zeros((), dtype=memory.dtype, device=memory.device)
        return total, mem.detach()

    def kept_bytes(self) -> int:
        return self.store.nbytes() + sum(r.nbytes for r in self.rng if r is not None)

    def backward(self, grad_loss: torch.Tensor | None, grad_memory: torch.Tensor | None):
        if self.backward_done:
            raise RuntimeError("segment_bptt(checkpoint=True): backward ran a second time; the "
                               "stored memory states are consumed by the first backward "
                               "(retain_graph=True is not supported)")
        self.backward_done = True
        if grad_loss is not None and self.reduction == "mean" and self.num_losses:
            grad_loss = grad_loss / self.num_losses
        leaf_grads: list[list[torch.Tensor | None]] = [[None] * len(pos)
                                                       for _, _, pos in self.flat]
        grad_mem = grad_memory
        for t in range(self.n - 1, -1, -1):
            if t > 0 and self.store.offload:
                self.store.prefetch(t - 1)
            mem_in = self.store.pop(t).detach()
            need_mem_grad = not is_cut(t, self.n, self.bptt_depth) and (
                t > 0 or self.memory_requires_grad)
            mem_in.requires_grad_(need_mem_grad)
            leaves, spec, grad_pos = self.flat[t]
            leaves = list(leaves)
            inputs = []
            for i in grad_pos:
                leaves[i] = leaves[i].detach().requires_grad_(True)
                inputs.append(leaves[i])
            seg = pytree.tree_unflatten(leaves, spec)
            rng = self.rng[t]
            devices = rng.devices if rng is not None else []
            with torch.random.fork_rng(devices=devices, enabled=rng is not None):
                if rng is not None:
                    rng.restore()
                with torch.enable_grad(), _autocast(self.autocast):
                    loss, new_mem, _ = _call_step(self.step_fn, mem_in, seg, t)
            outputs, grads = [], []
            if loss is not None and loss.requires_grad and grad_loss is not None:
                outputs.append(loss)
                grads.append(grad_loss.to(loss.dtype))
            if grad_mem is not None and new_mem.requires_grad:
                outputs.append(new_mem)
                grads.append(grad_mem.to(new_mem.dtype))
            if outputs:
                torch.autograd.backward(outputs, grads)
            grad_mem = mem_in.grad if need_mem_grad else None
            leaf_grads[t] = [x.grad for x in inputs]
            self.rng[t] = None
        self.flat, self.segments = [], []
        return grad_mem, [g for per_seg in leaf_grads for g in per_seg]


class _autocast:
    """Re-enter the autocast settings captured at forward time."""

    def __init__(self, state: list[tuple[str, bool, torch.dtype]]) -> None:
        self.contexts = [torch.autocast(kind, dtype=dtype, enabled=enabled)
                         for kind, enabled, dtype in state]

    def __enter__(self) -> None:
        for c in self.contexts:
            c.__enter__()

    def __exit__(self, *exc) -> None:
        for c in reversed(self.contexts):
            c.__exit__(*exc)


class _SegmentBPTTFunction(torch.autograd.Function):
    """Inputs: (engine, memory [B, M, d], anchor, *segment leaves requiring grad).

    Outputs: (total loss (scalar), final memory [B, M, d]). ``anchor`` is an empty tensor that
    requires grad so the outputs always join the graph (parameters used by ``step_fn`` are not
    inputs: their gradients are accumulated by the recomputation in backward).
    """

    @staticmethod
    def forward(ctx, engine: _Engine, memory: torch.Tensor, anchor: torch.Tensor,
                *leaves: torch.Tensor):
        ctx.engine = engine
        ctx.set_materialize_grads(False)
        return engine.forward(memory)

    @staticmethod
    def backward(ctx, grad_loss, grad_memory):
        if not torch.autograd._is_checkpoint_valid():
            raise RuntimeError(
                "segment_bptt(checkpoint=True) accumulates parameter gradients into .grad while "
                "recomputing segments during backward, so it supports loss.backward() but not "
                "torch.autograd.grad(...) or backward(inputs=...). Use loss.backward(), or "
                "checkpoint=False.")
        grad_mem, leaf_grads = ctx.engine.backward(grad_loss, grad_memory)
        return (None, grad_mem, None, *leaf_grads)


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
            where ``segment_inputs`` is ``segments[t]`` (any pytree of tensors and constants),
            ``loss_t`` a scalar tensor or None (e.g. only the last segment has a loss),
            ``new_memory`` ``[B, M, d]`` the memory entering segment ``t + 1`` and ``aux``
            anything (e.g. logits). With ``checkpoint=True`` it is called twice per segment
            (forward, then recompute during backward) and must be deterministic given the RNG
            state; it must not depend on Python-side state changed between the calls.
        memory: ``[B, M, d]`` initial memory; may require grad (e.g. a learned
            ``nn.Parameter`` expanded over the batch).
        segments: the ``N >= 1`` per-segment inputs. Tensors in them that require grad get
            gradients in both modes.
        bptt_depth: ``k``; the memory entering segment ``t`` is detached when ``t < N - k``
            (gradients cross memory only over the last ``k`` segments). ``-1``: full BPTT.
        checkpoint: keep only per-segment memory states and recompute segments in backward.
            Ignored (plain no-grad loop) when grad mode is off.
        store: where the memory states go with ``checkpoint=True`` (cleared at the start and
            emptied by the backward); default a new ``MemoryStore(offload=offload)`` (C++ class
            when ``rmt_fast._C`` is loaded, else a dict).
        offload: with the default store, keep the states on the host (pinned + prefetch on CUDA).
        reduction: ``"sum"`` (default) or ``"mean"`` of the per-segment losses that are not None.
        preserve_rng_state: save/restore CPU and CUDA RNG per segment so dropout is replayed
            exactly by the recomputation.

    Returns:
        :class:`BPTTResult` ``(loss, memory, aux, kept_bytes)``. With ``checkpoint=True`` call
        ``loss.backward()`` (or backward of anything built from ``loss`` and ``memory``), once.
    """
    if bptt_depth < -1:
        raise ValueError(f"bptt_depth must be -1 (full BPTT) or >= 0, got {bptt_depth}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(memory, torch.Tensor) or memory.dim() != 3:
        raise ValueError(f"memory must be a [B, M, d] tensor, got "
                         f"{getattr(memory, 'shape', type(memory).__name__)}")
    segments = list(segments)
    if not segments:
        raise ValueError("segments must hold at least one segment")
    n = len(segments)

    if not checkpoint or not torch.is_grad_enabled():
        losses, aux_all = [], []
        mem = memory
        for t, seg in enumerate(segments):
            if is_cut(t, n, bptt_depth):
                mem = mem.detach()
            loss, mem, aux = _call_step(step_fn, mem, seg, t)
            if loss is not None:
                losses.append(loss)
            aux_all.append(aux)
        return BPTTResult(_reduce(losses, reduction), mem, aux_all, 0)

    if store is None:
        store = MemoryStore(offload=offload)
    engine = _Engine(step_fn, segments, bptt_depth, store, reduction, preserve_rng_state)
    engine.memory_requires_grad = memory.requires_grad
    anchor = torch.empty(0, device=memory.device, requires_grad=True)
    total, final_memory = _SegmentBPTTFunction.apply(engine, memory, anchor,
                                                     *engine.grad_leaves())
    loss = total if engine.num_losses else None
    return BPTTResult(loss, final_memory, engine.aux, engine.kept_bytes())
