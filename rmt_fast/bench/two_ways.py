"""Two ways of computing one attention, timed side by side (one thread, CPU): the shared part of
:mod:`rmt_fast.bench.scored` and :mod:`rmt_fast.bench.windows`.

Each way is timed forward (no grad) and forward + backward (a loss on the float32 square of the
output); times are thread CPU ms, the best of ``rounds`` rounds that alternate the ways."""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable

import torch


def thread_ms(fn: Callable[[], object]) -> float:
    """Thread CPU time of ``fn()`` in ms."""
    start = time.thread_time()
    fn()
    return (time.thread_time() - start) * 1e3


def time_ways(ways: dict[str, Callable[[], torch.Tensor]], rounds: int) -> dict:
    """``{"<way> fwd": ms, "<way> fwd+bwd": ms, ..., "max_diff": x}`` for ``ways`` (name ->
    callable returning the output); ``max_diff``: the largest difference between the first two
    ways' outputs (float64)."""
    with torch.no_grad():
        outs = [fn().double() for fn in ways.values()]
    best: dict[str, float] = {}
    for _ in range(rounds):
        for name, fn in ways.items():
            with torch.no_grad():
                t = thread_ms(fn)
            best[f"{name} fwd"] = min(best.get(f"{name} fwd", t), t)
            t = thread_ms(lambda fn=fn: fn().float().square().sum().backward())
            best[f"{name} fwd+bwd"] = min(best.get(f"{name} fwd+bwd", t), t)
    return {**best, "max_diff": (outs[0] - outs[1]).abs().max().item()}


def table_row(r: dict, old: str, new: str, *lead) -> str:
    """A markdown row: ``lead`` cells, then old/new ms and the speed-up, forward and
    forward + backward, then the max abs diff."""
    cells = [str(c) for c in lead]
    for m in ("fwd", "fwd+bwd"):
        cells += [f"{r[f'{old} {m}']:.1f}", f"{r[f'{new} {m}']:.1f}",
                  f"{r[f'{old} {m}'] / r[f'{new} {m}']:.2f}x"]
    return "| " + " | ".join(cells + [f"{r['max_diff']:.1e}"]) + " |"


def table_header(old: str, new: str, *lead) -> str:
    cells = list(lead)
    for m in ("fwd", "fwd+bwd"):
        cells += [f"{old} {m} ms", f"{new} {m} ms", f"{m} speed-up"]
    cells.append("max abs diff")
    return "| " + " | ".join(cells) + " |\n|" + "---|" * len(cells)


def sweep(axes: dict[str, list], run: Callable[..., dict], old: str, new: str) -> list[dict]:
    """``run(**point)`` at every point of the grid ``axes`` (column name -> values, the first
    outermost), printing the table (header, then a row per point as it finishes); returns
    ``run``'s results with their point's values added."""
    print(table_header(old, new, *axes))
    rows = []
    for values in itertools.product(*axes.values()):
        point = dict(zip(axes, values, strict=True))
        r = run(**point)
        rows.append(dict(r, **point))
        print(table_row(r, old, new, *(f"{v:,}" if isinstance(v, int) else v for v in values)),
              flush=True)
    return rows
