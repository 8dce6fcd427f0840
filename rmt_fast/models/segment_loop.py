"""The one loop over segments that every recurrent-memory model runs.

A recurrent-memory model cuts a long input into ``N`` segments and runs a *step* on each:
``step(state, segment, t) -> (new_state, outputs)``. The *state* is what one segment hands to the
next, a pytree of tensors whose leaves all have the batch as dim 0 (:class:`SegmentState`: the
memory ``[B, M, d]``, the Transformer-XL cache :class:`RecurrentState` and its padding, and
``extra`` for further per-row states, e.g. an associative memory's ``A`` ``[B, d_key, d]`` and
``z`` ``[B, d_key]`` per layer). :func:`run_segments` walks the segments and

* applies the truncated-BPTT cut: the state entering segment ``t`` is detached when
  ``t < N - bptt_depth`` (:func:`is_cut`; ``bptt_depth=-1``: full BPTT). Segments that are
  padding in every row (e.g. added so that data-parallel ranks run the same number of segments)
  change nothing and are not counted: ``t`` and ``N`` count the other segments;
* keeps the state of rows whose segment is all padding (``segment.mask`` all False):
  :func:`keep_rows`;
* collects the per-segment outputs: the ``"loss"`` terms are summed, every other key is listed
  in segment order (logits, hidden states, ... when the step was asked for them);
* with ``checkpoint=True`` (and grad enabled) runs each step under
  ``torch.utils.checkpoint.checkpoint(..., use_reentrant=False)``: between forward and backward
  only each segment's inputs are kept (its state and its token ids; the RNG state, so dropout and
  memory-noise draws are replayed exactly, and the autocast state); in backward each segment is
  recomputed when autograd reaches it, so one segment's activations are alive at a time. It is
  PyTorch's own checkpoint, so ``loss.backward()``, ``torch.autograd.grad``,
  ``backward(inputs=...)``, gradient accumulation, autocast, DDP, FSDP2 and a
  ``torch.compile``-d step all work as they do without it.

Under CPU autocast (bf16 training) the recomputations share one set of cast weights per
backward pass (:class:`RecomputeCastCache`): autocast casts every float32 weight once per
autocast region, and each recomputation is a region of its own, so without it every segment's
recomputation cast every weight again.

The states a checkpoint keeps go into the C++/CUDA extension's memory-state store
(:class:`rmt_fast._extension.MemoryStore`): the checkpoint saves its tensor inputs as autograd
saved tensors, and :class:`StateStore` is the ``saved_tensors_hooks`` pair around each
checkpoint call that packs them into the store and unpacks them when the segment is recomputed.
With ``offload=True`` and states on an accelerator the store keeps host copies (pinned, copied
asynchronously), and when segment ``t`` is recomputed it starts bringing segment ``t - 1``'s
states back on a side stream (prefetch in the reverse order of the forward). On CPU the store
keeps the tensors in place (no copy).
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils import _pytree as pytree
from torch.utils.checkpoint import checkpoint as torch_checkpoint
from torch.utils.checkpoint import noop_context_fn

from rmt_fast._extension import MemoryStore

XLState = dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> (k, v) [B, Hkv, P, D]
SAVED_STATE_MODES = ("store", "save_on_cpu", "autograd")


def is_cut(t: int, num_segments: int, bptt_depth: int) -> bool:
    """Whether the state entering segment ``t`` (of ``num_segments``) is detached: ``t < N - k``
    for ``bptt_depth = k >= 0``; never for ``k = -1`` (full BPTT)."""
    return bptt_depth >= 0 and t < num_segments - bptt_depth


@dataclass
class RecurrentState:
    """The Transformer-XL cache: per layer the last keys/values ``kv`` (``[B, Hkv, P, D]``,
    detached) and their ``padding`` ``[B, P]`` bool (True = real token)."""

    kv: XLState
    padding: torch.Tensor

    def detach(self) -> RecurrentState:
        return RecurrentState({i: (k.detach(), v.detach()) for i, (k, v) in self.kv.items()},
                              self.padding)


@dataclass
class SegmentState:
    """What one segment hands to the next. Every tensor has the batch as dim 0.

    Attributes:
        memory: ``[B, M, d]`` memory tokens.
        xl: the Transformer-XL cache (None when off or before the first segment).
        extra: further per-row recurrent states by name (e.g. an associative memory's
            ``"A.<layer>"`` ``[B, d_key, d]`` and ``"z.<layer>"`` ``[B, d_key]``).
    """

    memory: torch.Tensor
    xl: RecurrentState | None = None
    extra: dict[str, torch.Tensor] = field(default_factory=dict)


pytree.register_dataclass(RecurrentState)
pytree.register_dataclass(SegmentState)


@dataclass
class Segment:
    """One segment of a batch: tokens ``[start, end)``.

    Attributes:
        ids: ``[B, S]`` token ids.
        mask: ``[B, S]`` bool, True = real token, or None (no padding). A row whose mask is all
            False keeps its state over this segment.
        targets: ``[B, S]`` next-token targets of the segment's positions (-100 = no loss), or
            None.
        num_targets: how many ``targets`` are not -100, if counted (None: not counted yet).
    """

    start: int
    end: int
    ids: torch.Tensor
    mask: torch.Tensor | None = None
    targets: torch.Tensor | None = None
    num_targets: int | None = None


def rows_with_tokens(segment: Any) -> torch.Tensor | None:
    """``[B]`` bool: rows with at least one real token in ``segment`` (from its ``mask``
    attribute), or None when the segment has no mask (every row has tokens)."""
    mask = getattr(segment, "mask", None)
    return None if mask is None else mask.any(dim=1)


def keep_rows(has_tokens: torch.Tensor | None, new: Any, old: Any) -> Any:
    """``new`` state, except rows where ``has_tokens`` ``[B]`` is False keep ``old``.

    Leaf by leaf (batch = dim 0). A leaf whose shape changed (an XL cache still filling up: the
    decoder appends only padding to an empty row's cache, unmoved) and a part whose structure
    changed (no XL cache before the first segment) are taken from ``new``; the other fields
    of the same dataclass (the memory) are still kept row by row."""
    if has_tokens is None:
        return new
    new_leaves, new_spec = pytree.tree_flatten(new)
    old_leaves, old_spec = pytree.tree_flatten(old)
    if new_spec != old_spec:
        if dataclasses.is_dataclass(new) and type(new) is type(old):
            return dataclasses.replace(new, **{
                f.name: keep_rows(has_tokens, getattr(new, f.name), getattr(old, f.name))
                for f in dataclasses.fields(new) if f.init})
        return new
    out = []
    for n, o in zip(new_leaves, old_leaves, strict=True):
        if isinstance(n, torch.Tensor) and isinstance(o, torch.Tensor) and n.shape == o.shape \
                and n.dim() >= 1 and n.shape[0] == has_tokens.shape[0]:
            n = torch.where(has_tokens.view(-1, *([1] * (n.dim() - 1))), n, o)
        out.append(n)
    return pytree.tree_unflatten(out, new_spec)


def cut_before(segments: Sequence[Any], bptt_depth: int) -> list[bool]:
    """Per segment: whether the state entering it is detached (:func:`is_cut`), counting only
    segments with a real token in some row; a segment that is padding in every row is never
    cut (it hands its state on unchanged). One device-to-host copy when segments have masks and
    ``bptt_depth >= 0``."""
    n = len(segments)
    if bptt_depth < 0:
        return [False] * n
    masks = [getattr(seg, "mask", None) for seg in segments]
    empty = [False] * n
    if any(m is not None for m in masks):
        flags = [m.any() if m is not None else torch.ones((), dtype=torch.bool) for m in masks]
        empty = [not f for f in torch.stack([f.to(flags[0].device) for f in flags]).tolist()]
    real = n - sum(empty)
    cuts, seen = [], 0
    for e in empty:
        cuts.append(not e and is_cut(seen, real, bptt_depth))
        seen += not e
    return cuts


def detach_state(state: Any) -> Any:
    """Every tensor of ``state`` detached."""
    return pytree.tree_map_only(torch.Tensor, torch.Tensor.detach, state)


@dataclass
class LoopResult:
    """What :func:`run_segments` returns.

    Attributes:
        state: the state leaving the last segment (differentiable).
        loss: the sum of the steps' ``"loss"`` outputs (None when no step returned one).
        outputs: every other output key -> its per-segment values in segment order (segments
            whose step returned None for it are left out).
        store: the :class:`MemoryStore` holding the checkpointed states (None without
            checkpointing): it empties as backward recomputes the segments.
        kept_bytes: bytes of the states the store held when the forward finished (0 without it).
    """

    state: Any
    loss: torch.Tensor | None
    outputs: dict[str, list[Any]]
    store: MemoryStore | None = None
    kept_bytes: int = 0


class _StoredRef:
    """What the checkpoint keeps in place of one saved input: the key of its state in the store.
    The state leaves the store when the segment is recomputed (kept here for a second backward
    with ``retain_graph=True``) or when the graph is freed without a backward."""

    __slots__ = ("owner", "key", "segment", "value")

    def __init__(self, owner: StateStore, key: int, segment: int) -> None:
        self.owner, self.key, self.segment, self.value = owner, key, segment, None

    def get(self) -> torch.Tensor:
        if self.value is None:
            self.owner.prefetch(self.segment - 1)  # reverse order: the next one recomputed
            self.value = self.owner.store.pop(self.key)
        return self.value

    def __del__(self) -> None:
        if self.value is None:
            with contextlib.suppress(Exception):  # also at interpreter shutdown
                self.owner.discard(self.key)


class StateStore:
    """``saved_tensors_hooks`` that keep the tensors a segment checkpoint saves (its inputs: the
    state entering the segment) in a :class:`MemoryStore`, keyed ``0, 1, ...`` in saving order.

    Use :meth:`segment` around each ``checkpoint`` call. Written by hand because
    ``torch.autograd.graph.save_on_cpu`` brings an offloaded tensor back only when autograd
    unpacks it (a synchronous copy at that point of the backward), while the store starts the
    copy of segment ``t - 1``'s states when segment ``t`` is recomputed, on a side stream, and
    keeps the states' copies in the extension (bench/README.md compares the two on CPU, where
    both keep the tensors in place).
    """

    def __init__(self, store: MemoryStore) -> None:
        self.store = store
        self._next = 0
        self._keys: list[list[int]] = []
        self._segment = -1

    @contextlib.contextmanager
    def segment(self, t: int):
        """Tensors saved within this context belong to segment ``t``."""
        while len(self._keys) <= t:
            self._keys.append([])
        self._segment = t
        with torch.autograd.graph.saved_tensors_hooks(self._pack, self._unpack):
            yield

    def _pack(self, x: torch.Tensor) -> _StoredRef:
        key = self._next
        self._next += 1
        self.store.put(key, x)
        self._keys[self._segment].append(key)
        return _StoredRef(self, key, self._segment)

    @staticmethod
    def _unpack(ref: _StoredRef) -> torch.Tensor:
        return ref.get()

    def prefetch(self, t: int) -> None:
        """Start bringing segment ``t``'s offloaded states back to their device (no-op otherwise)."""
        if t < 0 or t >= len(self._keys) or not self.store.offload:
            return
        for key in self._keys[t]:
            if self.store.has(key):
                self.store.prefetch(key)

    def discard(self, key: int) -> None:
        if self.store.has(key):
            self.store.pop(key)


