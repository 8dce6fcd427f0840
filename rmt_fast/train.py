"""A plain PyTorch training loop for RMTs on :mod:`rmt_fast.tasks`, and its command line.

``train(model, task, steps, ...)`` (or ``train(model, task, config=TrainConfig(...))``): AdamW,
warmup then linear/cosine/constant learning rate, gradient clipping, a :class:`Curriculum` over
the number of segments (optionally a random number per batch), truncated BPTT and segment
checkpointing passed to the model, JSON-lines metrics, and checkpoints that resume *exactly*:
batch ``k`` is drawn from a generator seeded with ``(seed, k)`` (the global torch RNG, used by
dropout, is re-seeded the same way every step), so ``k`` steps in one go and
``k/2 + resume + k/2`` give the same parameters.

A run directory (:class:`RunDir`) holds ``checkpoint-<step>/`` (the model's ``save_pretrained``
files, the task vocabulary ``vocab.json`` for text tasks, and ``trainer_state.pt``: optimizer
state, step, curriculum state, wall time), ``metrics.jsonl`` (one JSON object a line) and, for
CLI runs, ``train_args.json``. The learning rate is a pure function of the steps since the stage
began, so that is the whole scheduler state.

Options live in three frozen dataclasses, from which the command line and ``train_args.json``
are derived: :class:`TaskSpec` (which data), :class:`ModelSpec` (which model, for
:func:`build_model`) and :class:`TrainConfig` (how to train, for :func:`train`).

CLI: ``rmt-fast train --task copy --segments 6 --segment-size 12 --mem 6 --out DIR``.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from rmt_fast import distributed as rd
from rmt_fast import run_io
from rmt_fast.dtypes import CHOICES as DTYPE_CHOICES
from rmt_fast.dtypes import resolve_dtype
from rmt_fast.models.config import MEMORY_UPDATES, XL_POSITIONS
from rmt_fast.ops.associative_memory import RULES
from rmt_fast.tasks import TASKS, Task, TaskData, make_task, token_accuracy

STATE_NAME = "trainer_state.pt"
METRICS_NAME = "metrics.jsonl"
ARGS_NAME = "train_args.json"
SCHEDULES = ("linear", "cosine", "constant")
INITS = ("gpt2", "torch")
MODELS = ("rmt", "armt")
ARCHS = ("gpt2", "llama")


# --- options -------------------------------------------------------------------------------------
def _opt(default, help: str, **cli):
    """A dataclass field with its command-line description. ``cli`` keys: ``flag`` (default
    ``--field-name``), ``choices``, ``cli_default`` (the CLI's default when it differs from the
    Python API's), ``parse`` (argparse type), ``cli=False`` (not on the command line)."""
    return field(default=default, metadata={"help": help, **cli})


@dataclass(frozen=True)
class TaskSpec:
    """Which data: the arguments of :func:`rmt_fast.tasks.make_task` (its seed is the run's)."""

    task: str = _opt("copy", "task name", choices=TASKS, cli_default=None)
    segment_size: int | None = _opt(None, "tokens per segment (default: --length / --segments, else 12)")
    length: int | None = _opt(None, "total tokens at --segments segments (sets --segment-size)")
    train_size: int = _opt(10_000, "training samples")
    valid_size: int = _opt(1_000, "validation samples")
    test_size: int = _opt(1_000, "test samples")
    copies: int = _opt(2, "copy: target repeats the source this often")
    num_tokens: int = _opt(10, "copy/reverse: symbols are 2..N-1")
    num_pairs: int = _opt(4, "retrieval: key-value pairs")
    pairs_fit: bool = _opt(False, "retrieval: lengths too short for --num-pairs hold as many pairs as fit "
                                  "(2K + 2 tokens), so a --curriculum over segments is one over pairs")
    num_facts: int = _opt(4, "qa tasks: facts per story")
    path: str | None = _opt(None, "babilong-file: the .json/.jsonl file")

    def build(self, seed: int) -> Task:
        """The task (the same spec and seed give the same splits)."""
        return make_task(self.task, self.segment_size, seed=seed, train_size=self.train_size,
                         valid_size=self.valid_size, test_size=self.test_size,
                         num_tokens=self.num_tokens, copies=self.copies, num_pairs=self.num_pairs,
                         pairs_fit=self.pairs_fit, num_facts=self.num_facts, path=self.path)


@dataclass(frozen=True)
class ModelSpec:
    """Which model: the arguments of :func:`build_model` (a GPT-2 from a config in an RMT or an
    ARMT)."""

    model: str = _opt("rmt", "rmt (RMTForCausalLM) or armt (ARMTForCausalLM: associative memory "
                      "per layer; --mask and --xl-cache do not apply)",
                      choices=MODELS)
    num_mem_tokens: int = _opt(6, "memory tokens (0 = no memory)", flag="--mem")
    arch: str = _opt("gpt2", "base model: gpt2 (absolute positions) or llama (rotary positions, "
                     "RMSNorm, SwiGLU; an XL cache keeps its true distances)", choices=ARCHS)
    layers: int = _opt(4, "transformer blocks")
    d_model: int = _opt(128, "hidden size")
    heads: int = _opt(4, "attention heads")
    d_inner: int = _opt(256, "feed-forward size")
    dropout: float = _opt(0.0, "dropout (embeddings, attention, residual)")
    init: str = _opt("gpt2", "weight init: gpt2 (N(0, 0.02), tied embeddings) or torch (PyTorch's "
                     "layer defaults, untied; needed for associative retrieval)", choices=INITS)
    mask: str = _opt("causal", "attention mask over [read | segment | write]")
    xl_cache: int = _opt(0, "Transformer-XL cache: keys/values of the previous segment's last N tokens")
    xl_positions: str = _opt("before_memory", "where a rotary (llama) model's XL cache sits: "
                             "before_memory (the official order [cache | read | segment]) or "
                             "before_segment (its last token right before the first segment token)",
                             choices=XL_POSITIONS)
    memory_noise: float = _opt(0.0, "training-only noise on the memory read by each segment "
                               "(relative std; armt: on each layer's associative read)")
    memory_update: str = _opt("replace", "rmt: how the write outputs become the next memory: replace "
                              "or gated (a learned gate keeps part of the old memory)",
                              choices=MEMORY_UPDATES)
    d_mem: int = _opt(64, "armt: width of the associative keys (the state has 6 d_mem rows)")
    armt_l2_norm: bool = _opt(False, "armt: L2-normalise the DPFP features (the newer upstream ARMT)")
    armt_correction: bool = _opt(True, "armt: the gamma correction of z (the reference's); off, z "
                                 "sums every key written: the read stays bounded far past the "
                                 "training length but old content is diluted (docs/armt.md)")
    armt_floor: float = _opt(0.0, "armt: reads divide by max(phi.z, FLOOR |phi|^2) + eps "
                             "(ARMTConfig.normaliser_floor; 0 = the reference's phi.z + eps)")
    armt_normaliser_gate: bool = _opt(False, "armt: z takes each written key weighted by its write "
                                      "gate beta, as A does (ARMTConfig.normaliser_gate)")
    armt_rule: str = _opt("armt", "armt: the associative read/write: armt (the reference's) or delta "
                          "(DeltaNet's rule on unit DPFP keys; needs --armt-l2-norm: "
                          "ARMTConfig.update_rule)", choices=RULES)
    armt_value_norm: bool = _opt(False, "armt: the values read the memory outputs RMS-normalised, "
                                 "so they cannot grow with what the layer reads "
                                 "(ARMTConfig.value_norm)")
    armt_read_clip: float = _opt(0.0, "armt: each token's read is scaled down to at most CLIP "
                                 "times the RMS of the hidden state it is added to "
                                 "(ARMTConfig.read_clip; 0 = off)")
    armt_state_decay: float = _opt(1.0, "armt: every write goes into the state scaled by this "
                                   "(ARMTConfig.state_decay, in (0, 1]; 1 = off)")
    armt_decay_gate: bool = _opt(False, "armt: learn the decay per write from the memory outputs, "
                                 "starting at --armt-state-decay (ARMTConfig.decay_gate)")
    armt_decay_max: float = _opt(1.0, "armt: with --armt-decay-gate, the learnt decay's ceiling "
                                 "(ARMTConfig.decay_max; 1 = none)")


@dataclass(frozen=True)
class TrainConfig:
    """How to train: every option of :func:`train` (see its docstring for the semantics).

    ``segments`` is the curriculum: the number of segments, or increasing stage sizes.
    """

    steps: int = _opt(10_000, "optimizer steps in all")
    segments: int | tuple[int, ...] = _opt(1, "segments (the last stage)", cli=False)
    batch_size: int = _opt(32, "samples per optimizer step and rank (per micro-batch)")
    lr: float = _opt(1e-3, "peak learning rate")
    weight_decay: float = _opt(0.01, "AdamW weight decay")
    betas: tuple[float, float] = _opt((0.9, 0.999), "AdamW betas", cli=False)
    warmup_steps: int = _opt(0, "linear warmup steps per stage", flag="--warmup", cli_default=100)
    schedule: str = _opt("linear", "learning-rate decay after warmup", choices=SCHEDULES)
    min_lr_ratio: float = _opt(0.0, "final learning rate / peak")
    clip_grad: float | None = _opt(1.0, "max gradient norm (None: no clipping)", flag="--clip")
    threshold: float | None = _opt(None, "validation accuracy that ends a stage", cli_default=0.99)
    stage_steps: int | None = _opt(None, "steps per stage at most")
    random_segments: bool = _opt(False, "draw each batch's number of segments from the stages so far")
    early_stop: bool = _opt(False, "end when the last stage reaches --threshold")
    eval_every: int = _opt(100, "steps between validations")
    eval_size: int = _opt(512, "validation samples per evaluation")
    eval_batch_size: int = _opt(256, "evaluation batch size", cli=False)
    log_every: int = _opt(10, "steps between metrics records", cli=False)
    output_dir: str | None = _opt(None, "run directory (checkpoints, metrics.jsonl)", flag="--out")
    save_every: int | None = _opt(None, "steps between checkpoints (with --out)", cli_default=500)
    keep_checkpoints: int = _opt(2, "checkpoints kept (0 = all)", cli=False)
    resume: bool = _opt(True, "resume from the latest checkpoint in --out")
    bptt_depth: int | None = _opt(None, "memory carries gradient into the last N segments (-1 all)",
                                  cli_default=-1)
    checkpoint_segments: bool | None = _opt(None, "segment-level gradient checkpointing",
                                            cli_default=False)
    seed: int = _opt(0, "seeds the data, the batches and dropout")
    progress: bool = _opt(True, "progress bars")
    stop_after: int | None = _opt(None, "end this call after N steps (and checkpoint); a later call "
                                  "resumes", cli=False)
    grad_accum: int = _opt(1, "micro-batches of --batch-size per rank accumulated per step")
    dtype: str = _opt("float32", "compute dtype: bfloat16 runs forward/backward under autocast with "
                      "float32 weights and optimizer state; auto = bfloat16 where the hardware has "
                      "native bf16 (rmt_fast.dtypes)", choices=DTYPE_CHOICES, cli_default="auto")
    bucket_mb: float = _opt(rd.DEFAULT_BUCKET_MB, "gradient all-reduce bucket size (MiB)", cli=False)
    parallel: str = _opt("dp", "under torchrun: dp (replicated weights, gradient all-reduce), fsdp "
                         "(gradients and optimizer state sharded with fully_shard) or fsdp-blocks "
                         "(also the weights, one unit per block)", choices=rd.PARALLEL_MODES)

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(msg)

        def is_int(x) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        stages = self.stages
        need(len(stages) >= 1 and all(is_int(s) and s >= 1 for s in stages),
             f"segments must be an int >= 1 or a non-empty list of them, got {self.segments!r}")
        need(list(stages) == sorted(set(stages)), f"curriculum segments must increase strictly, got "
             f"{list(stages)}")
        need(is_int(self.steps) and self.steps >= 1, f"steps must be an int >= 1, got {self.steps!r}")
        need(is_int(self.batch_size) and self.batch_size >= 1,
             f"batch_size must be an int >= 1, got {self.batch_size!r}")
        need(self.lr > 0, f"lr must be > 0, got {self.lr!r}")
        need(is_int(self.warmup_steps) and self.warmup_steps >= 0,
             f"warmup_steps must be an int >= 0, got {self.warmup_steps!r}")
        need(self.schedule in SCHEDULES, f"schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        need(0.0 <= self.min_lr_ratio <= 1.0, f"min_lr_ratio must be in [0, 1], got {self.min_lr_ratio!r}")
        need(self.clip_grad is None or self.clip_grad > 0,
             f"clip_grad must be > 0 or None, got {self.clip_grad!r}")
        need(self.threshold is None or 0.0 <= self.threshold <= 1.0,
             f"threshold must be in [0, 1] or None, got {self.threshold!r}")
        need(self.stage_steps is None or (is_int(self.stage_steps) and self.stage_steps >= 1),
             f"stage_steps must be an int >= 1 or None, got {self.stage_steps!r}")
        need(is_int(self.eval_every) and self.eval_every >= 1,
             f"eval_every must be an int >= 1, got {self.eval_every!r}")
        need(self.save_every is None or (is_int(self.save_every) and self.save_every >= 1),
             f"save_every must be an int >= 1 or None, got {self.save_every!r}")
        need(self.save_every is None or self.output_dir is not None, "save_every needs output_dir")
        need(self.stop_after is None or (is_int(self.stop_after) and self.stop_after >= 1),
             f"stop_after must be an int >= 1 or None, got {self.stop_after!r}")
        need(is_int(self.grad_accum) and self.grad_accum >= 1,
             f"grad_accum must be an int >= 1, got {self.grad_accum!r}")
        need(self.dtype in DTYPE_CHOICES, f"dtype must be one of {DTYPE_CHOICES}, got {self.dtype!r}")
        need(self.bptt_depth is None or (is_int(self.bptt_depth) and self.bptt_depth >= -1),
             f"bptt_depth must be -1 (full), an int >= 0 or None, got {self.bptt_depth!r}")
        if isinstance(self.segments, list):
            object.__setattr__(self, "segments", tuple(self.segments))
        if self.output_dir is not None:
            object.__setattr__(self, "output_dir", os.fspath(self.output_dir))

    @property
    def stages(self) -> tuple[int, ...]:
        """The curriculum's stage sizes (one stage for an int ``segments``)."""
        return (self.segments,) if isinstance(self.segments, int) else tuple(self.segments)


def add_arguments(parser: argparse.ArgumentParser, spec: type) -> None:
    """Add one ``--flag`` per field of the dataclass ``spec`` (fields with ``cli=False`` aside).
    Bools become switches: ``--name`` when the default is False, ``--no-name`` when True."""
    hints = typing.get_type_hints(spec)
    group = parser.add_argument_group(spec.__name__, spec.__doc__.split("\n")[0])
    for f in dataclasses.fields(spec):
        meta = f.metadata
        if not meta.get("cli", True):
            continue
        flag = meta.get("flag", "--" + f.name.replace("_", "-"))
        default = meta.get("cli_default", f.default)
        if hints[f.name] in (bool, bool | None):
            if default:
                group.add_argument("--no-" + flag[2:], dest=f.name, action="store_false",
                                   help=f"disable: {meta['help']}")
            else:
                group.add_argument(flag, dest=f.name, action="store_true", help=meta["help"])
            continue
        kind = meta.get("parse") or next(t for t in (int, float, str)
                                         if t in typing.get_args(hints[f.name]) + (hints[f.name],))
        group.add_argument(flag, dest=f.name, type=kind, default=default, choices=meta.get("choices"),
                           required=f.name == "task", help=meta["help"])


def from_arguments(spec: type, args: argparse.Namespace, **overrides):
    """An instance of the dataclass ``spec`` from parsed arguments (``overrides`` win)."""
    names = {f.name for f in dataclasses.fields(spec)}
    return spec(**{**{k: v for k, v in vars(args).items() if k in names}, **overrides})


# --- the curriculum ---------------------------------------------------------------------------------
@dataclass
class Curriculum:
    """Which number of segments each step trains on, and when a stage ends.

    A stage ends when a validation accuracy reaches ``threshold`` or after ``stage_steps`` steps;
    the next stage continues from the current weights with a fresh optimizer and schedule.
    Training ends with the last stage (its ``stage_steps`` spent, or ``threshold`` reached with
    ``early_stop``).
    """

    stages: tuple[int, ...]
    threshold: float | None = None
    stage_steps: int | None = None
    early_stop: bool = False
    random_segments: bool = False
    stage: int = 0
    start: int = 0  # the step at which the current stage began
    changes: list[tuple[int, int, int, str]] = field(default_factory=list)

    @property
    def segments(self) -> int:
        return self.stages[self.stage]

    def draw(self, g: torch.Generator) -> int:
        """The number of segments of the next batch (random over the stages so far if asked)."""
        if self.random_segments and self.stage > 0:
            return self.stages[int(torch.randint(self.stage + 1, (1,), generator=g))]
        return self.segments

    def after_eval(self, step: int, accuracy: float) -> tuple[bool, bool]:
        """``(advanced to the next stage, training is done)`` after a validation at ``step``."""
        reached = self.threshold is not None and accuracy >= self.threshold
        spent = self.stage_steps is not None and step - self.start >= self.stage_steps
        if not (reached or spent):
            return False, False
        if self.stage + 1 < len(self.stages):
            self.stage += 1
            self.start = step
            self.changes.append((step, self.stage, self.segments, "threshold" if reached else "budget"))
            return True, False
        return False, spent or self.early_stop

    def budget_spent(self, step: int) -> bool:
        """Whether the last stage's ``stage_steps`` are spent (checked between validations)."""
        return (self.stage_steps is not None and step - self.start >= self.stage_steps
                and self.stage + 1 == len(self.stages))

    def state_dict(self) -> dict:
        return {"stage": self.stage, "stage_start": self.start, "stages": list(self.stages),
                "stage_changes": [list(c) for c in self.changes]}

    def load_state_dict(self, state: dict, where: str) -> None:
        if list(state["stages"]) != list(self.stages):
            raise ValueError(f"{where} was trained with segments={list(state['stages'])}, not "
                             f"{list(self.stages)}")
        self.stage, self.start = state["stage"], state["stage_start"]
        self.changes = [tuple(c) for c in state["stage_changes"]]


# --- the run directory ----------------------------------------------------------------------------
class RunDir:
    """A training run's folder: checkpoints, metrics and resume. Only the main rank writes."""

    def __init__(self, path: str | os.PathLike, is_main: bool = True):
        self.path = os.fspath(path)
        self.is_main = is_main
        self.metrics_path = os.path.join(self.path, METRICS_NAME)
        os.makedirs(self.path, exist_ok=True)

    def latest_checkpoint(self) -> str | None:
        return latest_checkpoint(self.path)

    def read_metrics(self, up_to_step: int) -> list[dict]:
        """The metrics records of steps ``<= up_to_step``."""
        if not os.path.exists(self.metrics_path):
            return []
        records = run_io.read_jsonl(self.metrics_path)  # a torn last line (a kill, a full disk) is dropped
        return [r for r in records if r["step"] <= up_to_step]

    def rewrite_metrics(self, records: list[dict]) -> None:
        if self.is_main and os.path.exists(self.metrics_path):
            run_io.rewrite_jsonl(self.metrics_path, records)  # atomically

    def append_metrics(self, record: dict) -> None:
        if self.is_main:
            run_io.append_jsonl(self.metrics_path, record)  # whole line, fsync: a kill cuts only this one

    def save_checkpoint(self, model, model_state: dict, optimizer_state: dict | None, task: Task,
                        state: dict, keep: int, progress: bool = True) -> str:
        """Write ``checkpoint-<step>`` atomically (a ``.tmp`` folder renamed into place), then keep
        the newest ``keep``. The states come from :func:`rmt_fast.distributed.full_state_dicts`
        (the optimizer's keyed by parameter name). ``progress=False`` also keeps transformers'
        shard-writing bar quiet (its global switch is restored after)."""
        from transformers.utils import logging as hf_logging

        final = os.path.join(self.path, f"checkpoint-{state['step']}")
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
            ckpts = sorted((int(n.removeprefix("checkpoint-")), n) for n in os.listdir(self.path)
                           if n.startswith("checkpoint-") and n.removeprefix("checkpoint-").isdigit())
            for _, name in ckpts[:-keep]:
                shutil.rmtree(os.path.join(self.path, name), ignore_errors=True)
        return final

    @staticmethod
    def load_checkpoint(model, optimizer, path: str) -> dict:
        """Copy the checkpoint's weights and optimizer state into ``model`` / ``optimizer``
        (sharded or not, whatever the number of processes that wrote it); returns the trainer
        state."""
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


# --- training ---------------------------------------------------------------------------------------
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


def _step_seed(seed: int, step: int) -> int:
    return (seed * 1_000_003 + step * 7919) % (2**63 - 1)


def clip_and_check_gradients(params, max_norm: float | None, loss: float, step: int, where: str,
                             output_dir: str | os.PathLike | None) -> float:
    """Clip the gradients of ``params`` to ``max_norm`` (None: no clipping) and return their
    norm; raise :class:`FloatingPointError` when ``loss`` or the norm is NaN/inf, before the
    optimizer step that would write it into every weight (AdamW turns one NaN gradient into NaN
    weights). The weights stay as after the step before ``step``, the run directory as it was;
    the message names the checkpoint to resume from. ``loss`` and the norm are global (reduced
    over ranks), so every rank raises at the same step."""
    if max_norm is None:  # the norm alone: no rescaling pass over the gradients
        norm = torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])
    else:
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)  # FSDP: a DTensor
    bad = [f"the {name} is {value}" for name, value in (("loss", loss), ("gradient norm", norm))
           if not math.isfinite(value)]
    if bad:
        ckpt = None if output_dir is None else latest_checkpoint(output_dir)
        resume = ("no checkpoint was saved yet" if ckpt is None else
                  f"the last checkpoint, {ckpt}, is intact: resume from it (a lower learning rate "
                  "or a longer warm-up may avoid this)")
        raise FloatingPointError(
            f"training stopped at step {step} ({where}): {' and '.join(bad)}; the optimizer step "
            f"was not taken, the weights are those after step {step - 1}; {resume}")
    return norm


