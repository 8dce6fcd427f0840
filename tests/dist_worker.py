"""One rank of the 2-process CPU/gloo runs of ``tests/test_distributed.py``.

Launched by the test as torchrun would launch it (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``MASTER_ADDR=127.0.0.1``, ``MASTER_PORT``): ``python tests/dist_worker.py OUT_DIR``. Runs every
scenario in one process group (imports are the slow part) and writes results to ``OUT_DIR``.
The model/task/batch builders are shared with the test, which computes the single-process
references.
"""

from __future__ import annotations

import os
import shutil
import sys

import torch

from rmt_fast import distributed as rd
from rmt_fast.tasks import make_task
from rmt_fast.train import _accumulate, build_model, train

PER_RANK_BATCH = 4
SEGMENT_SIZE = 8
TRAIN_KW = dict(lr=5e-4, warmup_steps=1, schedule="linear", eval_size=32, eval_batch_size=16,
                progress=False, seed=3)
# the variable-segments scenario: segments per rank and the rows each rank draws
VAR_SEGMENTS = (1, 3)


def make_copy_task():
    """A tiny copy task (fixed data: seed 0)."""
    return make_task("copy", SEGMENT_SIZE, copies=1, train_size=200, valid_size=32, test_size=0)


def tiny_model(task, **kw):
    """A 2-layer d_model 32 GPT-2 RMT, 2 memory tokens, initialised from seed 0."""
    return build_model(task.vocab_size, task.segment_size, 2, layers=2, d_model=32, heads=4,
                       d_inner=64, seed=0, **kw)


def var_batch(task, rank: int):
    """``(ids, labels_mask)`` of rank ``rank`` in the variable-segments scenario."""
    data = task.splits(VAR_SEGMENTS[rank])["train"]
    rows = torch.arange(PER_RANK_BATCH) + 10 * rank
    return data.input_ids[rows], data.labels_mask[rows]


def params(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class CollectiveCounter:
    """Counts calls of the ``torch.distributed`` collectives named in ``names`` (wraps the module
    attributes; FSDP2 calls ``all_gather_single`` / ``reduce_scatter_single`` through them)."""

    def __init__(self, names: tuple[str, ...] = ("all_reduce",)) -> None:
        self.counts = dict.fromkeys(names, 0)
        self._orig = {n: getattr(torch.distributed, n) for n in names}

    @property
    def calls(self) -> int:
        return sum(self.counts.values())

    def __enter__(self) -> CollectiveCounter:
        for name, orig in self._orig.items():
            def counted(*args, _name=name, _orig=orig, **kwargs):
                self.counts[_name] += 1
                return _orig(*args, **kwargs)

            setattr(torch.distributed, name, counted)
        return self

    def __exit__(self, *exc) -> None:
        for name, orig in self._orig.items():
            setattr(torch.distributed, name, orig)


FSDP_COLLECTIVES = ("all_reduce", "all_gather_single", "reduce_scatter_single")


def num_buckets(ddp) -> int:
    """Gradient buckets of a DistributedDataParallel module (one all-reduce each per backward)."""
    return len(ddp.reducer._get_zeros_like_grad_buckets())


def full_params(model) -> dict[str, torch.Tensor]:
    """The whole parameters of a (possibly FSDP-sharded) model on every rank."""
    if not rd.is_sharded(model):
        return params(model)
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}


def main(out: str) -> None:
    torch.set_num_threads(1)
    env = rd.init_distributed("cpu", timeout_s=120)
    assert env.world_size == 2, env
    results: dict = {"rank": env.rank}
    task = make_copy_task()

    # (1) k steps, the same global batch as one process with batch 2 * PER_RANK_BATCH
    for parallel in ("dp", "fsdp", "fsdp-blocks"):
        for ckpt in (False, True):
            model = tiny_model(task)
            train(model, task, 3, segments=2, batch_size=PER_RANK_BATCH, eval_every=100,
                  checkpoint_segments=ckpt, parallel=parallel, **TRAIN_KW)
            results[f"{parallel}_plain_ckpt{int(ckpt)}"] = full_params(model)
    # ... and the same for ARMT (data-parallel without, FSDP per block with checkpointing)
    for parallel, ckpt in (("dp", False), ("fsdp-blocks", True)):
        model = tiny_model(task, model="armt", d_mem=8)
        train(model, task, 3, segments=2, batch_size=PER_RANK_BATCH, eval_every=100,
              checkpoint_segments=ckpt, parallel=parallel, **TRAIN_KW)
        results[f"armt_{parallel}_ckpt{int(ckpt)}"] = full_params(model)

    # (2) ranks with different numbers of segments (checkpointed and not): gradients after sync
    kw = {"device_type": "cpu", "dtype": torch.float32, "enabled": False}
    for ckpt in (False, True):
        model = tiny_model(task, checkpoint_segments=ckpt)
        ddp = rd.data_parallel(model)
        ids, mask = var_batch(task, env.rank)
        micro = [(ids, mask, model.num_targets(ids, ids, mask))]
        with CollectiveCounter() as counter:
            loss = _accumulate(ddp, micro, env, kw, dropout_seed=0)
        results[f"var_grads_ckpt{int(ckpt)}"] = {n: p.grad.clone() for n, p in model.named_parameters()}
        results[f"var_loss_ckpt{int(ckpt)}"] = loss
        results[f"var_allreduce_ckpt{int(ckpt)}"] = counter.calls
        results["num_buckets"] = num_buckets(ddp)

    # (4) all-reduce count per optimizer step: checkpointed segments, truncated BPTT, curriculum
    # with random segments per batch, gradient accumulation; two evaluations (steps 2 and 4)
    model = tiny_model(task)
    with CollectiveCounter() as counter:
        res = train(model, task, 4, segments=[1, 3], random_segments=True, threshold=0.0,
                    batch_size=PER_RANK_BATCH // 2, grad_accum=2, eval_every=2,
                    checkpoint_segments=True, bptt_depth=1, **TRAIN_KW)
    results["count_calls"] = counter.calls
    results["count_stage_changes"] = res.stage_changes
    results["count_params"] = params(model)
    results["count_history"] = res.history

    # (3) train 2 of 4 steps with 2 processes (checkpoint), then continue with 2
    results["resume_params"] = interrupted_run(task, env, out, "resume_run", "saved-checkpoint-2")

    # bf16 autocast on CPU, checkpointed segments
    model = tiny_model(task)
    res = train(model, task, 2, segments=2, batch_size=PER_RANK_BATCH, eval_every=100, dtype="bfloat16",
                checkpoint_segments=True, **TRAIN_KW)
    results["amp_history"] = res.history
    results["amp_params"] = params(model)

    fsdp_scenarios(task, env, out, results)
    torch.save(results, os.path.join(out, f"rank{env.rank}.pt"))
    rd.barrier()
    rd.destroy()


