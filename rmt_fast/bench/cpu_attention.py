"""CPU memory attention side by side: the extension's fused kernel vs the ``cpu_flash`` path vs SDPA.

``python -m rmt_fast.bench.cpu_attention`` prints one markdown row per (case, system). Systems:

* ``kernel``: ``memory_attention(..., backend="cpu")``, the fused C++ kernel (ours), on the
  path it picks for the dtype (:func:`rmt_fast.ops.memory_attention.cpu_kernel.isa`);
  ``kernel[amx]`` / ``kernel[avx512_bf16]`` / ``kernel[avx512]`` / ``kernel[avx2]`` /
  ``kernel[generic]`` (with ``--isa-variants``): the same kernel on its AMX-BF16 tile path
  (bfloat16 only; float32 takes the next), its AVX-512 BF16 dot-product path, its AVX-512F
  float32 path, its AVX2 + FMA path or its portable C++ path (``RMT_FAST_CPU_ISA``, capped by the
  CPU), i.e. what other CPUs run;
* ``cpu_flash``: ``memory_attention(..., backend="torch")``, ATen's CPU flash attention per mask
  block, merged by log-sum-exp (what ``backend="auto"`` ran on CPU before the kernel);
* ``kernel[rows]`` / ``kernel[tiles]`` (with ``--rows-variants``; alone on ``ROWS_CASES`` with
  ``--rows-crossover``): the kernel's forward pass forced onto its in-place path for few query
  rows or onto its packed tiles (``RMT_FAST_CPU_ROWS_MAX``), to place its ``rows_max`` rule;
* ``sdpa``: ``F.scaled_dot_product_attention``, with ``is_causal=True`` for plain causal
  attention without past keys and a dense bool mask (past keys concatenated, inside the timed
  call) otherwise.

All systems run in one process on one thread, in alternating rounds (every round times every
system once, in turn, a sample repeating the call for at least 10 ms), on the same inputs. ``ms``
is the median wall time per call over the rounds; ``cpu_ms`` the minimum thread CPU time
(``time.thread_time``), which a machine shared with other jobs disturbs much less; ``GFLOP/s``
and the ratios use ``cpu_ms``. FLOPs count the visible (query, key) pairs only, the same for
every system: ``4 D`` per pair forward, ``3.5x`` that for forward + backward (the backward
recomputes the scores). ``max_diff``: max abs difference of the output from ``kernel``'s.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F

from rmt_fast import memory_attention
from rmt_fast.masks import AttentionLayout, layout_visibility
from rmt_fast.ops.memory_attention import cpu_kernel

SYSTEMS = ("kernel", "cpu_flash", "sdpa")
ISA_VARIANTS = tuple(f"kernel[{p}]" for p in reversed(cpu_kernel.ISAS))
COLUMNS = ("case", "dtype", "mode", "system", "ms", "cpu_ms", "GFLOP/s", "x cpu_flash", "x sdpa",
           "max_diff")


@dataclass(frozen=True)
class Case:
    """``length = read + segment + write`` query rows; ``past`` keys in their own buffer."""

    name: str
    batch: int
    heads: int
    segment: int
    memory: int = 16
    past: int = 0
    mask: str = "causal"
    head_dim: int = 64
    kv_heads: int | None = None

    @property
    def length(self) -> int:
        return self.segment + 2 * self.memory


CASES = (
    Case("default B1", 1, 4, 256),
    Case("default B8", 8, 4, 256),
    Case("default B32", 32, 4, 256),
    Case("default B8 rmt", 8, 4, 256, mask="rmt"),
    Case("default B8 rmt +past", 8, 4, 256, past=272, mask="rmt"),
    Case("gpt2-small S512", 1, 12, 512),
    Case("gpt2-small S1024", 1, 12, 1024),
    Case("gpt2-small S512 B4 +past", 4, 12, 512, past=528),
    Case("small S32 B1", 1, 4, 32, memory=4),
    # one generated token (no memory rows) over a segment's and its predecessor's keys
    Case("gpt2-small decode +past528", 1, 12, 1, memory=0, past=528),
    Case("gpt2-small decode +past2048", 1, 12, 1, memory=0, past=2048),
)
QUICK = tuple(CASES[i] for i in (0, 1, 5))
#: ``--rows-crossover``: the kernel forced onto its in-place rows path or its tiles
#: (``RMT_FAST_CPU_ROWS_MAX``) for L query rows over a past, one case per (heads, past, L)
ROWS_MAX = {"rows": 1 << 30, "tiles": 0}
ROWS_SYSTEMS = ("kernel[rows]", "kernel[tiles]")
ROWS_CASES = tuple(Case(f"H{h} past{p} L{n}", 1, h, n, memory=0, past=p)
                   for h, p in ((12, 528), (12, 2048), (4, 272)) for n in (1, 2, 4, 8, 12, 16, 32))


def _flops(case: Case, mode: str) -> float:
    layout = AttentionLayout(case.memory, case.memory, case.mask)
    pairs = int(layout_visibility(layout, case.length, case.past).sum())
    fwd = 4.0 * case.head_dim * pairs * case.batch * case.heads
    return fwd if mode == "fwd" else 3.5 * fwd


def _inputs(case: Case, dtype: torch.dtype, grad: bool) -> dict:
    g = torch.Generator().manual_seed(0)
    hkv = case.kv_heads or case.heads

    def rnd(h, n):
        t = torch.randn(case.batch, h, n, case.head_dim, generator=g).to(dtype)
        return t.requires_grad_(grad)

    inp = dict(q=rnd(case.heads, case.length), k=rnd(hkv, case.length), v=rnd(hkv, case.length))
    if case.past:
        inp.update(past_k=rnd(hkv, case.past), past_v=rnd(hkv, case.past))
    return inp


def _call(system: str, case: Case, inp: dict) -> Callable[[], torch.Tensor]:
    kw = dict(num_read=case.memory, num_write=case.memory, mask=case.mask)
    if system.startswith("kernel"):
        return lambda: memory_attention(**inp, backend="cpu", **kw)
    if system == "cpu_flash":
        return lambda: memory_attention(**inp, backend="torch", **kw)
    layout = AttentionLayout(case.memory, case.memory, case.mask)
    q, k, v = inp["q"], inp["k"], inp["v"]
    gqa = q.shape[1] != k.shape[1]
    if case.mask == "causal" and not case.past:
        return lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=gqa)
    vis = layout_visibility(layout, case.length, case.past)

    def sdpa():
        kk = torch.cat([inp["past_k"], k], dim=2) if case.past else k
        vv = torch.cat([inp["past_v"], v], dim=2) if case.past else v
        return F.scaled_dot_product_attention(q, kk, vv, attn_mask=vis, enable_gqa=gqa)
    return sdpa


@contextlib.contextmanager
def _env(system: str):
    """The kernel's code path for ``system``: ``RMT_FAST_CPU_ISA`` (``kernel[<isa>]``) or
    ``RMT_FAST_CPU_ROWS_MAX`` (``kernel[rows]``, ``kernel[tiles]``) for the block."""
    name = system[len("kernel["):-1] if system.startswith("kernel[") else None
    if name in ROWS_MAX:
        with cpu_kernel.env("RMT_FAST_CPU_ROWS_MAX", str(ROWS_MAX[name])):
            yield
    elif name is not None:
        with cpu_kernel.isa_env(name):
            yield
    else:
        yield


def run_case(case: Case, dtype: torch.dtype, mode: str, systems, rounds: int,
             min_sample_s: float = 0.01) -> list[dict]:
    """Time every system on ``case`` in alternating rounds; one result dict per system. A sample
    repeats the call until it has taken ``min_sample_s`` of CPU time (calibrated once)."""
    grad = mode == "fwd+bwd"
    inp = _inputs(case, dtype, grad)
    dout = torch.randn(case.batch, case.heads, case.length, case.head_dim,
                       generator=torch.Generator().manual_seed(1)).to(dtype)
    calls = {s: _call(s, case, inp) for s in systems}

    def step(system):
        with _env(system):
            if grad:
                out = calls[system]()
                out.backward(dout)
                for t in inp.values():
                    t.grad = None
                return out.detach()
            with torch.no_grad():
                return calls[system]()

    outs = {s: step(s) for s in systems}  # warm-up, and the outputs to compare
    reps = {}
    for s in systems:  # calls per sample: at least min_sample_s of CPU time
        c0 = time.thread_time()
        step(s)
        reps[s] = max(1, math.ceil(min_sample_s / max(time.thread_time() - c0, 1e-6)))
    wall = {s: [] for s in systems}
    cpu = {s: [] for s in systems}
    for _ in range(rounds):
        for s in systems:
            t0, c0 = time.perf_counter(), time.thread_time()
            for _ in range(reps[s]):
                step(s)
            cpu[s].append((time.thread_time() - c0) / reps[s])
            wall[s].append((time.perf_counter() - t0) / reps[s])
    flops = _flops(case, mode)
    best = {s: min(cpu[s]) for s in systems}
    ref = outs[systems[0]].float()
    rows = []
    for s in systems:
        rows.append(dict(
            case=case.name, dtype=str(dtype).removeprefix("torch."), mode=mode, system=s,
            ms=statistics.median(wall[s]) * 1e3, cpu_ms=best[s] * 1e3,
            gflops=flops / best[s] / 1e9,
            vs_cpu_flash=best.get("cpu_flash", float("nan")) / best[s],
            vs_sdpa=best.get("sdpa", float("nan")) / best[s],
            max_diff=(outs[s].float() - ref).abs().max().item(), shape=asdict(case)))
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for r in rows:
        lines.append(f"| {r['case']} | {r['dtype']} | {r['mode']} | {r['system']} | "
                     f"{r['ms']:.2f} | {r['cpu_ms']:.2f} | {r['gflops']:.0f} | "
                     f"{r['vs_cpu_flash']:.2f} | {r['vs_sdpa']:.2f} | {r['max_diff']:.1e} |")
    return "\n".join(lines)


def main(argv=None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="three cases, 3 rounds")
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds (default 7)")
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"],
                        choices=["float32", "bfloat16"])
    parser.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    parser.add_argument("--cases", nargs="+", default=None, help="case names (default: all)")
    parser.add_argument("--isa-variants", action="store_true",
                        help="also time the kernel capped to each of its code paths")
    parser.add_argument("--rows-variants", action="store_true",
                        help="also time the kernel forced onto its rows path and onto its tiles")
    parser.add_argument("--rows-crossover", action="store_true",
                        help="forward only: the kernel's in-place rows path vs its tiles for 1-32 "
                             "query rows over past keys (the kernel's rows_max rule)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None, help="also write the rows to this file")
    args = parser.parse_args(argv)
    if not cpu_kernel.HAS_CPU_KERNEL:
        raise SystemExit("the rmt_fast._C extension with memory_attention_cpu is not built")
    torch.set_num_threads(args.threads)
    cases = QUICK if args.quick else CASES
    if args.cases:
        cases = [c for c in CASES if c.name in args.cases]
    rounds = args.rounds or (3 if args.quick else 7)
    systems = SYSTEMS + (ISA_VARIANTS if args.isa_variants else ()) + \
        (ROWS_SYSTEMS if args.rows_variants else ())
    modes = args.modes
    if args.rows_crossover:
        cases, systems, modes = ROWS_CASES, ROWS_SYSTEMS, ["fwd"]
    print(f"kernel isa: {cpu_kernel.isa()} (bfloat16: {cpu_kernel.isa(torch.bfloat16)}), "
          f"threads: {torch.get_num_threads()}, rounds: {rounds}")
    rows = []
    for case in cases:
        for dtype in args.dtypes:
            for mode in modes:
                new = run_case(case, getattr(torch, dtype), mode, systems, rounds)
                rows += new
                print(markdown(new).split("\n", 2)[2], flush=True)
    print()
    print(markdown(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=1)
    return rows


if __name__ == "__main__":
    main()
