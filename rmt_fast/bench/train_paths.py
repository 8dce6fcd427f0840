"""bf16 training steps on each of the fused CPU kernel's bf16 code paths, against float32.

``python -m rmt_fast.bench.train_paths [--config default] [--length 4096] [--batch 4]
[--rounds 5]`` builds the bench's ``rmt_fast`` training step (:func:`rmt_fast.bench.systems.build`:
segment checkpointing; bf16 = float32 master weights under autocast) and times, in alternating
rounds in this one process on one thread, a float32 step and a bf16 step on every kernel path
this CPU runs (``RMT_FAST_CPU_ISA`` is read at every call, so it is switched per step), plus
the bf16 step on the path the kernel picks by itself, with the extension's GELU gradient and with
ATen's ``gelu_backward``. Tokens/s use the thread's CPU time (min
and median over the rounds; the machine may be shared).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from rmt_fast import _extension
from rmt_fast.bench.systems import CONFIGS, build
from rmt_fast.ops.memory_attention import cpu_kernel

PATHS = tuple(reversed(cpu_kernel.ISAS))  # best first
#: the bf16 step on the picked path with ATen's gelu_backward instead of the extension's
ATEN_GELU_ARM = "bf16 picked, ATen gelu_backward"


def main(argv=None) -> dict[str, tuple[float, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="default", choices=sorted(CONFIGS))
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = CONFIGS[args.config]
    with cpu_kernel.isa_env(None):
        picked = cpu_kernel.isa(torch.bfloat16)
    paths = tuple(reversed(cpu_kernel.runnable_isas(torch.bfloat16)))
    arms = {"float32": (torch.float32, None), f"bf16 picked ({picked})": (torch.bfloat16, None),
            **{f"bf16 {p}": (torch.bfloat16, p) for p in paths},
            ATEN_GELU_ARM: (torch.bfloat16, None)}
    steps = {name: build("rmt_fast", "train", cfg, args.length, dtype=dt) for name, (dt, _) in arms.items()}
    gen = torch.Generator().manual_seed(0)
    tokens = torch.randint(1, cfg.vocab, (args.batch, args.length), generator=gen)

    def run(name: str) -> float:
        fast_gelu = _extension.HAS_GELU_TANH_BACKWARD
        _extension.HAS_GELU_TANH_BACKWARD = fast_gelu and name != ATEN_GELU_ARM
        try:
            with cpu_kernel.isa_env(arms[name][1]):
                start = time.thread_time()
                steps[name](tokens)
                return time.thread_time() - start
        finally:
            _extension.HAS_GELU_TANH_BACKWARD = fast_gelu

    for name in arms:  # warm-up
        run(name)
    cpu = {name: [] for name in arms}
    for _ in range(args.rounds):
        for name in arms:
            cpu[name].append(run(name))
    n = args.batch * args.length
    rates = {name: (n / min(t), n / statistics.median(t)) for name, t in cpu.items()}
    print(f"{args.config} training step, {args.batch} x {args.length} tokens, one thread: tokens/s "
          f"(thread CPU time, best / median of {args.rounds})")
    for name, (best, med) in rates.items():
        print(f"  {name:32s} {best:8.0f} / {med:8.0f}  ({best / rates['float32'][0]:.2f}x float32)")
    return rates


if __name__ == "__main__":
    main()
