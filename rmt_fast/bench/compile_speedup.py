"""Opt-in ``torch.compile`` path: its speedup on reading segments, measured A/B in one process.

``python -m rmt_fast.bench.compile_speedup`` builds the default bench model twice (same weights),
compiles one backbone (:meth:`rmt_fast.models.RMTForCausalLM.compile_base`), and times
``segment_forward`` of both alternately (so machine-load drift hits both), reporting medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from rmt_fast.bench.systems import CONFIGS, _rmt


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default="default")
    p.add_argument("--rounds", type=int, default=20, help="alternating timed rounds")
    p.add_argument("--segments", type=int, default=8, help="segments per timed round")
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = CONFIGS[a.config]
    eager, compiled = _rmt(cfg, checkpoint=False).eval(), _rmt(cfg, checkpoint=False).eval()
    compiled.load_state_dict(eager.state_dict())
    start = time.perf_counter()
    compiled.compile_base(dynamic=False)
    ids = torch.randint(1, cfg.vocab, (1, cfg.segment), generator=torch.Generator().manual_seed(0))
    mem = eager.expand_memory(1)
    times: dict[str, list[float]] = {"eager": [], "compiled": []}
    with torch.no_grad():
        _, m_c, _ = compiled.segment_forward(mem, ids, None, need_hidden=False)  # compiles
        compile_s = time.perf_counter() - start
        _, m_e, _ = eager.segment_forward(mem, ids, None, need_hidden=False)
        for _ in range(a.rounds):
            for name, model in (("eager", eager), ("compiled", compiled)):
                t = time.perf_counter()
                for _ in range(a.segments):
                    model.segment_forward(mem, ids, None, need_hidden=False)
                times[name].append((time.perf_counter() - t) / a.segments)
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {"config": a.config, "threads": a.threads, "compile_s": compile_s,
              "eager_ms_per_segment": med["eager"] * 1e3,
              "compiled_ms_per_segment": med["compiled"] * 1e3,
              "speedup": med["eager"] / med["compiled"],
              "max_abs_memory_diff": float((m_c - m_e).abs().max())}
    print(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