def _check_model_and_task(model: nn.Module, task: Task) -> None:
    if not isinstance(task, Task):
        raise ValueError(f"task must be an rmt_fast.tasks.Task, got {type(task).__name__}")
    cfg = getattr(model, "rmt_config", None)
    if cfg is None:
        raise ValueError(f"model must be an rmt_fast RMT wrapper, got {type(model).__name__}")
    if cfg.segment_size != task.segment_size:
        raise ValueError(f"the model's segment_size ({cfg.segment_size}) must equal the task's "
                         f"({task.segment_size})")
    vocab = getattr(model.base.config, "vocab_size", None)
    if vocab is not None and vocab < task.vocab_size:
        raise ValueError(f"the base model's vocab_size ({vocab}) is smaller than the task's "
                         f"({task.vocab_size})")


def train(model: nn.Module, task: Task, steps: int | None = None, *, config: TrainConfig | None = None,
          **options) -> TrainResult:
    """Train ``model`` (an :class:`rmt_fast.RMTForCausalLM`) on ``task`` for ``steps`` optimizer
    steps in all. Options: a :class:`TrainConfig` and/or its fields as keyword arguments
    (``segments=[1, 2, 4]``, ``batch_size=32``, ``lr=1e-3``, ...; keywords override ``config``).

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

    A NaN or infinite loss or gradient norm stops training with :class:`FloatingPointError`
    before its optimizer step (:func:`clip_and_check_gradients`): the weights, the checkpoints
    and the metrics stay as they were, and the message names the checkpoint to resume from.

    The options (:class:`TrainConfig`):
        segments: the number of segments ``n``, or a :class:`Curriculum` of increasing stage
            sizes, e.g. ``[1, 2, 4, 6]``, advanced on ``threshold`` (checked every
            ``eval_every`` steps) or after ``stage_steps``; ``early_stop`` ends training when
            the last stage reaches ``threshold``; ``random_segments`` draws each batch's ``n``
            uniformly from the stages up to the current one.
        warmup_steps, schedule, min_lr_ratio: per-stage schedule, decaying over ``stage_steps``
            (or ``steps``) steps. clip_grad: max gradient norm (None: no clipping).
        eval_size: validation samples used per evaluation (of the current stage's length).
        output_dir: the :class:`RunDir`; with ``resume`` a run restarts from its latest
            checkpoint (metrics after it are dropped, then rewritten). save_every: checkpoint
            period (a final checkpoint is always written with output_dir).
        bptt_depth, checkpoint_segments: applied to the model's config when given.
        seed: seeds batches and dropout (per step). stop_after: end this call after that many
            steps (and checkpoint), as an interruption would; a later call resumes.
        grad_accum: micro-batches of ``batch_size`` per rank accumulated into one step.
        dtype: ``"bfloat16"``: forward/backward under ``torch.autocast(<model device>, bfloat16)``
            (parameters, gradients and optimizer state stay float32).
        parallel: ``"dp"`` (``DistributedDataParallel``, see
            :func:`rmt_fast.distributed.data_parallel`), ``"fsdp"`` (gradients and optimizer
            state sharded by ``fully_shard``, see :func:`rmt_fast.distributed.fully_shard_model`)
            or ``"fsdp-blocks"`` (also the parameters, one FSDP unit per transformer block); all
            with or without ``checkpoint_segments``; ignored by a single process. bucket_mb:
            DDP's all-reduce bucket size (MiB).

    Returns:
        :class:`TrainResult`.
    """
    if steps is not None:
        options["steps"] = steps
    cfg = TrainConfig(**options) if config is None else dataclasses.replace(config, **options)
    _check_model_and_task(model, task)
    rd.check_parallel(cfg.parallel)
    env = rd.init_distributed(model.device)
    changes = {k: v for k, v in (("bptt_depth", cfg.bptt_depth),
                                 ("checkpoint_segments", cfg.checkpoint_segments)) if v is not None}
    model.replace_config(**changes)
    for n in cfg.stages:
        task.splits(n)  # fail early on impossible lengths

    runner = model  # what runs the training forward: the model, or DDP around it
    if env.enabled and cfg.parallel == "dp":
        runner = rd.data_parallel(model, cfg.bucket_mb)  # broadcasts rank 0's weights
    elif env.enabled:
        rd.broadcast_module(model)
        rd.fully_shard_model(model, blocks=cfg.parallel == "fsdp-blocks")

    def new_optimizer():
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=cfg.lr,
                                 betas=cfg.betas, weight_decay=cfg.weight_decay)

    optimizer = new_optimizer()
    curriculum = Curriculum(cfg.stages, cfg.threshold, cfg.stage_steps, cfg.early_stop,
                            cfg.random_segments)
    step, wall_before, history = 0, 0.0, []
    run = RunDir(cfg.output_dir, env.is_main) if cfg.output_dir is not None else None
    if run is not None:
        ckpt = run.latest_checkpoint() if cfg.resume else None
        rd.barrier()  # every rank has picked the checkpoint before rank 0 may write anything
        if ckpt is not None:
            model.zero_grad(set_to_none=True)  # leftover .grad keeps the optimizer state from loading
            state = run.load_checkpoint(model, optimizer, ckpt)
            curriculum.load_state_dict(state, f"checkpoint {ckpt}")
            step, wall_before = state["step"], state["wall_time"]
        history = run.read_metrics(step) if ckpt is not None else []
        rd.barrier()  # every rank has read the metrics before rank 0 rewrites them
        run.rewrite_metrics(history)

    global_batch = cfg.batch_size * env.world_size * cfg.grad_accum
    t0 = time.perf_counter()

    def save() -> None:
        state = {"step": step, **curriculum.state_dict(), "seed": cfg.seed,
                 "wall_time": wall_before + time.perf_counter() - t0, "world_size": env.world_size,
                 "global_batch_size": global_batch}
        if env.is_main or rd.is_sharded(model):  # a collective under FSDP; else rank 0's alone
            model_state, optimizer_state = rd.full_state_dicts(model, optimizer)
        if env.is_main:  # a full disk: "No space left on device" with the path, partial write removed
            with run_io.checkpoint_errors(os.path.join(run.path, f"checkpoint-{step}")):
                run.save_checkpoint(model, model_state, optimizer_state, task, state,
                                    cfg.keep_checkpoints, cfg.progress)
        rd.barrier()

    span = cfg.stage_steps if cfg.stage_steps is not None else cfg.steps
    valid_acc = float("nan")
    compute = resolve_dtype(cfg.dtype, model.device)
    autocast_kw = {"device_type": model.device.type, "enabled": compute != torch.float32,
                   "dtype": compute}
    bar = None
    if cfg.progress and env.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.steps, initial=step, desc=task.name, dynamic_ncols=True)
    model.train()
    done = False
    last_saved = first_step = step
    while step < cfg.steps and not done:
        g = torch.Generator().manual_seed(_step_seed(cfg.seed, step))
        n = curriculum.draw(g)
        data = task.splits(n)["train"]
        idx = torch.randint(len(data), (global_batch,), generator=g)
        factor = lr_factor(step - curriculum.start, cfg.warmup_steps, span, cfg.schedule,
                           cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr * factor
        micro = []
        for j in range(cfg.grad_accum):
            mine = rd.shard(idx, env.rank, env.world_size, j, cfg.grad_accum)
            ids = data.input_ids[mine].to(model.device)
            labels_mask = data.labels_mask[mine].to(model.device)
            micro.append((ids, labels_mask, model.num_targets(ids, ids, labels_mask)))
        optimizer.zero_grad(set_to_none=True)
        loss = _accumulate(runner, micro, env, autocast_kw, _step_seed(cfg.seed, step) + 1)
        clip_and_check_gradients(model.parameters(), cfg.clip_grad, loss, step + 1,
                                 f"stage {curriculum.stage}, {n} segments", cfg.output_dir)
        optimizer.step()
        step += 1
        record = {"step": step, "stage": curriculum.stage, "segments": n, "loss": round(loss, 6),
                  "lr": cfg.lr * factor}
        if step % cfg.eval_every == 0 or step == cfg.steps:
            valid_acc = evaluate(model, task.splits(curriculum.segments)["valid"], cfg.eval_batch_size,
                                 cfg.eval_size, distributed=env.enabled)
            record["valid_accuracy"] = valid_acc
            advanced, done = curriculum.after_eval(step, valid_acc)
            if advanced:
                record["next_stage"] = curriculum.stage
                optimizer = new_optimizer()
        elif curriculum.budget_spent(step):
            done = True
        if step % cfg.log_every == 0 or "valid_accuracy" in record or done or step == cfg.steps:
            record["wall_time"] = round(wall_before + time.perf_counter() - t0, 3)
            history.append(record)
            if run is not None:
                run.append_metrics(record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", seg=n, acc=f"{valid_acc:.3f}")
        if cfg.save_every is not None and step % cfg.save_every == 0:
            save()
            last_saved = step
        if cfg.stop_after is not None and step - first_step >= cfg.stop_after:
            break
    if bar is not None:
        bar.close()
    if run is not None and last_saved != step:
        save()
    if math.isnan(valid_acc):
        valid_acc = evaluate(model, task.splits(curriculum.segments)["valid"], cfg.eval_batch_size,
                             cfg.eval_size, distributed=env.enabled)
    return TrainResult(step, curriculum.stage, curriculum.segments, valid_acc, history,
                       list(curriculum.changes), wall_before + time.perf_counter() - t0)


def _accumulate(model: nn.Module, micro: list[tuple[torch.Tensor, torch.Tensor, int]], env: rd.DistEnv,
                autocast_kw: dict, dropout_seed: int) -> float:
    """Forward/backward of this rank's micro-batches ``(ids, labels_mask, targets)``; ``model``
    is the RMT, or ``DistributedDataParallel`` around it. Each micro-batch's mean loss is
    weighted by its share of the global target count, so the summed gradient is the mean over
    the global batch. Returns the global mean loss.

    Distributed, every rank runs every micro-batch's forward and backward (a micro-batch
    without targets backpropagates a zero), so all ranks issue the same collectives whatever
    their data: one all-reduce of the target count; DDP's bucketed all-reduces in the last
    micro-batch's backward (``no_sync`` before) or FSDP's all-gathers and reduce-scatter (only the
    last micro-batch's backward reduce-scatters); one all-reduce of the loss. Per-block FSDP
    issues collectives per segment, so there one more all-reduce (MAX) finds each micro-batch's
    largest segment count and shorter micro-batches are left-padded with segments that are
    padding in every row."""
    rmt = rd.unwrap(model)
    ddp = rmt is not model
    local = sum(t for _, _, t in micro)
    total = local
    if env.enabled:
        total = int(rd.all_reduce_sum(torch.tensor([float(local)], dtype=torch.float64,
                                                   device=rmt.device))[0])
    sharded = rd.is_sharded(rmt)
    masks = [None] * len(micro)
    if sharded and len(rd.fsdp_units(rmt)) > 1:
        micro, masks = _same_segment_counts(rmt, micro)
    loss_sum = torch.zeros((), dtype=torch.float32, device=rmt.device)
    for j, (ids, labels_mask, targets) in enumerate(micro):
        last = j == len(micro) - 1
        if targets == 0 and not env.enabled:
            continue  # nothing to learn here
        # dropout: a distinct stream per micro-batch and rank (rank 0, micro 0: the old seed)
        torch.manual_seed(dropout_seed + j * env.world_size + env.rank)
        if sharded:  # FSDP reduces gradients in the backward: only the last one
            rmt.set_requires_gradient_sync(last)
        sync = model.no_sync() if ddp and not last else contextlib.nullcontext()
        with sync:
            with torch.autocast(**autocast_kw):
                out = model(ids, labels=ids, labels_mask=labels_mask, attention_mask=masks[j],
                            return_logits=targets == 0)
            if targets == 0:  # every rank runs every backward: a zero gradient here
                out.logits.sum().mul(0.0).backward()
                continue
            loss = out.loss
            scale = targets / total
            if scale != 1.0:
                loss = loss * scale
            loss.backward()
        loss_sum += loss.detach().float()
    if env.enabled:
        loss_sum = rd.all_reduce_sum(loss_sum.reshape(1))[0]
    return float(loss_sum)


def _same_segment_counts(model: nn.Module, micro: list[tuple[torch.Tensor, torch.Tensor, int]]):
    """Left-pad each micro-batch to the largest segment count any rank has for it (one
    all-reduce MAX), with segments that are padding in every row (they change nothing, see
    :func:`rmt_fast.models.segment_loop.cut_before`). Returns the micro-batches and their
    attention masks (None where nothing was padded)."""
    import torch.distributed as dist

    cfg = model.rmt_config
    size = cfg.segment_size
    counts = torch.tensor([math.ceil(ids.shape[1] / size) for ids, _, _ in micro], dtype=torch.int64,
                          device=model.device)
    most = counts.clone()
    dist.all_reduce(most, op=dist.ReduceOp.MAX)
    out, masks = [], []
    for (ids, labels_mask, targets), n, m in zip(micro, counts.tolist(), most.tolist(), strict=True):
        if n == m:
            out.append((ids, labels_mask, targets))
            masks.append(None)
            continue
        if cfg.segment_alignment == "center":
            raise ValueError("parallel='fsdp-blocks' with ranks holding different numbers of segments "
                             "needs segment_alignment 'left' or 'right' (padding by whole segments)")
        pad = (m - n) * size  # whole segments: the real part keeps its segment boundaries
        mask = torch.ones(ids.shape[0], pad + ids.shape[1], dtype=torch.long, device=ids.device)
        mask[:, :pad] = 0
        out.append((torch.nn.functional.pad(ids, (pad, 0)),
                    torch.nn.functional.pad(labels_mask, (pad, 0), value=False), targets))
        masks.append(mask)
    return out, masks


# --- models ----------------------------------------------------------------------------------------
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


def build_model(vocab_size: int, segment_size: int, num_mem_tokens: int = 6, *, layers: int = 4,
                d_model: int = 128, heads: int = 4, d_inner: int = 256, dropout: float = 0.0,
                mask: str = "causal", xl_cache: int = 0, xl_positions: str = "before_memory",
                bptt_depth: int | None = -1,
                checkpoint_segments: bool | None = False, seed: int = 0, init: str = "gpt2",
                memory_noise: float = 0.0, model: str = "rmt", d_mem: int = 64, arch: str = "gpt2",
                armt_l2_norm: bool = False, armt_correction: bool = True, armt_floor: float = 0.0,
                armt_normaliser_gate: bool = False, armt_rule: str = "armt",
                armt_value_norm: bool = False, armt_read_clip: float = 0.0,
                armt_state_decay: float = 1.0, armt_decay_gate: bool = False,
                armt_decay_max: float = 1.0, memory_update: str = "replace"):
    """A GPT-2 (``arch="gpt2"``) or Llama (``arch="llama"``: rotary positions, RMSNorm, SwiGLU
    with ``d_inner`` hidden units, no dropout but attention dropout) of the given size (from a
    config, random weights) inside an RMTForCausalLM (``model="rmt"``) or an ARMTForCausalLM
    (``model="armt"``, associative memory of width ``d_mem`` per layer, DPFP features
    L2-normalised with ``armt_l2_norm``, the ``gamma`` correction of ``z`` unless
    ``armt_correction=False``: :attr:`ARMTConfig.correction`, the read's floor ``armt_floor``:
    :attr:`ARMTConfig.normaliser_floor`, ``armt_normaliser_gate``:
    :attr:`ARMTConfig.normaliser_gate`, ``armt_rule``: :attr:`ARMTConfig.update_rule`,
    ``armt_value_norm``: :attr:`ARMTConfig.value_norm`, ``armt_read_clip``:
    :attr:`ARMTConfig.read_clip`, ``armt_state_decay``: :attr:`ARMTConfig.state_decay`,
    ``armt_decay_gate``: :attr:`ARMTConfig.decay_gate`, ``armt_decay_max``:
    :attr:`ARMTConfig.decay_max`);
    ``mask``, ``xl_cache`` and ``xl_positions`` (:attr:`RMTConfig.xl_positions`) are RMT options;
    ``memory_noise`` is noise on the memory each segment reads, for ARMT on what every layer reads
    from its associative state; ``memory_update``: :attr:`RMTConfig.memory_update`, RMT only).

    ``init``: ``"gpt2"`` (transformers' ``N(0, 0.02)``, tied input/output embeddings) or
    ``"torch"`` (:func:`torch_default_init`, untied output embeddings). The memory is drawn
    with the input embeddings' std either way.
    """
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    from rmt_fast.models import ARMTForCausalLM, RMTForCausalLM

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    if init not in INITS:
        raise ValueError(f"init must be one of {INITS}, got {init!r}")
    if model not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {model!r}")
    if model == "armt":
        rmt_only = {"mask": (mask, "causal"), "xl_cache": (xl_cache, 0),
                    "xl_positions": (xl_positions, "before_memory"),
                    "memory_update": (memory_update, "replace")}
        bad = sorted(k for k, (v, default) in rmt_only.items() if v != default)
        if bad:
            raise ValueError(f"{bad} are RMT options: ARMT runs [segment | memory] with a causal mask "
                             "and has no XL cache nor memory gate")
    else:
        armt_only = {"armt_l2_norm": armt_l2_norm, "armt_correction=False": not armt_correction,
                     f"armt_floor={armt_floor}": armt_floor,
                     "armt_normaliser_gate": armt_normaliser_gate,
                     f"armt_rule={armt_rule!r}": armt_rule != "armt",
                     "armt_value_norm": armt_value_norm,
                     f"armt_read_clip={armt_read_clip}": armt_read_clip,
                     f"armt_state_decay={armt_state_decay}": armt_state_decay != 1.0,
                     "armt_decay_gate": armt_decay_gate,
                     f"armt_decay_max={armt_decay_max}": armt_decay_max != 1.0}
        bad = next((name for name, used in armt_only.items() if used), None)
        if bad:
            raise ValueError(f"{bad} is an ARMT option (model='armt'), got model='rmt'")
    torch.manual_seed(seed)
    if arch == "gpt2":
        config = GPT2Config(vocab_size=vocab_size, n_positions=2 * num_mem_tokens + segment_size,
                            n_embd=d_model, n_layer=layers, n_head=heads, n_inner=d_inner,
                            resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
                            bos_token_id=0, eos_token_id=0, pad_token_id=0,
                            tie_word_embeddings=init == "gpt2")
        base = GPT2LMHeadModel(config)
    else:
        config = LlamaConfig(vocab_size=vocab_size, hidden_size=d_model, intermediate_size=d_inner,
                             num_hidden_layers=layers, num_attention_heads=heads,
                             max_position_embeddings=2 * num_mem_tokens + segment_size,
                             attention_dropout=dropout, initializer_range=0.02,
                             bos_token_id=0, eos_token_id=0, pad_token_id=0,
                             tie_word_embeddings=init == "gpt2")
        base = LlamaForCausalLM(config)
    if init == "torch":
        torch_default_init(base)
    if model == "armt":
        return ARMTForCausalLM(base, num_mem_tokens=num_mem_tokens, segment_size=segment_size,
                               d_mem=d_mem, use_l2_norm=armt_l2_norm, correction=armt_correction,
                               normaliser_floor=armt_floor, normaliser_gate=armt_normaliser_gate,
                               update_rule=armt_rule, value_norm=armt_value_norm,
                               read_clip=armt_read_clip, state_decay=armt_state_decay,
                               decay_gate=armt_decay_gate, decay_max=armt_decay_max,
                               bptt_depth=-1 if bptt_depth is None else bptt_depth,
                               checkpoint_segments=bool(checkpoint_segments),
                               memory_noise=memory_noise)
    return RMTForCausalLM(base, num_mem_tokens=num_mem_tokens, segment_size=segment_size, mask=mask,
                          bptt_depth=-1 if bptt_depth is None else bptt_depth, xl_cache=xl_cache,
                          xl_positions=xl_positions,
                          checkpoint_segments=bool(checkpoint_segments), memory_noise=memory_noise,
                          memory_update=memory_update)


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"expected comma-separated ints, got {text!r}") from exc


# --- command line -------------------------------------------------------------------------------
CLI_SPECS = (TaskSpec, ModelSpec, TrainConfig)


def parser() -> argparse.ArgumentParser:
    """``rmt-fast train``: one flag per field of :class:`TaskSpec`, :class:`ModelSpec` and
    :class:`TrainConfig`, plus ``--segments``/``--curriculum`` and the run-time switches."""
    p = argparse.ArgumentParser(prog="rmt-fast train", description=__doc__.split("\n\n")[0])
    p.add_argument("--segments", type=int, required=True, help="number of segments (the last stage)")
    p.add_argument("--curriculum", type=_ints, default=None,
                   help="stage sizes, e.g. 1,2,3,4,5,6 (must end with --segments)")
    for spec in CLI_SPECS:
        add_arguments(p, spec)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--device", default=None,
                   help="cpu, cuda, cuda:N (default: cuda:LOCAL_RANK under torchrun when CUDA is "
                        "available, else cpu)")
    return p


