"""The fused CPU kernel of the C++ extension: ``torch.ops.rmt_fast.memory_attention_cpu``.

One call covers every mask of :mod:`rmt_fast.masks`, past keys/values read from their own buffer,
key padding and grouped-query attention, for float32 and bfloat16 CPU tensors of any strides
(``csrc/memory_attention_cpu.cpp``): flash-style tiles with block skipping, bf16 products with
float32 accumulation (AMX-BF16 tiles or AVX-512 BF16 dot products where the CPU has them,
AVX-512F float32 FMAs otherwise, AVX2 + FMA without AVX-512, portable C++ without AVX2; picked
at run time, see :func:`isa`). Backward recomputes the probabilities from the saved log-sum-exp.

This module registers the op's fake kernels (``torch.compile``, meta tensors) and its autograd
formula; it falls back to :func:`rmt_fast.ops.memory_attention.cpu_flash.cpu_flash_memory_attention`
when the extension is missing or was built without the op, and for other dtypes or devices.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch

from rmt_fast import _extension
from rmt_fast.masks import AttentionLayout
from rmt_fast.ops.memory_attention.cpu_flash import cpu_flash_memory_attention

#: the extension loaded and has the op (an extension built before it existed lacks it)
HAS_CPU_KERNEL = _extension.HAS_EXTENSION and hasattr(torch.ops.rmt_fast, "memory_attention_cpu")
#: input dtypes the kernel takes
DTYPES = (torch.float32, torch.bfloat16)


def isa(dtype: torch.dtype = torch.float32) -> str | None:
    """The kernel's code path on this CPU for inputs of ``dtype``: ``"amx"`` (bfloat16 products
    on AMX-BF16 tiles; bfloat16 inputs only), ``"avx512_bf16"`` (AVX-512 BF16 dot products),
    ``"avx512"`` (float32 FMAs; bf16 inputs computed in float32), ``"avx2"`` (AVX2 + FMA, 8
    lanes; bf16 inputs computed in float32), ``"generic"`` (portable C++), or None without the
    op. ``RMT_FAST_CPU_ISA`` caps it (read at every call). float32 inputs
    never take ``"amx"``; bfloat16 inputs on a CPU with AMX-BF16 that the process may not use
    take ``"avx512"``, measured faster there than the dot products (``bench/README.md``, "On an
    AMX CPU")."""
    return _extension.cpu_isa(dtype) if HAS_CPU_KERNEL else None


#: the kernel's code paths, lowest first (csrc/cpu_isa.h; the names ``RMT_FAST_CPU_ISA`` takes)
ISAS = ("generic", "avx2", "avx512", "avx512_bf16", "amx")


def runnable_isas(dtype: torch.dtype = torch.float32) -> tuple[str, ...]:
    """The code paths inputs of ``dtype`` can take on this CPU, lowest first (each one runs under
    :func:`isa_env`): up to the CPU's best (float32 inputs never take ``"amx"``); none without
    the op."""
    with isa_env("amx"):
        top = isa(dtype)
    return ISAS[:ISAS.index(top) + 1] if top in ISAS else ()


@contextlib.contextmanager
def env(name: str, value: str | None):
    """The environment variable ``name`` set to ``value`` for the block (None: unset), restored
    after. The kernel reads its switches (``RMT_FAST_CPU_ISA``, ``RMT_FAST_CPU_ROWS_MAX``) at
    every call, so benchmarks and tests switch them per call with this."""
    old = os.environ.get(name)
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value
    try:
        yield
    finally:
        if old is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = old


def isa_env(path: str | None):
    """``RMT_FAST_CPU_ISA=path`` for the block (None: unset, the kernel picks its path)."""
    return env("RMT_FAST_CPU_ISA", path)


def supported(q: torch.Tensor) -> bool:
    """Whether the kernel takes ``q`` (and k, v of the same dtype and device)."""
    return HAS_CPU_KERNEL and q.device.type == "cpu" and q.dtype in DTYPES


def _op_has(argument: str) -> bool:
    """Whether the op takes ``argument`` (an extension built before it did takes none)."""
    return HAS_CPU_KERNEL and any(
        a.name == argument
        for a in torch.ops.rmt_fast.memory_attention_cpu.default._schema.arguments)


#: the op takes a sliding window / a logit soft-cap
HAS_WINDOW = _op_has("window")
HAS_SOFTCAP = _op_has("softcap")


def supports_layout(q: torch.Tensor, layout: AttentionLayout) -> bool:
    """Whether the kernel takes ``q`` under ``layout``: :func:`supported`, and a build whose op
    has the ``window`` / ``softcap`` argument where the layout sets them."""
    return supported(q) and (layout.window is None or HAS_WINDOW) and \
        (layout.softcap is None or HAS_SOFTCAP)


#: code paths that ``backend="auto"`` uses (see :func:`preferred`)
AUTO_ISAS = ("avx512_bf16", "avx512", "avx2")


def _auto_isa(dtype: torch.dtype = torch.float32) -> str | None:
    """The kernel's path for ``dtype``, read at the first ``auto`` call (RMT_FAST_CPU_ISA set
    later does not change what ``auto`` picks): :func:`rmt_fast._extension.first_cpu_isa`."""
    return _extension.first_cpu_isa(dtype) if HAS_CPU_KERNEL else None


def preferred(q: torch.Tensor, past_k: torch.Tensor | None = None) -> bool:
    """Whether ``backend="auto"`` runs this kernel for ``q`` (and ``past_k``) rather than the
    ``cpu_flash`` path: the rule measured in ``bench/README.md`` ("Fused CPU kernel", "On an
    AVX2 CPU"): float32 and bfloat16 CPU tensors on CPUs that run the AVX-512 or the AVX2 paths
    (the portable one was 0.3-0.5x ``cpu_flash``); no shape condition."""
    return supported(q) and _auto_isa() in AUTO_ISAS


@functools.cache
def aten_amx() -> bool:
    """Whether ATen runs bfloat16 matrix products on AMX tiles on this CPU (Intel Sapphire
    Rapids and later; ``torch.cpu._is_amx_tile_supported``), read once."""
    probe = getattr(torch.cpu, "_is_amx_tile_supported", None)
    try:
        return bool(probe()) if probe is not None else False
    except RuntimeError:
        return False


def sdpa_beats_kernel_bf16() -> bool:
    """Whether ATen's flash attention beat this kernel on bfloat16 forward calls here: ATen runs
    its bf16 products on AMX tiles and this kernel does not (no ``"amx"`` path: an extension
    built without it, or a process that may not use the tiles). Measured in ``bench/README.md``
    ("On an AMX CPU"): SDPA 1.3-1.6x our AVX-512F path there, our AMX path 1.2-1.8x SDPA."""
    return aten_amx() and _auto_isa(torch.bfloat16) != "amx"


#: the largest dense bool mask (elements) that ``auto`` builds for SDPA (16 MiB); larger calls
#: stay on the mask-free paths
SDPA_MASK_MAX_ELEMENTS = 1 << 24


def auto_path(q: torch.Tensor, past_k: torch.Tensor | None = None, *, needs_grad: bool = True,
              return_lse: bool = False, mask_elements: int = 0) -> str:
    """What ``backend="auto"`` runs for a CPU call: ``"sdpa"`` (ATen's SDPA with its own causal
    mask, or with the layout's dense bool mask of ``mask_elements`` elements), ``"cpu"`` (this
    kernel) or ``"torch"`` (the ``cpu_flash`` path).

    The rule measured in ``bench/README.md`` ("On an AMX CPU"): where ATen's bf16 products run
    on AMX tiles and this kernel's do not (:func:`sdpa_beats_kernel_bf16`), ATen's flash
    attention beat this kernel on bfloat16 forward calls at every model shape, and one
    dense-mask call beat the per-block ``cpu_flash`` path, so bfloat16 calls that need no
    gradient (nor the log-sum-exp) go to SDPA there, unless their mask would exceed
    :data:`SDPA_MASK_MAX_ELEMENTS`; with a gradient this kernel was faster at every model shape.
    Elsewhere :func:`preferred` decides."""
    if (q.device.type == "cpu" and q.dtype == torch.bfloat16 and not needs_grad
            and not return_lse and mask_elements <= SDPA_MASK_MAX_ELEMENTS
            and sdpa_beats_kernel_bf16()):
        return "sdpa"
    return "cpu" if preferred(q, past_k) else "torch"


def cpu_kernel_memory_attention(q, k, v, past_k, past_v, key_padding_mask, layout: AttentionLayout
                                ) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated inputs in (``layout.scale`` resolved), as :func:`rmt_fast.memory_attention`:
    ``q [B, Hq, L, D]``, ``k, v [B, Hkv, L, D]``, ``past_k, past_v [B, Hkv, P, D]`` or None,
    ``key_padding_mask [B, P + L]`` bool or None. Returns ``(out [B, Hq, L, D] in q's dtype,
    lse [B, Hq, L] float32)``, differentiable in q, k, v, past_k, past_v (and through lse).
    Unsupported dtypes/devices, or no op: the ``cpu_flash`` path."""
    if not supports_layout(q, layout):
        return cpu_flash_memory_attention(q, k, v, past_k, past_v, key_padding_mask, layout)
    return torch.ops.rmt_fast.memory_attention_cpu(
        q, k, v, past_k, past_v, key_padding_mask, layout.num_read, layout.num_write, layout.mask,
        layout.past_visible_to_read, float(layout.scale), *_optional_args(layout))


def _optional_args(layout: AttentionLayout) -> tuple:
    """The op's trailing ``window=0, softcap=0.0`` arguments, only as far as the layout sets
    them (an older build takes neither)."""
    if layout.softcap is not None:
        return (layout.window or 0, layout.softcap)
    return () if layout.window is None else (layout.window,)


def _register() -> None:
    lib = "rmt_fast::"

    @torch.library.register_fake(lib + "memory_attention_cpu")
    def _fwd_fake(q, k, v, past_k, past_v, key_padding_mask, num_read, num_write, mask,
                  past_visible_to_read, scale, window=0, softcap=0.0):
        torch._check(q.dim() == 4, lambda: "memory_attention_cpu: q must be [B, Hq, L, D]")
        torch._check(q.dtype in DTYPES, lambda: f"memory_attention_cpu: unsupported dtype {q.dtype}")
        b, h, n, d = q.shape  # out: a [B, L, Hq, D] buffer seen as [B, Hq, L, D]
        return (q.new_empty((b, n, h, d)).permute(0, 2, 1, 3),
                q.new_empty(q.shape[:3], dtype=torch.float32))

    @torch.library.register_fake(lib + "memory_attention_cpu_backward")
    def _bwd_fake(dout, q, k, v, past_k, past_v, key_padding_mask, out, lse, grad_lse, num_read,
                  num_write, mask, past_visible_to_read, scale, need_past_grad, window=0,
                  softcap=0.0):
        grads = [q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)]
        if need_past_grad:
            grads += [past_k.new_empty(past_k.shape), past_v.new_empty(past_v.shape)]
        return grads

    def _setup(ctx, inputs, output):
        q, k, v, past_k, past_v, kpm, *layout = inputs
        out, lse = output
        ctx.save_for_backward(q, k, v, past_k, past_v, kpm, out, lse)
        ctx.layout = layout
        ctx.set_materialize_grads(False)  # an unused output (the lse, mostly) gets None, not zeros

    def _backward(ctx, dout, dlse):
        q, k, v, past_k, past_v, kpm, out, lse = ctx.saved_tensors
        need_past = past_k is not None and (ctx.needs_input_grad[3] or ctx.needs_input_grad[4])
        if dout is None:  # only the lse was used
            dout = torch.zeros_like(out)
        # ctx.layout: num_read, num_write, mask, past_visible_to_read, scale (, window, softcap)
        layout, optional = ctx.layout[:5], ctx.layout[5:]
        grads = torch.ops.rmt_fast.memory_attention_cpu_backward(
            dout, q, k, v, past_k, past_v, kpm, out, lse, dlse, *layout, need_past, *optional)
        dpk, dpv = (grads[3], grads[4]) if need_past else (None, None)
        return (grads[0], grads[1], grads[2], dpk, dpv) + (None,) * (len(ctx.layout) + 1)

    torch.library.register_autograd(lib + "memory_attention_cpu", _backward, setup_context=_setup)


if HAS_CPU_KERNEL:
    _register()
