"""Python face of the ``rmt_fast._C`` extension, with pure-PyTorch fallbacks.

``import rmt_fast._C`` loads the C++/CUDA library, which registers the ``torch.ops.rmt_fast.*``
operators and the ``torch.classes.rmt_fast.MemoryStore`` class. This module:

* sets :data:`HAS_EXTENSION` (and :data:`EXTENSION_ERROR` when the import failed);
* registers autograd formulas (``torch.library.register_autograd``) and fake kernels
  (``torch.library.register_fake``, for ``torch.compile`` / meta tensors) for the ops, only when the
  extension loaded;
* exposes :func:`assemble_segment`, :func:`assemble_mask`, :func:`extract_memory` and
  :class:`MemoryStore`, which use the extension when it loaded and otherwise fall back to
  ``torch.cat`` / slicing / a dict, after one ``RuntimeWarning`` saying so.
"""

from __future__ import annotations

import functools
import warnings

import torch
import torch.nn.functional as F

try:
    import rmt_fast._C  # noqa: F401  (loads the library; registers ops and classes)

    HAS_EXTENSION = True
    EXTENSION_ERROR: str | None = None
except ImportError as exc:  # not built, or built against another torch
    HAS_EXTENSION = False
    EXTENSION_ERROR = f"{type(exc).__name__}: {exc}"

# an extension built before the op existed lacks it
HAS_GELU_TANH = HAS_EXTENSION and hasattr(torch.ops.rmt_fast, "gelu_tanh")
#: its gradient kernel (an extension built before it existed lacks it: ATen's gelu_backward)
HAS_GELU_TANH_BACKWARD = HAS_EXTENSION and hasattr(torch.ops.rmt_fast, "gelu_tanh_backward")
#: the LayerNorm kernel (an extension built before it existed lacks it: F.layer_norm)
HAS_LAYER_NORM = HAS_EXTENSION and hasattr(torch.ops.rmt_fast, "layer_norm")
#: the fused cross-entropy kernel (an extension built before it existed lacks it: F.cross_entropy)
HAS_CROSS_ENTROPY = HAS_EXTENSION and hasattr(torch.ops.rmt_fast, "cross_entropy")
_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def _gelu_takes_bf16() -> bool:
    """Whether the built op has its bfloat16 kernel (an older build takes float32 only)."""
    try:
        torch.ops.rmt_fast.gelu_tanh(torch.zeros(1, dtype=torch.bfloat16))
    except RuntimeError:
        return False
    return True


#: dtypes that ``gelu_tanh`` sends to the extension's kernel (others: ``F.gelu``)
GELU_TANH_DTYPES = ((torch.float32, torch.bfloat16) if _gelu_takes_bf16() else (torch.float32,)) \
    if HAS_GELU_TANH else ()
_warned = False


def _warn_fallback() -> None:
    """Warn once per process that the pure-PyTorch path replaces the extension."""
    global _warned
    if not _warned:
        _warned = True
        warnings.warn(
            f"rmt_fast: the C++/CUDA extension rmt_fast._C could not be loaded ({EXTENSION_ERROR});"
            " using the pure-PyTorch path (torch.cat / slicing / dict). Build it with "
            "`python setup.py build_ext --inplace` or `pip install --no-build-isolation .`.",
            RuntimeWarning,
            stacklevel=3,
        )


def _check_out_autograd(name: str, *tensors: torch.Tensor) -> None:
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        raise RuntimeError(f"{name}: the out= variant does not support autograd (an input "
                           "requires grad); call it without out= or under torch.no_grad()")


# --------------------------------------------------------------------------------------- wrappers


def assemble_segment(read_mem: torch.Tensor, seg_emb: torch.Tensor, write_mem: torch.Tensor,
                     out: torch.Tensor | None = None) -> torch.Tensor:
    """``[read_mem | seg_emb | write_mem]`` along dim 1, in one pass.

    Args:
        read_mem: ``[B, M_r, d]`` read-memory embeddings (``M_r`` may be 0).
        seg_emb: ``[B, S, d]`` segment token embeddings.
        write_mem: ``[B, M_w, d]`` write-memory embeddings (``M_w`` may be 0).
        out: optional preallocated contiguous ``[B, M_r + S + M_w, d]`` buffer (same dtype and
            device) that is written in place and returned; no autograd through ``out=``.

    Returns:
        ``[B, M_r + S + M_w, d]``; differentiable (the gradient splits back into the three
        inputs) when ``out`` is None. float32 / float16 / bfloat16 / float64.
    """
    if not HAS_EXTENSION:
        _warn_fallback()
        if out is None:
            return torch.cat([read_mem, seg_emb, write_mem], dim=1)
        return torch.cat([read_mem, seg_emb, write_mem], dim=1, out=out)
    if out is None:
        return torch.ops.rmt_fast.assemble_segment(read_mem, seg_emb, write_mem)
    _check_out_autograd("assemble_segment", read_mem, seg_emb, write_mem)
    torch.ops.rmt_fast.assemble_segment_out(read_mem, seg_emb, write_mem, out)
    return out