def specs_from_arguments(args: argparse.Namespace) -> tuple[TaskSpec, ModelSpec, TrainConfig]:
    """The three option objects of a parsed ``rmt-fast train`` command line (with the CLI's
    derived values: the segment size from ``--length``, the curriculum, and ``--threshold``
    applying only to curricula or ``--early-stop``)."""
    segment_size = args.segment_size
    if segment_size is None:
        if args.length is not None:
            if args.length % args.segments:
                raise SystemExit(f"--length {args.length} is not divisible by --segments {args.segments}")
            segment_size = args.length // args.segments
        else:
            segment_size = 12
    stages = tuple(args.curriculum or [args.segments])
    if stages[-1] != args.segments:
        raise SystemExit(f"--curriculum must end with --segments {args.segments}, got {list(stages)}")
    threshold = args.threshold if len(stages) > 1 or args.early_stop else None
    return (from_arguments(TaskSpec, args, segment_size=segment_size),
            from_arguments(ModelSpec, args),
            from_arguments(TrainConfig, args, segments=stages, threshold=threshold,
                           save_every=args.save_every if args.output_dir else None))


def save_run_args(path: str, task: TaskSpec, model: ModelSpec, config: TrainConfig,
                  world_size: int) -> None:
    """``train_args.json``: the three option objects of a CLI run."""
    with open(os.path.join(path, ARGS_NAME), "w") as f:
        json.dump({"task": dataclasses.asdict(task), "model": dataclasses.asdict(model),
                   "train": dataclasses.asdict(config), "world_size": world_size}, f, indent=2)


