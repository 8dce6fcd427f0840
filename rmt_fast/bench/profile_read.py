"""Where the time of a streaming read goes, and what the fused CPU kernels change.

``python -m rmt_fast.bench.profile_read [--config gpt2-small] [--dtype bfloat16] [--tokens 4096]``
builds the bench's RMT model (:mod:`rmt_fast.bench.systems`, weights from a fixed seed), reads
``--tokens`` random tokens with :class:`rmt_fast.streaming.StreamingReader` on one thread, and
times these variants in alternating rounds in this one process:

* ``fused``: as shipped (``backend="auto"`` attention, the extension's tanh GELU);
* ``kernel``: the same with attention always on the extension's fused kernel (where ``auto``
  picks ATen's SDPA instead: bf16 on AMX CPUs whose kernel path is not ``"amx"``,
  ``cpu_kernel.auto_path``);
* ``sdpa``: the same with ATen's SDPA for every call ``auto`` may send there (bf16 inference
  calls: ``cpu_kernel.sdpa_beats_kernel_bf16`` forced true);
* ``aten_ln``: ``fused`` with LayerNorm through ATen's kernel (``F.layer_norm``);
* ``aten_gelu``: ``fused`` with GELU through ``F.gelu(approximate="tanh")``;
* ``before``: ATen's GELU and LayerNorm, attention on the ``cpu_flash`` path (ATen's CPU flash
  attention per mask block), i.e. CPU inference before the fused attention, bf16 GELU and
  LayerNorm kernels.

Tokens/s use the thread's CPU time (min over rounds; the machine may be shared), then one
``torch.profiler`` table per variant (self CPU time, top ops).
"""

from __future__ import annotations

import argparse
import contextlib
import time

import torch
from torch.profiler import ProfilerActivity, profile

from rmt_fast import _extension
from rmt_fast.bench.systems import CONFIGS, _rmt
from rmt_fast.ops.memory_attention import cpu_kernel
from rmt_fast.streaming import StreamingReader

VARIANTS = ("fused", "kernel", "sdpa", "aten_ln", "aten_gelu", "before")


@contextlib.contextmanager
def variant(name: str):
    """Switch the GELU and LayerNorm kernels and/or the attention path for the duration of the
    block."""
    gelu, auto_path = _extension.GELU_TANH_DTYPES, cpu_kernel.auto_path
    layer_norm = _extension.HAS_LAYER_NORM
    sdpa_rule = cpu_kernel.sdpa_beats_kernel_bf16
    if name == "sdpa":
        cpu_kernel.sdpa_beats_kernel_bf16 = lambda: True
    if name in ("aten_gelu", "before"):
        _extension.GELU_TANH_DTYPES = ()
    if name in ("aten_ln", "before"):
        _extension.HAS_LAYER_NORM = False
    if name == "before":
        cpu_kernel.auto_path = lambda q, past_k=None, **kw: "torch"
    if name == "kernel":
        cpu_kernel.auto_path = lambda q, past_k=None, **kw: "cpu" if cpu_kernel.supported(q) else "torch"
    try:
        yield
    finally:
        _extension.GELU_TANH_DTYPES, cpu_kernel.auto_path = gelu, auto_path
        _extension.HAS_LAYER_NORM = layer_norm
        cpu_kernel.sdpa_beats_kernel_bf16 = sdpa_rule


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", default="gpt2-small", choices=sorted(CONFIGS))
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "bfloat16"])
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--rows", type=int, default=10, help="profiler table rows")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    cfg = CONFIGS[args.config]
    model = _rmt(cfg, checkpoint=False).eval().to(getattr(torch, args.dtype))
    tokens = torch.randint(0, cfg.vocab, (1, args.tokens), generator=torch.Generator().manual_seed(0))

    def read():
        reader = StreamingReader(model, batch_size=1, progress=False)
        reader.feed(tokens)
        reader.flush()

    cpu = {v: [] for v in VARIANTS}
    for v in VARIANTS:  # warm-up
        with variant(v):
            read()
    for _ in range(args.rounds):
        for v in VARIANTS:
            with variant(v):
                start = time.thread_time()
                read()
                cpu[v].append(time.thread_time() - start)
    rates = {v: args.tokens / min(t) for v, t in cpu.items()}
    print(f"{args.config} {args.dtype}, {args.tokens} tokens, one thread, kernel isa "
          f"{cpu_kernel.isa(getattr(torch, args.dtype))}: tokens/s (thread CPU time, best of {args.rounds})")
    for v in VARIANTS:
        print(f"  {v:10s} {rates[v]:8.0f}  ({rates[v] / rates['before']:.2f}x before)")
    for v in VARIANTS:
        with variant(v), profile(activities=[ProfilerActivity.CPU]) as prof:
            read()
        print(f"\n--- {v}")
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows))
    return rates


if __name__ == "__main__":
    main()
