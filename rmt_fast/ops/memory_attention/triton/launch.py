"""Launchers: pick a config, allocate outputs, launch kernels (inputs and layout come validated).

Outputs are allocated with ``torch.empty``; with ``RMT_FAST_POISON=1`` (the test suite sets it)
they are filled with NaN first, so an element a kernel fails to write shows up in the tests.

Configs are chosen explicitly per head dim (``@triton.autotune`` needs a GPU driver to time
candidates); under ``TRITON_INTERPRET=1`` one small config keeps the serial numpy run cheap.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch
import triton

from rmt_fast.masks import AttentionLayout

from .bwd import bwd_dkdv_kernel, bwd_dq_kernel, bwd_preprocess_kernel
from .decode import decode_reduce_kernel, decode_split_kernel
from .fwd import memory_attention_fwd_kernel

LOG2E = 1.4426950408889634


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class Config:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


#: (kernel, head-dim bucket) -> config used on the GPU. Buckets: BLOCK_D <= 64, BLOCK_D == 128.
#: Picked from a small ptxas sweep (``python -m rmt_fast.ops.memory_attention.triton.aot``, fp16,
#: sm_80 and sm_90a) as the largest tiles with zero register spills on both targets; not timed (no GPU here).
#: E.g. dK/dV at 64x64/4 warps spilled 92 bytes on sm_80, hence the 16x64 tile.
GPU_CONFIGS = {
    ("fwd", 64): Config(128, 64, 4, 3),
    ("fwd", 128): Config(128, 64, 8, 3),
    ("bwd_dkdv", 64): Config(16, 64, 4, 1),
    ("bwd_dkdv", 128): Config(32, 64, 8, 1),
    ("bwd_dq", 64): Config(64, 32, 4, 2),
    ("bwd_dq", 128): Config(64, 32, 4, 2),
    # flash-decoding split kernel: BLOCK_M is always DECODE_MAX_ROWS
    ("decode_split", 64): Config(16, 64, 4, 2),
    ("decode_split", 128): Config(16, 64, 4, 2),
    # fp32 dots are IEEE (input_precision="ieee"): CUDA-core FMA, no tensor cores, so their
    # operands live in registers. The fp16 tiles spilled (e.g. fwd 64x32/4 warps D=128: 5.7 KB
    # on sm_80); these are the first zero-spill configs on both sm_80 and sm_90a of a small
    # ptxas sweep (largest tile first, then more warps, then smaller tiles). Not timed.
    ("fwd_fp32", 64): Config(64, 32, 8, 2),
    ("fwd_fp32", 128): Config(32, 32, 4, 2),
    ("bwd_dq_fp32", 64): Config(64, 32, 8, 2),
    ("bwd_dq_fp32", 128): Config(32, 16, 4, 2),
    ("bwd_dkdv_fp32", 64): Config(16, 16, 4, 1),
    ("decode_split_fp32", 128): Config(16, 64, 8, 2),
    # with a sliding window (HAS_WINDOW): where the config above left ptxas spilling a few
    # registers (cold ones, stored before the loops and reloaded for the final stores, on
    # sm_80), the first zero-spill config on both sm_80 and sm_90a of a small ptxas sweep
    # (same tile, then other stages or warps). Not timed.
    ("fwd_fp32_window", 64): Config(64, 32, 8, 3),
    ("bwd_dq_fp32_window", 128): Config(32, 16, 4, 3),
    ("bwd_dkdv_fp32_window", 64): Config(16, 16, 2, 1),
    # with logit soft-capping (HAS_SOFTCAP; "_window_softcap": with a window too): where the
    # configs above left ptxas spilling (the dK/dV kernels were at 250-255 registers on sm_80
    # without it), the first zero-spill config on both sm_80 and sm_90a of a small ptxas sweep
    # (same tile with other stages or warps, then smaller tiles). fp16/bf16 dK/dV at D <= 64
    # lose wgmma on sm_90a with the 32-key tile: no 64-key tile was spill-free on sm_80. Not timed.
    ("bwd_dkdv_softcap", 64): Config(16, 32, 4, 1),
    ("bwd_dkdv_fp32_window_softcap", 64): Config(16, 16, 8, 1),
    ("bwd_dkdv_fp32_softcap", 128): Config(16, 16, 4, 1),
    ("bwd_dkdv_fp32_window_softcap", 128): Config(16, 16, 8, 2),
    ("bwd_dq_fp32_window_softcap", 128): Config(32, 16, 4, 2),
}
INTERPRET_CONFIG = Config(16, 16, 1, 1)


def block_d(head_dim: int) -> int:
    """Head dims are padded to the next power of two (>= 16) with masked loads."""
    return max(16, triton.next_power_of_2(head_dim))


def config_keys(kernel: str, head_dim: int, dtype: str, window: bool = False,
                softcap: bool = False) -> list[tuple[str, int]]:
    """The :data:`GPU_CONFIGS` keys :func:`gpu_config` looks up, most specific first: the
    dtype's before the generic one, and within each, the entry for both flags, then for the
    soft-cap, then for the window, then the plain one."""
    bucket = 64 if block_d(head_dim) <= 64 else 128
    suffixes = [""]
    if window:
        suffixes.insert(0, "_window")
    if softcap:
        suffixes.insert(0, "_softcap")
    if window and softcap:
        suffixes.insert(0, "_window_softcap")
    return [(base + sfx, bucket) for base in (f"{kernel}_{dtype}", kernel) for sfx in suffixes]


def gpu_config(kernel: str, head_dim: int, dtype: str, window: bool = False,
               softcap: bool = False) -> Config:
    """GPU config for ``kernel`` at ``head_dim``; ``dtype``: ``"fp16"``, ``"bf16"``, ``"fp32"``;
    ``window`` / ``softcap``: the kernel compiled with a sliding window / logit soft-capping.
    The first of :func:`config_keys` present in :data:`GPU_CONFIGS` wins."""
    keys = config_keys(kernel, head_dim, dtype, window, softcap)
    return next(GPU_CONFIGS[key] for key in keys if key in GPU_CONFIGS)


def pick_config(kernel: str, head_dim: int, dtype: torch.dtype, window: bool = False,
                softcap: bool = False) -> Config:
    if interpreting():
        return INTERPRET_CONFIG
    name = {torch.float16: "fp16", torch.bfloat16: "bf16"}.get(dtype, "fp32")
    return gpu_config(kernel, head_dim, name, window, softcap)


def dot_f32(dtype: torch.dtype) -> bool:
    """Cast tiles to float32 before ``tl.dot``: the interpreter mishandles bf16 dots."""
    return interpreting() and dtype == torch.bfloat16


def dot_precision(dtype: torch.dtype | str) -> str:
    """``tl.dot`` input precision (a ``DOT_PREC`` constexpr) for inputs of ``dtype``.

    float32 inputs get ``"ieee"`` (full fp32 products): Triton's default, ``"tf32"``, rounds the
    operands to 10 mantissa bits on sm_80/sm_90 tensor cores. fp16/bf16 keep ``"tf32"``, which
    Triton ignores for them (it is the default, so their kernels are unchanged).
    """
    return "ieee" if dtype in (torch.float32, "fp32") else "tf32"


def poisoning() -> bool:
    """Whether outputs are NaN-filled before launch (``RMT_FAST_POISON=1``, set by the tests)."""
    return os.environ.get("RMT_FAST_POISON") == "1"


def _alloc(shape_or_like, dtype=None, device=None) -> torch.Tensor:
    """An output buffer: ``torch.empty`` (NaN-filled under :func:`poisoning`)."""
    if isinstance(shape_or_like, torch.Tensor):
        out = torch.empty_like(shape_or_like)
    else:
        out = torch.empty(shape_or_like, dtype=dtype, device=device)
    return out.fill_(float("nan")) if poisoning() else out


def _contig(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.contiguous()


#: the AttentionLayout fields the launchers pass on to the kernels
LAYOUT_FIELDS = frozenset({"num_read", "num_write", "mask", "past_visible_to_read", "scale", "window",
                           "softcap"})


def check_layout(layout: AttentionLayout) -> None:
    """Refuse a layout with a field the kernels do not implement (set to other than its default):
    a new field must never be dropped silently, as ``window`` would have been before the kernels
    knew it."""
    for f in dataclasses.fields(layout):
        if f.name not in LAYOUT_FIELDS and getattr(layout, f.name) != f.default:
            raise NotImplementedError(f"the Triton kernels do not implement AttentionLayout."
                                      f"{f.name} (got {getattr(layout, f.name)!r})")


def layout_args(layout: AttentionLayout, past_len: int,
                length: int) -> tuple[bool, int, bool, float]:
    """``(HAS_WINDOW, WINDOW, HAS_SOFTCAP, SOFTCAP)`` kernel arguments, after
    :func:`check_layout`. A window that hides no key (:meth:`AttentionLayout.cutting_window`)
    runs the kernels without a window, which are then identical; ``WINDOW`` is 0 and ``SOFTCAP``
    1.0 (unused) without them."""
    check_layout(layout)
    window = layout.cutting_window(past_len, length)
    has_window, window = (False, 0) if window is None else (True, int(window))
    has_softcap, softcap = (False, 1.0) if layout.softcap is None else (True, float(layout.softcap))
    return has_window, window, has_softcap, softcap


def prepare(q, k, v, past_k, past_v, key_padding_mask):
    """Contiguous inputs; an empty past becomes ``None``; padding mask as int8 ``[B, P + L]``."""
    q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
    if past_k is not None and past_k.shape[2] == 0:
        past_k = past_v = None
    past_k, past_v = _contig(past_k), _contig(past_v)
    kpm = None if key_padding_mask is None else key_padding_mask.to(torch.int8).contiguous()
    return q, k, v, past_k, past_v, kpm


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor | None,
            past_v: torch.Tensor | None, kpm: torch.Tensor | None, layout: AttentionLayout,
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the forward kernel on contiguous inputs (see :func:`prepare`).

    q ``[B, Hq, L, D]``, k/v ``[B, Hkv, L, D]``, past ``[B, Hkv, P, D]`` or None, kpm int8
    ``[B, P + L]`` or None. Returns ``out [B, Hq, L, D]`` (q's dtype), ``lse [B, Hq, L]`` float32.
    """
    batch, hq, length, dim = q.shape
    hkv = k.shape[1]
    past_len = 0 if past_k is None else past_k.shape[2]
    has_window, window, has_softcap, softcap = layout_args(layout, past_len, length)
    cfg = pick_config("fwd", dim, q.dtype, has_window, has_softcap)
    out = _alloc(q)
    lse = _alloc((batch, hq, length), torch.float32, q.device)
    if length == 0 or batch * hq == 0:
        return out, lse
    grid = (triton.cdiv(length, cfg.block_m), batch * hq)
    memory_attention_fwd_kernel[grid](
        q, k, v, past_k if past_k is not None else k, past_v if past_v is not None else v,
        kpm if kpm is not None else q, out, lse,
        layout.scale * LOG2E, length, past_len, layout.num_read, layout.num_write, dim, hq,
        hq // hkv, window, softcap,
        MASK=layout.mask, HAS_PAST=past_k is not None,
        PAST_TO_READ=layout.past_visible_to_read, HAS_KPM=kpm is not None,
        HAS_WINDOW=has_window, HAS_SOFTCAP=has_softcap, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        BLOCK_D=block_d(dim), DOT_F32=dot_f32(q.dtype), DOT_PREC=dot_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return out, lse


def backward(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             past_k: torch.Tensor | None, past_v: torch.Tensor | None, kpm: torch.Tensor | None,
             out: torch.Tensor, lse: torch.Tensor, layout: AttentionLayout, need_past_grad: bool,
             grad_lse: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
    """Gradients of :func:`forward` given ``dout [B, Hq, L, D]`` and, when the lse was used,
    ``grad_lse [B, Hq, L]`` float32 (d lse / d score = P, so it enters as ``delta - grad_lse``
    in ``dS = P (dP - delta)``).

    Returns ``(dq, dk, dv, dpast_k, dpast_v)``; the past grads are None unless
    ``need_past_grad`` (then ``[B, Hkv, P, D]``). All in the input dtype.
    """
    batch, hq, length, dim = q.shape
    hkv = k.shape[1]
    groups = hq // hkv
    past_len = 0 if past_k is None else past_k.shape[2]
    has_window, window, has_softcap, softcap = layout_args(layout, past_len, length)
    dout = dout.contiguous()
    bd = block_d(dim)
    f32 = dot_f32(q.dtype)
    delta = _alloc((batch, hq, length), torch.float32, q.device)
    dq, dk, dv = _alloc(q), _alloc(k), _alloc(v)
    dpk = dpv = None
    if need_past_grad and past_k is not None:
        dpk, dpv = _alloc(past_k), _alloc(past_v)
    n_rows = batch * hq * length
    if n_rows == 0:  # no query rows: the past keys (P > 0 with L = 0) get zero gradients
        return dq, dk, dv, None if dpk is None else dpk.zero_(), None if dpv is None else dpv.zero_()
    pre_block = 16 if interpreting() else 64
    bwd_preprocess_kernel[(triton.cdiv(n_rows, pre_block),)](
        out, dout, delta, n_rows, dim, BLOCK_M=pre_block, BLOCK_D=bd)
    if grad_lse is not None:
        delta.sub_(grad_lse)
    kpm_arg = kpm if kpm is not None else q
    common = dict(MASK=layout.mask, PAST_TO_READ=layout.past_visible_to_read,
                  HAS_KPM=kpm is not None, HAS_WINDOW=has_window, HAS_SOFTCAP=has_softcap,
                  BLOCK_D=bd, DOT_F32=f32,
                  DOT_PREC=dot_precision(q.dtype))
    qk_scale = layout.scale * LOG2E
    scalars = (qk_scale, layout.scale, length, past_len, layout.num_read, layout.num_write, dim,
               hq, groups)
    cfg = pick_config("bwd_dkdv", dim, q.dtype, has_window, has_softcap)
    buffers = [(k, v, dk, dv, length, False)]
    if dpk is not None:
        buffers.append((past_k, past_v, dpk, dpv, past_len, True))
    for kb, vb, dkb, dvb, n_len, is_past in buffers:
        bwd_dkdv_kernel[(triton.cdiv(n_len, cfg.block_n), batch * hkv)](
            q, kb, vb, dout, lse, delta, kpm_arg, dkb, dvb, *scalars, n_len, window, softcap,
            IS_PAST=is_past, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages, **common)
    cfg = pick_config("bwd_dq", dim, q.dtype, has_window, has_softcap)
    bwd_dq_kernel[(triton.cdiv(length, cfg.block_m), batch * hq)](
        q, k, v, past_k if past_k is not None else k, past_v if past_v is not None else v,
        dout, lse, delta, kpm_arg, dq, *scalars, window, softcap,
        HAS_PAST=past_k is not None, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **common)
    return dq, dk, dv, dpk, dpv


#: the flash-decoding path handles at most this many query rows (one BLOCK_M tile)
DECODE_MAX_ROWS = 16


def decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, past_k: torch.Tensor | None,
           past_v: torch.Tensor | None, kpm: torch.Tensor | None, layout: AttentionLayout,
           split_size: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Flash-decoding forward for ``L <= DECODE_MAX_ROWS``; same contract as :func:`forward`.

    ``split_size`` (keys per program, rounded up to a multiple of BLOCK_N) defaults to 256 on
    the GPU, 32 under the interpreter.
    """
    batch, hq, length, dim = q.shape
    if length > DECODE_MAX_ROWS:
        raise ValueError(f"decode handles at most {DECODE_MAX_ROWS} query rows, got {length}")
    hkv = k.shape[1]
    past_len = 0 if past_k is None else past_k.shape[2]
    has_window, window, has_softcap, softcap = layout_args(layout, past_len, length)
    cfg = pick_config("decode_split", dim, q.dtype, has_window, has_softcap)
    block_n = cfg.block_n
    split = split_size or (32 if interpreting() else 256)
    split = triton.cdiv(split, block_n) * block_n
    past_lo = 0
    if has_window and past_len:
        # the first row that sees the past (position P + first) sees past keys from
        # P + first - window + 1 on, later rows none before; none at all once first + 1 >= window
        first = 0 if layout.past_visible_to_read else min(layout.num_read, length - 1)
        past_lo = past_len if first + 1 >= window else \
            max(past_len + first - window + 1, 0) // block_n * block_n
    n_past = triton.cdiv(past_len - past_lo, split)
    n_splits = n_past + triton.cdiv(length, split)
    bd = block_d(dim)
    out = _alloc(q)
    lse = _alloc((batch, hq, length), torch.float32, q.device)
    if length == 0 or batch * hq == 0:
        return out, lse
    bm = DECODE_MAX_ROWS
    out_part = _alloc((batch * hq, n_splits, bm, bd), torch.float32, q.device)
    lse_part = _alloc((batch * hq, n_splits, bm), torch.float32, q.device)
    decode_split_kernel[(n_splits, batch * hq)](
        q, k, v, past_k if past_k is not None else k, past_v if past_v is not None else v,
        kpm if kpm is not None else q, out_part, lse_part,
        layout.scale * LOG2E, length, past_len, layout.num_read, layout.num_write, dim, hq,
        hq // hkv, split, n_past, n_splits, window, past_lo, softcap,
        MASK=layout.mask, PAST_TO_READ=layout.past_visible_to_read,
        HAS_KPM=kpm is not None, HAS_WINDOW=has_window, HAS_SOFTCAP=has_softcap, BLOCK_M=bm,
        BLOCK_N=block_n, BLOCK_D=bd, DOT_F32=dot_f32(q.dtype), DOT_PREC=dot_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    decode_reduce_kernel[(batch * hq,)](out_part, lse_part, out, lse, length, dim, n_splits,
                                        BLOCK_M=bm, BLOCK_D=bd)
    return out, lse
