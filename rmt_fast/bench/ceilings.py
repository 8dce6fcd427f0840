"""The machine's own ceilings, measured in the run that reports against them.

* matrix product: ``C = A @ B`` on random ``[n, n]`` operands in each dtype, ``2 n^3`` FLOPs,
  through ATen's ``matmul`` (MKL on x86 CPUs) and, on CPU, through oneDNN with a packed operand
  (what reading uses: :mod:`rmt_fast.integrations.packed_linear`); the ceiling is the better of
  the two (MKL runs its AVX2 code on AMD CPUs: on the project's AMD EPYC oneDNN was 2.2x faster
  in float32);
* memory copy: ``dst.copy_(src)`` of a large buffer, bytes read plus bytes written.

Each is timed ``repeats`` times after a warm-up; the ceiling is the best run (the least
disturbed one on a shared machine), the median is kept too. Without a given size, a dtype whose
products are slow on this CPU gets a smaller matrix (:func:`fit_size`): on an AMD EPYC without AVX-512
ATen's bf16 product ran at 0.3-1 GFLOP/s (2026-12-07), where the default size took 55 s a run
and the bench's ceiling process hit its 300 s timeout, losing the float32 ceiling with it. On
CUDA the clock is read after ``torch.cuda.synchronize()`` around ``inner`` back-to-back calls.

``python -m rmt_fast.bench.ceilings [--threads 1] [--dtypes float32 bfloat16]`` prints one
JSON object.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from rmt_fast.dtypes import dtype_name, resolve_dtype
from rmt_fast.integrations import packed_linear

#: defaults per device type: matrix size, copy MiB, calls per timed run
DEFAULTS = {"cpu": dict(size=2048, copy_mib=256, inner=1),
            "cuda": dict(size=8192, copy_mib=2048, inner=10)}
#: fit_size: the probe's matrix size and the longest product it lets through (seconds)
PROBE_SIZE = 128
MAX_PRODUCT_S = 2.0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn, device: torch.device, repeats: int, inner: int) -> list[float]:
    fn()  # warm-up: library handles, oneDNN/cuBLAS kernel selection
    _sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            fn()
        _sync(device)
        times.append((time.perf_counter() - start) / inner)
    return times


def matmul_rate(dtype: torch.dtype, size: int, device: torch.device, repeats: int = 5,
                inner: int = 1) -> dict:
    """GFLOP/s of an ``[size, size] @ [size, size]`` product (random operands, never zeros)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    a = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    b = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    c = torch.empty(size, size, device=device, dtype=dtype)
    flops = 2.0 * size ** 3
    runs = {"aten": _time(lambda: torch.matmul(a, b, out=c), device, repeats, inner)}
    if device.type == "cpu" and packed_linear.available(dtype):
        packed = torch.ops.mkldnn._reorder_linear_weight(b.t().contiguous(), size)
        runs["onednn"] = _time(lambda: torch.ops.mkldnn._linear_pointwise(a, packed, None, "none",
                                                                           [], ""),
                               device, repeats, inner)
    best = max(runs, key=lambda k: -min(runs[k]))
    times = runs[best]
    return {"size": size, "gflops": flops / min(times) / 1e9,
            "median_gflops": flops / statistics.median(times) / 1e9, "library": best,
            "library_gflops": {k: flops / min(t) / 1e9 for k, t in runs.items()},
            "times_s": times}


def fit_size(size: int, probe_gflops: float, max_seconds: float = MAX_PRODUCT_S,
             min_size: int = PROBE_SIZE) -> int:
    """The largest of ``size``, ``size // 2``, ... (not below ``min_size``) whose product takes
    at most ``max_seconds`` at ``probe_gflops`` (the rate of a small product, a rough guess of a
    large one's: on the AVX2 EPYC the bf16 probe said 1024^3 would take under 2 s, it took
    2.2 s)."""
    n = size
    while n // 2 >= min_size and 2.0 * n ** 3 / (probe_gflops * 1e9) > max_seconds:
        n //= 2
    return n


def probe_gflops(dtype: torch.dtype, device: torch.device, size: int = PROBE_SIZE) -> float:
    """GFLOP/s of one ``[size, size]`` product after a warm-up (a rough rate for
    :func:`fit_size`)."""
    gen = torch.Generator(device="cpu").manual_seed(1)
    a = torch.randn(size, size, generator=gen).to(device=device, dtype=dtype)
    t = min(_time(lambda: torch.matmul(a, a), device, repeats=2, inner=1))
    return 2.0 * size ** 3 / max(t, 1e-9) / 1e9


def copy_rate(mib: int, device: torch.device, repeats: int = 5, inner: int = 1) -> dict:
    """GB/s (1e9 bytes, read + written) of copying a ``mib`` MiB float32 buffer."""
    n = mib * 2 ** 20 // 4
    src = torch.rand(n, device=device)
    dst = torch.empty_like(src)
    times = _time(lambda: dst.copy_(src), device, repeats, inner)
    moved = 2.0 * n * 4
    return {"mib": mib, "gbps": moved / min(times) / 1e9,
            "median_gbps": moved / statistics.median(times) / 1e9, "times_s": times}


def measure(dtypes=("float32", "bfloat16"), device: str | torch.device = "cpu",
            threads: int | None = None, size: int | None = None, copy_mib: int | None = None,
            repeats: int = 5, max_seconds: float = MAX_PRODUCT_S) -> dict:
    """Matrix-product GFLOP/s per dtype and copy GB/s on ``device``.

    ``threads`` sets ``torch.set_num_threads`` first (CPU; use the benchmark's own count).
    ``size``: the matrix size for every dtype; None: the device's default, on CPU cut per dtype to
    products of at most ``max_seconds`` (:func:`fit_size`; each row says its size; not on a GPU,
    where a small probe product is launch-bound and would cut it for nothing).
    Returns ``{"device", "threads", "matmul": {dtype name: {...}}, "copy": {...}}``.
    """
    device = torch.device(device)
    if threads is not None:
        torch.set_num_threads(threads)
    d = DEFAULTS.get(device.type, DEFAULTS["cpu"])
    copy_mib, inner = copy_mib or d["copy_mib"], d["inner"]
    out = {"device": str(device), "threads": torch.get_num_threads(), "matmul": {}}
    for name in dtypes:
        dtype = resolve_dtype(name, device, warn=False)  # measuring emulated bf16 is the point
        n = size or d["size"]
        if size is None and device.type == "cpu":  # a GPU's small products are launch-bound
            n = fit_size(n, probe_gflops(dtype, device), max_seconds)
        out["matmul"][dtype_name(dtype)] = matmul_rate(dtype, n, device, repeats, inner)
    out["copy"] = copy_rate(copy_mib, device, repeats, inner)
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m rmt_fast.bench.ceilings",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--size", type=int, default=None,
                   help="matrix size n (default CPU 2048, CUDA 8192, smaller for a dtype whose "
                        f"product would take over {MAX_PRODUCT_S:g} s)")
    p.add_argument("--copy-mib", type=int, default=None, help="copied MiB (CPU 256, CUDA 2048)")
    p.add_argument("--repeats", type=int, default=5)
    a = p.parse_args(argv)
    result = measure(a.dtypes, a.device, a.threads, a.size, a.copy_mib, a.repeats)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