def interrupted_run(task, env, out: str, run: str, saved: str, **extra) -> dict[str, torch.Tensor]:
    """Train 2 of 4 steps (checkpointed segments, checkpoint at step 2) in ``out/run``, keep a
    copy of the step-2 checkpoint as ``out/saved``, then resume to step 4; the final parameters."""
    run_dir = os.path.join(out, run)
    kw = dict(segments=2, batch_size=PER_RANK_BATCH, eval_every=2, save_every=2,
              checkpoint_segments=True, output_dir=run_dir, **TRAIN_KW, **extra)
    train(tiny_model(task), task, 4, stop_after=2, **kw)
    if env.is_main:
        shutil.copytree(os.path.join(run_dir, "checkpoint-2"), os.path.join(out, saved))
    rd.barrier()
    model = tiny_model(task)
    train(model, task, 4, **kw)
    return full_params(model)


def block0_sharded_while_block1_runs(model, task) -> bool:
    """Whether block 0's weight is a sharded DTensor (half the rows here) while block 1 runs."""
    from torch.distributed.tensor import DTensor

    blocks = model.base.transformer.h
    seen = []

    def hook(module, args):
        w = blocks[0].attn.c_attn.weight
        seen.append(isinstance(w, DTensor) and w.to_local().shape[0] < w.shape[0])

    handle = blocks[1].register_forward_pre_hook(hook)
    ids = task.splits(2)["train"].input_ids[:2]
    model(ids, labels=ids).loss.backward()
    handle.remove()
    return bool(seen) and all(seen)


def fsdp_scenarios(task, env, out: str, results: dict) -> None:
    """The FSDP versions (``fsdp``: the model as one unit; ``fsdp-blocks``: also one unit per
    block) of scenarios (2)-(4)."""
    kw = {"device_type": "cpu", "dtype": torch.float32, "enabled": False}
    for parallel in ("fsdp", "fsdp-blocks"):
        for ckpt in (False, True):
            model = tiny_model(task, checkpoint_segments=ckpt)
            rd.fully_shard_model(model, blocks=parallel == "fsdp-blocks")
            ids, mask = var_batch(task, env.rank)
            micro = [(ids, mask, model.num_targets(ids, ids, mask))]
            with CollectiveCounter(FSDP_COLLECTIVES) as counter:
                loss = _accumulate(model, micro, env, kw, dropout_seed=0)
            key = f"{parallel}_var_{{}}_ckpt{int(ckpt)}"
            results[key.format("grads")] = {n: p.grad.full_tensor().clone()
                                            for n, p in model.named_parameters()}
            results[key.format("loss")] = loss
            results[key.format("counts")] = counter.counts

    for parallel in ("fsdp", "fsdp-blocks"):
        model = tiny_model(task)
        with CollectiveCounter(FSDP_COLLECTIVES) as counter:
            res = train(model, task, 4, segments=[1, 3], random_segments=True, threshold=0.0,
                        batch_size=PER_RANK_BATCH // 2, grad_accum=2, eval_every=2,
                        checkpoint_segments=True, bptt_depth=1, parallel=parallel, **TRAIN_KW)
        results[f"{parallel}_count"] = counter.counts
        results[f"{parallel}_count_params"] = full_params(model)
        results[f"{parallel}_count_history"] = res.history

    # one FSDP unit per transformer block: block 0 is sharded again while block 1 runs
    model = tiny_model(task)
    rd.fully_shard_model(model, blocks=True)
    results["blocks_units"] = len(rd.fsdp_units(model))
    results["blocks_sharded_during_compute"] = block0_sharded_while_block1_runs(model, task)
    model = tiny_model(task)
    rd.fully_shard_model(model)
    results["fsdp_sharded_during_compute"] = block0_sharded_while_block1_runs(model, task)

    # checkpoints: 2 of 4 steps, resumed by FSDP here and by one process in the test
    results["fsdp_resume_params"] = interrupted_run(task, env, out, "fsdp_resume_run",
                                                    "fsdp-checkpoint-2", parallel="fsdp")
    results["blocks_resume_params"] = interrupted_run(task, env, out, "blocks_resume_run",
                                                      "blocks-checkpoint-2", parallel="fsdp-blocks")


if __name__ == "__main__":
    main(sys.argv[1])