def load_run_args(run_dir: str) -> tuple[TaskSpec, ModelSpec, TrainConfig]:
    """Inverse of :func:`save_run_args`."""
    path = os.path.join(run_dir, ARGS_NAME)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{run_dir} has no {ARGS_NAME}: not the --out directory of "
                                "an `rmt-fast train` run")
    with open(path) as f:
        data = json.load(f)
    try:
        train_args = {**data["train"], "betas": tuple(data["train"]["betas"])}
        return TaskSpec(**data["task"]), ModelSpec(**data["model"]), TrainConfig(**train_args)
    except (KeyError, TypeError) as exc:
        raise ValueError(f"{path} is not a train_args.json of this version of rmt_fast: {exc}") from exc


def evaluate_run(run_dir: str | os.PathLike, checkpoint: str | os.PathLike | None = None,
                 split: str = "test", segments: int | None = None, batch_size: int = 256,
                 dtype: str = "float32") -> dict:
    """Token accuracy of a ``rmt-fast train --out RUN_DIR`` run's checkpoint (default: the
    latest) on a split of its task (default: ``test``) at ``segments`` segments (default: the
    run's ``--segments``), the model cast to ``dtype`` (``auto``: bfloat16 where the hardware
    has native bf16). Returns a dict with ``accuracy``, ``samples``, ``step``, ``dtype``, ...."""
    from rmt_fast.models.auto import AutoRMT

    run_dir = os.fspath(run_dir)
    task_spec, _, config = load_run_args(run_dir)
    checkpoint = os.fspath(checkpoint) if checkpoint is not None else latest_checkpoint(run_dir)
    if checkpoint is None:
        raise FileNotFoundError(f"no checkpoint-<step> directory in {run_dir}")
    if split not in ("train", "valid", "test"):
        raise ValueError(f"split must be train, valid or test, got {split!r}")
    n = config.stages[-1] if segments is None else segments
    data = task_spec.build(config.seed).splits(n)[split]
    if len(data) == 0:
        raise ValueError(f"the {split} split of {run_dir} is empty")
    model = AutoRMT.from_pretrained(checkpoint)
    model = model.to(resolve_dtype(dtype, model.device))
    state = run_io.load_torch(os.path.join(checkpoint, STATE_NAME))
    t0 = time.perf_counter()
    acc = evaluate(model, data, batch_size)
    return {"run": run_dir, "checkpoint": checkpoint, "step": state["step"], "split": split,
            "segments": n, "samples": len(data), "accuracy": acc,
            "dtype": str(model.memory.dtype).removeprefix("torch."),
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
    p.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                   help="cast the model to this dtype (auto: bfloat16 where the hardware has native bf16)")
    args = p.parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    result = evaluate_run(args.run_dir, args.checkpoint, args.split, args.segments, dtype=args.dtype)
    print(json.dumps(result))
    return result


