"""Launchers of the associative-memory kernels: same signatures as :mod:`..chunked`.

Configs are fixed per kernel and dtype (no autotuning without a GPU); under the interpreter one
small config keeps the serial run cheap. Outputs are ``torch.empty`` (NaN-filled under
``RMT_FAST_POISON=1``, as the attention launchers do, so an unwritten element fails the tests).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton

from rmt_fast.ops.memory_attention.triton.launch import dot_f32, dot_precision, interpreting, poisoning

from ..chunked import feature_norm
from .kernels import phi_grad_kernel, phi_matmul_kernel, phi_outer_kernel, rowdot_kernel


@dataclass(frozen=True)
class Config:
    """``block_a`` x ``block_b`` are the kernel's two tiled dims (matmul: rows x keys; outer:
    keys x rows; grad: rows x d_mem), ``block_d`` the column tile."""

    block_a: int
    block_b: int
    block_d: int
    num_warps: int
    num_stages: int


#: GPU configs per (kernel, dtype). Picked as zero-spill configs on sm_80 and sm_90a in a small
#: ptxas sweep (``python -m rmt_fast.ops.associative_memory.triton.aot``); not timed (no GPU here).
GPU_CONFIGS = {
    ("matmul", "fp16"): Config(64, 32, 64, 4, 2),
    ("matmul", "bf16"): Config(64, 32, 64, 4, 2),
    ("matmul", "fp32"): Config(32, 32, 64, 4, 2),
    ("outer", "fp16"): Config(64, 32, 64, 4, 2),
    ("outer", "bf16"): Config(64, 32, 64, 4, 2),
    ("outer", "fp32"): Config(32, 32, 64, 4, 2),
    # 32x32x32 spilled ~300 bytes on sm_80 in fp16/bf16 (255 registers): 16 rows per program
    ("grad", "fp16"): Config(16, 32, 64, 4, 1),
    ("grad", "bf16"): Config(16, 32, 64, 4, 1),
    ("grad", "fp32"): Config(16, 32, 32, 4, 1),
}
INTERPRET_CONFIG = Config(16, 16, 16, 1, 1)
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}


def gpu_config(kernel: str, dtype: str) -> Config:
    return GPU_CONFIGS[(kernel, dtype)]


def pick_config(kernel: str, dtype: torch.dtype) -> Config:
    if interpreting():
        return INTERPRET_CONFIG
    return gpu_config(kernel, DTYPE_NAMES[dtype])


def _check_dtype(t: torch.Tensor) -> None:
    if t.dtype not in DTYPE_NAMES:
        raise ValueError(f"the triton backend takes float16, bfloat16 or float32, got {t.dtype} "
                         "(use backend='torch' for float64)")


def _alloc(shape, dtype, device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    return out.fill_(float("nan")) if poisoning() else out


def _km_block(dm: int, cfg: Config) -> int:
    """d_mem tile of the grad kernel: the config's, at most the next power of two of d_mem."""
    return max(16, min(cfg.block_b, triton.next_power_of_2(dm)))