def assemble_mask(seg_mask: torch.Tensor, num_read: int, num_write: int) -> torch.Tensor:
    """Padding mask of an assembled segment: ``[ones(M_r) | seg_mask | ones(M_w)]`` per row.

    Args:
        seg_mask: ``[B, S]`` mask of the segment tokens (any dtype: bool, int64, float ...).
        num_read: ``M_r``, number of read-memory rows (>= 0).
        num_write: ``M_w``, number of write-memory rows (>= 0).

    Returns:
        ``[B, M_r + S + M_w]`` tensor of ``seg_mask``'s dtype, 1 on the memory positions.
    """
    if not HAS_EXTENSION:
        _warn_fallback()
        if seg_mask.dim() != 2:
            raise RuntimeError(f"assemble_mask: seg_mask must be a 2-D tensor [B, S], got shape "
                               f"{list(seg_mask.shape)}")
        batch = seg_mask.shape[0]
        ones = seg_mask.new_ones
        return torch.cat([ones(batch, num_read), seg_mask, ones(batch, num_write)], dim=1)
    return torch.ops.rmt_fast.assemble_mask(seg_mask, num_read, num_write)


def extract_memory(hidden: torch.Tensor, start: int, count: int,
                   out: torch.Tensor | None = None) -> torch.Tensor:
    """Copy rows ``[start, start + count)`` of ``hidden`` into a new (or the given) memory buffer.

    Args:
        hidden: ``[B, L, d]`` hidden states of an assembled segment.
        start: first row (for RMT: ``M_r + S``, the first write-memory row).
        count: number of rows (``M_w``).
        out: optional contiguous ``[B, count, d]`` buffer (e.g. one half of a double buffer),
            written in place and returned; no autograd through ``out=``.

    Returns:
        ``[B, count, d]`` contiguous copy of ``hidden[:, start:start + count]``; differentiable
        when ``out`` is None (backward scatters into a zero ``[B, L, d]`` gradient).
    """
    if not HAS_EXTENSION:
        _warn_fallback()
        if hidden.dim() != 3 or start < 0 or count < 0 or start + count > hidden.shape[1]:
            raise RuntimeError(f"extract_memory: rows [{start}, {start + count}) must lie inside "
                               f"hidden [B, L, d], got shape {list(hidden.shape)}")
        rows = hidden[:, start:start + count]
        if out is None:
            return rows.contiguous()
        return out.copy_(rows)
    if out is None:
        return torch.ops.rmt_fast.extract_memory(hidden, start, count)
    _check_out_autograd("extract_memory", hidden)
    torch.ops.rmt_fast.extract_memory_out(hidden, start, count, out)
    return out


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU with the tanh approximation (GPT-2's ``gelu_new``), any shape.

    float32 and bfloat16 CPU tensors go through the extension's one-pass vectorised kernel
    (float32: about 4x faster than ``F.gelu(x, approximate="tanh")`` on this project's CPU,
    within 1e-6 of it; bfloat16: float32 arithmetic rounded once, within one bf16 rounding of
    the exact value); the gradient is the extension's ``gelu_tanh_backward`` (ATen's
    ``gelu_backward`` under ``create_graph``). Other dtypes/devices, or no
    extension: ``F.gelu(x, approximate="tanh")``.
    """
    if x.dtype in GELU_TANH_DTYPES and x.device.type == "cpu":
        return torch.ops.rmt_fast.gelu_tanh(x)
    return F.gelu(x, approximate="tanh")


#: per dtype, the extension's CPU code paths (csrc/cpu_isa.h) on which its LayerNorm kernel beat
#: ATen's (bench/README.md, python -m rmt_fast.bench.elementwise): float32 only on the AVX-512
#: ones (0.96-1.24x on an AMX Xeon; on an AVX2 EPYC level with ATen, 0.93-1.22x, after the
#: partial sums of 2026-12-07: memory-bound there), bfloat16 from AVX2 on (1.13-1.32x on the
#: AVX2 EPYC, 1.5-1.8x on the AMX Xeon); the portable build was 0.5-0.8x in both
LAYER_NORM_ISAS = {torch.float32: ("avx512", "avx512_bf16", "amx"),
                   torch.bfloat16: ("avx2", "avx512", "avx512_bf16", "amx")}


def cpu_isa(dtype: torch.dtype = torch.float32) -> str | None:
    """The extension's CPU code path for inputs of ``dtype`` on this machine (``"generic"``,
    ``"avx2"``, ``"avx512"``, ``"avx512_bf16"``, ``"amx"``: csrc/cpu_isa.h, capped by
    ``RMT_FAST_CPU_ISA``, read at every call), as its attention op reports it; None without
    that op."""
    op = getattr(torch.ops.rmt_fast, "memory_attention_cpu_isa", None) if HAS_EXTENSION else None
    if op is None:
        return None
    try:
        return op(dtype)
    except RuntimeError:  # an extension built before the op took a dtype
        return op()


@functools.cache
def first_cpu_isa(dtype: torch.dtype = torch.float32) -> str | None:
    """:func:`cpu_isa` as read at the first call (``RMT_FAST_CPU_ISA`` set later does not
    change it): what the automatic choices (``backend="auto"``, :func:`layer_norm`) go by."""
    return cpu_isa(dtype)


def layer_norm_uses_kernel(dtype: torch.dtype) -> bool:
    """Whether :func:`layer_norm` sends CPU tensors of ``dtype`` to the extension's kernel
    (:data:`LAYER_NORM_ISAS`) rather than ``F.layer_norm``."""
    return HAS_LAYER_NORM and first_cpu_isa() in LAYER_NORM_ISAS.get(dtype, ())


def layer_norm(x: torch.Tensor, normalized_shape, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None, eps: float = 1e-5) -> torch.Tensor:
    """``F.layer_norm(x, normalized_shape, weight, bias, eps)``: x ``[*, *normalized_shape]``,
    weight and bias ``normalized_shape`` or None.

    float32 and bfloat16 CPU tensors (weight and bias in x's dtype or float32, one dtype) go
    through the extension's kernel where it beat ATen's on this CPU's code path
    (:func:`layer_norm_uses_kernel`; float32 arithmetic, bf16 rounded once); its gradient is
    ATen's ``native_layer_norm_backward`` on the saved statistics, so second derivatives work.
    Other dtypes/devices/CPUs, or no extension: ``F.layer_norm``.
    """
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if (x.device.type == "cpu" and layer_norm_uses_kernel(x.dtype)
            and all(p is None or (p.device.type == "cpu" and p.dtype in (x.dtype, torch.float32))
                    for p in (weight, bias))
            and (weight is None or bias is None or weight.dtype == bias.dtype)):
        return torch.ops.rmt_fast.layer_norm(x, list(shape), weight, bias, eps)[0]
    return F.layer_norm(x, shape, weight, bias, eps)


def cross_entropy_sum(logits: torch.Tensor, targets: torch.Tensor,
                      ignore_index: int = -100) -> torch.Tensor:
    """``F.cross_entropy(logits.float(), targets, ignore_index=ignore_index, reduction="sum")``:
    logits ``[N, V]``, targets ``[N]`` int64; a float32 scalar (float64 for float64 logits).

    float32 and bfloat16 CPU logits go through the extension's fused kernel: the loss and each
    row's log-sum-exp in one pass in float32 arithmetic (bf16 logits are not copied to float32),
    and the gradient ``g (softmax - onehot)`` in one pass, in the logits' dtype (ATen's under
    ``create_graph``, so second derivatives work). Other dtypes/devices, or no extension:
    ``F.cross_entropy`` on the logits in float32 at least.
    """
    if (HAS_CROSS_ENTROPY and logits.device.type == "cpu" and logits.dim() == 2
            and logits.dtype in (torch.float32, torch.bfloat16) and targets.dtype == torch.long):
        return torch.ops.rmt_fast.cross_entropy(logits, targets, ignore_index)[0]
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    return F.cross_entropy(logits, targets, ignore_index=ignore_index, reduction="sum")


class _PyMemoryStore:
    """Dict-based store with the interface of ``torch.classes.rmt_fast.MemoryStore``."""

    def __init__(self, offload: bool = False) -> None:
        self._offload = bool(offload)
        self._states: dict[int, tuple[torch.Tensor, torch.device]] = {}

    def put(self, segment: int, state: torch.Tensor) -> None:
        state = state.detach()
        device = state.device
        if self._offload:
            host = torch.empty(state.shape, dtype=state.dtype, device="cpu",
                               pin_memory=state.is_cuda)
            host.copy_(state, non_blocking=state.is_cuda)
            state = host
        self._states[int(segment)] = (state, device)

    # a missing segment is reported by MemoryStore._require before any of these is called
    def get(self, segment: int) -> torch.Tensor:
        state, device = self._states[segment]
        return state.to(device, non_blocking=True) if state.device != device else state

    def pop(self, segment: int) -> torch.Tensor:
        out = self.get(segment)
        del self._states[segment]
        return out

    def prefetch(self, segment: int) -> None:
        pass  # states are brought back by get

    def has(self, segment: int) -> bool:
        return segment in self._states

    def size(self) -> int:
        return len(self._states)

    def offload(self) -> bool:
        return self._offload

    def clear(self) -> None:
        self._states.clear()

    def segments(self) -> list[int]:
        return sorted(self._states)

    def nbytes(self) -> int:
        return sum(s.nbytes for s, _ in self._states.values())


class MemoryStore:
    """Per-segment memory states ``{segment index: [B, M, d] tensor}``.

    Backed by ``torch.classes.rmt_fast.MemoryStore`` when the extension is loaded, by a dict
    otherwise (same behaviour). States are stored detached; with ``offload=True`` they are kept
    on the host (pinned, async D2H copy, when they come from CUDA; a plain copy on CPU) and
    brought back to their device by :meth:`get`, :meth:`prefetch` starting that copy early on a
    side stream (CUDA only; a no-op otherwise). :meth:`get` of a segment never stored raises
    ``RuntimeError`` naming the segment and the stored ones, and leaves the store unchanged.
    """

    def __init__(self, offload: bool = False) -> None:
        if HAS_EXTENSION:
            self._impl = torch.classes.rmt_fast.MemoryStore(bool(offload))
        else:
            _warn_fallback()
            self._impl = _PyMemoryStore(offload)

    @property
    def native(self) -> bool:
        """True when backed by the C++ class."""
        return not isinstance(self._impl, _PyMemoryStore)

    @property
    def offload(self) -> bool:
        return bool(self._impl.offload())

    def put(self, segment: int, state: torch.Tensor) -> None:
        """Store ``state`` (``[B, M, d]``, detached) for ``segment``, replacing any previous one."""
        if not isinstance(state, torch.Tensor):
            raise TypeError(f"MemoryStore.put: segment {int(segment)}: state must be a tensor "
                            f"[B, M, d], got {type(state).__name__}")
        self._impl.put(int(segment), state)

    def _require(self, what: str, segment: int) -> int:
        # Checked here as well as in C++: a C++ exception killed the process instead of raising
        # with extensions built on one CUDA machine (bench/README.md, GPU check 2026-12-04).
        segment = int(segment)
        if not self._impl.has(segment):
            stored = self.segments()
            raise RuntimeError(f"MemoryStore.{what}: no memory state stored for segment {segment}; "
                               f"stored segments: {stored} ({len(stored)} states)")
        return segment

    def get(self, segment: int) -> torch.Tensor:
        """The state of ``segment`` on its original device."""
        return self._impl.get(self._require("get", segment))

    def pop(self, segment: int) -> torch.Tensor:
        """:meth:`get`, then forget the segment."""
        return self._impl.pop(self._require("pop", segment))

    def prefetch(self, segment: int) -> None:
        """Start bringing an offloaded CUDA state back to its device (no-op otherwise)."""
        self._impl.prefetch(self._require("prefetch", segment))

    def has(self, segment: int) -> bool:
        return bool(self._impl.has(int(segment)))

    def size(self) -> int:
        return int(self._impl.size())

    def clear(self) -> None:
        self._impl.clear()

    def segments(self) -> list[int]:
        """Stored segment indices, ascending."""
        return list(self._impl.segments())

    def nbytes(self) -> int:
        """Bytes held by the stored states."""
        return int(self._impl.nbytes())

    def __len__(self) -> int:
        return self.size()

    def __contains__(self, segment: int) -> bool:
        return self.has(segment)


# ------------------------------------------------------------------- autograd and fake kernels


def _register() -> None:
    lib = "rmt_fast::"

    def _assemble_shape(read_mem, seg_emb, write_mem):
        torch._check(seg_emb.dim() == 3 and read_mem.dim() == 3 and write_mem.dim() == 3,
                     lambda: "assemble_segment: inputs must be 3-D [B, *, d]")
        torch._check(read_mem.dtype == seg_emb.dtype == write_mem.dtype,
                     lambda: "assemble_segment: inputs must have the same dtype")
        torch._check(seg_emb.dtype in _FLOAT_DTYPES,
                     lambda: f"assemble_segment: unsupported dtype {seg_emb.dtype}")
        batch, width = seg_emb.shape[0], seg_emb.shape[2]
        for t in (read_mem, write_mem):
            torch._check(t.shape[0] == batch and t.shape[2] == width,
                         lambda: "assemble_segment: read_mem / write_mem must match seg_emb's B, d")
        return batch, read_mem.shape[1] + seg_emb.shape[1] + write_mem.shape[1], width

    @torch.library.register_fake(lib + "assemble_segment")
    def _assemble_fake(read_mem, seg_emb, write_mem):
        return seg_emb.new_empty(_assemble_shape(read_mem, seg_emb, write_mem))

    @torch.library.register_fake(lib + "assemble_segment_out")
    def _assemble_out_fake(read_mem, seg_emb, write_mem, out):
        _assemble_shape(read_mem, seg_emb, write_mem)
        return None

    @torch.library.register_fake(lib + "assemble_mask")
    def _mask_fake(seg_mask, num_read, num_write):
        torch._check(seg_mask.dim() == 2, lambda: "assemble_mask: seg_mask must be [B, S]")
        return seg_mask.new_empty(seg_mask.shape[0], num_read + seg_mask.shape[1] + num_write)

    def _extract_shape(hidden, start, count):
        torch._check(hidden.dim() == 3, lambda: "extract_memory: hidden must be [B, L, d]")
        torch._check(start >= 0 and count >= 0 and start + count <= hidden.shape[1],
                     lambda: "extract_memory: rows out of range")
        return hidden.shape[0], count, hidden.shape[2]

    @torch.library.register_fake(lib + "extract_memory")
    def _extract_fake(hidden, start, count):
        return hidden.new_empty(_extract_shape(hidden, start, count))

    @torch.library.register_fake(lib + "extract_memory_out")
    def _extract_out_fake(hidden, start, count, out):
        _extract_shape(hidden, start, count)
        return None

    def _assemble_setup(ctx, inputs, output):
        read_mem, seg_emb, _ = inputs
        ctx.num_read, ctx.seg_len = read_mem.shape[1], seg_emb.shape[1]

    def _assemble_backward(ctx, grad):
        a, b = ctx.num_read, ctx.num_read + ctx.seg_len
        return grad[:, :a], grad[:, a:b], grad[:, b:]

    torch.library.register_autograd(lib + "assemble_segment", _assemble_backward,
                                    setup_context=_assemble_setup)

    def _extract_setup(ctx, inputs, output):
        hidden, start, count = inputs
        ctx.length, ctx.start, ctx.count = hidden.shape[1], start, count

    def _extract_backward(ctx, grad):
        pad = (0, 0, ctx.start, ctx.length - ctx.start - ctx.count)
        return F.pad(grad, pad), None, None

    torch.library.register_autograd(lib + "extract_memory", _extract_backward,
                                    setup_context=_extract_setup)

    if HAS_GELU_TANH:
        @torch.library.register_fake(lib + "gelu_tanh")
        def _gelu_fake(x):
            torch._check(x.dtype in (torch.float32, torch.bfloat16),
                         lambda: "gelu_tanh: x must be float32 or bfloat16")
            return torch.empty_like(x, memory_format=torch.contiguous_format)

        def _gelu_setup(ctx, inputs, output):
            ctx.save_for_backward(inputs[0])

        if HAS_GELU_TANH_BACKWARD:
            @torch.library.register_fake(lib + "gelu_tanh_backward")
            def _gelu_backward_fake(grad, x):
                torch._check(x.dtype in (torch.float32, torch.bfloat16) and grad.dtype == x.dtype,
                             lambda: "gelu_tanh_backward: grad and x must be float32 or bfloat16")
                return torch.empty_like(x, memory_format=torch.contiguous_format)

        def _gelu_backward(ctx, grad):
            (x,) = ctx.saved_tensors
            # the extension's kernel, except under create_graph (a double backward needs ATen's
            # differentiable gelu_backward) or for a gradient of another dtype
            if HAS_GELU_TANH_BACKWARD and not torch.is_grad_enabled() and grad.dtype == x.dtype:
                return torch.ops.rmt_fast.gelu_tanh_backward(grad, x)
            return torch.ops.aten.gelu_backward(grad, x, approximate="tanh")

        torch.library.register_autograd(lib + "gelu_tanh", _gelu_backward, setup_context=_gelu_setup)

    if HAS_LAYER_NORM:
        @torch.library.register_fake(lib + "layer_norm")
        def _layer_norm_fake(x, normalized_shape, weight, bias, eps):
            torch._check(x.dtype in (torch.float32, torch.bfloat16),
                         lambda: "layer_norm: x must be float32 or bfloat16")
            k = len(normalized_shape)
            mixed = x.dtype == torch.bfloat16 and any(
                p is not None and p.dtype == torch.float32 for p in (weight, bias))
            stats = [*x.shape[:x.dim() - k], *([1] * k)]
            dtype = torch.float32 if mixed else x.dtype
            return (torch.empty_like(x, memory_format=torch.contiguous_format),
                    x.new_empty(stats, dtype=dtype), x.new_empty(stats, dtype=dtype))

        def _layer_norm_setup(ctx, inputs, output):
            x, normalized_shape, weight, bias, _ = inputs
            _, mean, rstd = output
            ctx.mark_non_differentiable(mean, rstd)  # statistics: not differentiable outputs
            ctx.normalized_shape = list(normalized_shape)
            ctx.save_for_backward(x, weight, bias, mean, rstd)

        def _layer_norm_backward(ctx, grad, _grad_mean, _grad_rstd):
            x, weight, bias, mean, rstd = ctx.saved_tensors
            need = ctx.needs_input_grad
            dx, dw, db = torch.ops.aten.native_layer_norm_backward(
                grad, x, ctx.normalized_shape, mean, rstd, weight, bias,
                [need[0], weight is not None and need[2], bias is not None and need[3]])
            return dx, None, dw, db, None

        torch.library.register_autograd(lib + "layer_norm", _layer_norm_backward,
                                        setup_context=_layer_norm_setup)

    if HAS_CROSS_ENTROPY:
        @torch.library.register_fake(lib + "cross_entropy")
        def _ce_fake(logits, targets, ignore_index):
            torch._check(logits.dtype in (torch.float32, torch.bfloat16) and logits.dim() == 2,
                         lambda: "cross_entropy: logits must be float32 or bfloat16 [N, V]")
            return (logits.new_empty((), dtype=torch.float32),
                    logits.new_empty(logits.shape[:1], dtype=torch.float32))

        @torch.library.register_fake(lib + "cross_entropy_backward")
        def _ce_backward_fake(grad, logits, targets, lse, ignore_index):
            return torch.empty_like(logits, memory_format=torch.contiguous_format)

        def _ce_setup(ctx, inputs, output):
            logits, targets, ignore_index = inputs
            ctx.mark_non_differentiable(output[1])  # the log-sum-exp: not a differentiable output
            ctx.ignore_index = ignore_index
            ctx.save_for_backward(logits, targets, output[1])

        def _ce_backward(ctx, grad, _grad_lse):
            logits, targets, lse = ctx.saved_tensors
            if not torch.is_grad_enabled():
                return torch.ops.rmt_fast.cross_entropy_backward(
                    grad.float(), logits, targets, lse, ctx.ignore_index), None, None
            # create_graph (a double backward): ATen's differentiable formula
            x = logits.float()
            keep = targets != ctx.ignore_index
            onehot = F.one_hot(torch.where(keep, targets, 0), x.shape[1]).to(x.dtype)
            dx = (torch.softmax(x, dim=1) - onehot) * keep[:, None].to(x.dtype) * grad
            return dx.to(logits.dtype), None, None

        torch.library.register_autograd(lib + "cross_entropy", _ce_backward,
                                        setup_context=_ce_setup)


if HAS_EXTENSION:
    _register()