def _device(requested: str | None) -> torch.device:
    launched = rd.env_from_environ()
    if requested is not None:
        device = torch.device(requested)
        if device.type == "cuda" and device.index is None and launched is not None:
            device = torch.device("cuda", launched.local_rank)
        return device
    if launched is not None and launched.world_size > 1:
        return rd.default_device(launched)
    return torch.device("cpu")


def main(argv: Sequence[str] | None = None) -> TrainResult:
    args = parser().parse_args(argv)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    env = rd.init_distributed(_device(args.device))
    if not args.progress:  # also transformers' own bars (checkpoint writing/loading) in the logs
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
    task_spec, model_spec, config = specs_from_arguments(args)
    task = task_spec.build(config.seed)
    model = build_model(task.vocab_size, task_spec.segment_size, bptt_depth=config.bptt_depth,
                        checkpoint_segments=config.checkpoint_segments, seed=config.seed,
                        **dataclasses.asdict(model_spec)).to(_device(args.device))
    if config.output_dir is not None and env.is_main:
        os.makedirs(config.output_dir, exist_ok=True)
        save_run_args(config.output_dir, task_spec, model_spec, config, env.world_size)
    result = train(model, task, config=config)
    if env.is_main:
        print(json.dumps({"step": result.step, "segments": result.segments,
                          "valid_accuracy": result.valid_accuracy,
                          "wall_time": round(result.wall_time, 1), "world_size": env.world_size,
                          "stage_changes": result.stage_changes}))
    rd.destroy()
    return result


if __name__ == "__main__":
    main(sys.argv[1:])
