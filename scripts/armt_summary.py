"""One table and one figure of many ``length_eval`` runs: per model variant, each seed's accuracy
at a few lengths, so the variants of ``docs/armt.md`` can be compared at a glance::

    python scripts/armt_summary.py docs/armt/*/qa1_lengths.json \\
        --group "RMT=^RMT \\(trained to 32 mixed" --group "ARMT L2=^ARMT( \\(L2,|\\s*L2) \\(?trained" \\
        --segments 1024 4096 31250 --out docs/armt/summary

A group gathers the runs whose label matches its regular expression (``re.search``); a run's
seed is the number after ``seed`` in its label (0 when the label names none). A label found in
several files must have the same rows in each (the merged files repeat earlier runs). Writes
``summary.md`` (a row per group: correct / stories per seed at each length, the mean accuracy)
and ``summary.png`` (a panel per length: each seed a dot with its 95% Wilson interval, the mean
a bar).
"""

from __future__ import annotations

import argparse
import json
import os
import re

from rmt_fast.tasks.babi_eval import wilson


def seed_of(label: str) -> int:
    """The seed a run's label names (``"..., seed 2)"`` -> 2), 0 when it names none."""
    found = re.search(r"\bseed (\d+)", label)
    return int(found.group(1)) if found else 0


def load_runs(paths: list[str]) -> tuple[dict[str, dict[int, tuple[int, int]]], int]:
    """``({label: {segments: (correct, stories)}}, segment_size)`` over the files; a label
    repeated with other numbers (two different runs under one name) or files of different
    segment sizes are an error."""
    runs: dict[str, dict[int, tuple[int, int]]] = {}
    where: dict[str, str] = {}
    sizes: set[int] = set()
    for path in paths:
        with open(path) as f:
            saved = json.load(f)
        sizes.add(saved["segment_size"])
        for label, rows in saved["runs"].items():
            got = {r["segments"]: (round(r["accuracy"] * r["samples"]), r["samples"]) for r in rows}
            if label in runs:
                same = {n: runs[label][n] for n in got.keys() & runs[label].keys()}
                if same != {n: got[n] for n in same}:
                    raise ValueError(f"{label!r} has other numbers in {path} than in {where[label]}")
                runs[label].update(got)
            else:
                runs[label], where[label] = dict(got), path
    if len(sizes) != 1:
        raise ValueError(f"the files have different segment sizes {sorted(sizes)}")
    return runs, sizes.pop()


def gather(runs: dict[str, dict[int, tuple[int, int]]], groups: list[tuple[str, str]],
           segments: list[int]) -> dict[str, dict[int, dict[int, tuple[int, int]]]]:
    """``{group: {seed: {segments: (correct, stories)}}}`` for the lengths asked for; a group
    that matches no run, or two runs of one seed, is an error."""
    out: dict[str, dict[int, dict[int, tuple[int, int]]]] = {}
    for name, pattern in groups:
        seeds: dict[int, dict[int, tuple[int, int]]] = {}
        for label in sorted(runs):
            if not re.search(pattern, label):
                continue
            seed = seed_of(label)
            if seed in seeds:
                raise ValueError(f"group {name!r}: two runs of seed {seed} match {pattern!r} "
                                 f"(one is {label!r})")
            seeds[seed] = {n: runs[label][n] for n in segments if n in runs[label]}
        if not seeds:
            raise ValueError(f"group {name!r}: no run label matches {pattern!r}")
        out[name] = dict(sorted(seeds.items()))
    return out


def table(summary: dict, segments: list[int], segment_size: int) -> str:
    """A markdown row per group: seeds, then ``correct/stories`` per seed at each length."""
    head = ["variant", "seeds"] + [f"{n:,} segments ({n * segment_size:,} tokens)" for n in segments]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, seeds in summary.items():
        cells = [name, " / ".join(map(str, seeds))]
        for n in segments:
            have = [s[n] for s in seeds.values() if n in s]
            if not have:
                cells.append("-")
                continue
            per = " / ".join(f"{s[n][0]}/{s[n][1]}" if n in s else "-" for s in seeds.values())
            mean = sum(c / t for c, t in have) / len(have)
            cells.append(f"{per} (mean {mean:.2f})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(summary: dict, segments: list[int], segment_size: int, path: str) -> None:
    """A panel per length: a column per group, each seed a dot with its Wilson interval, the
    mean over seeds a horizontal bar."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(summary)
    fig, axes = plt.subplots(1, len(segments), figsize=(4.2 * len(segments), 4.6), sharey=True,
                             squeeze=False)
    for ax, n in zip(axes[0], segments, strict=True):
        for x, name in enumerate(names):
            seeds = [(seed, s[n]) for seed, s in summary[name].items() if n in s]
            for j, (seed, (c, t)) in enumerate(seeds):
                lo, hi = wilson(c, t)
                dx = (j - (len(seeds) - 1) / 2) * 0.12
                ax.errorbar(x + dx, c / t, yerr=[[c / t - lo], [hi - c / t]], fmt="o", ms=4,
                            color=f"C{seed}", capsize=2, lw=1)
            if seeds:
                mean = sum(c / t for _, (c, t) in seeds) / len(seeds)
                ax.hlines(mean, x - 0.3, x + 0.3, color="k", lw=2)
        ax.set_title(f"{n:,} segments ({n * segment_size:,} tokens)")
        ax.set_xticks(range(len(names)), names, rotation=35, ha="right", fontsize=8)
        ax.set_ylim(-0.03, 1.03)
        ax.axhline(1 / 6, color="grey", ls=":", lw=1)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("accuracy (dots: seeds; bar: their mean)")
    seeds = sorted({seed for s in summary.values() for seed in s})
    axes[0][0].legend(handles=[plt.Line2D([], [], ls="", marker="o", color=f"C{seed}", label=f"seed {seed}")
                               for seed in seeds], loc="lower left", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("results", nargs="+", help="length_eval qa1_lengths.json files")
    p.add_argument("--group", action="append", required=True, metavar="NAME=REGEX",
                   help="a variant: its name and a regular expression over run labels (repeat)")
    p.add_argument("--segments", type=int, nargs="+", default=[1024, 4096, 31250])
    p.add_argument("--out", required=True, help="folder for summary.md and summary.png")
    a = p.parse_args(argv)
    groups = []
    for item in a.group:
        name, sep, pattern = item.partition("=")
        if not sep or not name or not pattern:
            p.error(f"--group: expected NAME=REGEX, got {item!r}")
        groups.append((name, pattern))
    try:
        runs, size = load_runs(a.results)
    except ValueError as exc:
        p.error(str(exc))
    summary = gather(runs, groups, a.segments)
    text = table(summary, a.segments, size)
    os.makedirs(a.out, exist_ok=True)
    with open(os.path.join(a.out, "summary.md"), "w") as f:
        f.write(text)
    plot(summary, a.segments, size, os.path.join(a.out, "summary.png"))
    print(text)
    return summary


if __name__ == "__main__":
    main()
