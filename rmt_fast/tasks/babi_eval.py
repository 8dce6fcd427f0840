"""Accuracy vs input length of an encoder RMT on :mod:`rmt_fast.tasks.babi_qa`, out to 1M+ tokens.

Each test sample is read segment by segment (:meth:`BabiQA.stream`: the sample is never built
whole; only the memory ``[B, M, d]`` is carried, and with an associative memory its fixed-size
per-layer state), and the class is read from the last segment, as in training. Next to it, the
**no-memory baseline**: the same fine-tuned model on the last segment alone (the learned initial
memory, a fresh associative state, nothing read before). Both come with 95% Wilson
intervals. Peak memory per length: the process's peak resident set size (``VmHWM``) while that
length is read, restarted before it with the heap trimmed (:mod:`rmt_fast.bench.memory`), so a
length does not inherit the peak of the one before; it must stay flat in length.

``python -m rmt_fast.tasks.babi_eval --checkpoint DIR --task memorize --out results/memorize``
writes ``babi_lengths.json`` (rows are added as lengths finish: a stopped evaluation resumes
where it was), ``babi_lengths.md`` and ``babi_lengths.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
from tqdm.auto import tqdm

from rmt_fast import dtypes
from rmt_fast.bench.memory import peak_rss_mib, reset_peak_rss, rss_mib
from rmt_fast.integrations.packed_linear import packed_linears
from rmt_fast.models.segment_loop import Segment
from rmt_fast.tasks.babi_qa import TASKS, BabiQA

DEFAULT_SEGMENTS = (1, 2, 4, 8, 16, 64, 256, 1024, 4096)
RESULT_NAME = "babi_lengths"


def wilson(correct: int, total: int, z: float = 1.959963984540054) -> tuple[float, float]:
    """95% Wilson score interval of a binomial proportion (written out: no stats package is a
    dependency, and it is three lines)."""
    if total <= 0:
        raise ValueError(f"total must be > 0, got {total}")
    p = correct / total
    centre = (p + z * z / (2 * total)) / (1 + z * z / total)
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / (1 + z * z / total)
    return max(0.0, centre - half), min(1.0, centre + half)


@torch.inference_mode()
def evaluate_length(model, data: BabiQA, num_segments: int, samples: int, *, batch_size: int = 16,
                    split: str = "test", dtype: torch.dtype | None = None, progress: bool = False,
                    keep_logits: bool = False, first: int = 0) -> dict:
    """Accuracy with memory and without (last segment alone) on samples ``first..first+samples-1`` of
    ``split`` at ``num_segments`` segments, with Wilson intervals, seconds, tokens/s, the peak
    RSS while this length is read and the RSS before it (``keep_logits``: also both models'
    logits ``[N, C]``)."""

    model.eval()
    correct = base_correct = 0
    logits: list[torch.Tensor] = []
    base_logits: list[torch.Tensor] = []
    reset_peak_rss()
    before = rss_mib()
    start = time.perf_counter()
    size = data.segment_size
    bar = tqdm(total=samples * num_segments * size, unit="tok", unit_scale=True, disable=not progress,
               desc=f"{num_segments} segments", dynamic_ncols=True)
    with packed_linears(model):  # CPU: linear layers through oneDNN with packed weights
        for lo in range(first, first + samples, batch_size):
            plans = data.plans(split, num_segments, range(lo, min(lo + batch_size, first + samples)))
            labels = data.labels(plans)
            segments = (Segment(t * size, (t + 1) * size, ids.to(model.device),
                                mask.to(model.device, torch.bool))
                        for t, (ids, mask) in enumerate(data.stream(plans)))  # read lazily
            last: list[Segment] = []

            def after(t, seg, state, last=last):
                bar.update(seg.ids.numel())
                last[:] = [seg]

            with dtypes.autocast(dtype or torch.float32, model.device):
                _, out_logits = model.classify_segments(model.expand_memory(len(plans)), segments,
                                                        callback=after)
                seg = last[0]  # the last segment alone, from fresh memory: the no-memory baseline
                alone, _ = model.segment_forward(model.expand_memory(len(plans)), seg.ids, seg.mask)
            logits.append(out_logits.float().cpu())
            base_logits.append(alone.logits.float().cpu())
            predicted, base_predicted = logits[-1].argmax(-1), base_logits[-1].argmax(-1)
            correct += int((predicted == labels).sum())
            base_correct += int((base_predicted == labels).sum())
    bar.close()
    seconds = time.perf_counter() - start
    tokens = num_segments * size
    row = {"segments": num_segments, "tokens": tokens, "samples": samples,
            "accuracy": correct / samples, "ci95": list(wilson(correct, samples)),
            "no_memory_accuracy": base_correct / samples,
            "no_memory_ci95": list(wilson(base_correct, samples)),
            "seconds": round(seconds, 1), "tokens_per_s": round(samples * tokens / seconds, 1),
            "peak_rss_mb": round(peak_rss_mib(), 1), "rss_before_mb": round(before, 1)}
    if keep_logits:
        row.update(logits=torch.cat(logits), no_memory_logits=torch.cat(base_logits))
    return row


def memory_flatness(rows: list[dict], from_tokens: int = 16_384) -> float | None:
    """max / min peak RSS over the rows of at least ``from_tokens`` tokens (None if < 2 rows)."""
    peaks = [r["peak_rss_mb"] for r in rows if r["tokens"] >= from_tokens]
    return round(max(peaks) / min(peaks), 4) if len(peaks) >= 2 else None


def _curve(ax, rows: list[dict], key: str, ci: str, **style) -> None:
    """``rows[i][key]`` against tokens with its 95% interval ``rows[i][ci]`` as error bars."""
    y = [r[key] for r in rows]
    err = [[r[key] - r[ci][0] for r in rows], [r[ci][1] - r[key] for r in rows]]
    ax.errorbar([r["tokens"] for r in rows], y, yerr=err, capsize=3, **style)


def _accuracy_axes(ax, title: str, **legend) -> None:
    ax.axhline(1 / 6, ls=":", c="gray", label="chance (1/6)")
    ax.set_xscale("log")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("accuracy (95% Wilson)")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(**{"fontsize": 8, "loc": "lower left", **legend})


def plot(result: dict, path: str) -> None:
    """One evaluation: accuracy and the no-memory baseline vs length, peak RSS below."""
    from rmt_fast.bench.plotting import pyplot, save

    rows = sorted(result["rows"], key=lambda r: r["tokens"])
    plt = pyplot()
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(7.5, 6.5), sharex=True,
                                  gridspec_kw={"height_ratios": [3, 1]})
    _curve(ax, rows, "accuracy", "ci95", marker="o", label="RMT (memory)")
    _curve(ax, rows, "no_memory_accuracy", "no_memory_ci95", marker="s", label="no memory (last segment)")
    trained = result.get("trained_segments")
    if trained:
        ax.axvline(trained * result["segment_size"], ls="--", c="gray", label="longest training length")
    _accuracy_axes(ax, f"MiniLM-L6 RMT, {result['task']}: accuracy vs input length")
    x = [r["tokens"] for r in rows]
    ax2.plot(x, [r["peak_rss_mb"] for r in rows], marker="o")
    ax2.set_ylabel("peak RSS (MiB)")
    ax2.set_xlabel("input length (tokens)")
    ax2.grid(True, which="both", alpha=0.3)
    save(fig, path)


def plot_tasks(results: dict[str, dict], path: str) -> None:
    """Several evaluations on one figure (the layout of the 1M-token report's Figure 1):
    ``results`` maps a label to a ``babi_lengths.json`` result; each gets its accuracy curve
    (solid), its no-memory baseline (dotted, same colour) and its longest training length (a
    mark on the x axis)."""
    from rmt_fast.bench.plotting import pyplot, save

    if not results:
        raise ValueError("results must name at least one evaluation")
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 6))
    for i, (label, result) in enumerate(results.items()):
        rows = sorted(result["rows"], key=lambda r: r["tokens"])
        color = f"C{i}"
        _curve(ax, rows, "accuracy", "ci95", marker="o", color=color, label=label)
        _curve(ax, rows, "no_memory_accuracy", "no_memory_ci95", marker="s", ms=3, ls=":",
               color=color, alpha=0.6, label=f"{label}: no memory")
        trained = result.get("trained_segments")
        if trained:
            ax.plot([trained * result["segment_size"]], [0.02], marker="^", ms=9, color=color, ls="none")
    ax.set_xlabel("input length (tokens); triangles: longest training length")
    _accuracy_axes(ax, "MiniLM-L6 RMT on bAbI facts in English noise: accuracy vs input length",
                   loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=3)
    save(fig, path)


def write_markdown(result: dict, path: str) -> None:
    lines = [f"task `{result['task']}`, checkpoint `{result['checkpoint']}`, segment "
             f"{result['segment_size']} tokens, amp {result['amp']}, {result['threads']} thread(s)", "",
             "| segments | tokens | samples | accuracy (95% CI) | no memory (95% CI) | peak RSS MiB "
             "| tokens/s |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(result["rows"], key=lambda r: r["tokens"]):
        lines.append(f"| {r['segments']:,} | {r['tokens']:,} | {r['samples']} | {r['accuracy']:.3f} "
                     f"({r['ci95'][0]:.3f}-{r['ci95'][1]:.3f}) | {r['no_memory_accuracy']:.3f} "
                     f"({r['no_memory_ci95'][0]:.3f}-{r['no_memory_ci95'][1]:.3f}) | {r['peak_rss_mb']:.0f} "
                     f"| {r['tokens_per_s']:.0f} |")
    flat = result.get("rss_ratio_from_16k")
    if flat is not None:
        lines += ["", f"peak RSS, max/min over lengths >= 16,384 tokens: {flat:.3f}"]
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True, help="a LoRA RMT saved by rmt_fast.train_qa (final/)")
    p.add_argument("--task", choices=TASKS, required=True)
    p.add_argument("--base", default=None, help="base encoder folder, if not where it was at training")
    p.add_argument("--segments", type=int, nargs="+", default=list(DEFAULT_SEGMENTS))
    p.add_argument("--tokens", type=int, nargs="*", default=[1_000_000],
                   help="extra lengths in tokens (rounded up to whole segments)")
    p.add_argument("--samples", type=int, default=64, help="samples per length up to --long-from tokens")
    p.add_argument("--long-samples", type=int, default=16, help="samples per longer length")
    p.add_argument("--long-from", type=int, default=262_144, help="lengths above this use --long-samples")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--trained-segments", type=int, default=None, help="marked on the plot")
    p.add_argument("--amp", choices=("auto", "bf16", "fp32"), default="auto")
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--progress", action="store_true")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if a.threads:
        torch.set_num_threads(a.threads)
    from rmt_fast.models.lora import LoRARMTEncoderForSequenceClassification
    from rmt_fast.train_qa import amp_dtype

    model = LoRARMTEncoderForSequenceClassification.from_pretrained(a.checkpoint, base=a.base)
    model.merge_adapters()
    size = model.rmt_config.segment_size
    data = BabiQA(a.task, model.tokenizer, size, seed=a.data_seed)
    dtype = amp_dtype(a.amp, model.device)
    lengths = sorted(set(a.segments) | {-(-t // size) for t in a.tokens})
    os.makedirs(a.out, exist_ok=True)
    json_path = os.path.join(a.out, RESULT_NAME + ".json")
    settings = {"task": a.task, "checkpoint": os.path.abspath(a.checkpoint), "segment_size": size,
                "data_seed": a.data_seed, "amp": str(dtype), "batch_size": a.batch_size}
    result = {**settings, "threads": torch.get_num_threads(), "trained_segments": a.trained_segments,
              "noise": data.noise.summary(), "rows": []}
    if os.path.isfile(json_path):
        with open(json_path) as f:
            old = json.load(f)
        if all(old.get(k) == v for k, v in settings.items()):
            result["rows"] = old["rows"]
    done = {(r["segments"], r["samples"]) for r in result["rows"]}
    for n in lengths:
        samples = a.samples if n * size <= a.long_from else a.long_samples
        if (n, samples) in done:
            continue
        row = evaluate_length(model, data, n, samples, batch_size=a.batch_size, dtype=dtype,
                              progress=a.progress)
        row["date"] = time.strftime("%Y-%m-%d %H:%M")
        result["rows"] = [r for r in result["rows"] if r["segments"] != n] + [row]
        result["rss_ratio_from_16k"] = memory_flatness(result["rows"])
        print(f"{n:>6} segments ({row['tokens']:>9,} tokens, {samples} samples): accuracy "
              f"{row['accuracy']:.3f} [{row['ci95'][0]:.3f}, {row['ci95'][1]:.3f}], no memory "
              f"{row['no_memory_accuracy']:.3f}; {row['seconds']:.0f} s, {row['tokens_per_s']:.0f} tok/s, "
              f"peak RSS {row['peak_rss_mb']:.0f} MiB", flush=True)
        tmp = json_path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(result, f, indent=1)
        os.replace(tmp, json_path)
    result["rss_ratio_from_16k"] = memory_flatness(result["rows"])
    write_markdown(result, os.path.join(a.out, RESULT_NAME + ".md"))
    plot(result, os.path.join(a.out, RESULT_NAME + ".png"))
    return result


if __name__ == "__main__":
    main()
