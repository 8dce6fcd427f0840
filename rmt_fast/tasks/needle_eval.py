"""Length generalisation on the needle task: accuracy vs number of segments, far past training.

A story is ``the key is D .`` in its first segment, background sentences, and ``what is the key ?``
at the end of the last segment; the model must answer ``D``. Stories of ``n`` segments are read
segment by segment into memory (:class:`rmt_fast.streaming.StreamingReader`), then the answer is
generated from the last segment: exactly the segmentation used in training (left-aligned,
``n * segment_size`` tokens, the answer being the last one).

``python -m rmt_fast.tasks.needle_eval --checkpoint DIR --segments 8 64 1024 --out results/``
writes ``needle_lengths.json``, ``.md`` and ``.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import time

import torch
from tqdm.auto import tqdm

from rmt_fast.models import RMTForCausalLM
from rmt_fast.streaming import StreamingReader
from rmt_fast.tasks.babilong import Vocab, needle_sample


def needle_batch(num_segments: int, segment_size: int, batch: int, vocab: Vocab, *, seed: int = 0,
                 fact_within: int | None = None) -> torch.Tensor:
    """``[batch, num_segments * segment_size]`` needle stories (the key digit is the last id)."""
    if num_segments < 1 or segment_size < 11:
        raise ValueError(f"need num_segments >= 1 and segment_size >= 11, got {num_segments}, "
                         f"{segment_size}")
    rng = random.Random(seed)
    length = num_segments * segment_size
    within = segment_size if fact_within is None else fact_within
    return torch.tensor([needle_sample(rng, length, within, vocab) for _ in range(batch)])


@torch.no_grad()
def answer(model: RMTForCausalLM, stories: torch.Tensor, progress: bool = False) -> torch.Tensor:
    """Read all but the last segment of ``stories`` ``[B, L]`` into memory, then generate one
    token after the question. Returns the predicted ids ``[B]``."""
    size = model.rmt_config.segment_size
    context, prompt = stories[:, :-size], stories[:, -size:-1]
    reader = StreamingReader(model, batch_size=stories.shape[0], progress=progress)
    reader.feed(context)
    out = reader.generate(prompt, max_new_tokens=1, do_sample=False, pad_token_id=0)
    return out[:, -1]


def needle_accuracy(model: RMTForCausalLM, vocab: Vocab, num_segments: int, samples: int = 64,
                    batch_size: int = 32, seed: int = 0) -> dict:
    """Exact-match accuracy of the answer digit over ``samples`` fresh stories."""
    correct, start, done = 0, time.perf_counter(), 0
    for b in range(0, samples, batch_size):
        n = min(batch_size, samples - b)
        stories = needle_batch(num_segments, model.rmt_config.segment_size, n, vocab,
                               seed=seed * 1_000_003 + b)
        correct += int((answer(model, stories) == stories[:, -1]).sum())
        done += n
    seconds = time.perf_counter() - start
    return {"segments": num_segments, "tokens": num_segments * model.rmt_config.segment_size,
            "samples": done, "accuracy": correct / done, "seconds": seconds}


def load(checkpoint: str | os.PathLike) -> tuple[RMTForCausalLM, Vocab]:
    model = RMTForCausalLM.from_pretrained(checkpoint)  # in eval mode
    return model, Vocab.load(os.path.join(checkpoint, "vocab.json"))


def plot(rows: list[dict], path: str, trained_segments: int | None = None) -> None:
    from rmt_fast.bench.plotting import pyplot, save

    fig, ax = pyplot().subplots(figsize=(7, 4))
    ax.plot([r["tokens"] for r in rows], [r["accuracy"] for r in rows], marker="o", label="RMT")
    if trained_segments:
        ax.axvline(trained_segments * rows[0]["tokens"] / rows[0]["segments"], ls="--", c="gray",
                   label="longest training length")
    ax.set_xscale("log", base=2)
    ax.set_ylim(0, 1.05)
    ax.set_xlabel("input length (tokens)")
    ax.set_ylabel("answer accuracy")
    ax.set_title("Needle: accuracy vs input length")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    save(fig, path)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--segments", type=int, nargs="+", default=[8, 16, 64, 256, 1024])
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--trained-segments", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=12345, help="evaluation stories (not the training seed)")
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    model, vocab = load(a.checkpoint)
    rows = []
    for n in tqdm(a.segments, desc="lengths"):
        rows.append(needle_accuracy(model, vocab, n, a.samples, a.batch_size, a.seed))
        r = rows[-1]
        print(f"{r['segments']:>6} segments ({r['tokens']:>9,} tokens): accuracy {r['accuracy']:.3f} "
              f"({r['samples']} stories, {r['seconds']:.0f} s)", flush=True)
    if a.out:
        os.makedirs(a.out, exist_ok=True)
        with open(os.path.join(a.out, "needle_lengths.json"), "w") as f:
            json.dump({"checkpoint": str(a.checkpoint), "rows": rows}, f, indent=1)
        lines = ["| segments | tokens | accuracy | stories |", "|---|---|---|---|"]
        lines += [f"| {r['segments']:,} | {r['tokens']:,} | {r['accuracy']:.3f} | {r['samples']} |"
                  for r in rows]
        with open(os.path.join(a.out, "needle_lengths.md"), "w") as f:
            f.write("\n".join(lines) + "\n")
        plot(rows, os.path.join(a.out, "needle_lengths.png"), a.trained_segments)
    return rows


if __name__ == "__main__":
    main()
