"""The main job (``make demo``): find a needle in 1,000,000-token haystacks with a trained RMT.

The package ships a small RMT checkpoint trained on the needle task (``the key is D .`` early on,
background sentences, ``what is the key ?`` at the end) with stories of at most 8 segments of 32
tokens. The demo streams a few haystacks of ``--tokens`` tokens each through it segment by
segment (only the memory is kept), asks the question, and prints the answers, the accuracy,
tokens/s, peak memory, and what full attention over the same length would have needed.
"""

from __future__ import annotations

import argparse
import os
import resource
import time

import torch

from rmt_fast.dtypes import resolve_dtype

CHECKPOINT = os.path.join(os.path.dirname(__file__), "checkpoints", "needle")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> dict:
    from rmt_fast.tasks.needle_eval import answer, load, needle_batch

    parser = argparse.ArgumentParser(prog="rmt-fast demo", description=__doc__)
    parser.add_argument("--tokens", type=int, default=1_000_000, help="haystack length")
    parser.add_argument("--haystacks", type=int, default=3, help="haystacks, read as one batch")
    parser.add_argument("--checkpoint", default=CHECKPOINT)
    parser.add_argument("--seed", type=int, default=2026)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1 is fastest for this small model: its ops are tiny)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="compute dtype (auto: bfloat16 where the CPU has native bf16 dot products)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, vocab = load(args.checkpoint)
    model = model.to(resolve_dtype(args.dtype, model.device))
    cfg = model.rmt_config
    segments = max(1, args.tokens // cfg.segment_size)
    n_tokens = segments * cfg.segment_size
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {args.checkpoint} ({params / 1e6:.2f}M parameters, segment {cfg.segment_size}, "
          f"{cfg.num_mem_tokens} memory tokens, mask {cfg.mask}), {torch.get_num_threads()} threads, "
          f"{str(model.memory.dtype).removeprefix('torch.')}")
    print(f"building {args.haystacks} haystacks of {n_tokens:,} tokens ({segments:,} segments)...",
          flush=True)
    stories = needle_batch(segments, cfg.segment_size, args.haystacks, vocab, seed=args.seed)
    rss_before = peak_rss_mib()
    start = time.perf_counter()
    predicted = answer(model, stories, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    peak = peak_rss_mib()
    keys = stories[:, -1]
    for i in range(args.haystacks):
        fact = stories[i, : cfg.segment_size].tolist()
        print(f"haystack {i}: ...{vocab.decode(fact)}... {vocab.decode(stories[i, -6:-1].tolist())} "
              f"-> {vocab.decode([int(predicted[i])])} (true: {vocab.decode([int(keys[i])])})")
    accuracy = float((predicted == keys).float().mean())
    total = n_tokens * args.haystacks
    full_gib = n_tokens * n_tokens * 4 / 2**30  # one fp32 score matrix, one head, one layer
    print(f"accuracy: {accuracy:.3f} over {args.haystacks} haystacks of {n_tokens:,} tokens")
    print(f"read {total:,} tokens in {seconds:.1f} s: {total / seconds:,.0f} tokens/s")
    print(f"peak RSS {peak:,.0f} MiB (after set-up: {rss_before:,.0f} MiB); the recurrent state is "
          f"{cfg.num_mem_tokens} x {model.memory.shape[1]} floats per haystack")
    print(f"full attention over {n_tokens:,} tokens would materialise {full_gib:,.0f} GiB for one "
          "fp32 score matrix of one head of one layer")
    return {"dtype": str(model.memory.dtype).removeprefix("torch."), "tokens": n_tokens,
            "haystacks": args.haystacks, "accuracy": accuracy,
            "seconds": seconds, "tokens_per_s": total / seconds, "peak_rss_mib": peak,
            "rss_before_mib": rss_before, "full_attention_scores_gib": full_gib}


if __name__ == "__main__":
    main()
