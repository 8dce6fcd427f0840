"""Attention with a sink logit per head (gpt-oss), the backend's two ways, one thread, CPU.

``exact``: transformers' eager formula on dense scores (what ``attn_implementation="rmt_fast"``
ran for every call with sinks before, and still runs for Gemma 2 / T5). ``fused``:
``memory_attention(..., return_lse=True)`` and ``out * sigmoid(lse - sink)``
(:func:`rmt_fast.integrations.transformers._with_sinks`). Causal self-attention ``[1, H, L, D]``
with GQA; timing as :mod:`rmt_fast.bench.two_ways`; ``max |diff|`` compares the two outputs.

``python -m rmt_fast.bench.sinks --dtype float32 bfloat16 --lengths 1024 4096 --rounds 5``
"""

from __future__ import annotations

import argparse

import torch

from rmt_fast import memory_attention
from rmt_fast.bench.two_ways import table_header, table_row, time_ways
from rmt_fast.integrations.transformers import _exact_attention, _with_sinks


def run(dtype: torch.dtype, length: int, heads: int = 8, kv_heads: int = 2, dim: int = 64,
        rounds: int = 5) -> dict:
    """One case: ``{"exact fwd": ms, "exact fwd+bwd": ms, "fused ...": ..., "max_diff": x}``."""
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, heads, length, dim, generator=g).to(dtype).requires_grad_()
    k, v = (torch.randn(1, kv_heads, length, dim, generator=g).to(dtype).requires_grad_()
            for _ in range(2))
    sinks = torch.randn(heads, generator=g).to(dtype).requires_grad_()
    mask = torch.ones(length, length, dtype=torch.bool).tril()[None, None]
    scale = dim ** -0.5
    ways = {
        "exact": lambda: _exact_attention(q, k, v, mask, scale, 0.0, None, sinks, None),
        "fused": lambda: _with_sinks(memory_attention(q, k, v, mask="causal", scale=scale,
                                                      return_lse=True), sinks),
    }
    return time_ways(ways, rounds)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"])
    p.add_argument("--lengths", nargs="+", type=int, default=[1024, 4096])
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    print(table_header("exact", "fused", "dtype", "L"))
    rows = []
    for name in args.dtype:
        for length in args.lengths:
            r = run(getattr(torch, name), length, rounds=args.rounds)
            rows.append(dict(r, dtype=name, length=length))
            print(table_row(r, "exact", "fused", name, f"{length:,}"), flush=True)
    return rows


if __name__ == "__main__":
    main()
