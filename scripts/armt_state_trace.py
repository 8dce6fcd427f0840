"""Why ARMT language models break down on long streams: its associative state, segment by segment.

Loads a trained ARMT row of ``scripts/lm_xl_comparison.py`` (``--out DIR --row armt-d4``) and
reads ``--streams`` test streams of ``--segments`` segments (cut one after the other from the
test split's ``[BOS] doc [BOS] doc ...``, as ``--drift`` does) under three regimes:

* ``carry``: the state carried through the whole stream (as ``--drift``);
* ``every``: a fresh state every ``--every`` segments (the training windows' length: the state
  never gets older than in training);
* ``bos``: a fresh state in a lane whose segment holds a document start (``BOS``);
* ``carry-nocorr``: as ``carry``, but read with ``ARMTConfig.correction=False`` (``z`` then sums
  every key written, not only those ``gamma`` lets in), the trained weights unchanged.

Per segment it records bits per byte and, per layer, ``|A|`` and ``|z|`` (Frobenius / L2 norm,
averaged over the lanes) and the mean of ``|read| / |h|`` over the segment's tokens (how large
the associative read is next to the hidden state it is added to). Writes ``OUT/<row>/state_trace.json``
and a plot (``--png``).

    python scripts/armt_state_trace.py --out /tmp/rmt_runs/lm_armt --row armt-d4 \
        --png docs/lm_armt/state_trace.png
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import lm_xl_comparison as lm  # noqa: E402

from rmt_fast.models import armt as armt_mod  # noqa: E402
from rmt_fast.models.segment_loop import keep_rows  # noqa: E402
from rmt_fast.tasks.lm_eval import long_streams  # noqa: E402
from rmt_fast.tasks.text_corpus import BOS, load_corpus  # noqa: E402

MODES = ("carry", "every", "bos", "carry-nocorr")
BANDS = ((0, 8), (8, 64), (64, 128), (128, 256), (256, 512), (512, 1024))


def _fresh_rows(model, state, rows: torch.Tensor):
    """``state`` with the lanes ``rows`` ``[B]`` bool reset (all: a fresh state)."""
    if bool(rows.all()):
        return model.init_state(len(rows))
    return state if state.fresh else keep_rows(~rows, state, model.init_state(len(rows)))


def trace(model, streams: torch.Tensor, mode: str, every: int, amp: str | None) -> list[dict]:
    """One record per segment (see the module docstring). ``streams`` ``[B, T * S + 1]``."""
    seg = model.rmt_config.segment_size
    lanes, segments = streams.shape[0], (streams.shape[1] - 1) // seg
    ratios: list[float] = []
    real_read = armt_mod.AssociativeMemory.read

    def read(self, h, A, z, opts):
        r = real_read(self, h, A, z, opts)
        ratios.append(float((r.float().norm(dim=-1) / h.float().norm(dim=-1).clamp_min(1e-6)).mean()))
        return r

    state = model.init_state(lanes)
    out = []
    autocast = torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=amp == "bf16")
    armt_mod.AssociativeMemory.read = read
    try:
        for t in range(segments):
            ids = streams[:, t * seg: (t + 1) * seg]
            nxt = streams[:, t * seg + 1: (t + 1) * seg + 1]
            if mode == "every" and t and t % every == 0:
                state = model.init_state(lanes)
            elif mode == "bos" and t:
                has = (ids == BOS).any(dim=1)
                if has.any():
                    state = _fresh_rows(model, state, has)
            ratios.clear()
            with torch.no_grad(), autocast:
                hidden, state = model.segment_forward(state, ids.to(model.device), None)
                logits = model.logits(hidden)
            target = torch.where(nxt == BOS, -100, nxt).to(model.device)
            nll = F.cross_entropy(logits.float().flatten(0, 1), target.flatten(), ignore_index=-100,
                                  reduction="sum")
            n = int((target != -100).sum())
            out.append({"bits": float(nll) / math.log(2), "bytes": n,
                        "A": [round(float(a.float().norm()) / lanes, 4) for a in state.A],
                        "z": [round(float(z.float().norm()) / lanes, 4) for z in state.z],
                        "read_ratio": [round(r, 5) for r in ratios]})
    finally:
        armt_mod.AssociativeMemory.read = real_read
    return out


def bands(records: list[dict]) -> dict[str, float]:
    res = {}
    for lo, hi in BANDS:
        part = records[lo:hi]
        if len(part) == hi - lo:
            res[f"{lo}-{hi - 1}"] = sum(r["bits"] for r in part) / sum(r["bytes"] for r in part)
    return res


def plot(saved: dict, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    w = 8
    for mode, recs in saved["modes"].items():
        bits = np.array([r["bits"] for r in recs])
        n = np.array([r["bytes"] for r in recs])
        k = len(bits) // w * w
        axes[0].plot(np.arange(0, k, w), bits[:k].reshape(-1, w).sum(1) / n[:k].reshape(-1, w).sum(1),
                     label=mode)
    axes[0].set(xlabel="segment index", ylabel=f"bits per byte (windows of {w} segments)",
                title=f"bits/byte by regime (reset every {saved['every']}: 'every')")
    layers = len(saved["modes"]["carry"][0]["A"])
    for mode, style in (("carry", "-"), ("carry-nocorr", ":")):
        recs = saved["modes"][mode]
        for i in range(layers):
            ratio = [r["read_ratio"][i] if len(r["read_ratio"]) > i else np.nan for r in recs]
            label = f"layer {i}" + (" (correction off)" if mode != "carry" else "")
            axes[1].plot(np.maximum(ratio, 1e-12), style, color=f"C{i}", label=label)  # log axes
            axes[2].plot(np.maximum([r["A"][i] for r in recs], 1e-12), style, color=f"C{i}", label=label)
    axes[1].set(xlabel="segment index", ylabel="mean |read| / |h|", yscale="log",
                title="size of the associative read (carried)")
    axes[2].set(xlabel="segment index", ylabel="|A| (Frobenius, per lane)", yscale="log",
                title="associative state |A| (carried)")
    for ax in axes:
        ax.axvline(saved["every"], color="grey", lw=0.8, ls=":")
        ax.legend(fontsize=7, ncol=2 if ax is not axes[0] else 1)
    fig.suptitle(f"{saved['row']}: {saved['streams']} test streams of {saved['segments']} segments "
                 f"(training windows: {saved['every']} segments)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main(argv: list[str] | None = None, corpus=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="the runs directory of lm_xl_comparison.py")
    p.add_argument("--row", default="armt-d4")
    p.add_argument("--streams", type=int, default=4)
    p.add_argument("--segments", type=int, default=512)
    p.add_argument("--every", type=int, default=None, help="default: the row's --segments")
    p.add_argument("--png", default=None)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, step, settings = lm._row_model(args.out, args.row)
    if not isinstance(model, armt_mod.ARMTForCausalLM):
        raise SystemExit(f"--row {args.row} is not an ARMT row")
    model.eval()
    every = args.every or settings.segments
    tokens = args.segments * settings.segment_size + 1
    split = (corpus if corpus is not None else load_corpus())["test"]
    streams = torch.stack(long_streams(split, args.streams, tokens))
    saved = {"row": args.row, "step": step, "streams": args.streams, "segments": args.segments,
             "every": every, "correction": model.rmt_config.correction, "amp": settings.eval_amp,
             "modes": {}, "bands": {}}
    trained = model.rmt_config.correction
    for mode in MODES:
        model.replace_config(correction=False if mode == "carry-nocorr" else trained)
        saved["modes"][mode] = trace(model, streams, mode.removesuffix("-nocorr"), every,
                                     settings.eval_amp)
        saved["bands"][mode] = bands(saved["modes"][mode])
        shown = ", ".join(f"{k}: {v:.4f}" for k, v in saved["bands"][mode].items())
        print(f"[{args.row}] {mode:12s} {shown}", flush=True)
    model.replace_config(correction=trained)
    for mode in ("carry", "carry-nocorr"):
        for t in sorted({0, 1, every - 1, every, 2 * every, 64, 128, 256, args.segments - 1}):
            if t < len(saved["modes"][mode]):
                r = saved["modes"][mode][t]
                print(f"  {mode} t={t}: |A| {r['A']}, |z| {r['z']}, |read|/|h| {r['read_ratio']}")
    path = os.path.join(args.out, args.row, "state_trace.json")
    with open(path, "w") as f:
        json.dump(saved, f)
    if args.png:
        plot(saved, args.png)
    return saved


if __name__ == "__main__":
    main()
