"""The extension's element-wise CPU kernels against ATen's, one thread, per code path.

LayerNorm (``rmt_fast::layer_norm`` vs ``F.layer_norm``), the cross-entropy forward
(``rmt_fast::cross_entropy`` vs ``F.cross_entropy`` on float32 logits, summed) and the tanh GELU
(``rmt_fast::gelu_tanh`` vs ``F.gelu``), float32 and bfloat16, at the model shapes of
``bench/README.md``; each kernel on every code path this CPU runs (``RMT_FAST_CPU_ISA``, read
per call; the GELU picks its clone at load time and ignores it). Time: thread CPU time per call,
best of ``rounds`` samples of ``calls`` calls; ``aten / ours`` > 1 means ours is faster. These
numbers decide :data:`rmt_fast._extension.LAYER_NORM_ISAS`.

``python -m rmt_fast.bench.elementwise [--rounds 5] [--calls 30] [--paths generic avx2 ...]``
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from rmt_fast import _extension
from rmt_fast.bench.two_ways import thread_ms as call_ms
from rmt_fast.ops.memory_attention import cpu_kernel

PATHS = cpu_kernel.ISAS[:-1]  # float32 calls never take "amx"
LAYER_NORM_SHAPES = ((4096, 256), (512, 768))
CROSS_ENTROPY_SHAPES = ((1024, 1000), (512, 50257))
GELU_SHAPE = (512, 3072)


def best_ms(fns, rounds: int, calls: int) -> list[float]:
    """Best thread CPU ms per call of each of ``fns`` over ``rounds`` samples of ``calls`` calls,
    the functions taking turns within each round (a process's first samples ran several times
    slower than later ones at 4 MB tensors, which alone made ATen look 6x slower)."""
    for fn in fns:
        fn()
    best = [float("inf")] * len(fns)
    for _ in range(rounds):
        for i, fn in enumerate(fns):
            best[i] = min(best[i], call_ms(lambda fn=fn: [fn() for _ in range(calls)]) / calls)
    return best


def cases(dtype: torch.dtype, scale: float = 1.0):
    """``(kernel, shape, aten fn, ours fn)`` on random inputs (never zeros); ``scale`` < 1
    shrinks the rows (tests)."""
    g = torch.Generator().manual_seed(0)

    def rows(n):
        return max(2, int(n * scale))

    for r, n in LAYER_NORM_SHAPES:
        x = torch.randn(rows(r), n, generator=g).to(dtype)
        w, b = torch.randn(n, generator=g), torch.randn(n, generator=g)
        yield ("layer_norm", (rows(r), n),
               lambda x=x, w=w, b=b, n=n: F.layer_norm(x, (n,), w.to(x.dtype), b.to(x.dtype)),
               lambda x=x, w=w, b=b, n=n: torch.ops.rmt_fast.layer_norm(x, [n], w, b, 1e-5)[0])
    for r, v in CROSS_ENTROPY_SHAPES:
        x = torch.randn(rows(r), v, generator=g).to(dtype)
        t = torch.randint(0, v, (rows(r),), generator=g)
        yield ("cross_entropy", (rows(r), v),
               lambda x=x, t=t: F.cross_entropy(x.float(), t, reduction="sum"),
               lambda x=x, t=t: torch.ops.rmt_fast.cross_entropy(x, t, -100)[0])
    x = torch.randn(rows(GELU_SHAPE[0]), GELU_SHAPE[1], generator=g).to(dtype)
    yield ("gelu_tanh", tuple(x.shape), lambda x=x: F.gelu(x, approximate="tanh"),
           lambda x=x: torch.ops.rmt_fast.gelu_tanh(x))


def run(paths=PATHS, dtypes=(torch.float32, torch.bfloat16), rounds: int = 5, calls: int = 30,
        scale: float = 1.0) -> list[dict]:
    """One row per (kernel, dtype, shape, path this CPU runs): ms of ATen and of ours."""
    runnable = [p for p in cpu_kernel.runnable_isas(torch.float32) if p in paths]
    rows = []
    for dtype in dtypes:
        for kernel, shape, aten, ours in cases(dtype, scale):
            for path in runnable:
                with cpu_kernel.isa_env(path):
                    n = max(1, calls // 6) if kernel == "cross_entropy" else calls
                    a, o = best_ms((aten, ours), rounds, n)
                    out_a, out_o = aten(), ours()
                diff = (out_a.double() - out_o.double()).abs().max().item()
                rows.append({"kernel": kernel, "dtype": str(dtype).removeprefix("torch."),
                             "shape": list(shape), "path": path, "aten_ms": a, "ours_ms": o,
                             "aten_over_ours": a / o, "max_diff": diff})
    return rows


def main(argv=None) -> list[dict]:
    p = argparse.ArgumentParser(prog="python -m rmt_fast.bench.elementwise",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--calls", type=int, default=30)
    p.add_argument("--paths", nargs="+", choices=PATHS, default=list(PATHS))
    p.add_argument("--dtypes", nargs="+", choices=("float32", "bfloat16"),
                   default=["float32", "bfloat16"])
    a = p.parse_args(argv)
    if not (_extension.HAS_LAYER_NORM and _extension.HAS_CROSS_ENTROPY):
        raise SystemExit("rmt_fast._C was built without the element-wise kernels")
    torch.set_num_threads(1)
    rows = run(a.paths, [getattr(torch, d) for d in a.dtypes], a.rounds, a.calls)
    print("| kernel | dtype | shape | path | ATen ms | ours ms | ATen / ours | max diff |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['kernel']} | {r['dtype']} | {r['shape']} | {r['path']} | "
              f"{r['aten_ms']:.3f} | {r['ours_ms']:.3f} | {r['aten_over_ours']:.2f}x | "
              f"{r['max_diff']:.1e} |")
    return rows


if __name__ == "__main__":
    main()
