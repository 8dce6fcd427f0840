"""A plain PyTorch training loop for RMTs on :mod:`rmt_fast.tasks`, and its command line.

``train(model, task, steps, ...)``: AdamW, warmup then linear/cosine/constant learning rate,
gradient clipping, a curriculum over the number of segments, optional random number of
segments per batch, truncated BPTT and segment checkpointing passed to the model, JSON-lines
metrics, and checkpoints that resume *exactly*: batch ``k`` is drawn from a generator seeded
with ``(seed, k)`` (the global torch RNG, used by dropout, is re-seeded the same way every
step), so ``k`` steps in one go and ``k/2 + resume + k/2`` give the same parameters.

Checkpoints are ``output_dir/checkpoint-<step>/``: the model's ``save_pretrained`` files, the
task vocabulary (``vocab.json``, text tasks) and ``trainer_state.pt`` (optimizer state, step,
curriculum stage and its first step, wall time). The learning rate is a pure function of the
steps since the stage began, so that is the whole scheduler state. Metrics go to
``output_dir/metrics.jsonl``, one JSON object a line.

CLI: ``python -m rmt_fast.train --task copy --segments 6 --segment-size 12 --mem 6 --out DIR``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from rmt_fast import distributed as rd
from rmt_fast import run_io
from rmt_fast.tasks import TASKS, Task, TaskData, make_task, token_accuracy

STATE_NAME = "trainer_state.pt"
METRICS_NAME = "metrics.jsonl"
ARGS_NAME = "train_args.json"
SCHEDULES = ("linear", "cosine", "constant")
AMP_DTYPES = {"bf16": torch.bfloat16}


@dataclass
class TrainResult:
    """What :func:`train` ends with: the global ``step``, the curriculum ``stage`` index and its
    ``segments``, the last validation token accuracy, every metrics record written, and the
    ``(step, stage, segments, reason)`` of each stage change (``reason``: ``threshold`` or
    ``budget``)."""

    step: int
    stage: int
    segments: int
    valid_accuracy: float
    history: list[dict] = field(default_factory=list)
    stage_changes: list[tuple[int, int, int, str]] = field(default_factory=list)
    wall_time: float = 0.0


def lr_factor(step: int, warmup_steps: int, total_steps: int, schedule: str, min_lr_ratio: float) -> float:
    """Learning-rate multiplier at ``step`` (0-based, counted from the stage start): linear
    warmup over ``warmup_steps``, then ``linear``/``cosine`` decay to ``min_lr_ratio`` at
    ``total_steps`` (flat afterwards) or ``constant``."""
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    span = max(total_steps - warmup_steps, 1)
    progress = min((step - warmup_steps) / span, 1.0)
    if schedule == "linear":
        decay = 1.0 - progress
    else:
        decay = 0.5 * (1.0 + math.cos(math.pi * progress))
    return min_lr_ratio + (1.0 - min_lr_ratio) * decay


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7919) % (2**63 - 1)


@torch.no_grad()
def evaluate(model: nn.Module, data: TaskData, batch_size: int = 256, limit: int | None = None,
             distributed: bool = False) -> float:
    """Token accuracy (see :func:`rmt_fast.tasks.token_accuracy`) of ``model`` on ``data``
    (its first ``limit`` samples), batched; the model's train/eval mode is restored.

    ``distributed``: every rank of the process group must call it; each scores a contiguous
    share of the samples and the counts are summed over ranks (one all-reduce), so all ranks
    return the same accuracy."""
    n = len(data) if limit is None else min(limit, len(data))
    if n == 0:
        raise ValueError("evaluate: the validation data is empty (valid_size=0?)")
    env = rd.current_env() if distributed else rd.DistEnv()
    lo, hi = rd.split_evenly(n, env.world_size, env.rank)
    was_training = model.training
    model.eval()
    sharded = rd.is_sharded(model)
    if sharded:  # one all-gather per FSDP unit on every rank, even one without samples to score
        rd.unshard_all(model)
    correct, total = 0.0, 0
    try:
        for start in range(lo, hi, batch_size):
            batch = data[start: min(start + batch_size, hi)]
            logits = model(batch.input_ids.to(model.device)).logits
            count = int(batch.labels_mask[:, :-1].sum())
            if count:
                acc = token_accuracy(logits.cpu(), batch.input_ids, batch.labels_mask)
                correct += acc * count
                total += count
    finally:
        model.train(was_training)
        if sharded:  # back to the sharded parameters (the ones the optimizer holds)
            rd.reshard_all(model)
    if env.enabled:
        counts = rd.all_reduce_sum(torch.tensor([correct, float(total)], dtype=torch.float64,
                                                device=model.device))
        correct, total = float(counts[0]), int(counts[1])
    return correct / total if total else float("nan")


def latest_checkpoint(output_dir: str | os.PathLike) -> str | None:
    """The complete ``checkpoint-<step>`` directory with the largest step, or None."""
    if not os.path.isdir(output_dir):
        return None
    best, best_step = None, -1
    for name in os.listdir(output_dir):
        path = os.path.join(output_dir, name)
        if name.startswith("checkpoint-") and os.path.isfile(os.path.join(path, STATE_NAME)):
            try:
                step = int(name.removeprefix("checkpoint-"))
            except ValueError:
                continue
            if step > best_step:
                best, best_step = path, step
    return best


def _save_checkpoint(model, model_state: dict, optimizer_state: dict | None, task: Task, state: dict,
                     output_dir: str, keep: int, progress: bool = True) -> str:
    """Write ``checkpoint-<step>`` (rank 0 only; the states come from
    :func:`rmt_fast.distributed.full_state_dicts`, the optimizer's keyed by parameter name).
    ``progress=False`` also keeps transformers' shard-writing bar quiet (restored after)."""
    from transformers.utils import logging as hf_logging

    final = os.path.join(output_dir, f"checkpoint-{state['step']}")
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    bars = hf_logging.is_progress_bar_enabled()
    if not progress:
        hf_logging.disable_progress_bar()
    try:
        model.save_pretrained(tmp, state_dict=model_state)
    finally:
        if bars:
            hf_logging.enable_progress_bar()
    if task.vocab is not None:
        task.vocab.save(tmp)
    torch.save({**state, "optimizer": optimizer_state, "optimizer_format": "by_name"},
               os.path.join(tmp, STATE_NAME))
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    if keep > 0:
        ckpts = sorted((int(n.removeprefix("checkpoint-")), n) for n in os.listdir(output_dir)
                       if n.startswith("checkpoint-") and n.removeprefix("checkpoint-").isdigit())
        for _, name in ckpts[:-keep]:
            shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
    return final


def _load_checkpoint(model, optimizer, path: str) -> dict:
    """Copy the checkpoint's weights and optimizer state into ``model`` / ``optimizer`` (sharded
    or not, whatever the number of processes that wrote it); returns the trainer state."""
    from torch.distributed.fsdp import FSDPModule

    # under FSDP type(model) is a generated subclass: load with the model's own class
    cls = next(c for c in type(model).__mro__ if not issubclass(c, FSDPModule))
    loaded = cls.from_pretrained(path)
    state = run_io.load_torch(os.path.join(path, STATE_NAME))
    by_name = state.get("optimizer_format") == "by_name"
    if not by_name and rd.is_sharded(model):
        raise ValueError(f"checkpoint {path} keeps its optimizer state by parameter index (written "
                         "before FSDP support); resume it with parallel='dp' once to convert it")
    try:
        rd.load_full_state_dicts(model, optimizer, loaded.state_dict(),
                                 state["optimizer"] if by_name else None)
    except ValueError as exc:
        raise ValueError(f"checkpoint {path} does not fit the model: {exc}") from exc
    if not by_name:
        optimizer.load_state_dict(state["optimizer"])
    return state


def _check_args(model, task, steps, stages, batch_size, lr, warmup_steps, schedule, min_lr_ratio,
                clip_grad, threshold, stage_steps, eval_every, save_every, output_dir) -> None:
    def need(cond: bool, msg: str) -> None:
        if not cond:
            raise ValueError(msg)

    need(isinstance(task, Task), f"task must be an rmt_fast.tasks.Task, got {type(task).__name__}")
    need(isinstance(steps, int) and steps >= 1, f"steps must be an int >= 1, got {steps!r}")
    need(len(stages) >= 1 and all(isinstance(s, int) and s >= 1 for s in stages),
         f"segments must be an int >= 1 or a non-empty list of them, got {stages!r}")
    need(list(stages) == sorted(set(stages)), f"curriculum segments must increase strictly, got {stages}")
    need(isinstance(batch_size, int) and batch_size >= 1,
         f"batch_size must be an int >= 1, got {batch_size!r}")
    need(lr > 0, f"lr must be > 0, got {lr!r}")
    need(isinstance(warmup_steps, int) and warmup_steps >= 0,
         f"warmup_steps must be an int >= 0, got {warmup_steps!r}")
    need(schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    need(0.0 <= min_lr_ratio <= 1.0, f"min_lr_ratio must be in [0, 1], got {min_lr_ratio!r}")
    need(clip_grad is None or clip_grad > 0, f"clip_grad must be > 0 or None, got {clip_grad!r}")
    need(threshold is None or 0.0 <= threshold <= 1.0,
         f"threshold must be in [0, 1] or None, got {threshold!r}")
    need(stage_steps is None or (isinstance(stage_steps, int) and stage_steps >= 1),
         f"stage_steps must be an int >= 1 or None, got {stage_steps!r}")
    need(isinstance(eval_every, int) and eval_every >= 1,
         f"eval_every must be an int >= 1, got {eval_every!r}")
    need(save_every is None or (isinstance(save_every, int) and save_every >= 1),
         f"save_every must be an int >= 1 or None, got {save_every!r}")
    need(save_every is None or output_dir is not None, "save_every needs output_dir")
    cfg = getattr(model, "rmt_config", None)
    need(cfg is not None, f"model must be an rmt_fast RMT wrapper, got {type(model).__name__}")
    need(cfg.segment_size == task.segment_size,
         f"the model's segment_size ({cfg.segment_size}) must equal the task's ({task.segment_size})")
    vocab = getattr(model.base.config, "vocab_size", None)
    need(vocab is None or vocab >= task.vocab_size,
         f"the base model's vocab_size ({vocab}) is smaller than the task's ({task.vocab_size})")


def train(model: nn.Module, task: Task, steps: int, *, segments: int | Sequence[int] = 1,
          batch_size: int = 32, lr: float = 1e-3, weight_decay: float = 0.01,
          betas: tuple[float, float] = (0.9, 0.999), warmup_steps: int = 0, schedule: str = "linear",
          min_lr_ratio: float = 0.0, clip_grad: float | None = 1.0, threshold: float | None = None,
          stage_steps: int | None = None, random_segments: bool = False, early_stop: bool = False,
          eval_every: int = 100, eval_size: int = 512, eval_batch_size: int = 256, log_every: int = 10,
          output_dir: str | os.PathLike | None = None, save_every: int | None = None,
          keep_checkpoints: int = 2, resume: bool = True, bptt_depth: int | None = None,
          checkpoint_segments: bool | None = None, seed: int = 0, progress: bool = True,
          stop_after: int | None = None, grad_accum: int = 1, amp: str | None = None,
          bucket_mb: float = rd.DEFAULT_BUCKET_MB, parallel: str = "dp") -> TrainResult:
    """Train ``model`` (an :class:`rmt_fast.models.RMTForCausalLM`) on ``task`` for ``steps``
    optimizer steps in all.

    Each batch is ``batch_size`` training samples ``input_ids [B, n * S]`` with their
    ``labels_mask``; the loss is the model's mean cross-entropy over the target tokens.

    Distributed (see :mod:`rmt_fast.distributed` and ``docs/distributed.md``): under torchrun
    (``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` set, or a process group already initialised) the
    process group is initialised (NCCL for a CUDA model, gloo otherwise), ``batch_size`` is
    *per rank* and the global batch is ``batch_size * world_size * grad_accum`` samples, drawn
    exactly as a single process with that ``batch_size`` would draw them and split into
    disjoint per-rank shards. Gradients are the mean over all target tokens of the global
    batch, so ``k`` steps on ``W`` processes give the parameters of ``k`` steps on one process
    with a ``W`` times larger batch (up to float rounding, without dropout). Rank 0 writes
    checkpoints and metrics; a checkpoint resumes on any number of processes.

    Args:
        segments: the number of segments ``n``, or a curriculum: increasing stage sizes, e.g.
            ``[1, 2, 4, 6]``. A stage ends when the validation accuracy (checked every
            ``eval_every`` steps) reaches ``threshold`` or after ``stage_steps`` steps; the
            next stage continues from the current weights with a fresh optimizer and schedule.
            Training ends after ``steps`` steps, or when the last stage ends (``stage_steps``
            spent, or ``threshold`` reached and ``early_stop``).
        random_segments: draw each batch's ``n`` uniformly from the stages up to the current one.
        warmup_steps, schedule, min_lr_ratio: per-stage schedule, decaying over ``stage_steps``
            (or ``steps``) steps.
        clip_grad: max gradient norm (None: no clipping).
        eval_size: validation samples used per evaluation (of the current stage's length).
        output_dir: checkpoints and ``metrics.jsonl``; with ``resume`` a run restarts from the
            latest checkpoint there (metrics after it are dropped, then rewritten).
        save_every: checkpoint period (a final checkpoint is always written with output_dir).
        bptt_depth, checkpoint_segments: set on ``model.rmt_config`` when given.
        seed: seeds batches and dropout (per step).
        stop_after: end this call after that many steps (and checkpoint), as an interruption
            would; a later call with the same arguments resumes.
        grad_accum: micro-batches of ``batch_size`` per rank accumulated into one optimizer step.
        amp: ``"bf16"``: run forward/backward under ``torch.autocast(<model device>, bfloat16)``
            (parameters, gradients and optimizer state stay float32).
        bucket_mb: gradient all-reduce bucket size (MiB) when distributed.
        parallel: ``"dp"`` (replicated parameters, gradients all-reduced after backward by
            :class:`rmt_fast.distributed.GradientSync`) or ``"fsdp"`` (gradients and optimizer
            state sharded over the ranks by ``torch.distributed.fsdp.fully_shard``, see
            :func:`rmt_fast.distributed.fully_shard_model`), or ``"fsdp-blocks"`` (also the
            parameters sharded, one FSDP unit per transformer block; needs
            ``checkpoint_segments=False``); ignored by a single process.

    Returns:
        :class:`TrainResult`.
    """
    stages = [segments] if isinstance(segments, int) else list(segments)
    _check_args(model, task, steps, stages, batch_size, lr, warmup_steps, schedule, min_lr_ratio,
                clip_grad, threshold, stage_steps, eval_every, save_every, output_dir)
    if stop_after is not None and (not isinstance(stop_after, int) or stop_after < 1):
        raise ValueError(f"stop_after must be an int >= 1 or None, got {stop_after!r}")
    if not isinstance(grad_accum, int) or grad_accum < 1:
        raise ValueError(f"grad_accum must be an int >= 1, got {grad_accum!r}")
    rd.check_parallel(parallel, model.rmt_config.checkpoint_segments if checkpoint_segments is None
                      else bool(checkpoint_segments))
    if amp is not None and amp not in AMP_DTYPES:
        raise ValueError(f"amp must be None or one of {tuple(AMP_DTYPES)}, got {amp!r}")
    env = rd.init_distributed(model.device)
    if bptt_depth is not None:
        model.rmt_config.bptt_depth = bptt_depth
    if checkpoint_segments is not None:
        model.rmt_config.checkpoint_segments = bool(checkpoint_segments)
    model.rmt_config.validate()
    for n in stages:
        task.splits(n)  # fail early on impossible lengths

    if env.enabled:
        rd.broadcast_module(model)
        if parallel != "dp":
            rd.fully_shard_model(model, blocks=parallel == "fsdp-blocks")
    sync = rd.GradientSync(model.parameters(), bucket_mb) if env.enabled and parallel == "dp" else None

    def new_optimizer():
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                 betas=betas, weight_decay=weight_decay)

    optimizer = new_optimizer()
    step, stage, stage_start, wall_before = 0, 0, 0, 0.0
    stage_changes: list[tuple[int, int, int, str]] = []
    history: list[dict] = []
    metrics_path = None
    if output_dir is not None:
        output_dir = os.fspath(output_dir)
        os.makedirs(output_dir, exist_ok=True)
        metrics_path = os.path.join(output_dir, METRICS_NAME)
        ckpt = latest_checkpoint(output_dir) if resume else None
        rd.barrier()  # every rank has picked the checkpoint before rank 0 may write anything
        if ckpt is not None:
            state = _load_checkpoint(model, optimizer, ckpt)
            if state["stages"] != stages:
                raise ValueError(f"checkpoint {ckpt} was trained with segments={state['stages']}, "
                                 f"not {stages}")
            step, stage, stage_start = state["step"], state["stage"], state["stage_start"]
            wall_before = state["wall_time"]
            stage_changes = [tuple(c) for c in state["stage_changes"]]
        if os.path.exists(metrics_path):
            history = run_io.read_jsonl(metrics_path)  # a torn last line (a kill, a full disk) is dropped
            history = [h for h in history if h["step"] <= step] if ckpt is not None else []
        rd.barrier()  # every rank has read the metrics before rank 0 rewrites them
        if env.is_main and os.path.exists(metrics_path):
            run_io.rewrite_jsonl(metrics_path, history)  # atomically

    def log(record: dict) -> None:
        history.append(record)
        if metrics_path is not None and env.is_main:
            run_io.append_jsonl(metrics_path, record)  # whole line, fsync: a kill cuts only this line

    def save() -> None:
        state = {"step": step, "stage": stage, "stage_start": stage_start, "stages": stages,
                 "stage_changes": [list(c) for c in stage_changes], "seed": seed,
                 "wall_time": wall_before + time.perf_counter() - t0, "world_size": env.world_size,
                 "global_batch_size": global_batch}
        if env.is_main or rd.is_sharded(model):  # a collective under FSDP; else rank 0's alone
            model_state, optimizer_state = rd.full_state_dicts(model, optimizer)
        if env.is_main:  # a full disk: "No space left on device" with the path, partial write removed
            with run_io.checkpoint_errors(os.path.join(output_dir, f"checkpoint-{step}")):
                _save_checkpoint(model, model_state, optimizer_state, task, state, output_dir,
                                 keep_checkpoints, progress)
        rd.barrier()

    span = stage_steps if stage_steps is not None else steps
    valid_acc = float("nan")
    t0 = time.perf_counter()
    bar = None
    global_batch = batch_size * env.world_size * grad_accum
    autocast_kw = {"device_type": model.device.type, "dtype": AMP_DTYPES[amp] if amp else torch.float32,
                   "enabled": amp is not None}
    if progress and env.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=steps, initial=step, desc=task.name, dynamic_ncols=True)
    model.train()
    done = False
    last_saved = first_step = step
    while step < steps and not done:
        n = stages[stage]
        g = torch.Generator().manual_seed(_step_seed(seed, step))
        if random_segments and stage > 0:
            n = stages[int(torch.randint(stage + 1, (1,), generator=g))]
        data = task.splits(n)["train"]
        idx = torch.randint(len(data), (global_batch,), generator=g)
        factor = lr_factor(step - stage_start, warmup_steps, span, schedule, min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr * factor
        micro = []
        for j in range(grad_accum):
            mine = rd.shard(idx, env.rank, env.world_size, j, grad_accum)
            ids = data.input_ids[mine].to(model.device)
            labels_mask = data.labels_mask[mine].to(model.device)
            micro.append((ids, labels_mask, model.num_targets(ids, ids, labels_mask)))
        optimizer.zero_grad(set_to_none=True)
        loss = _accumulate(model, micro, env, sync, autocast_kw, _step_seed(seed, step) + 1)
        if clip_grad is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        optimizer.step()
        step += 1
        record = {"step": step, "stage": stage, "segments": n, "loss": round(loss, 6),
                  "lr": lr * factor}
        if step % eval_every == 0 or step == steps:
            valid_acc = evaluate(model, task.splits(stages[stage])["valid"], eval_batch_size, eval_size,
                                 distributed=env.enabled)
            record["valid_accuracy"] = valid_acc
            reached = threshold is not None and valid_acc >= threshold
            spent = stage_steps is not None and step - stage_start >= stage_steps
            if reached or spent:
                reason = "threshold" if reached else "budget"
                if stage + 1 < len(stages):
                    stage += 1
                    stage_start = step
                    stage_changes.append((step, stage, stages[stage], reason))
                    record["next_stage"] = stage
                    optimizer = new_optimizer()
                elif spent or early_stop:
                    done = True
        elif stage_steps is not None and step - stage_start >= stage_steps and stage + 1 == len(stages):
            done = True
        if step % log_every == 0 or "valid_accuracy" in record or done or step == steps:
            record["wall_time"] = round(wall_before + time.perf_counter() - t0, 3)
            log(record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", seg=n, acc=f"{valid_acc:.3f}")
        if save_every is not None and step % save_every == 0:
            save()
            last_saved = step
        if stop_after is not None and step - first_step >= stop_after:
            break
    if bar is not None:
        bar.close()
    if output_dir is not None and last_saved != step:
        save()
    if math.isnan(valid_acc):
        valid_acc = evaluate(model, task.splits(stages[stage])["valid"], eval_batch_size, eval_size,
                             distributed=env.enabled)
    return TrainResult(step, stage, stages[stage], valid_acc, history, stage_changes,
                       wall_before + time.perf_counter() - t0)


def _accumulate(model: nn.Module, micro: list[tuple[torch.Tensor, torch.Tensor, int]], env: rd.DistEnv,
                sync: rd.GradientSync | None, autocast_kw: dict, dropout_seed: int) -> float:
    """Forward/backward of this rank's micro-batches ``(ids, labels_mask, targets)`` and, when
    distributed, the gradient reduction. Each micro-batch's mean loss is weighted by its share
    of the global target count, so the summed gradient is the mean over the global batch.
    Returns the global mean loss. Collectives per call, however many segments each rank ran:
    one all-reduce of the target count, then with ``sync`` (data parallel) ``sync.num_buckets``
    all-reduces (the loss rides in the last bucket); under FSDP one all-gather per micro-batch,
    one reduce-scatter (after the last micro-batch) and one all-reduce of the loss."""
    local = sum(t for _, _, t in micro)
    total = local
    if env.enabled:
        total = int(rd.all_reduce_sum(torch.tensor([float(local)], dtype=torch.float64,
                                                   device=model.device))[0])
    sharded = rd.is_sharded(model)
    loss_sum = torch.zeros((), dtype=torch.float32, device=model.device)
    for j, (ids, labels_mask, targets) in enumerate(micro):
        # dropout: a distinct stream per micro-batch and rank (rank 0, micro 0: the old seed)
        torch.manual_seed(dropout_seed + j * env.world_size + env.rank)
        if sharded:  # FSDP reduces gradients in the backward: only the last one
            model.set_requires_gradient_sync(j == len(micro) - 1)
        elif targets == 0:
            continue  # nothing to learn here; GradientSync contributes zeros for this rank
        with torch.autocast(**autocast_kw):
            out = model(ids, labels=ids, labels_mask=labels_mask, return_logits=targets == 0)
        if targets == 0:  # under FSDP every rank runs every backward: a zero gradient here
            out.logits.sum().mul(0.0).backward()
            continue
        loss = out.loss
        scale = targets / total
        if scale != 1.0:
            loss = loss * scale
        loss.backward()
        loss_sum += loss.detach().float()
    if sync is not None:
        loss_sum = sync(loss_sum.reshape(1))[0]
    elif env.enabled:
        loss_sum = rd.all_reduce_sum(loss_sum.reshape(1))[0]
    return float(loss_sum)


# --- command line -------------------------------------------------------------------------------
INITS = ("gpt2", "torch")


def torch_default_init(model: nn.Module) -> None:
    """Re-initialise ``model`` as PyTorch's own layers would be: embeddings ``N(0, 1)``, every
    weight matrix ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))`` (``nn.Linear``'s default bound; GPT-2's
    ``Conv1D`` stores ``[in, out]``), biases 0, LayerNorms untouched.

    Why: with GPT-2's ``N(0, 0.02)`` a 6-layer d_model 64 GPT-2 stays on the associative-retrieval
    plateau (answer = some digit of the input, accuracy ~0.37) for 3,000+ steps, while this init
    leaves it within about 1,000 (docs/results.md).
    """
    from transformers.pytorch_utils import Conv1D

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                module.weight.normal_(0.0, 1.0)
            elif isinstance(module, (nn.Linear, Conv1D)):
                fan_in = module.weight.shape[0 if isinstance(module, Conv1D) else 1]
                bound = fan_in ** -0.5
                module.weight.uniform_(-bound, bound)
                if module.bias is not None:
                    module.bias.zero_()


def build_model(vocab_size: int, segment_size: int, num_mem_tokens: int, *, layers: int = 4,
                d_model: int = 128, heads: int = 4, d_inner: int = 256, dropout: float = 0.0,
                mask: str = "causal", xl_cache: int = 0, bptt_depth: int = -1,
                checkpoint_segments: bool = False, seed: int = 0, init: str = "gpt2",
                memory_noise: float = 0.0):
    """A GPT-2 of the given size (from a config, random weights) inside an RMTForCausalLM.

    ``init``: ``"gpt2"`` (transformers' ``N(0, 0.02)``, tied input/output embeddings) or
    ``"torch"`` (:func:`torch_default_init`, untied output embeddings). The memory is drawn
    with the input embeddings' std either way.
    """
    from transformers import GPT2Config, GPT2LMHeadModel

    from rmt_fast.models import RMTForCausalLM

    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_positions=2 * num_mem_tokens + segment_size,
                        n_embd=d_model, n_layer=layers, n_head=heads, n_inner=d_inner,
                        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                        bos_token_id=0, eos_token_id=0, pad_token_id=0,
                        tie_word_embeddings=init == "gpt2")
    base = GPT2LMHeadModel(config)
    if init == "torch":
        torch_default_init(base)
    return RMTForCausalLM(base, num_mem_tokens=num_mem_tokens, segment_size=segment_size, mask=mask,
                          bptt_depth=bptt_depth, xl_cache=xl_cache,
                          checkpoint_segments=checkpoint_segments, memory_noise=memory_noise)


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from exc


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rmt-fast train", description=__doc__.split("\n\n")[0])
    p.add_argument("--task", required=True, choices=TASKS)
    p.add_argument("--segments", type=int, required=True, help="number of segments (the last stage)")
    p.add_argument("--segment-size", type=int, default=None,
                   help="tokens per segment (default: --length / --segments, else 12)")
    p.add_argument("--length", type=int, default=None, help="total tokens at --segments segments")
    p.add_argument("--curriculum", type=_ints, default=None,
                   help="stage sizes, e.g. 1,2,3,4,5,6 (must end with --segments)")
    p.add_argument("--threshold", type=float, default=0.99, help="validation accuracy to advance")
    p.add_argument("--stage-steps", type=int, default=None)
    p.add_argument("--random-segments", action="store_true")
    p.add_argument("--early-stop", action="store_true")
    p.add_argument("--mem", type=int, default=6, help="memory tokens (0 = no memory)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--d-inner", type=int, default=256)
    p.add_argument("--dropout", type=float, default=0.0)
    p.add_argument("--init", choices=INITS, default="gpt2",
                   help="weight init: gpt2 (N(0, 0.02), tied embeddings) or torch (PyTorch's layer "
                        "defaults, untied; needed for associative retrieval)")
    p.add_argument("--mask", default="causal")
    p.add_argument("--xl-cache", type=int, default=0)
    p.add_argument("--memory-noise", type=float, default=0.0,
                   help="training-only noise on the memory read by each segment (relative std)")
    p.add_argument("--bptt-depth", type=int, default=-1)
    p.add_argument("--checkpoint-segments", action="store_true")
    p.add_argument("--steps", type=int, default=10_000)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.01)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--schedule", choices=SCHEDULES, default="linear")
    p.add_argument("--min-lr-ratio", type=float, default=0.0)
    p.add_argument("--clip", type=float, default=1.0)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-size", type=int, default=512)
    p.add_argument("--save-every", type=int, default=500)
    p.add_argument("--out", default=None, help="output directory (checkpoints, metrics.jsonl)")
    p.add_argument("--no-resume", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--train-size", type=int, default=10_000)
    p.add_argument("--valid-size", type=int, default=1_000)
    p.add_argument("--test-size", type=int, default=1_000)
    p.add_argument("--copies", type=int, default=2, help="copy: target repeats the source this often")
    p.add_argument("--num-tokens", type=int, default=10, help="copy/reverse: symbols are 2..N-1")
    p.add_argument("--num-pairs", type=int, default=4)
    p.add_argument("--num-facts", type=int, default=4)
    p.add_argument("--path", default=None, help="babilong-file: the .json/.jsonl file")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--grad-accum", type=int, default=1,
                   help="micro-batches of --batch-size per rank accumulated per optimizer step")
    p.add_argument("--amp", choices=tuple(AMP_DTYPES), default=None,
                   help="autocast forward/backward to this dtype (parameters stay float32)")
    p.add_argument("--parallel", choices=rd.PARALLEL_MODES, default="dp",
                   help="under torchrun: dp (replicated weights, gradient all-reduce), fsdp "
                        "(gradients and optimizer state sharded with fully_shard) or fsdp-blocks "
                        "(also the weights, one unit per block; not with --checkpoint-segments)")
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:N (default: cuda:LOCAL_RANK under torchrun when CUDA is "
                        "available, else cpu)")
    return p


