"""Where a checkpointed training step keeps the segment states: the extension's store vs
``torch.autograd.graph.save_on_cpu`` vs the checkpoint's own saving.

One process, one model (``checkpoint_segments=True``); the three ways (``saved_state`` of
:func:`rmt_fast.models.segment_loop.run_segments`) are timed alternately, ``--rounds`` training
steps each (forward + backward; wall-clock and process CPU time), then each is run once more under
:class:`rmt_fast.bench.live_bytes.LiveBytes` for the bytes alive after the forward and the
peak. Prints one JSON object.

``python -m rmt_fast.bench.saved_state --segments 32 --batch 2 --rounds 5``
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from functools import partial

import torch

from rmt_fast.bench.live_bytes import LiveBytes
from rmt_fast.bench.systems import CONFIGS, _gpt2
from rmt_fast.models import RMTForCausalLM
from rmt_fast.models.segment_loop import SAVED_STATE_MODES, SegmentState, run_segments


def build(config: str, xl_cache: int) -> RMTForCausalLM:
    cfg = CONFIGS[config]
    base = _gpt2(cfg, cfg.segment + 2 * cfg.memory, "sdpa")
    return RMTForCausalLM(base, num_mem_tokens=cfg.memory, segment_size=cfg.segment,
                          checkpoint_segments=True, xl_cache=xl_cache).train()


def train_step(model: RMTForCausalLM, tokens: torch.Tensor, saved_state: str,
               after_forward=None) -> float:
    """One forward + backward with the states kept as ``saved_state`` says; returns the loss."""
    model.zero_grad(set_to_none=True)
    segments = model._segments(tokens, None, tokens, None)
    n_targets = sum(s.num_targets for s in segments)
    step = partial(model._step, n_targets=n_targets)
    res = run_segments(step, SegmentState(model.expand_memory(tokens.shape[0])), segments,
                       checkpoint=True, saved_state=saved_state)
    if after_forward is not None:
        after_forward()
    res.loss.backward()
    return res.loss.item()


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="default")
    p.add_argument("--segments", type=int, default=32)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--xl-cache", type=int, default=64)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model = build(args.config, args.xl_cache)
    cfg = CONFIGS[args.config]
    length = args.segments * cfg.segment
    tokens = torch.randint(1, cfg.vocab, (args.batch, length), generator=torch.Generator().manual_seed(0))
    losses = {mode: train_step(model, tokens, mode) for mode in SAVED_STATE_MODES}  # warm-up
    times: dict[str, list[float]] = {mode: [] for mode in SAVED_STATE_MODES}
    cpu: dict[str, list[float]] = {mode: [] for mode in SAVED_STATE_MODES}
    for r in range(args.rounds):
        modes = SAVED_STATE_MODES[r % 3:] + SAVED_STATE_MODES[: r % 3]
        for mode in modes:
            start, start_cpu = time.perf_counter(), time.process_time()
            train_step(model, tokens, mode)
            times[mode].append(time.perf_counter() - start)
            cpu[mode].append(time.process_time() - start_cpu)
    memory = {}
    for mode in SAVED_STATE_MODES:
        with LiveBytes() as counter:
            seen = {}
            train_step(model, tokens, mode, after_forward=lambda c=counter, s=seen: s.update(live=c.live))
        memory[mode] = {"live_after_forward_mib": seen["live"] / 2**20, "peak_mib": counter.peak / 2**20}
    tokens_per_step = args.batch * length
    report = {"args": vars(args), "losses": losses,
              "median_s": {m: statistics.median(t) for m, t in times.items()},
              "median_cpu_s": {m: statistics.median(t) for m, t in cpu.items()},
              "tokens_per_s": {m: tokens_per_step / statistics.median(t) for m, t in times.items()},
              "tokens_per_cpu_s": {m: tokens_per_step / statistics.median(t) for m, t in cpu.items()},
              "times_s": times, "cpu_s": cpu, "memory": memory}
    print(json.dumps(report, indent=1))
    return report


if __name__ == "__main__":
    main()
