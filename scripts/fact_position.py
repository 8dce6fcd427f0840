"""Where in a long story a qa1 model loses its one fact: accuracy by the fact's position and by
its distance from the question, each set on its own (``length_eval`` draws the fact anywhere in
the story, so a long story mixes a late fact after a long prefix with an early fact far from the
question)::

    python scripts/fact_position.py --checkpoint "delta, seed 0=RUN/checkpoint-2000" \\
        --positions 0 1024 4096 16384 --distances 1 32 1024 --stories 32 --out docs/armt/fact_position

A story of cell ``(p, d)`` is ``p`` segments of background sentences, then the fact (``mary went
to the kitchen .``) at the start of segment ``p``, background to the end of segment ``p + d - 1``,
and a last segment of background ending in the question and its answer, so the question comes
``d`` segments after the fact's segment and the story is ``p + d + 1`` segments long. The
background at the cut points is cut mid-sentence (training stories put facts between
sentences); the cell ``(0, 1)`` shows what that costs. Each story's background is one stream:
the prefixes of all positions are read once, in order, and every cell branches from the state
after its prefix (``StreamingReader.state_dict``), so the cost is the longest prefix plus the
branches, not the sum of all stories. One fact per story and position, the same for every
distance. Writes ``fact_position.{json,md,png}`` under ``--out``; ``--merge A.json B.json --out
DIR`` combines runs evaluated in separate processes (one per core).
"""

from __future__ import annotations

import argparse
import json
import os
import random

import torch

from rmt_fast.streaming import StreamingReader
from rmt_fast.tasks.babi_eval import wilson
from rmt_fast.tasks.babilong import STORIES, background_sentence
from rmt_fast.tasks.length_eval import labelled, load


class WordStream:
    """Background sentences as one stream of words: ``take(n)`` gives the next ``n`` (a
    sentence cut at the end goes on in the next take)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng, self.pending = rng, []

    def take(self, n: int) -> list[str]:
        while len(self.pending) < n:
            self.pending += background_sentence(self.rng)
        out, self.pending = self.pending[:n], self.pending[n:]
        return out


def branch(rng: random.Random, fact: list[str], question: list[str], answer: str, distance: int,
           size: int) -> list[str]:
    """The words after a prefix: ``fact`` at the start of ``distance`` segments of background,
    then a last segment of background ending in ``question`` and ``answer``."""
    if distance * size < len(fact) or size < len(question) + 1:
        raise ValueError(f"distance={distance} segments of {size} tokens cannot hold the fact "
                         f"({len(fact)} words) or the last segment the question")
    words = WordStream(rng)
    return (fact + words.take(distance * size - len(fact)) + words.take(size - len(question) - 1)
            + question + [answer])


def _tensor(rows: list[list[str]], vocab) -> torch.Tensor:
    return torch.tensor([vocab.encode(r, strict=True) for r in rows])


def cells(model, vocab, positions: list[int], distances: list[int], stories: int, batch_size: int,
          seed: int, keep_stories: bool = False):
    """Yield ``(position, distance, predicted [n], answers [n], extra)`` per batch of stories and
    cell; ``extra`` is None, or with ``keep_stories`` (for tests) ``(stories [n, L], state)``:
    the whole stories and the reader's :meth:`~StreamingReader.state_dict` before the question."""
    size = model.rmt_config.segment_size
    for first in range(0, stories, batch_size):
        n = min(batch_size, stories - first)
        streams = [WordStream(random.Random(f"{seed}:{first + i}:background")) for i in range(n)]
        reader = StreamingReader(model, batch_size=n, progress=False)
        done, prefix = 0, torch.empty(n, 0, dtype=torch.long)
        for p in sorted(positions):
            if p > done:
                ids = _tensor([s.take((p - done) * size) for s in streams], vocab)
                reader.feed(ids)
                if keep_stories:
                    prefix = torch.cat([prefix, ids], 1)
                done = p
            saved = {k: v.clone() for k, v in reader.state_dict().items()}
            facts = [STORIES["qa1"](random.Random(f"{seed}:{first + i}:{p}:fact"), 1) for i in range(n)]
            for d in sorted(distances):
                ids = _tensor([branch(random.Random(f"{seed}:{first + i}:{p}:{d}"), f[0][0], f[1],
                                      f[2], d, size) for i, f in enumerate(facts)], vocab)
                reader.load_state_dict({k: v.clone() for k, v in saved.items()})
                reader.feed(ids[:, :d * size])
                extra = None
                if keep_stories:
                    extra = (torch.cat([prefix, ids], 1),
                             {k: v.clone() for k, v in reader.state_dict().items()})
                out = reader.generate(ids[:, d * size:-1], max_new_tokens=1, do_sample=False,
                                      pad_token_id=0)
                yield p, d, out[:, -1], ids[:, -1], extra
            reader.load_state_dict(saved)


def evaluate(model, vocab, positions, distances, stories: int = 32, batch_size: int = 32,
             seed: int = 12345) -> list[dict]:
    """Per cell: ``position``, ``distance`` (segments), ``samples``, ``correct``, ``accuracy``,
    ``ci95`` (Wilson)."""
    correct = {(p, d): [0, 0] for p in positions for d in distances}
    for p, d, got, want, _ in cells(model, vocab, positions, distances, stories, batch_size, seed):
        correct[p, d][0] += int((got == want).sum())
        correct[p, d][1] += len(want)
    return [{"position": p, "distance": d, "samples": t, "correct": c, "accuracy": c / t,
             "ci95": list(wilson(c, t))} for (p, d), (c, t) in sorted(correct.items())]


