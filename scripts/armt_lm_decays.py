"""The decay a language-modelling row with a learnt decay (``ARMTConfig.decay_gate``) chose on
long test streams: per layer, at the segments that hold a document start (``BOS``) and at the
others, and by segment index.

``python scripts/armt_lm_decays.py --out OUT --row armt-d4-delta-learnt [--streams 4]
[--segments 256] [--json FILE]`` (``OUT``: ``scripts/lm_xl_comparison.py``'s ``--out``; the row's
last checkpoint; the streams are cut as its ``--drift`` cuts them: one after the other from the
test split's ``[BOS] doc [BOS] doc ...``, so they cross document starts).
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from armt_state_growth import trace_writes, untrace_writes  # noqa: E402

from rmt_fast.tasks.text_corpus import BOS  # noqa: E402


def split_by_document_start(decays: torch.Tensor, ids: torch.Tensor, segment_size: int) -> dict:
    """``decays`` ``[T, B]`` (one layer's decay per segment and row) of the streams ``ids``
    ``[B, T * segment_size]`` -> ``{"start": [...], "other": [...]}``: the decays of the segments
    that hold a ``BOS`` and of the others, flat lists."""
    T, B = decays.shape
    if ids.shape != (B, T * segment_size):
        raise ValueError(f"ids must be [B={B}, T * segment_size={T * segment_size}], got {list(ids.shape)}")
    starts = (ids.reshape(B, T, segment_size) == BOS).any(-1).t()  # [T, B]
    return {"start": decays[starts].tolist(), "other": decays[~starts].tolist()}


def summary(values: list[float]) -> dict:
    if not values:
        return {"n": 0}
    t = torch.tensor(values, dtype=torch.float64)
    q = torch.quantile(t, torch.tensor([0.05, 0.5, 0.95], dtype=torch.float64)).tolist()
    return {"n": len(values), "mean": float(t.mean()), "min": float(t.min()), "p05": q[0],
            "median": q[1], "p95": q[2], "max": float(t.max())}


def trace(model, ids: torch.Tensor) -> list[torch.Tensor]:
    """Each layer's learnt decay ``[T, B]`` while ``model`` reads ``ids`` ``[B, L]`` (eval, no
    gradients; ``L`` a multiple of the segment size)."""
    decays: dict[int, list] = {}
    trace_writes(model.rmt_config.read_clip, decays)
    try:
        with torch.no_grad():
            model.eval()(ids, return_logits=False)
    finally:
        untrace_writes()
    return [torch.stack(decays[id(a)]) for a in model.assoc]


def main(argv: list[str] | None = None, corpus=None) -> dict:
    from lm_xl_comparison import _row_model

    from rmt_fast.tasks.lm_eval import long_streams
    from rmt_fast.tasks.text_corpus import load_corpus

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True)
    p.add_argument("--row", required=True)
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--segments", type=int, default=256)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None, help="write the numbers here too")
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    model, step, settings = _row_model(a.out, a.row)
    if not getattr(model.rmt_config, "decay_gate", False):
        p.error(f"{a.row} has no learnt decay (ARMTConfig.decay_gate)")
    S = settings.segment_size
    split = (corpus if corpus is not None else load_corpus())["test"]
    ids = torch.stack(long_streams(split, a.streams, a.segments * S))
    layers = trace(model, ids)
    result = {"row": a.row, "step": step, "streams": a.streams, "segments": a.segments,
              "segment_size": S, "layers": []}
    print(f"{a.row} (step {step}): learnt decay on {a.streams} test streams of {a.segments} segments")
    print("| layer | segments with a document start | mean | 5% | median | 95% | other segments | mean | 5% "
          "| median | 95% | segments 0-7 | 8-63 | 64+ |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for i, d in enumerate(layers):
        parts = split_by_document_start(d, ids, S)
        s, o = summary(parts["start"]), summary(parts["other"])
        bands = {k: float(d[lo:hi].mean()) for k, (lo, hi) in
                 {"0-7": (0, 8), "8-63": (8, 64), "64+": (64, len(d))}.items() if hi > lo}
        result["layers"].append({"start": s, "other": o, "bands": bands})

        def cells(x):
            return " | ".join(f"{x[k]:.3f}" if k in x else "" for k in ("mean", "p05", "median", "p95"))

        print(f"| {i} | {s['n']} | {cells(s)} | {o['n']} | {cells(o)} | "
              + " | ".join(f"{bands.get(k, float('nan')):.3f}" for k in ("0-7", "8-63", "64+")) + " |")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(result, f, indent=1)
    return result


if __name__ == "__main__":
    main()
