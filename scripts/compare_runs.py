"""Compare ``rmt-fast train`` runs of one task: validation accuracy against training step and
wall time (from each run's ``metrics.jsonl``), and each run's latest checkpoint scored on the test
split (:func:`rmt_fast.train.evaluate_run`). Writes ``NAME.json``, ``NAME.md`` and ``NAME.png``.

    python scripts/compare_runs.py --runs armt=/tmp/rmt_runs/capacity/armt \
        rmt=/tmp/rmt_runs/capacity/rmt --out docs/armt/capacity_8pairs --title "..."

``--keep OLD.json`` adds the runs of an earlier output as they were scored then.
"""

from __future__ import annotations

import argparse
import json
import os

from rmt_fast.bench.plotting import pyplot, save
from rmt_fast.run_io import read_jsonl
from rmt_fast.train import evaluate_run


def compare(runs: dict[str, str], out: str, title: str, threads: int = 1,
            keep: str | None = None) -> dict:
    """``keep``: an earlier output's JSON whose runs join as they were scored then (their run
    directories may be gone); a run named again in ``runs`` is scored anew."""
    import torch

    torch.set_num_threads(threads)
    result = {"title": title, "runs": {}}
    if keep is not None:
        with open(keep) as f:
            result["runs"] = {k: v for k, v in json.load(f)["runs"].items() if k not in runs}
    for name, path in runs.items():
        rows = [r for r in read_jsonl(os.path.join(path, "metrics.jsonl")) if "valid_accuracy" in r]
        test = evaluate_run(path, split="test", dtype="float32")
        result["runs"][name] = {
            "path": path, "test": test,
            "valid": [[r["step"], r["wall_time"], r["valid_accuracy"]] for r in rows]}
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".json", "w") as f:
        json.dump(result, f, indent=1)
    lines = [f"**{title}**", "", "| run | steps | training wall time (s) | best valid accuracy | "
             "test accuracy (latest checkpoint) | test samples |", "|---|---|---|---|---|---|"]
    for name, r in result["runs"].items():
        t = r["test"]
        best = max(v[2] for v in r["valid"]) if r["valid"] else float("nan")
        lines.append(f"| {name} | {t['step']:,} | {t['train_wall_time']:,.0f} | {best:.3f} | "
                     f"**{t['accuracy']:.3f}** | {t['samples']:,} |")
    with open(out + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    plt = pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for name, r in result["runs"].items():
        steps, walls, accs = zip(*r["valid"], strict=True) if r["valid"] else ((), (), ())
        axes[0].plot(steps, accs, label=name)
        axes[1].plot([w / 3600 for w in walls], accs, label=name)
    for ax, xlabel in zip(axes, ("training step", "training wall time (hours)"), strict=True):
        ax.set_xlabel(xlabel)
        ax.set_ylabel("validation accuracy")
        ax.set_ylim(0, 1.02)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    save(fig, out + ".png")
    return result


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", nargs="+", required=True, help="NAME=RUN_DIR ...")
    p.add_argument("--out", required=True, help="path prefix of the .json/.md/.png files")
    p.add_argument("--title", default="")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--keep", default=None,
                   help="an earlier output's .json: its runs join as scored then")
    a = p.parse_args(argv)
    runs = dict(r.split("=", 1) for r in a.runs)
    result = compare(runs, a.out, a.title, a.threads, a.keep)
    with open(a.out + ".md") as f:
        print(f.read())
    return result


if __name__ == "__main__":
    main()
