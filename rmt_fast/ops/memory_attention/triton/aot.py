"""Ahead-of-time compile of every shipped kernel variant, without a GPU.

For each kernel, dtype, head dim and target (sm_80, sm_90) this builds the kernel with
``triton.compile(ASTSource(...), target=GPUTarget("cuda", cap, 32))`` using the launcher's GPU
config, then runs Triton's bundled ``ptxas -v`` (see :func:`ptxas_path`) on the PTX to read
registers, spills and static shared memory. Triton allocates shared memory dynamically, so
the useful shared-memory figure is ``metadata.shared`` (bytes), reported as ``smem``. The
attention kernels come four times: as launched without a sliding window or a logit soft-cap,
with a window (``<name>_window``: ``HAS_WINDOW=True``, a runtime ``WINDOW``), with a soft-cap
(``<name>_softcap``: ``HAS_SOFTCAP=True``, a runtime float ``SOFTCAP``) and with both
(``<name>_window_softcap``, as Gemma 2's local layers), each with the launcher's config for it.

Run ``python -m rmt_fast.ops.memory_attention.triton.aot`` for a markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import tempfile
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from .bwd import bwd_dkdv_kernel, bwd_dq_kernel, bwd_preprocess_kernel
from .decode import decode_reduce_kernel, decode_split_kernel
from .fwd import memory_attention_fwd_kernel
from .launch import DECODE_MAX_ROWS, Config, block_d, dot_precision, gpu_config

DTYPES = {"fp16": "fp16", "bf16": "bf16", "fp32": "fp32"}
PTXAS_DIR = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")


def ptxas_path(cap: int) -> str:
    """The ptxas Triton itself uses for ``cap``: the bundled CUDA 12.x ``ptxas`` below sm_90,
    ``ptxas-blackwell`` (a newer CUDA, which accepts Triton's PTX 9.x) from sm_90 on."""
    return os.path.join(PTXAS_DIR, "ptxas" if cap < 90 else "ptxas-blackwell")


def _signature(fn, pointers: dict[str, str], floats: tuple[str, ...], constexprs: dict):
    """Signature dict in Triton 3.x form: ``{"X": "*fp16", "n": "i32", "C": "constexpr"}``."""
    sig = {}
    for name in fn.arg_names:
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        elif name in floats:
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig


def _attrs(fn, sig: dict[str, str], aligned_ints: tuple[str, ...]):
    """Divisibility-by-16 hints, as the runtime specialiser would give for aligned tensors."""
    return {(i,): [["tt.divisibility", 16]] for i, name in enumerate(fn.arg_names)
            if sig[name].startswith("*") or name in aligned_ints}


def _variants(dtype: str, head_dim: int):
    """(name, kernel, pointer types, float args, constexprs, config) for one dtype / head dim:
    the kernels as launched without a window or a soft-cap, then the attention kernels with a
    window (``<name>_window``), a soft-cap (``<name>_softcap``) and both
    (``<name>_window_softcap``), each with the launcher's config for it."""
    for window, softcap in ((False, False), (True, False), (False, True), (True, True)):
        yield from _kernel_variants(dtype, head_dim, window, softcap)


def _kernel_variants(dtype: str, head_dim: int, window: bool, softcap: bool):
    t = f"*{dtype}"
    bd = block_d(head_dim)
    plain = not (window or softcap)
    sfx = ("_window" if window else "") + ("_softcap" if softcap else "")
    mask_flags = dict(MASK="causal", PAST_TO_READ=False, HAS_KPM=False, HAS_WINDOW=window,
                      HAS_SOFTCAP=softcap, BLOCK_D=bd, DOT_F32=False,
                      DOT_PREC=dot_precision(dtype))
    fwd_cfg = gpu_config("fwd", head_dim, dtype, window, softcap)
    fwd_ptrs = dict(Q=t, K=t, V=t, PK=t, PV=t, KPM="*i8", Out=t, Lse="*fp32")
    yield ("fwd" + sfx, memory_attention_fwd_kernel, fwd_ptrs, ("qk_scale", "SOFTCAP"),
           dict(mask_flags, HAS_PAST=True, BLOCK_M=fwd_cfg.block_m, BLOCK_N=fwd_cfg.block_n),
           fwd_cfg)
    if plain:
        yield ("bwd_pre", bwd_preprocess_kernel, dict(Out=t, DO=t, Delta="*fp32"), (),
               dict(BLOCK_M=64, BLOCK_D=bd), Config(64, 0, 4, 1))
    cfg = gpu_config("bwd_dkdv", head_dim, dtype, window, softcap)
    yield ("bwd_dkdv" + sfx, bwd_dkdv_kernel,
           dict(Q=t, KB=t, VB=t, DO=t, Lse="*fp32", Delta="*fp32", KPM="*i8", DK=t, DV=t),
           ("qk_scale", "sm_scale", "SOFTCAP"),
           dict(mask_flags, IS_PAST=False, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n), cfg)
    cfg = gpu_config("bwd_dq", head_dim, dtype, window, softcap)
    yield ("bwd_dq" + sfx, bwd_dq_kernel,
           dict(Q=t, K=t, V=t, PK=t, PV=t, DO=t, Lse="*fp32", Delta="*fp32", KPM="*i8", DQ=t),
           ("qk_scale", "sm_scale", "SOFTCAP"),
           dict(mask_flags, HAS_PAST=True, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n), cfg)
    cfg = gpu_config("decode_split", head_dim, dtype, window, softcap)
    yield ("decode_split" + sfx, decode_split_kernel,
           dict(Q=t, K=t, V=t, PK=t, PV=t, KPM="*i8", OutPart="*fp32", LsePart="*fp32"),
           ("qk_scale", "SOFTCAP"),
           dict(mask_flags, BLOCK_M=DECODE_MAX_ROWS, BLOCK_N=cfg.block_n), cfg)
    if plain:
        yield ("decode_reduce", decode_reduce_kernel,
               dict(OutPart="*fp32", LsePart="*fp32", Out=t, Lse="*fp32"), (),
               dict(BLOCK_M=DECODE_MAX_ROWS, BLOCK_D=bd), Config(DECODE_MAX_ROWS, 0, 4, 1))


def _ptxas(ptx: str, arch: str, cap: int) -> dict[str, int]:
    """Run the bundled ``ptxas -v`` and parse registers / spill bytes / static smem."""
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run([ptxas_path(cap), "-v", f"--gpu-name={arch}", src, "-o",
                              os.path.join(tmp, "k.cubin")], capture_output=True, text=True,
                             check=True)
    log = res.stderr + res.stdout

    def grab(pattern: str) -> int:
        m = re.search(pattern, log)
        return int(m.group(1)) if m else 0

    return dict(regs=grab(r"Used (\d+) registers"), spill_stores=grab(r"(\d+) bytes spill stores"),
                spill_loads=grab(r"(\d+) bytes spill loads"), ptxas_smem=grab(r"(\d+) bytes smem"))


def compile_variant(kernel, pointers, floats, constexprs, cfg: Config, cap: int,
                    aligned_ints=("head_dim",)):
    sig = _signature(kernel, pointers, floats, constexprs)
    src = ASTSource(fn=kernel, signature=sig, constexprs=constexprs,
                    attrs=_attrs(kernel, sig, aligned_ints))
    return triton.compile(src, target=GPUTarget("cuda", cap, 32),
                          options=dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages))


