"""The main job (``make demo``): stream a long input through an RMT-wrapped model.

Reads ``--tokens`` tokens (default 1,000,000) segment by segment into memory, then generates a
few tokens after a question, and prints throughput, peak memory, and what full attention over
the same length would have needed for its score matrix alone.
"""

from __future__ import annotations

import argparse
import resource
import time

import torch

from rmt_fast.models import RMTForCausalLM
from rmt_fast.streaming import StreamingReader


def default_model(seed: int = 0) -> RMTForCausalLM:
    """GPT-2 style: 4 layers, d_model 256, 4 heads, FF 1024, vocab 1000; segment 256, 16 memory."""
    from transformers import GPT2Config, GPT2LMHeadModel

    cfg = GPT2Config(vocab_size=1000, n_positions=288, n_embd=256, n_layer=4, n_head=4, n_inner=1024,
                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(seed)
    return RMTForCausalLM(GPT2LMHeadModel(cfg), num_mem_tokens=16, segment_size=256).eval()


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(prog="rmt-fast demo", description=__doc__)
    parser.add_argument("--tokens", type=int, default=1_000_000, help="input length to stream")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: all)")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model = default_model()
    params = sum(p.numel() for p in model.parameters())
    print(f"model: GPT-2 style 4x256, {params / 1e6:.2f}M parameters, segment 256, 16 memory tokens, "
          f"{torch.get_num_threads()} threads, backend {model.base.config._attn_implementation}")
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(1, 1000, (args.tokens,), generator=generator)
    reader = StreamingReader(model, progress=not args.no_progress)
    rss_before = peak_rss_mib()
    start = time.perf_counter()
    reader.feed(tokens)
    reader.flush()
    seconds = time.perf_counter() - start
    question = torch.randint(1, 1000, (1, 8), generator=generator)
    answer = reader.generate(question, max_new_tokens=8, do_sample=False, pad_token_id=0)
    peak = peak_rss_mib()
    n = reader.tokens_read
    # one fp32 score matrix of one head of one layer: what full attention would materialise
    full_gib = n * n * 4 / 2**30
    result = {"tokens": n, "seconds": seconds, "tokens_per_s": n / seconds, "peak_rss_mib": peak,
              "rss_before_reading_mib": rss_before, "full_attention_scores_gib": full_gib}
    print(f"read {n:,} tokens in {seconds:.1f} s: {n / seconds:,.0f} tokens/s")
    print(f"peak RSS {peak:,.0f} MiB (after model set-up: {rss_before:,.0f} MiB)")
    print(f"full attention over {n:,} tokens: one fp32 score matrix (1 head, 1 layer) alone is "
          f"{full_gib:,.0f} GiB; RMT kept a [1, 16, 256] memory state")
    print(f"generated after the question: {answer[0].tolist()} (random weights: the trained demo "
          "checkpoint is not shipped yet)")
    return result


if __name__ == "__main__":
    main()