StepFn = Callable[[Any, Any, int], tuple[Any, Mapping[str, Any]]]


def _check_outputs(t: int, out: Any) -> Mapping[str, Any]:
    if not isinstance(out, tuple) or len(out) != 2 or not isinstance(out[1], Mapping):
        raise TypeError(f"step must return (new_state, outputs: dict); segment {t} returned "
                        f"{type(out).__name__}")
    loss = out[1].get("loss")
    if loss is not None and (not isinstance(loss, torch.Tensor) or loss.dim() != 0):
        raise ValueError(f"step: the loss of segment {t} must be a scalar tensor or None, got "
                         f"{getattr(loss, 'shape', type(loss).__name__)}")
    return out[1]


def _state_device(state: Any) -> torch.device | None:
    for leaf in pytree.tree_leaves(state):
        if isinstance(leaf, torch.Tensor):
            return leaf.device
    return None


class RecomputeCastCache:
    """Keeps CPU autocast's cache of cast weights from the first segment recomputed in a
    backward pass to the end of that pass, so that the recomputations of all segments use the
    weights cast once (a bf16 GPT-2-small training step with 8 checkpointed segments spent 16%
    of its time casting weights, one cast per segment's recomputation, bench/README.md).

    Why by hand: ``torch.utils.checkpoint`` re-enters autocast for each recomputation, and
    autocast clears its cache when its outermost region exits (nesting back to 0), i.e. after
    every recomputation. The recomputation context (``context_fn``) raises autocast's nesting
    once per backward pass and an autograd final callback lowers it and clears the cache when
    the pass ends. The recomputed tensors are saved tensors only (gradients flow through the
    forward's graph), so the values, and every gradient, are the same bits as without it.

    CPU only: the engine runs a CPU graph's nodes and final callbacks on the calling thread,
    whose thread-local autocast state this changes. A pass that ended without its callback (it
    raised) is undone at the next checkpointed forward (:meth:`release_stale`); until then
    autocast keeps that pass's casts, so autocast work on the same weights outside this loop
    after such a failure and an optimizer step would see the old weights."""

    _held: set = set()  # strong: a hold must be released even after its graph is gone

    def __init__(self) -> None:
        self.thread: int | None = None  # the thread whose autocast nesting is raised, if any

    def contexts(self):
        """``context_fn`` for ``torch.utils.checkpoint``: (forward, recomputation) contexts."""
        return contextlib.nullcontext(), self._recomputation()

    @contextlib.contextmanager
    def _recomputation(self):
        if self.thread is None and torch.is_autocast_enabled("cpu"):
            torch.autocast_increment_nesting()
            try:  # raises outside a backward pass (a saved tensor read by hand): hold nothing
                torch.autograd.Variable._execution_engine.queue_callback(self.release)
            except RuntimeError:
                torch.autocast_decrement_nesting()
            else:
                self.thread = threading.get_ident()
                RecomputeCastCache._held.add(self)
        yield

    def release(self, clear: bool = False) -> None:
        """Lower the nesting raised for this pass; clear the cache where it reaches 0 (or
        always, ``clear``)."""
        if self.thread is None or self.thread != threading.get_ident():
            return
        self.thread = None
        RecomputeCastCache._held.discard(self)
        if torch.autocast_decrement_nesting() == 0 or clear:
            torch.clear_autocast_cache()

    @classmethod
    def release_stale(cls) -> None:
        """Undo the holds of passes that ended without their callback (on this thread): their
        cached casts would outlive an optimizer step."""
        for hold in list(cls._held):
            hold.release(clear=True)


