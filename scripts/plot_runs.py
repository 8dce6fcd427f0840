"""Plot the validation curves of ``rmt-fast train`` runs: accuracy vs step, one line per run,
with the curriculum's stage changes marked.

Usage: ``python scripts/plot_runs.py OUT.png LABEL=RUN_DIR [LABEL=RUN_DIR ...]``
(each RUN_DIR holds the ``metrics.jsonl`` a run wrote).
"""

from __future__ import annotations

import json
import os
import sys


def curves(run_dir: str) -> tuple[list[int], list[float], list[tuple[int, int]]]:
    """``(steps, validation accuracies, [(step, segments of the next stage), ...])``."""
    steps, accs, changes = [], [], []
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        for line in f:
            rec = json.loads(line)
            if "valid_accuracy" in rec:
                steps.append(rec["step"])
                accs.append(rec["valid_accuracy"])
            if "next_stage" in rec:
                changes.append((rec["step"], rec["segments"]))
    return steps, accs, changes


def plot(out: str, runs: dict[str, str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    for label, run_dir in runs.items():
        steps, accs, changes = curves(run_dir)
        (line,) = ax.plot(steps, accs, label=label)
        for step, _ in changes:
            ax.axvline(step, color=line.get_color(), alpha=0.25, linestyle=":")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation token accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title("rmt-fast train: validation accuracy (dotted: curriculum stage changes)")
    fig.tight_layout()
    fig.savefig(out, dpi=110)


if __name__ == "__main__":
    if len(sys.argv) < 3 or any("=" not in a for a in sys.argv[2:]):
        sys.exit(__doc__)
    plot(sys.argv[1], dict(a.split("=", 1) for a in sys.argv[2:]))