def task_from_args(args: dict) -> Task:
    """The task a ``rmt-fast train`` run trained on, from its arguments (``train_args.json``):
    the same seed and sizes give the same splits."""
    return make_task(args["task"], args["segment_size"], seed=args["seed"], train_size=args["train_size"],
                     valid_size=args["valid_size"], test_size=args["test_size"],
                     num_tokens=args["num_tokens"], copies=args["copies"], num_pairs=args["num_pairs"],
                     num_facts=args["num_facts"], path=args["path"])


def evaluate_run(run_dir: str | os.PathLike, checkpoint: str | os.PathLike | None = None,
                 split: str = "test", segments: int | None = None, batch_size: int = 256) -> dict:
    """Token accuracy of a ``rmt-fast train --out RUN_DIR`` run's checkpoint (default: the
    latest) on a split of its task (default: ``test``) at ``segments`` segments (default: the
    run's ``--segments``). Returns a dict with ``accuracy``, ``samples``, ``step``, ...."""
    from rmt_fast.models import RMTForCausalLM

    run_dir = os.fspath(run_dir)
    args_path = os.path.join(run_dir, ARGS_NAME)
    if not os.path.isfile(args_path):
        raise FileNotFoundError(f"{run_dir} has no {ARGS_NAME}: not the --out directory of "
                                "an `rmt-fast train` run")
    with open(args_path) as f:
        args = json.load(f)
    checkpoint = os.fspath(checkpoint) if checkpoint is not None else latest_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"no checkpoint-<step> directory in {run_dir}")
    if split not in ("train", "valid", "test"):
        raise ValueError(f"split must be train, valid or test, got {split!r}")
    n = args["segments"] if segments is None else segments
    data = task_from_args(args).splits(n)[split]
    if len(data) == 0:
        raise ValueError(f"the {split} split of {run_dir} is empty")
    model = RMTForCausalLM.from_pretrained(checkpoint)
    state = run_io.load_torch(os.path.join(checkpoint, STATE_NAME))
    t0 = time.perf_counter()
    acc = evaluate(model, data, batch_size)
    return {"run": run_dir, "checkpoint": checkpoint, "step": state["step"], "split": split,
            "segments": n, "samples": len(data), "accuracy": acc,
            "train_wall_time": round(state["wall_time"], 1),
            "eval_seconds": round(time.perf_counter() - t0, 1)}


