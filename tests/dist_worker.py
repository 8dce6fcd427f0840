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


class AllReduceCounter:
    """Counts ``torch.distributed.all_reduce`` calls (wraps the module attribute)."""

    def __init__(self) -> None:
        self.calls = 0
        self._orig = torch.distributed.all_reduce

    def __enter__(self) -> AllReduceCounter:
        def counted(*args, **kwargs):
            self.calls += 1
            return self._orig(*args, **kwargs)

        torch.distributed.all_reduce = counted
        return self

    def __exit__(self, *exc) -> None:
        torch.distributed.all_reduce = self._orig


def main(out: str) -> None:
    torch.set_num_threads(1)
    env = rd.init_distributed("cpu", timeout_s=120)
    assert env.world_size == 2, env
    results: dict = {"rank": env.rank}
    task = make_copy_task()

    # (1) k steps, the same global batch as one process with batch 2 * PER_RANK_BATCH
    for ckpt in (False, True):
        model = tiny_model(task)
        train(model, task, 3, segments=2, batch_size=PER_RANK_BATCH, eval_every=100,
              checkpoint_segments=ckpt, **TRAIN_KW)
        results[f"plain_ckpt{int(ckpt)}"] = params(model)

    # (2) ranks with different numbers of segments (checkpointed and not): gradients after sync
    for ckpt in (False, True):
        model = tiny_model(task, checkpoint_segments=ckpt)
        ids, mask = var_batch(task, env.rank)
        sync = rd.GradientSync(model.parameters())
        micro = [(ids, mask, model.num_targets(ids, ids, mask))]
        kw = {"device_type": "cpu", "dtype": torch.float32, "enabled": False}
        with AllReduceCounter() as counter:
            loss = _accumulate(model, micro, env, sync, kw, dropout_seed=0)
        results[f"var_grads_ckpt{int(ckpt)}"] = {n: p.grad.clone() for n, p in model.named_parameters()}
        results[f"var_loss_ckpt{int(ckpt)}"] = loss
        results[f"var_allreduce_ckpt{int(ckpt)}"] = counter.calls
        results["num_buckets"] = sync.num_buckets

    # (4) all-reduce count per optimizer step: checkpointed segments, truncated BPTT, curriculum
    # with random segments per batch, gradient accumulation; two evaluations (steps 2 and 4)
    model = tiny_model(task)
    with AllReduceCounter() as counter:
        res = train(model, task, 4, segments=[1, 3], random_segments=True, threshold=0.0,
                    batch_size=PER_RANK_BATCH // 2, grad_accum=2, eval_every=2,
                    checkpoint_segments=True, bptt_depth=1, **TRAIN_KW)
    results["count_calls"] = counter.calls
    results["count_buckets"] = rd.GradientSync(model.parameters()).num_buckets
    results["count_stage_changes"] = res.stage_changes
    results["count_params"] = params(model)
    results["count_history"] = res.history

    # (3) train 2 of 4 steps with 2 processes (checkpoint), then continue with 2
    run_dir = os.path.join(out, "resume_run")
    kw = dict(segments=2, batch_size=PER_RANK_BATCH, eval_every=2, save_every=2,
              checkpoint_segments=True, output_dir=run_dir, **TRAIN_KW)
    train(tiny_model(task), task, 4, stop_after=2, **kw)
    if env.is_main:
        shutil.copytree(os.path.join(run_dir, "checkpoint-2"), os.path.join(out, "saved-checkpoint-2"))
    rd.barrier()
    model = tiny_model(task)
    train(model, task, 4, **kw)
    results["resume_params"] = params(model)

    # bf16 autocast on CPU, checkpointed segments
    model = tiny_model(task)
    res = train(model, task, 2, segments=2, batch_size=PER_RANK_BATCH, eval_every=100, amp="bf16",
                checkpoint_segments=True, **TRAIN_KW)
    results["amp_history"] = res.history
    results["amp_params"] = params(model)

    torch.save(results, os.path.join(out, f"rank{env.rank}.pt"))
    rd.barrier()
    rd.destroy()


if __name__ == "__main__":
    main(sys.argv[1])