def compile_stats(kernel, pointers, floats, constexprs, cfg: Config, cap: int, **compile_kw) -> dict:
    """Compile one variant for ``sm_<cap>`` and describe it: warps, stages, shared memory, which
    MMA instructions the PTX uses, compile seconds, and ptxas' registers and spills."""
    t0 = time.perf_counter()
    compiled = compile_variant(kernel, pointers, floats, constexprs, cfg, cap, **compile_kw)
    ptx = compiled.asm["ptx"]
    arch = "sm_90a" if cap == 90 else f"sm_{cap}"  # Triton emits sm_90a PTX for Hopper
    return dict(warps=cfg.num_warps, stages=cfg.num_stages, smem=compiled.metadata.shared,
                mma="mma.sync" in ptx or "wgmma" in ptx, wgmma="wgmma" in ptx,
                tf32=re.search(r"mma\S*\.tf32", ptx) is not None,
                compile_s=round(time.perf_counter() - t0, 2), **_ptxas(ptx, arch, cap))


def aot_table(caps=(80, 90), dtypes=("fp16", "bf16", "fp32"), head_dims=(64, 128),
              kernels: tuple[str, ...] | None = None) -> list[dict]:
    """Compile every variant; one dict row per (kernel, dtype, head dim, target)."""
    rows = []
    for cap in caps:
        arch = "sm_90a" if cap == 90 else f"sm_{cap}"  # Triton emits sm_90a PTX for Hopper
        for dtype in dtypes:
            for hd in head_dims:
                for name, kern, ptrs, floats, cexpr, cfg in _variants(DTYPES[dtype], hd):
                    if kernels is not None and name not in kernels:
                        continue
                    rows.append(dict(
                        kernel=name, dtype=dtype, head_dim=hd, target=arch,
                        block=f"{cfg.block_m}x{cfg.block_n}" if cfg.block_n else f"{cfg.block_m}",
                        **compile_stats(kern, ptrs, floats, cexpr, cfg, cap)))
    return rows


COLUMNS = ("kernel", "dtype", "head_dim", "target", "block", "warps", "stages", "regs",
           "spill_stores", "spill_loads", "smem", "mma", "wgmma", "tf32")


def markdown(rows: list[dict], columns: tuple[str, ...] = COLUMNS) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caps", type=int, nargs="+", default=[80, 90])
    parser.add_argument("--dtypes", nargs="+", default=["fp16", "bf16", "fp32"])
    parser.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--kernels", nargs="+", default=None)
    parser.add_argument("--json", action="store_true", help="print the rows as JSON instead")
    args = parser.parse_args(argv)
    rows = aot_table(tuple(args.caps), tuple(args.dtypes), tuple(args.head_dims),
                     tuple(args.kernels) if args.kernels else None)
    if args.json:
        print(json.dumps(rows))
        return
    print(markdown(rows))
    spills = [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    print(f"\n{len(rows)} variants compiled; {len(spills)} with register spills.")
    hopper_bf16 = [r for r in rows if r["kernel"] == "fwd" and r["dtype"] == "bf16"
                   and r["target"] == "sm_90a"]
    for r in hopper_bf16:
        print(f"bf16 sm_90a forward D={r['head_dim']}: wgmma in PTX = {r['wgmma']}")


if __name__ == "__main__":
    main()
