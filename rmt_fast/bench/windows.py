"""Sliding-window attention (Mistral, Gemma 2/3, gpt-oss's sliding layers), two ways, one
thread, CPU.

``dense``: SDPA with the window as a dense ``[L, L]`` bool mask (what
``attn_implementation="rmt_fast"`` ran for a window that cuts the keys before the kernels took
one). ``fused``: ``memory_attention(..., mask="causal", window=w)``, the fused CPU kernel, which
skips the key tiles outside every row's window. Causal self-attention ``[1, 8, L, 64]`` with 2 key/value
heads; timing as :mod:`rmt_fast.bench.two_ways`; ``max |diff|`` compares the two outputs.

``python -m rmt_fast.bench.windows --dtype float32 bfloat16 --lengths 2048 8192 --windows 128 1024``
"""

from __future__ import annotations

import argparse

import torch

from rmt_fast import memory_attention
from rmt_fast.bench.two_ways import sweep, time_ways
from rmt_fast.masks import dense_visibility
from rmt_fast.ops.memory_attention.dense import dense_sdpa


def run(dtype: torch.dtype, length: int, window: int, heads: int = 8, kv_heads: int = 2,
        dim: int = 64, rounds: int = 3) -> dict:
    """One case: ``{"dense fwd": ms, ..., "fused fwd+bwd": ms, "max_diff": x}``."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, length, dim, generator=g).to(dtype).requires_grad_()
    k, v = (torch.randn(1, kv_heads, length, dim, generator=g).to(dtype).requires_grad_()
            for _ in range(2))
    scale = dim ** -0.5

    def dense():  # the mask built per call, as transformers builds it per forward
        return dense_sdpa(q, k, v, dense_visibility(length, window=window), scale=scale)

    ways = {"dense": dense,
            "fused": lambda: memory_attention(q, k, v, mask="causal", window=window, scale=scale)}
    return time_ways(ways, rounds)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--lengths", nargs="+", type=int, default=[2048, 8192])
    p.add_argument("--windows", nargs="+", type=int, default=[128, 1024])
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    return sweep(dict(dtype=args.dtype, L=args.lengths, window=args.windows),
                 lambda dtype, L, window: run(getattr(torch, dtype), L, window,
                                              rounds=args.rounds),
                 "dense", "fused")

if __name__ == "__main__":
    main()
