"""Length generalisation of answer-at-the-end tasks: accuracy vs number of segments, far past
training, for RMT and ARMT checkpoints side by side.

Tasks: ``needle`` (``the key is D .`` in the first segment, background sentences, ``what is the
key ?`` at the end) and the BABILong-style ``qa1`` / ``qa2`` (``num_facts`` facts hidden, in
order, at random places in the whole story; the question at the end). A story of ``n``
segments is read segment by segment into memory (:class:`rmt_fast.streaming.StreamingReader`),
then the answer is generated from the last segment: exactly the segmentation used in training
(left-aligned, ``n * segment_size`` tokens, the answer being the last one).

``python -m rmt_fast.tasks.length_eval --task qa1 --checkpoint RMT=DIR --checkpoint ARMT=DIR2
--segments 8 64 1024 --out results/`` writes ``qa1_lengths.json``, ``.md`` and ``.png``
(``--checkpoint DIR`` alone labels the run by its wrapper class); runs evaluated in separate
processes combine with ``--merge A/qa1_lengths.json B/qa1_lengths.json --out results/``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import torch
from tqdm.auto import tqdm

from rmt_fast.models import ARMTForCausalLM, RMTForCausalLM
from rmt_fast.models.auto import AutoRMT
from rmt_fast.streaming import StreamingReader
from rmt_fast.tasks.babi_eval import wilson
from rmt_fast.tasks.babilong import STORIES, Vocab, babilong_sample, needle_sample

TASKS = ("needle", *STORIES)


def story_batch(task: str, num_segments: int, segment_size: int, batch: int, vocab: Vocab, *,
                seed: int = 0, num_facts: int = 4, fact_within: int | None = None) -> torch.Tensor:
    """``[batch, num_segments * segment_size]`` stories of ``task`` (the answer is the last id).
    ``fact_within``: needle only, the fact ends within this many words (default
    ``segment_size``); ``num_facts``: qa tasks only."""
    if task not in TASKS:
        raise ValueError(f"task must be one of {TASKS}, got {task!r}")
    if num_segments < 1 or segment_size < 11:
        raise ValueError(f"need num_segments >= 1 and segment_size >= 11, got {num_segments}, "
                         f"{segment_size}")
    rng = random.Random(seed)
    length = num_segments * segment_size
    if task == "needle":
        within = segment_size if fact_within is None else fact_within
        rows = [needle_sample(rng, length, within, vocab) for _ in range(batch)]
    else:
        rows = [babilong_sample(rng, task, length, num_facts, vocab) for _ in range(batch)]
    return torch.tensor(rows)


def batch_seed(seed: int, first: int) -> int:
    """The :func:`story_batch` seed of the batch that starts at story ``first`` of an evaluation
    seeded ``seed`` (every length reads the same sequence of seeds)."""
    return seed * 1_000_003 + first


@torch.no_grad()
def answer(model: RMTForCausalLM | ARMTForCausalLM, stories: torch.Tensor,
           progress: bool = False) -> torch.Tensor:
    """Read all but the last segment of ``stories`` ``[B, L]`` into memory, then generate one
    token after the question. Returns the predicted ids ``[B]``."""
    size = model.rmt_config.segment_size
    context, prompt = stories[:, :-size], stories[:, -size:-1]
    reader = StreamingReader(model, batch_size=stories.shape[0], progress=progress)
    reader.feed(context)
    out = reader.generate(prompt, max_new_tokens=1, do_sample=False, pad_token_id=0)
    return out[:, -1]


def length_accuracy(model: RMTForCausalLM | ARMTForCausalLM, vocab: Vocab, num_segments: int,
                    samples: int = 64, batch_size: int = 32, seed: int = 0, *, task: str = "needle",
                    num_facts: int = 4) -> dict:
    """Exact-match accuracy of the answer over ``samples`` fresh stories of ``num_segments``
    segments, with its 95% Wilson interval."""
    correct, start, done = 0, time.perf_counter(), 0
    for b in range(0, samples, batch_size):
        n = min(batch_size, samples - b)
        stories = story_batch(task, num_segments, model.rmt_config.segment_size, n, vocab,
                              seed=batch_seed(seed, b), num_facts=num_facts)
        correct += int((answer(model, stories) == stories[:, -1]).sum())
        done += n
    seconds = time.perf_counter() - start
    return {"segments": num_segments, "tokens": num_segments * model.rmt_config.segment_size,
            "samples": done, "accuracy": correct / done, "ci95": list(wilson(correct, done)),
            "seconds": seconds}


def load(checkpoint: str | os.PathLike) -> tuple[RMTForCausalLM | ARMTForCausalLM, Vocab]:
    """The model (in eval mode, whichever wrapper the directory holds) and its ``vocab.json``."""
    model = AutoRMT.from_pretrained(checkpoint)
    if not isinstance(model, (RMTForCausalLM, ARMTForCausalLM)):
        raise TypeError(f"{checkpoint} holds a {type(model).__name__}; length evaluation reads into "
                        "an RMTForCausalLM or an ARMTForCausalLM")
    return model.eval(), Vocab.load(os.path.join(checkpoint, "vocab.json"))


def plot(runs: dict[str, list[dict]], path: str, trained_tokens: int | None = None,
         task: str = "needle") -> None:
    """Accuracy (with 95% intervals where the rows have them) vs input length, one line per run."""
    from rmt_fast.bench.plotting import pyplot, save

    fig, ax = pyplot().subplots(figsize=(7, 4))
    for label, rows in runs.items():
        x = [r["tokens"] for r in rows]
        y = [r["accuracy"] for r in rows]
        line = ax.plot(x, y, marker="o", label=label)[0]
        if all("ci95" in r for r in rows):
            ax.fill_between(x, [r["ci95"][0] for r in rows], [r["ci95"][1] for r in rows],
                            color=line.get_color(), alpha=0.15)
    if trained_tokens:
        ax.axvline(trained_tokens, ls="--", c="gray", label="longest training length")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("input length (tokens)")
    ax.set_ylabel("answer accuracy")
    ax.set_title(f"{task}: accuracy vs input length")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    save(fig, path)


def table(runs: dict[str, list[dict]]) -> str:
    """Markdown: one row per length, accuracy (95% interval) per run."""
    labels = list(runs)
    lengths = sorted({(r["segments"], r["tokens"]) for rows in runs.values() for r in rows})
    lines = ["| segments | tokens | " + " | ".join(f"{x} (95% CI)" for x in labels) + " | stories |",
             "|---" * (len(labels) + 3) + "|"]
    for segments, tokens in lengths:
        cells, stories = [], set()
        for label in labels:
            row = next((r for r in runs[label] if r["segments"] == segments), None)
            if row is None:
                cells.append("")
                continue
            stories.add(row["samples"])
            ci = row.get("ci95")
            cells.append(f"{row['accuracy']:.3f}" + (f" ({ci[0]:.2f}-{ci[1]:.2f})" if ci else ""))
        lines.append(f"| {segments:,} | {tokens:,} | " + " | ".join(cells) + " | "
                     + "/".join(map(str, sorted(stories))) + " |")
    return "\n".join(lines)


def labelled(spec: str) -> tuple[str | None, str]:
    """``(label, path)`` of a ``[LABEL=]DIR`` argument; ``(None, spec)`` without a label (or when
    ``spec`` itself is a directory whose name holds ``=``)."""
    label, sep, path = spec.partition("=")
    return (label, path) if sep and not os.path.isdir(spec) else (None, spec)


def write(out: str, saved: dict, trained_tokens: int | None = None) -> None:
    """``out/<task>_lengths.{json,md,png}`` of ``saved`` (``task``, ``runs``, ...)."""
    os.makedirs(out, exist_ok=True)
    stem = os.path.join(out, f"{saved['task']}_lengths")
    with open(stem + ".json", "w") as f:
        json.dump(saved, f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(table(saved["runs"]) + "\n")
    plot(saved["runs"], stem + ".png", trained_tokens, saved["task"])


def merge(paths: list[str]) -> dict:
    """One result of several ``<task>_lengths.json`` files of the same task and stories (runs
    evaluated in separate processes, e.g. one per core; one run's lengths may come from several
    files, each length from one)."""
    merged: dict = {}
    for path in paths:
        with open(path) as f:
            saved = json.load(f)
        if not merged:
            merged = {**saved, "runs": {}, "checkpoints": {}}
        for key in ("task", "num_facts", "seed", "segment_size"):
            if saved.get(key) != merged.get(key):
                raise ValueError(f"--merge: {path} has {key}={saved.get(key)!r}, the first file "
                                 f"{merged.get(key)!r}")
        for label, rows in saved["runs"].items():
            have = merged["runs"].setdefault(label, [])
            twice = {r["segments"] for r in have} & {r["segments"] for r in rows}
            if twice:
                raise ValueError(f"--merge: run {label!r} has {sorted(twice)} segments in more than one file")
            have += rows
            have.sort(key=lambda r: r["segments"])
        merged["checkpoints"].update(saved.get("checkpoints", {}))
    return merged


def main(argv: list[str] | None = None) -> dict[str, list[dict]]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--checkpoint", action="append",
                      help="[LABEL=]DIR of a saved RMTForCausalLM or ARMTForCausalLM (repeat to compare)")
    mode.add_argument("--merge", nargs="+", metavar="JSON",
                      help="combine saved <task>_lengths.json files into one table and plot under --out")
    p.add_argument("--task", choices=TASKS, default="needle")
    p.add_argument("--num-facts", type=int, default=4, help="qa tasks: facts per story")
    p.add_argument("--segments", type=int, nargs="+", default=[8, 16, 64, 256, 1024])
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--trained-segments", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=12345, help="evaluation stories (not the training seed)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.merge:
        if not a.out:
            p.error("--merge needs --out")
        saved = merge(a.merge)
        write(a.out, saved, a.trained_segments * saved["segment_size"] if a.trained_segments else None)
        return saved["runs"]
    if a.threads:
        torch.set_num_threads(a.threads)
    models = {}
    for spec in a.checkpoint:
        label, path = labelled(spec)
        model, vocab = load(path)
        label = label or type(model).__name__
        if label in models:
            raise ValueError(f"--checkpoint: the label {label!r} is given twice; name runs LABEL=DIR")
        models[label] = (model, vocab, path)
    sizes = {label: m[0].rmt_config.segment_size for label, m in models.items()}
    if len(set(sizes.values())) > 1:
        raise ValueError(f"--checkpoint: the runs must share one segment size (the stories are "
                         f"built from it), got {sizes}")
    runs: dict[str, list[dict]] = {label: [] for label in models}
    for n in tqdm(a.segments, desc="lengths"):
        for label, (model, vocab, _) in models.items():
            runs[label].append(length_accuracy(model, vocab, n, a.samples, a.batch_size, a.seed,
                                               task=a.task, num_facts=a.num_facts))
            r = runs[label][-1]
            print(f"{label}: {r['segments']:>6} segments ({r['tokens']:>9,} tokens): accuracy "
                  f"{r['accuracy']:.3f} ({r['samples']} stories, {r['seconds']:.0f} s)", flush=True)
    if a.out:
        size = next(iter(models.values()))[0].rmt_config.segment_size
        write(a.out, {"task": a.task, "num_facts": a.num_facts, "seed": a.seed, "segment_size": size,
                      "checkpoints": {label: str(m[2]) for label, m in models.items()}, "runs": runs},
              a.trained_segments * size if a.trained_segments else None)
    return runs


if __name__ == "__main__":
    main()