def table(rows: list[dict]) -> str:
    """Markdown: a row per fact position, a column per distance, ``correct/stories``."""
    positions = sorted({r["position"] for r in rows})
    distances = sorted({r["distance"] for r in rows})
    cell = {(r["position"], r["distance"]): r for r in rows}
    heads = [f"question {d:,} segment{'s' * (d != 1)} later" for d in distances]
    lines = ["| fact at segment | " + " | ".join(heads) + " |",
             "|---" * (len(distances) + 1) + "|"]
    for p in positions:
        lines.append(f"| {p:,} | " + " | ".join(
            f"{cell[p, d]['correct']}/{cell[p, d]['samples']} ({cell[p, d]['accuracy']:.2f})"
            for d in distances) + " |")
    return "\n".join(lines) + "\n"


def plot(runs: dict[str, list[dict]], path: str) -> None:
    """A panel per run (two a row): accuracy vs the fact's position, a line per distance."""
    from rmt_fast.bench.plotting import pyplot, save

    plt = pyplot()
    cols = min(2, len(runs))
    nrows = -(-len(runs) // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(5.5 * cols, 3.8 * nrows), squeeze=False, sharey=True)
    for ax in axes.flat[len(runs):]:
        ax.set_visible(False)
    for ax, (label, rows) in zip(axes.flat[:len(runs)], runs.items(), strict=True):
        for j, d in enumerate(sorted({r["distance"] for r in rows})):
            pts = sorted((r["position"], r["accuracy"], r["ci95"]) for r in rows if r["distance"] == d)
            x = [p + 1 for p, _, _ in pts]  # log axis: position 0 drawn at 1
            line = ax.plot(x, [a for _, a, _ in pts], marker="o", color=f"C{j}",
                           label=f"question {d:,} segment{'s' * (d != 1)} after the fact")[0]
            ax.fill_between(x, [c[0] for _, _, c in pts], [c[1] for _, _, c in pts],
                            color=line.get_color(), alpha=0.12)
        ax.set_xscale("log", base=2)
        ax.set_ylim(0, 1.05)
        ax.axhline(1 / 6, color="grey", ls=":", lw=1)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("segments before the fact (+1)")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(fontsize=8)
    save(fig, path)


def write(out: str, saved: dict) -> None:
    """``out/fact_position.{json,md,png}`` of ``saved`` (``seed``, ``checkpoints``, ``runs``)."""
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, "fact_position")
    with open(stem + ".json", "w") as f:
        json.dump(saved, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write("".join(f"**{label}**\n\n{table(rows)}\n" for label, rows in saved["runs"].items()))
    plot(saved["runs"], stem + ".png")


def merge(paths: list[str]) -> dict:
    """One result of several ``fact_position.json`` files of the same stories (``seed``); a run
    label may appear in one file only."""
    merged: dict = {}
    for path in paths:
        with open(path) as f:
            saved = json.load(f)
        if not merged:
            merged = {"task": "qa1", "seed": saved["seed"], "checkpoints": {}, "runs": {}}
        if saved["seed"] != merged["seed"]:
            raise ValueError(f"--merge: {path} has seed {saved['seed']}, the first file {merged['seed']}")
        twice = sorted(merged["runs"].keys() & saved["runs"].keys())
        if twice:
            raise ValueError(f"--merge: {path} repeats the run(s) {twice}")
        merged["runs"].update(saved["runs"])
        merged["checkpoints"].update(saved["checkpoints"])
    return merged


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--checkpoint", action="append", metavar="[LABEL=]DIR")
    mode.add_argument("--merge", nargs="+", metavar="JSON", help="combine fact_position.json files")
    p.add_argument("--positions", type=int, nargs="+", default=[0, 1024, 4096, 16384])
    p.add_argument("--distances", type=int, nargs="+", default=[1, 32, 1024])
    p.add_argument("--stories", type=int, default=32)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--seed", type=int, default=12345)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", required=True)
    a = p.parse_args(argv)
    if a.merge:
        saved = merge(a.merge)
        write(a.out, saved)
        return saved["runs"]
    if min(a.positions) < 0 or min(a.distances) < 1 or a.stories < 1 or a.batch_size < 1:
        p.error("positions must be >= 0, distances, --stories and --batch-size >= 1")
    torch.set_num_threads(a.threads)
    paths = {}
    for spec in a.checkpoint:
        label, path = labelled(spec)
        label = label or path
        if label in paths:
            p.error(f"--checkpoint: the label {label!r} is given twice; name runs LABEL=DIR")
        paths[label] = path
    runs = {}
    for label, path in paths.items():
        model, vocab = load(path)
        runs[label] = evaluate(model, vocab, a.positions, a.distances, a.stories, a.batch_size, a.seed)
        print(f"{label}\n{table(runs[label])}", flush=True)
    write(a.out, {"task": "qa1", "seed": a.seed, "checkpoints": paths, "runs": runs})
    return runs


if __name__ == "__main__":
    main()