def run_segments(step: StepFn, state: Any, segments: Iterable[Any], *, bptt_depth: int = -1,
                 checkpoint: bool = False, offload: bool = False, store: MemoryStore | None = None,
                 saved_state: str = "store", preserve_rng_state: bool = True,
                 callback: Callable[[int, Any, Any], None] | None = None) -> LoopResult:
    """Run ``step`` over ``segments``, carrying ``state``.

    Args:
        step: ``step(state, segment, t) -> (new_state, outputs)``; ``outputs`` a dict whose
            ``"loss"`` (a scalar tensor or None) is summed over segments and whose other values
            are collected per segment. With ``checkpoint=True`` it runs twice per segment
            (forward, then the recomputation in backward) and must compute the same thing given
            the same RNG state; it must not depend on Python state changed in between.
        state: the state entering segment 0: a :class:`SegmentState` or any pytree of tensors
            with the batch as dim 0 (e.g. a bare ``[B, M, d]`` memory).
        segments: the ``N >= 1`` segments (:class:`Segment` or any object; a ``mask`` attribute
            ``[B, S]`` marks real tokens, see :func:`keep_rows`). An iterator is read lazily,
            one segment at a time, when ``bptt_depth=-1`` (e.g. a million-token evaluation
            that is never materialised); otherwise it is listed first.
        bptt_depth: ``k``; the state entering segment ``t`` is detached when ``t < N - k``
            (segments that are padding in every row not counted, see :func:`cut_before`).
            ``-1``: full BPTT.
        checkpoint: segment checkpointing (``torch.utils.checkpoint``, non-reentrant); ignored
            when grad mode is off.
        offload: with checkpointing, keep the states on the host (accelerator states only; CPU
            states stay in place): a new ``MemoryStore(offload=True)``.
        store: the :class:`MemoryStore` to use instead of a new one (it is used as it is: an
            offloading store also copies CPU states).
        saved_state: where checkpointed states go: ``"store"`` (the extension's store),
            ``"save_on_cpu"`` (``torch.autograd.graph.save_on_cpu``, for comparison) or
            ``"autograd"`` (kept by the checkpoint itself).
        preserve_rng_state: restore the RNG state when recomputing (dropout replayed exactly).
        callback: ``callback(t, segment, new_state)`` after every segment (e.g. a progress bar).

    Returns:
        :class:`LoopResult`.
    """
    if not isinstance(bptt_depth, int) or bptt_depth < -1:
        raise ValueError(f"bptt_depth must be -1 (full BPTT) or an int >= 0, got {bptt_depth!r}")
    if saved_state not in SAVED_STATE_MODES:
        raise ValueError(f"saved_state must be one of {SAVED_STATE_MODES}, got {saved_state!r}")
    if bptt_depth >= 0 or not isinstance(segments, Iterator):
        segments = list(segments)  # the cuts count the segments first
        if not segments:
            raise ValueError("segments must hold at least one segment")
    checkpoint = checkpoint and torch.is_grad_enabled()
    device = _state_device(state) if checkpoint else None
    on_cpu = device is None or device.type == "cpu"
    hooks: StateStore | None = None
    if checkpoint and saved_state == "store":
        if store is None:
            store = MemoryStore(offload=offload and not on_cpu)
        hooks = StateStore(store)
    elif not checkpoint:
        store = None
    context_fn = noop_context_fn
    if checkpoint:
        RecomputeCastCache.release_stale()
        # (under torch.compile a context_fn must be a pair of dispatch modes: none there)
        if torch.is_autocast_enabled("cpu") and on_cpu and not torch.compiler.is_compiling():
            context_fn = RecomputeCastCache().contexts
    loss: torch.Tensor | None = None
    outputs: dict[str, list[Any]] = {}
    cuts = cut_before(segments, bptt_depth) if bptt_depth >= 0 else None
    t = -1
    for t, seg in enumerate(segments):
        if cuts is not None and cuts[t]:
            state = detach_state(state)
        has_tokens = rows_with_tokens(seg)
        if checkpoint:
            leaves, spec = pytree.tree_flatten(state)

            def fn(*leaves, _t=t, _seg=seg, _has=has_tokens, _spec=spec):
                old = pytree.tree_unflatten(list(leaves), _spec)
                new, out = step(old, _seg, _t)
                return keep_rows(_has, new, old), out

            if hooks is not None:
                context = hooks.segment(t)
            elif saved_state == "save_on_cpu":
                context = torch.autograd.graph.save_on_cpu(pin_memory=offload)
            else:
                context = contextlib.nullcontext()
            with context:
                # determinism_check="none": the recomputation runs the same step on the same
                # inputs with the same RNG and autocast state; checking every saved tensor's
                # shape/dtype/device costs Python time per tensor (~10% of a small model's step)
                result = torch_checkpoint(fn, *leaves, use_reentrant=False,
                                          preserve_rng_state=preserve_rng_state,
                                          determinism_check="none", context_fn=context_fn)
            new_state, out = result[0], _check_outputs(t, result)
        else:
            result = step(state, seg, t)
            out = _check_outputs(t, result)
            new_state = keep_rows(has_tokens, result[0], state)
        state = new_state
        for key, value in out.items():
            if value is None:
                continue
            if key == "loss":
                loss = value if loss is None else loss + value
            else:
                outputs.setdefault(key, []).append(value)
        if callback is not None:
            callback(t, seg, state)
    if t < 0:
        raise ValueError("segments must hold at least one segment")
    kept = store.nbytes() if store is not None else 0
    return LoopResult(state, loss, outputs, store, kept)
