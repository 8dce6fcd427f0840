"""Tokens/s along one long stream: does reading slow down with position?

``python -m rmt_fast.bench.stream_rate [--chunks 40] [--chunk-tokens 16384]``: one
``StreamingReader`` (default bench config, batch 1, one thread) is fed ``chunks`` chunks of
random tokens, each chunk timed; fresh 16K-token readers are timed before and after. Prints one
JSON object. A flat per-chunk rate means the cost per token does not depend on how much was
read before (the recurrent state is the same size throughout).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from rmt_fast.bench.systems import CONFIGS, INFER, _rmt, build


def run(chunks: int = 40, chunk_tokens: int = 16384, config: str = "default", fresh: int = 3) -> dict:
    from rmt_fast.streaming import StreamingReader

    cfg = CONFIGS[config]
    fresh_reader = build("rmt_fast", INFER, cfg, chunk_tokens)
    tokens = torch.randint(0, cfg.vocab, (1, chunk_tokens))
    fresh_reader(tokens[:, :4096])  # warm-up

    def fresh_rate() -> float:
        t = time.perf_counter()
        fresh_reader(tokens)
        return chunk_tokens / (time.perf_counter() - t)

    before = [fresh_rate() for _ in range(fresh)]
    model = _rmt(cfg, checkpoint=False).eval()
    reader = StreamingReader(model, batch_size=1, progress=False)
    reader.feed(torch.randint(0, cfg.vocab, (1, 4096)))  # warm-up
    rates = []
    for _ in range(chunks):
        chunk = torch.randint(0, cfg.vocab, (1, chunk_tokens))
        t = time.perf_counter()
        reader.feed(chunk)
        rates.append(chunk_tokens / (time.perf_counter() - t))
    reader.flush()
    after = [fresh_rate() for _ in range(fresh)]
    tenth = max(chunks // 10, 1)
    return {"config": config, "chunk_tokens": chunk_tokens, "chunks": chunks,
            "fresh_before": [round(r) for r in before], "fresh_after": [round(r) for r in after],
            "stream_chunks": [round(r) for r in rates],
            "stream_median": round(statistics.median(rates)),
            "fresh_median": round(statistics.median(before + after)),
            "first_tenth_mean": round(statistics.mean(rates[:tenth])),
            "last_tenth_mean": round(statistics.mean(rates[-tenth:]))}


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m rmt_fast.bench.stream_rate",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--chunks", type=int, default=40)
    p.add_argument("--chunk-tokens", type=int, default=16384)
    p.add_argument("--config", default="default", choices=sorted(CONFIGS))
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    result = run(args.chunks, args.chunk_tokens, args.config)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
