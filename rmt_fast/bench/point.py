"""One benchmark point, meant to run in a fresh process so peak memory is its own.

``python -m rmt_fast.bench.point --system rmt_fast --mode infer --length 16000`` prints one JSON
line: tokens/s (median of the timed repeats after warm-up, and every repeat's time), achieved
GFLOP/s (:func:`rmt_fast.bench.systems.point_flops` over the median time) and peak memory.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch

from rmt_fast.bench.memory import peak_rss_mib
from rmt_fast.bench.systems import CONFIGS, INFER, TRAIN, build, point_flops
from rmt_fast.dtypes import CHOICES, dtype_name, resolve_dtype


def peak_memory_mib() -> float:
    """Peak RSS of this process (CPU) or the torch allocator's peak (CUDA)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return peak_rss_mib()


def run_point(system: str, mode: str, length: int, batch: int, repeats: int = 3, warmup: int = 1,
              warmup_length: int | None = None, config: str = "default", threads: int = 1,
              dtype: str | torch.dtype = "float32", official_rmt: str | None = None) -> dict:
    torch.set_num_threads(threads)
    cfg = CONFIGS[config]
    dtype = resolve_dtype(dtype, "cpu", warn=False)  # the sweep warned once, not once a point
    step = build(system, mode, cfg, length, dtype=dtype, official_rmt=official_rmt)
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, cfg.vocab, (batch, length), generator=gen)
    rss_init = peak_memory_mib()
    warm = tokens if warmup_length is None else tokens[:, :warmup_length]
    for _ in range(warmup):
        step(warm)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step(tokens)
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    flops = point_flops(system, mode, cfg, length, batch)
    return {"system": system, "mode": mode, "length": length, "batch": batch, "config": config,
            "dtype": dtype_name(dtype), "threads": threads, "times_s": times, "median_s": median,
            "tokens_per_s": batch * length / median, "flops": flops,
            "gflops": flops / median / 1e9, "peak_mib": peak_memory_mib(), "init_mib": rss_init,
            "status": "ok"}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--system", required=True)
    p.add_argument("--mode", choices=[INFER, TRAIN], required=True)
    p.add_argument("--length", type=int, required=True)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--warmup-length", type=int, default=None)
    p.add_argument("--config", default="default")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="float32", choices=CHOICES)
    p.add_argument("--official-rmt", default=None, help="the official wrapper's language_modeling.py")
    a = p.parse_args(argv)
    row = run_point(a.system, a.mode, a.length, a.batch, a.repeats, a.warmup, a.warmup_length,
                    a.config, a.threads, a.dtype, a.official_rmt)
    print(json.dumps(row))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
