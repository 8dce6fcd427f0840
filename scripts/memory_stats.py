"""What a MiniLM RMT's extra memory parts do, per segment, on validation samples:

* a gated memory update (``memory_update="gated"``): the mean of the gate's ``z`` (share of the
  memory read that the next memory keeps), the share of channels with ``z > 0.5`` and
  ``z > 0.9``, and how much ``z`` differs between the memory slots;
* an associative memory (``associative_d_mem``): per layer, the RMS of the associative read over
  the RMS of the hidden states it is added to (0 in the first segment, which has nothing to read).

``python scripts/memory_stats.py CHECKPOINT [--task reasoning] [--segments 8] [--samples 64]``
(a checkpoint of ``python -m rmt_fast.train_qa ... --memory-update gated`` and/or
``--associative-d-mem N``; validation samples ``0..samples-1``)."""

from __future__ import annotations

import argparse

import torch

from rmt_fast.models.lora import LoRARMTEncoderForSequenceClassification
from rmt_fast.tasks.babi_qa import TASKS, BabiQA


def gate_openness(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> list[dict]:
    """One row per segment of ``input_ids`` ``[B, T]``: ``mean``, ``over_0.5``, ``over_0.9`` of the
    gate's ``z`` ``[B, M, d]`` and ``slot_spread`` (max - min over the slots of the per-slot mean)."""
    if model.memory_gate is None:
        raise ValueError("the model's memory is not gated (memory_update='replace')")
    rows = []

    def record(gate, args, output):
        z = gate.keep(*args).float()
        per_slot = z.mean(dim=(0, 2))
        rows.append({"segment": len(rows), "mean": z.mean().item(),
                     **{f"over_{t}": (z > t).float().mean().item() for t in (0.5, 0.9)},
                     "slot_spread": (per_slot.max() - per_slot.min()).item()})

    handle = model.memory_gate.register_forward_hook(record)
    try:
        with torch.no_grad():
            model(input_ids, attention_mask=attention_mask)
    finally:
        handle.remove()
    return rows


def read_share(model, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
               ) -> list[list[float]]:
    """``share[t][l]``: RMS of layer ``l``'s associative read in segment ``t`` over the RMS of the
    hidden states entering the block (over every row and position)."""
    if model.assoc is None:
        raise ValueError("the model has no associative memory (associative_d_mem=0)")
    layers = model.associative_layers
    entering: dict[int, torch.Tensor] = {}
    shares: list[list[float]] = []

    def before(i):  # runs before the associative read (prepended)
        def hook(module, args, kwargs):
            entering[i] = args[0] if args else kwargs["hidden_states"]
        return hook

    def after(i):  # runs after it: the difference is the read
        def hook(module, args, kwargs):
            h = args[0] if args else kwargs["hidden_states"]
            h0 = entering.pop(i)
            if i == 0:
                shares.append([])
            shares[-1].append(((h - h0).float().pow(2).mean().sqrt()
                               / h0.float().pow(2).mean().sqrt()).item())
        return hook

    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(before(i), with_kwargs=True, prepend=True))
        handles.append(layer.register_forward_pre_hook(after(i), with_kwargs=True))
    try:
        with torch.no_grad():
            model(input_ids, attention_mask=attention_mask)
    finally:
        for h in handles:
            h.remove()
    return shares


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("checkpoint")
    p.add_argument("--task", choices=TASKS, default="reasoning")
    p.add_argument("--segments", type=int, default=8)
    p.add_argument("--samples", type=int, default=64)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    model = LoRARMTEncoderForSequenceClassification.from_pretrained(a.checkpoint)
    if model.memory_gate is None and model.assoc is None:
        raise SystemExit(f"{a.checkpoint}: neither a gated memory update nor an associative memory")
    data = BabiQA(a.task, model.tokenizer, model.rmt_config.segment_size)
    batch = data.batch("valid", a.segments, range(a.samples))
    print(f"{a.checkpoint}: validation samples 0..{a.samples - 1} of {a.task} at {a.segments} segments")
    if model.memory_gate is not None:
        rows = gate_openness(model, batch["input_ids"], batch["attention_mask"])
        print("\n| after segment | mean z | z > 0.5 | z > 0.9 | spread of the slot means |\n"
              "|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['segment'] + 1} | {r['mean']:.3f} | {r['over_0.5']:.3f} | {r['over_0.9']:.3f} | "
                  f"{r['slot_spread']:.3f} |")
    if model.assoc is not None:
        shares = read_share(model, batch["input_ids"], batch["attention_mask"])
        n = len(shares[0])
        print("\nRMS(associative read) / RMS(hidden) per layer\n")
        print("| segment | " + " | ".join(f"layer {i}" for i in range(n)) + " |\n|---|" + "---|" * n)
        for t, row in enumerate(shares):
            print(f"| {t + 1} | " + " | ".join(f"{x:.3f}" for x in row) + " |")


if __name__ == "__main__":
    main()