def _f32(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float().contiguous()


def phi_matmul(x, Bm, w, *, nu: int, normalize: bool, eps: float, floor: float = 0.0):
    """See :func:`rmt_fast.ops.associative_memory.chunked.phi_matmul` (statistics in float32)."""
    _check_dtype(x)
    x, Bm = x.contiguous(), Bm.contiguous()
    w = None if w is None else w.contiguous()
    batch, length, dm = x.shape
    k, d = Bm.shape[1], Bm.shape[2]
    out = _alloc((batch, length, d), Bm.dtype, x.device)
    nrm = _alloc((batch, length), torch.float32, x.device)
    den = _alloc((batch, length), torch.float32, x.device) if w is not None else None
    if batch * length * d == 0:
        return out, den, nrm
    cfg = pick_config("matmul", x.dtype)
    grid = (triton.cdiv(length, cfg.block_a), triton.cdiv(d, cfg.block_d), batch)
    phi_matmul_kernel[grid](
        x, Bm, w if w is not None else Bm, out, den if den is not None else nrm, nrm,
        length, dm, k, d, float(eps), float(floor),
        HAS_W=w is not None, NORMALIZE=normalize, HAS_FLOOR=w is not None and floor > 0,
        BLOCK_M=cfg.block_a, BLOCK_K=cfg.block_b, BLOCK_D=cfg.block_d,
        DOT_F32=dot_f32(x.dtype), DOT_PREC=dot_precision(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out, den, nrm


def phi_outer(x, G, gscale, c, nrm, base_B, base_w, *, nu: int, normalize: bool):
    """See :func:`rmt_fast.ops.associative_memory.chunked.phi_outer`."""
    _check_dtype(x)
    x, G = x.contiguous(), G.contiguous()
    batch, length, dm = x.shape
    k, d = 2 * nu * dm, G.shape[-1]
    out_B = _alloc((batch, k, d), G.dtype, x.device)
    out_w = _alloc((batch, k), G.dtype, x.device) if c is not None else None
    if batch * k * d == 0:
        return out_B, out_w
    if length == 0:  # nothing to add
        out_B.copy_(base_B) if base_B is not None else out_B.zero_()
        if out_w is not None:
            out_w.copy_(base_w) if base_w is not None else out_w.zero_()
        return out_B, out_w
    cfg = pick_config("outer", x.dtype)
    gs, c32, n32 = _f32(gscale), _f32(c), _f32(nrm)
    base_B = None if base_B is None else base_B.contiguous()
    base_w = None if base_w is None else base_w.contiguous()
    grid = (triton.cdiv(k, cfg.block_a), triton.cdiv(d, cfg.block_d), batch)
    phi_outer_kernel[grid](
        x, G, gs if gs is not None else x, c32 if c32 is not None else x,
        n32 if n32 is not None else x, base_B if base_B is not None else out_B,
        base_w if base_w is not None else out_B, out_B, out_w if out_w is not None else out_B,
        length, dm, k, d,
        HAS_GS=gs is not None, HAS_C=c is not None, HAS_BASE=base_B is not None,
        NORMALIZE=normalize,
        BLOCK_K=cfg.block_a, BLOCK_R=cfg.block_b, BLOCK_D=cfg.block_d,
        DOT_F32=dot_f32(x.dtype), DOT_PREC=dot_precision(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return out_B, out_w


def phi_grad(x, G, gscale, Bm, c, w, s, nrm, *, nu: int, normalize: bool):
    """See :func:`rmt_fast.ops.associative_memory.chunked.phi_grad`; ``s`` is required with
    ``normalize``."""
    _check_dtype(x)
    if normalize and s is None:
        raise ValueError("phi_grad with normalize=True needs s = phi_n . d phi_n per row")
    x, G, Bm = x.contiguous(), G.contiguous(), Bm.contiguous()
    batch, length, dm = x.shape
    k, d = Bm.shape[1], Bm.shape[2]
    dx = _alloc(x.shape, x.dtype, x.device)
    if batch * length * dm == 0:
        return dx
    cfg = pick_config("grad", x.dtype)
    gs, c32, s32, n32 = _f32(gscale), _f32(c), _f32(s), _f32(nrm)
    w = None if w is None else w.contiguous()
    grid = (triton.cdiv(length, cfg.block_a), batch)
    phi_grad_kernel[grid](
        x, G, gs if gs is not None else x, Bm, c32 if c32 is not None else x,
        w if w is not None else x, s32 if s32 is not None else x,
        n32 if n32 is not None else x, dx,
        length, dm, k, d,
        HAS_GS=gs is not None, HAS_C=c is not None, NORMALIZE=normalize, NU=nu,
        BLOCK_M=cfg.block_a, BLOCK_KM=_km_block(dm, cfg), BLOCK_D=cfg.block_d,
        DOT_F32=dot_f32(x.dtype), DOT_PREC=dot_precision(x.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    return dx


def rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum_d a * b`` ``[B, L]`` float32 for ``a``, ``b`` ``[B, L, D]``."""
    a, b = a.contiguous(), b.contiguous()
    n_rows, d = a.numel() // max(1, a.shape[-1]), a.shape[-1]
    out = _alloc(a.shape[:-1], torch.float32, a.device)
    if n_rows == 0:
        return out
    block_m = 16 if interpreting() else 64
    rowdot_kernel[(triton.cdiv(n_rows, block_m),)](a, b, out, n_rows, d, BLOCK_M=block_m,
                                                   BLOCK_D=16 if interpreting() else 64)
    return out


__all__ = ["GPU_CONFIGS", "feature_norm", "gpu_config", "phi_grad", "phi_matmul", "phi_outer",
           "rowdot"]