def evaluate_main(argv: Sequence[str] | None = None) -> dict:
    """``rmt-fast evaluate RUN_DIR [--checkpoint DIR] [--split test] [--segments N]``."""
    p = argparse.ArgumentParser(prog="rmt-fast evaluate", description=evaluate_run.__doc__.split("\n\n")[0])
    p.add_argument("run_dir")
    p.add_argument("--checkpoint", default=None)
    p.add_argument("--split", default="test", choices=("train", "valid", "test"))
    p.add_argument("--segments", type=int, default=None)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    result = evaluate_run(args.run_dir, args.checkpoint, args.split, args.segments)
    print(json.dumps(result))
    return result


def main(argv: Sequence[str] | None = None) -> TrainResult:
    args = parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    launched = rd.env_from_environ()
    if args.device is not None:
        device = torch.device(args.device)
        if device.type == "cuda" and device.index is None and launched is not None:
            device = torch.device("cuda", launched.local_rank)
    elif launched is not None and launched.world_size > 1:
        device = rd.default_device(launched)
    else:
        device = torch.device("cpu")
    env = rd.init_distributed(device)
    if args.no_progress:  # also transformers' own bars (checkpoint writing/loading) in the logs
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    if args.segment_size is None:
        if args.length is not None:
            if args.length % args.segments:
                raise SystemExit(f"--length {args.length} is not divisible by --segments {args.segments}")
            args.segment_size = args.length // args.segments
        else:
            args.segment_size = 12
    stages = args.curriculum or [args.segments]
    if stages[-1] != args.segments:
        raise SystemExit(f"--curriculum must end with --segments {args.segments}, got {stages}")
    task = task_from_args(vars(args))
    model = build_model(task.vocab_size, args.segment_size, args.mem, layers=args.layers,
                        d_model=args.d_model, heads=args.heads, d_inner=args.d_inner,
                        dropout=args.dropout, mask=args.mask, xl_cache=args.xl_cache,
                        bptt_depth=args.bptt_depth, checkpoint_segments=args.checkpoint_segments,
                        seed=args.seed, init=args.init,
                        memory_noise=args.memory_noise).to(device)
    if args.out is not None and env.is_main:
        os.makedirs(args.out, exist_ok=True)
        with open(os.path.join(args.out, ARGS_NAME), "w") as f:
            json.dump({**vars(args), "world_size": env.world_size}, f, indent=2)
    result = train(model, task, args.steps, segments=stages, batch_size=args.batch_size, lr=args.lr,
                   weight_decay=args.weight_decay, warmup_steps=args.warmup, schedule=args.schedule,
                   min_lr_ratio=args.min_lr_ratio, clip_grad=args.clip,
                   threshold=args.threshold if len(stages) > 1 or args.early_stop else None,
                   stage_steps=args.stage_steps, random_segments=args.random_segments,
                   early_stop=args.early_stop, eval_every=args.eval_every, eval_size=args.eval_size,
                   output_dir=args.out, save_every=args.save_every if args.out else None,
                   resume=not args.no_resume, seed=args.seed, progress=not args.no_progress,
                   grad_accum=args.grad_accum, amp=args.amp, parallel=args.parallel)
    if env.is_main:
        print(json.dumps({"step": result.step, "segments": result.segments,
                          "valid_accuracy": result.valid_accuracy,
                          "wall_time": round(result.wall_time, 1), "world_size": env.world_size,
                          "stage_changes": result.stage_changes}))
    rd.destroy()
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
