"""Forward FLOPs of RMT vs full attention (Hoffmann et al. 2022, appendix F convention).

``rmt-fast flops`` tabulates and plots the ratio for OPT configurations; the 1M-token RMT
report gives x295 (OPT-125M) and x29 (OPT-175B) fewer FLOPs at 2,048,000 tokens, segment 512.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass

from rmt_fast.bench.plotting import pyplot, save, style_length_axes


@dataclass(frozen=True)
class ModelShape:
    layers: int
    d_model: int
    heads: int
    ffw: int
    vocab: int


OPT = {
    "opt-125m": ModelShape(12, 768, 12, 3072, 50272),
    "opt-350m": ModelShape(24, 1024, 16, 4096, 50272),
    "opt-1.3b": ModelShape(24, 2048, 32, 8192, 50272),
    "opt-2.7b": ModelShape(32, 2560, 32, 10240, 50272),
    "opt-6.7b": ModelShape(32, 4096, 32, 16384, 50272),
    "opt-13b": ModelShape(40, 5120, 40, 20480, 50272),
    "opt-30b": ModelShape(48, 7168, 56, 28672, 50272),
    "opt-66b": ModelShape(64, 9216, 72, 36864, 50272),
    "opt-175b": ModelShape(96, 12288, 96, 49152, 50272),
}


def forward_flops(n: int, m: ModelShape, embeddings: bool = True, logits: bool = True) -> float:
    """Forward FLOPs of one sequence of ``n`` tokens (full attention over all of it)."""
    d = m.d_model
    attention = (2 * n * 3 * d * d          # q, k, v projections
                 + 2 * n * n * d            # q @ k^T
                 + 3 * m.heads * n * n      # softmax
                 + 2 * n * n * d            # p @ v
                 + 2 * n * d * d)           # output projection
    dense = 2 * n * 2 * d * m.ffw
    total = m.layers * (attention + dense)
    total += 2 * n * m.vocab * d if embeddings else 0
    total += 2 * n * m.vocab * d if logits else 0
    return float(total)


def matmul_forward_flops(positions: int, m: ModelShape, attention_pairs: int | None = None,
                         logit_positions: int = 0, tail_rows: int | None = None) -> float:
    """Matrix-product FLOPs of one decoder forward pass over ``positions`` positions.

    Unlike :func:`forward_flops` (the Chinchilla convention, which counts the full ``n x n``
    score matrix, the softmax and the embedding as a product) this counts what the matrix units
    execute: q/k/v/output projections ``8 n d^2``, MLP ``4 n d f``, ``4 d`` per visible
    (query, key) pair (``q @ k^T`` and ``p @ v``; causal: ``n (n + 1) / 2`` pairs) per layer,
    and ``2 d V`` per position whose logits are computed. Embedding lookups, norms, softmax and
    activations are not counted.

    ``tail_rows``: the last layer computes only the last ``tail_rows`` positions past the
    key/value projections (:mod:`rmt_fast.models.used_rows`: reading into memory): q/k/v for
    every position, the output projection, MLP and causal attention for those rows only.
    """
    d = m.d_model
    pairs = positions * (positions + 1) // 2 if attention_pairs is None else attention_pairs
    per_layer = 2 * positions * 4 * d * d + 2 * positions * 2 * d * m.ffw + 4 * d * pairs
    if tail_rows is None:
        return float(m.layers * per_layer + 2 * logit_positions * d * m.vocab)
    w = tail_rows
    tail_pairs = w * (positions - w) + w * (w + 1) // 2
    last = 2 * positions * 3 * d * d + 2 * w * d * d + 2 * w * 2 * d * m.ffw + 4 * d * tail_pairs
    return float((m.layers - 1) * per_layer + last + 2 * logit_positions * d * m.vocab)


def rmt_forward_flops(n: int, m: ModelShape, segment: int = 512, **kw) -> float:
    """RMT: ``ceil(n / segment)`` segments of ``segment`` positions each (memory included)."""
    segments = -(-n // segment)
    return segments * forward_flops(segment, m, **kw)


def table(lengths: list[int], models: dict[str, ModelShape], segment: int = 512, **kw) -> list[dict]:
    rows = []
    for name, shape in models.items():
        for n in lengths:
            full, rmt = forward_flops(n, shape, **kw), rmt_forward_flops(n, shape, segment, **kw)
            rows.append({"model": name, "tokens": n, "full_flops": full, "rmt_flops": rmt,
                         "ratio": full / rmt})
    return rows


def plot(rows: list[dict], path: str) -> None:
    fig, ax = pyplot().subplots(figsize=(7, 4.5))
    for name in dict.fromkeys(r["model"] for r in rows):
        pts = [r for r in rows if r["model"] == name]
        ax.plot([r["tokens"] for r in pts], [r["ratio"] for r in pts], marker="o", label=name)
    style_length_axes(ax, "full-attention FLOPs / RMT FLOPs", "Forward FLOPs saved by RMT")
    save(fig, path)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="rmt-fast flops", description=__doc__)
    parser.add_argument("--segment", type=int, default=512)
    parser.add_argument("--max-tokens", type=int, default=2_048_000)
    parser.add_argument("--models", nargs="*", default=["opt-125m", "opt-1.3b", "opt-13b", "opt-175b"])
    parser.add_argument("--no-embeddings", action="store_true", help="leave out the embedding FLOPs")
    parser.add_argument("--json", default=None)
    parser.add_argument("--png", default=None)
    args = parser.parse_args(argv)
    lengths, n = [], 4000
    while n < args.max_tokens:
        lengths.append(n)
        n *= 2
    lengths.append(args.max_tokens)
    rows = table(lengths, {k: OPT[k] for k in args.models}, args.segment,
                 embeddings=not args.no_embeddings)
    print(f"| model | tokens | full / RMT forward FLOPs (segment {args.segment}) |\n|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['tokens']:,} | x{r['ratio']:.1f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"segment": args.segment, "models": {k: asdict(OPT[k]) for k in args.models},
                       "rows": rows}, f, indent=1)
    if args.png:
        plot(rows, args.png)
    return rows


if __name__ == "__main__":
    main()
