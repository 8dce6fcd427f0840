"""Ahead-of-time compile of the associative-memory kernels for sm_80 / sm_90, without a GPU.

Each kernel is compiled with the launcher's GPU config (``triton.compile`` on an ``ASTSource``,
as :mod:`rmt_fast.ops.memory_attention.triton.aot` does, whose helpers this reuses) and the PTX
goes through Triton's bundled ``ptxas -v`` for registers and spills.

Run ``python -m rmt_fast.ops.associative_memory.triton.aot`` for a markdown table.
"""

from __future__ import annotations

import argparse
import json

from rmt_fast.ops.memory_attention.triton import aot as attention_aot
from rmt_fast.ops.memory_attention.triton.aot import compile_stats
from rmt_fast.ops.memory_attention.triton.launch import Config as AttnConfig
from rmt_fast.ops.memory_attention.triton.launch import dot_precision

from .kernels import phi_grad_kernel, phi_matmul_kernel, phi_outer_kernel, rowdot_kernel
from .launch import _km_block, gpu_config

KERNELS = ("matmul", "matmul_floor", "outer", "grad", "rowdot")
ALIGNED = ("dm", "K", "D")


def _cfg(c) -> AttnConfig:
    return AttnConfig(c.block_a, c.block_b, c.num_warps, c.num_stages)


def _variants(dtype: str, d_mem: int, normalize: bool):
    """(name, kernel, pointer types, float args, constexprs, config) for one dtype / d_mem."""
    t = f"*{dtype}"
    common = dict(DOT_F32=False, DOT_PREC=dot_precision(dtype))
    c = gpu_config("matmul", dtype)
    for name, floor in (("matmul", False), ("matmul_floor", True)):
        yield (name, phi_matmul_kernel,
               dict(X=t, Bm=t, W=t, Out=t, Den="*fp32", Nrm="*fp32"), ("eps", "floor"),
               dict(common, HAS_W=True, NORMALIZE=normalize, HAS_FLOOR=floor, BLOCK_M=c.block_a,
                    BLOCK_K=c.block_b, BLOCK_D=c.block_d), c)
    c = gpu_config("outer", dtype)
    yield ("outer", phi_outer_kernel,
           dict(X=t, G=t, Gs="*fp32", C="*fp32", Nrm="*fp32", BaseB=t, BaseW=t, OutB=t, OutW=t), (),
           dict(common, HAS_GS=True, HAS_C=True, HAS_BASE=True, NORMALIZE=normalize,
                BLOCK_K=c.block_a, BLOCK_R=c.block_b, BLOCK_D=c.block_d), c)
    c = gpu_config("grad", dtype)
    yield ("grad", phi_grad_kernel,
           dict(X=t, G=t, Gs="*fp32", Bm=t, C="*fp32", Wv=t, S="*fp32", Nrm="*fp32", DX=t), (),
           dict(common, HAS_GS=True, HAS_C=True, NORMALIZE=normalize, NU=3, BLOCK_M=c.block_a,
                BLOCK_KM=_km_block(d_mem, c), BLOCK_D=c.block_d), c)
    yield ("rowdot", rowdot_kernel, dict(A=t, B=t, Out="*fp32"), (),
           dict(BLOCK_M=64, BLOCK_D=64), type(c)(64, 0, 64, 4, 1))


def aot_table(caps=(80, 90), dtypes=("fp16", "bf16", "fp32"), d_mems=(64,),
              kernels: tuple[str, ...] | None = None, normalize: bool = True) -> list[dict]:
    """Compile every variant; one row per (kernel, dtype, d_mem, target)."""
    rows = []
    for cap in caps:
        arch = "sm_90a" if cap == 90 else f"sm_{cap}"
        for dtype in dtypes:
            for dm in d_mems:
                for name, kern, ptrs, floats, cexpr, cfg in _variants(dtype, dm, normalize):
                    if kernels is not None and name not in kernels:
                        continue
                    rows.append(dict(
                        kernel=name, dtype=dtype, d_mem=dm, target=arch,
                        block=f"{cfg.block_a}x{cfg.block_b}x{cfg.block_d}",
                        **compile_stats(kern, ptrs, floats, cexpr, _cfg(cfg), cap,
                                        aligned_ints=ALIGNED)))
    return rows


COLUMNS = ("kernel", "dtype", "d_mem", "target", "block", "warps", "stages", "regs",
           "spill_stores", "spill_loads", "smem", "mma", "wgmma", "tf32")


def markdown(rows: list[dict]) -> str:
    return attention_aot.markdown(rows, COLUMNS)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caps", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--dtypes", nargs="+", default=["fp16", "bf16", "fp32"])
    parser.add_argument("--d-mems", type=int, nargs="+", default=[64])
    parser.add_argument("--kernels", nargs="+", default=None, choices=KERNELS)
    parser.add_argument("--no-normalize", action="store_true", help="compile NORMALIZE=False")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead")
    args = parser.parse_args(argv)
    rows = aot_table(tuple(args.caps), tuple(args.dtypes), tuple(args.d_mems),
                     tuple(args.kernels) if args.kernels else None, not args.no_normalize)
    if args.json:
        print(json.dumps(rows))
        return
    print(markdown(rows))
    spills = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    print(f"\n{len(rows)} variants compiled; {len(spills)} with register spills.")


if __name__ == "__main__":
    main()
