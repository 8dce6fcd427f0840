"""Language modelling on real text: the RMT paper's Transformer-XL comparison at CPU scale
(issue #18), on the byte-level stdlib corpus (:mod:`rmt_fast.tasks.text_corpus`).

Every row is the same Llama-style model (``--arch llama``: rotary positions, so a
Transformer-XL cache keeps its true distances, :mod:`rmt_fast.models.rotary`; ``--arch gpt2``
was the first round's base, whose absolute positions give cached keys their old segment's
positions; ``--layers``/``--d-model``/... , default 4 layers, d_model 256, 4 heads, d_inner
1024, segment 128) inside :class:`rmt_fast.models.RMTForCausalLM`, trained
with the same budget, schedule and seed by :func:`rmt_fast.train.train` on random windows of
``--segments`` x 128 bytes; only the recurrence differs (:data:`ROWS`). The final numbers are
bits per byte over the WHOLE test (and validation) split, each document read as one stream
with memory and XL cache carried (:mod:`rmt_fast.tasks.lm_eval`).

Usage (one row per invocation; rerun the same command to resume from the last checkpoint)::

    python scripts/lm_xl_comparison.py --row plain --out runs/lm
    python scripts/lm_xl_comparison.py --measure --out runs/lm    # memory, tokens/s, s/step
    python scripts/lm_xl_comparison.py --plot docs/lm_curves.png --out runs/lm
    python scripts/lm_xl_comparison.py --table --out runs/lm      # markdown table of results
    python scripts/lm_xl_comparison.py --positions pos.png --out runs/lm  # bits/byte by segment position
    python scripts/lm_xl_comparison.py --drift drift.png --out runs/lm    # ... by segment index, long streams

``OUT/<row>/``: ``settings.json``, train()'s ``checkpoint-<step>/`` and ``metrics.jsonl``,
``lm_metrics.jsonl`` (validation bits/byte every ``--eval-every`` steps: windows of the
training length, fresh memory, as in training) and ``result.json`` (streamed bits/byte of the
test and validation splits, recurrent state size, wall times). Training runs in chunks of
``--eval-every`` steps (``train(..., stop_after=...)``), each ending in a checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import platform
import subprocess
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch

from rmt_fast.bench.memory import peak_rss_mib, reset_peak_rss, rss_mib
from rmt_fast.dtypes import resolve_dtype
from rmt_fast.tasks.lm_eval import evaluate_split, state_floats
from rmt_fast.tasks.text_corpus import VOCAB_SIZE, load_corpus, text_task
from rmt_fast.train import ARCHS, build_model, latest_checkpoint, train

# row -> (memory tokens (0 or --mem), xl_cache, bptt_depth, mask[, model: rmt (default) or armt])
ROWS: dict[str, dict] = {
    "plain": dict(mem=False, xl=0, depth=-1, mask="causal"),
    "xl10": dict(mem=False, xl=10, depth=-1, mask="causal"),
    "xl128": dict(mem=False, xl=128, depth=-1, mask="causal"),
    **{f"rmt-d{k}": dict(mem=True, xl=0, depth=k, mask="causal") for k in (0, 1, 2, 4)},
    "rmt-xl10": dict(mem=True, xl=10, depth=2, mask="causal"),
    # the same with the cache's last token right before the first segment token, not before
    # the read memory (RMTConfig.xl_positions)
    "rmt-xl10-adjacent": dict(mem=True, xl=10, depth=2, mask="causal", xl_positions="before_segment"),
    # the mask comparison is for the best RMT row (chosen on validation): its rmt-mask twin
    **{f"rmt-d{k}-rmtmask": dict(mem=True, xl=0, depth=k, mask="rmt") for k in (0, 1, 2, 4)},
    "rmt-xl10-rmtmask": dict(mem=True, xl=10, depth=2, mask="rmt"),
    # RMT depth 4 trained with memory noise 0.2 (RMTConfig.memory_noise, the needle recipe):
    # does it stop the memory's drift on streams far longer than training (--drift)?
    "rmt-d4-noise": dict(mem=True, xl=0, depth=4, mask="causal", noise=0.2),
    # ARMT (associative memory per layer, d_mem --d-mem) with --mem memory tokens, BPTT depth 4
    "armt-d4": dict(mem=True, xl=0, depth=4, mask="causal", model="armt"),
    # the same with L2-normalised DPFP features (what kept ARMT's associative state bounded
    # past the trained length on qa1, docs/armt.md)
    "armt-d4-l2": dict(mem=True, xl=0, depth=4, mask="causal", model="armt", l2=True),
    # the same without the gamma correction of z (ARMTConfig.correction=False): z then sums every
    # key that A holds, so the read stays a bounded average (scripts/armt_state_trace.py showed
    # the corrected z freeze after the first segment while A grows, and reads explode)
    "armt-d4-nocorr": dict(mem=True, xl=0, depth=4, mask="causal", model="armt", correction=False),
    # with the correction, but reads divide by max(phi.z, |phi|^2) + eps
    # (ARMTConfig.normaliser_floor = 1): no division by almost nothing, old content kept
    "armt-d4-floor": dict(mem=True, xl=0, depth=4, mask="causal", model="armt", floor=1.0),
    # without the correction, z taking each key weighted by its write gate beta as A does
    # (ARMTConfig.normaliser_gate): a bounded average that gated-off writes leave alone
    "armt-d4-gate": dict(mem=True, xl=0, depth=4, mask="causal", model="armt", correction=False,
                         gate=True),
    # DeltaNet's rule on unit DPFP keys (ARMTConfig.update_rule="delta"): reads phi(q) A, the
    # memory tokens write one after another, each write a contraction: A stays bounded
    "armt-d4-delta": dict(mem=True, xl=0, depth=4, mask="causal", model="armt", l2=True,
                          rule="delta"),
    # the same with every write going into half the state (ARMTConfig.state_decay = 0.5: what
    # made the delta rule exact to 1M tokens on qa1, docs/armt.md "A decay of the state")
    "armt-d4-delta-decay": dict(mem=True, xl=0, depth=4, mask="causal", model="armt", l2=True,
                                rule="delta", decay=0.5),
    # the same decay learnt per write from the memory outputs, starting at 0.5
    # (ARMTConfig.decay_gate)
    "armt-d4-delta-learnt": dict(mem=True, xl=0, depth=4, mask="causal", model="armt", l2=True,
                                 rule="delta", decay=0.5, decay_gate=True),
}
MAIN_ROWS = ("plain", "xl10", "xl128", "rmt-d0", "rmt-d1", "rmt-d2", "rmt-d4", "rmt-xl10")
RESULT_NAME, LM_METRICS, SETTINGS_NAME = "result.json", "lm_metrics.jsonl", "settings.json"


@dataclass
class Settings:
    """What every row shares (the model size, data, budget, schedule and seed). ``amp`` /
    ``eval_amp``: ``"bf16"``, None (float32) or ``"auto"`` (bf16 where the CPU multiplies bf16
    natively, else float32; resolved when the settings are made, so a run records what ran)."""

    arch: str = "llama"
    layers: int = 4
    d_model: int = 256
    heads: int = 4
    d_inner: int = 1024
    segment_size: int = 128
    segments: int = 8
    mem: int = 10
    d_mem: int = 32
    batch_size: int = 8
    steps: int = 800
    lr: float = 1e-3
    warmup: int = 100
    schedule: str = "cosine"
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.01
    clip: float = 1.0
    seed: int = 0
    amp: str | None = "auto"
    eval_every: int = 100
    valid_windows: int = 64
    eval_batch_size: int = 16
    eval_lanes: int = 8
    eval_amp: str | None = "auto"
    eval_docs: int | None = None

    def __post_init__(self):
        native = resolve_dtype("auto") == torch.bfloat16
        for name in ("amp", "eval_amp"):
            if getattr(self, name) == "auto":
                setattr(self, name, "bf16" if native else None)
            if getattr(self, name) not in ("bf16", None):
                raise ValueError(f"{name} must be 'bf16', None or 'auto', got {getattr(self, name)!r}")

    def row_model(self, row: str, checkpoint_segments: bool = False):
        spec = ROWS[row]
        return build_model(VOCAB_SIZE, self.segment_size, self.mem if spec["mem"] else 0,
                           layers=self.layers, d_model=self.d_model, heads=self.heads,
                           d_inner=self.d_inner, mask=spec["mask"], xl_cache=spec["xl"],
                           xl_positions=spec.get("xl_positions", "before_memory"),
                           memory_noise=spec.get("noise", 0.0),
                           bptt_depth=spec["depth"], checkpoint_segments=checkpoint_segments,
                           seed=self.seed, arch=self.arch, model=spec.get("model", "rmt"),
                           d_mem=self.d_mem, armt_l2_norm=spec.get("l2", False),
                           armt_correction=spec.get("correction", True),
                           armt_floor=spec.get("floor", 0.0),
                           armt_normaliser_gate=spec.get("gate", False),
                           armt_rule=spec.get("rule", "armt"),
                           armt_state_decay=spec.get("decay", 1.0),
                           armt_decay_gate=spec.get("decay_gate", False))

    def train_kwargs(self) -> dict:
        return dict(segments=self.segments, batch_size=self.batch_size, lr=self.lr,
                    weight_decay=self.weight_decay, warmup_steps=self.warmup, schedule=self.schedule,
                    min_lr_ratio=self.min_lr_ratio, clip_grad=self.clip, seed=self.seed,
                    dtype="bfloat16" if self.amp == "bf16" else "float32",
                    eval_every=self.eval_every, eval_size=8, eval_batch_size=8,
                    save_every=self.eval_every, keep_checkpoints=2, progress=False)


SETTING_FLAGS = {f.name: f for f in dataclasses.fields(Settings)}
# these may change between invocations of one run (they do not change training)
EVAL_ONLY = ("eval_batch_size", "eval_lanes", "eval_amp", "eval_docs")
# settings added later, with the value a settings.json written before them means
ADDED = {"arch": "gpt2", "d_mem": 32}


def machine() -> str:
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{name}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} thread(s)"


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@torch.no_grad()
def window_bits_per_byte(model, data, batch_size: int, amp: str | None) -> float:
    """Mean next-byte NLL / ln 2 over ``data`` (TaskData windows), each window read from the
    learned memory and an empty cache (the training protocol)."""
    was = model.training
    model.eval()
    nll, count = 0.0, 0
    try:
        for start in range(0, len(data), batch_size):
            batch = data[start: start + batch_size]
            ids, mask = batch.input_ids.to(model.device), batch.labels_mask.to(model.device)
            n = model.num_targets(ids, ids, mask)
            with torch.autocast(model.device.type, dtype=torch.bfloat16, enabled=amp == "bf16"):
                out = model(ids, labels=ids, labels_mask=mask, return_logits=False)
            nll += float(out.loss) * n
            count += n
    finally:
        model.train(was)
    return nll / count / math.log(2)


def _check_settings(run_dir: str, settings: Settings, row: str) -> None:
    path = os.path.join(run_dir, SETTINGS_NAME)
    mine = {"row": row, **dataclasses.asdict(settings)}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        old = {**ADDED, **old}
        diff = {k: (old.get(k), v) for k, v in mine.items() if k not in EVAL_ONLY and old.get(k) != v}
        if diff:
            raise SystemExit(f"{run_dir} was started with other settings (old, new): {diff}; "
                             "use another --out or the same flags")
    else:
        os.makedirs(run_dir, exist_ok=True)
        with open(path, "w") as f:
            json.dump(mine, f, indent=1)


def run_row(row: str, settings: Settings, out: str, corpus=None, log=print) -> dict:
    """Train ``row`` to ``settings.steps`` (resuming from ``out/<row>``), then evaluate it;
    returns the ``result.json`` dict."""
    if row not in ROWS:
        raise ValueError(f"row must be one of {sorted(ROWS)}, got {row!r}")
    run_dir = os.path.join(out, row)
    _check_settings(run_dir, settings, row)
    corpus = corpus if corpus is not None else load_corpus()
    task = text_task(settings.segment_size, corpus, seed=settings.seed)
    valid = task.splits(settings.segments)["valid"][: settings.valid_windows]
    model = settings.row_model(row)
    ckpt = latest_checkpoint(run_dir)
    step = 0 if ckpt is None else _step(ckpt)
    metrics_path = os.path.join(run_dir, LM_METRICS)
    kept = [r for r in _read_jsonl(metrics_path) if r["step"] <= step]
    with open(metrics_path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)
    log(f"[{row}] {'resuming at step ' + str(step) if step else 'starting'}; "
        f"{sum(p.numel() for p in model.parameters()):,} parameters; {machine()}")
    kwargs = settings.train_kwargs()
    driver = kept[-1]["driver_seconds"] if kept else 0.0
    while step < settings.steps:
        chunk = settings.eval_every - step % settings.eval_every
        t = time.perf_counter()
        # train() resumes through torch.distributed.checkpoint's set_optimizer_state_dict, which
        # leaves a fresh optimizer without state (and fails) when the parameters still hold
        # gradients, as they do after the previous train() call: drop them first
        model.zero_grad(set_to_none=True)
        res = train(model, task, settings.steps, output_dir=run_dir, stop_after=chunk, **kwargs)
        step = res.step
        losses = [h["loss"] for h in res.history if h["step"] > step - chunk]
        t_eval = time.perf_counter()
        bpb = window_bits_per_byte(model, valid, settings.eval_batch_size, settings.amp)
        driver += time.perf_counter() - t
        record = {"step": step, "valid_bpb": round(bpb, 5), "train_loss_bpb":
                  round(float(np.mean(losses)) / math.log(2), 5) if losses else None,
                  "valid_token_accuracy": res.valid_accuracy,
                  "wall_time": res.history[-1]["wall_time"],  # train()'s clock (its evaluations in)
                  "driver_seconds": round(driver, 1),  # everything: checkpoints, these evaluations
                  "chunk_seconds": round(t_eval - t, 1),
                  "valid_eval_seconds": round(time.perf_counter() - t_eval, 1)}
        with open(metrics_path, "a") as f:
            f.write(json.dumps(record) + "\n")
        left = (settings.steps - step) * (t_eval - t) / chunk
        log(f"[{row}] step {step}/{settings.steps} train {record['train_loss_bpb']} bits/byte, "
            f"valid {bpb:.4f} bits/byte, {(t_eval - t) / chunk:.2f} s/step, ~{left / 60:.0f} min left")
    result_path = os.path.join(run_dir, RESULT_NAME)
    if os.path.exists(result_path):
        with open(result_path) as f:
            old = json.load(f)
        if old["step"] == step and old.get("eval_docs") == settings.eval_docs:
            log(f"[{row}] already evaluated at step {step}: {result_path}")
            return old
    # the weights of the last checkpoint (also when this call trained nothing)
    loaded = type(model).from_pretrained(latest_checkpoint(run_dir))
    model.load_state_dict(loaded.state_dict())
    result = {"row": row, "step": step, **ROWS[row], "num_mem_tokens": model.rmt_config.num_mem_tokens,
              "eval_docs": settings.eval_docs, "eval_amp": settings.eval_amp}
    torch.manual_seed(0)
    for split in ("test", "valid"):
        docs = corpus[split]
        if settings.eval_docs is not None:
            docs = _first_docs(docs, settings.eval_docs)
        log(f"[{row}] streaming {split}: {len(docs)} documents, {docs.num_bytes:,} bytes")
        result[split] = evaluate_split(model, docs, settings.eval_lanes, amp=settings.eval_amp)
        log(f"[{row}] {split}: {result[split]['bits_per_byte']:.4f} bits/byte "
            f"({result[split]['eval_seconds']} s)")
    history = _read_jsonl(os.path.join(run_dir, LM_METRICS))
    result.update({"train_wall_time": history[-1]["wall_time"] if history else None,
                   "driver_seconds": history[-1]["driver_seconds"] if history else None,
                   "state_floats": state_floats(model),
                   "parameters": sum(p.numel() for p in model.parameters()),
                   "settings": dataclasses.asdict(settings), "corpus": corpus.sha256(),
                   "python": platform.python_version(), "machine": machine(),
                   "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    with open(result_path, "w") as f:
        json.dump(result, f, indent=1)
    log(json.dumps({"row": row, "test_bpb": result["test"]["bits_per_byte"],
                    "valid_bpb": result["valid"]["bits_per_byte"],
                    "state_bytes": result["test"]["state_bytes"]}))
    return result


def _first_docs(split, n: int):
    """The split restricted to its first ``n`` documents (quick runs and tests)."""
    from rmt_fast.tasks.text_corpus import CorpusSplit

    n = min(n, len(split))
    return CorpusSplit(split.name, split.data[: split.offsets[n]], split.offsets[: n + 1], split.paths[:n])


# --- measurements ---------------------------------------------------------------------------------
def measure_one(row: str, settings: Settings, checkpoint_segments: bool, steps: int, warmup: int,
                corpus_dir: str) -> dict:
    """Training steps of ``row`` on real windows (read from the corpus file, not the whole
    stream): wall and CPU seconds per step, tokens/s, and the peak resident memory during the
    measured steps above the resident memory before them (``/proc/self/status`` VmHWM after
    resetting it; the parent sets ``MALLOC_MMAP_THRESHOLD_`` so that freed activations leave the
    resident set)."""
    model = settings.row_model(row, checkpoint_segments=checkpoint_segments)
    opt = torch.optim.AdamW(model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay)
    data = np.memmap(os.path.join(corpus_dir, "train.bin"), dtype=np.uint8, mode="r")
    length = settings.segments * settings.segment_size
    g = np.random.default_rng(settings.seed)
    batches = [torch.from_numpy(np.stack([data[s: s + length] for s in
                                          g.integers(0, len(data) - length, settings.batch_size)])
                                .astype(np.int64)) for _ in range(warmup + steps)]

    def step(ids):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=settings.amp == "bf16"):
            out = model(ids, labels=ids, return_logits=False)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), settings.clip)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for ids in batches[:warmup]:
        step(ids)
    reset = reset_peak_rss()
    base = rss_mib()
    times, cpu = [], []
    for ids in batches[warmup:]:
        t, c = time.perf_counter(), time.process_time()
        step(ids)
        times.append(time.perf_counter() - t)
        cpu.append(time.process_time() - c)
    peak = peak_rss_mib()
    tokens = settings.batch_size * length
    return {"row": row, "checkpoint_segments": checkpoint_segments, "steps": steps,
            "s_per_step_mean": round(float(np.mean(times)), 3),
            "s_per_step_median": round(float(np.median(times)), 3),
            "s_per_step_min": round(float(np.min(times)), 3),
            "tokens_per_s": round(tokens / float(np.median(times)), 1),
            # CPU seconds of this process: what a core of its own would take (the wall clock
            # also counts the time other processes held the core)
            "cpu_s_per_step_median": round(float(np.median(cpu)), 3),
            "tokens_per_cpu_s": round(tokens / float(np.median(cpu)), 1),
            "peak_rss_mib": round(peak, 1), "rss_before_mib": round(base, 1),
            "train_step_peak_mib": round(peak - base, 1) if reset else None,
            "tokens_per_step": tokens}


def measure(settings: Settings, out: str, steps: int, warmup: int, cache_dir: str | None,
            configs=(("plain", False), ("rmt-d4", False), ("rmt-d4", True)), log=print) -> dict:
    """Run :func:`measure_one` for each ``(row, checkpoint_segments)`` in a fresh child process
    (one after the other, so the resident-memory peaks are each row's own), plus the streamed
    evaluation speed; writes ``out/measure.json``."""
    corpus = load_corpus(cache_dir)
    results = []
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}  # large buffers go back to the OS on free
    for row, ckpt in configs:
        cmd = [sys.executable, os.path.abspath(__file__), "--measure-one", row, "--measure-steps", str(steps),
               "--measure-warmup", str(warmup), "--corpus-dir", corpus.directory,
               "--settings-json", json.dumps(dataclasses.asdict(settings))]
        if ckpt:
            cmd.append("--checkpoint-segments")
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode:
            raise RuntimeError(f"measurement of {row} failed:\n{proc.stderr[-3000:]}")
        rec = json.loads(proc.stdout.strip().splitlines()[-1])
        log(json.dumps(rec))
        results.append(rec)
    # streamed evaluation speed (untrained weights: the speed does not depend on them)
    evals = []
    docs = _first_docs(corpus["valid"], 40)
    for row in ("plain", "rmt-d4"):
        model = settings.row_model(row)
        cpu = time.process_time()
        res = evaluate_split(model, docs, settings.eval_lanes, amp=settings.eval_amp)
        cpu = time.process_time() - cpu
        evals.append({"row": row, "bytes": res["bytes"], "seconds": res["eval_seconds"],
                      "bytes_per_s": round(res["bytes"] / max(res["eval_seconds"], 1e-9), 1),
                      "cpu_seconds": round(cpu, 1), "bytes_per_cpu_s": round(res["bytes"] / cpu, 1),
                      "eval_amp": settings.eval_amp})
        log(json.dumps(evals[-1]))
    summary = {"settings": dataclasses.asdict(settings), "train": results, "stream_eval": evals,
               "machine": machine(),
               "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
               "load_average": os.getloadavg()}
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "measure.json"), "w") as f:
        json.dump(summary, f, indent=1)
    return summary


# --- where in a segment the recurrence helps --------------------------------------------------------
POSITIONS_NAME = "positions.json"
POSITION_BANDS = ((0, 8), (8, 32), (32, 128))
INDEX_BANDS = ((0, 1), (1, 8), (8, 64), (64, 512), (512, None))  # segment index in the document
DRIFT_BANDS = ((0, 8), (8, 64), (64, 512), (512, 1024), (1024, 2048), (2048, None))  # in a long stream
DRIFT_NAME, DRIFT_WINDOW = "drift.json", 32  # the curve: bits per byte over 32 segments at a time


def _bands(nll: np.ndarray, counts: np.ndarray, bands) -> dict[str, tuple[float, int]]:
    """``{"lo-hi": (bits per byte, bytes)}`` of the sums ``nll`` (nats) / ``counts`` over each
    band ``[lo, hi)`` that holds bytes."""
    out = {}
    for lo, hi in bands:
        n = int(counts[lo:hi].sum())
        if n:
            out[f"{lo}-{'' if hi is None else hi - 1}"] = (float(nll[lo:hi].sum() / math.log(2) / n), n)
    return out


def _row_model(out: str, row: str):
    """``row``'s model with the weights of its last checkpoint under ``out``, and its step."""
    run_dir = os.path.join(out, row)
    with open(os.path.join(run_dir, SETTINGS_NAME)) as f:
        saved = {**ADDED, **json.load(f)}
    settings = Settings(**{k: saved[k] for k in SETTING_FLAGS if k in saved})
    ckpt = latest_checkpoint(run_dir)
    if ckpt is None:
        raise FileNotFoundError(f"{run_dir} has no checkpoint")
    model = settings.row_model(row)
    model.load_state_dict(type(model).from_pretrained(ckpt).state_dict())
    return model, _step(ckpt), settings


def _step(ckpt: str) -> int:
    return int(os.path.basename(ckpt).removeprefix("checkpoint-"))


def _evaluate_rows(out: str, name: str, key: dict, rows: list[str] | None, evaluate,
                   required: tuple[str, ...] = ()) -> dict:
    """``out/name``: ``{**key, "rows": {row: {"step": ..., **evaluate(row, model, settings)}}}``
    for every trained row under ``out`` (or ``rows``, which must be trained), each with the
    weights of its last checkpoint; the file is rewritten after each row. Rows already in the
    file at their last checkpoint's step (and holding ``required``) are kept, when its ``key``
    fields match; no model is loaded for them."""
    path = os.path.join(out, name)
    saved = {**key, "rows": {}}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)
        if all(old.get(k) == v for k, v in key.items()):
            saved = old
    for row in rows or _runs(out):
        ckpt = latest_checkpoint(os.path.join(out, row))
        if ckpt is None and not rows:
            continue  # a row not trained yet (a row asked for by name raises below)
        done = saved["rows"].get(row, {})
        if ckpt is not None and done.get("step") == _step(ckpt) and all(k in done for k in required):
            continue  # decided from the folder name: no model is loaded for a row already there
        model, step, settings = _row_model(out, row)
        saved["rows"][row] = {"step": step, **evaluate(row, model, settings)}
        with open(path + ".tmp", "w") as f:
            json.dump(saved, f, indent=1)
        os.replace(path + ".tmp", path)
    return saved


def positions(out: str, docs: int, rows: list[str] | None = None, corpus=None, log=print) -> dict:
    """Bits per byte by position within the segment (:attr:`StreamResult.bits_per_byte_by_position`)
    of every trained row under ``out`` on the first ``docs`` test documents, read as streams;
    written to ``out/positions.json`` (rows already there at the same step are kept)."""
    from rmt_fast.tasks.lm_eval import stream_nll

    split = _first_docs((corpus if corpus is not None else load_corpus())["test"], docs)

    def evaluate(row, model, settings) -> dict:
        res = stream_nll(model, list(split.documents()), settings.eval_lanes, amp=settings.eval_amp)
        by_pos = res.bits_per_byte_by_position
        seg = len(res.position_bytes)
        bands = {f"{lo}-{min(hi, seg) - 1}": float(res.position_nll[lo:hi].sum() / math.log(2)
                                                   / res.position_bytes[lo:hi].sum())
                 for lo, hi in POSITION_BANDS if res.position_bytes[lo:hi].sum() > 0}
        counted = _bands(res.index_nll, res.index_bytes, INDEX_BANDS)
        index_bands = {name: bpb for name, (bpb, _) in counted.items()}
        log(f"[{row}] {res.total_bytes:,} bytes: {res.bits_per_byte:.4f} bits/byte; by position "
            + ", ".join(f"{k}: {v:.4f}" for k, v in bands.items()) + "; by segment index "
            + ", ".join(f"{k}: {v:.4f}" for k, v in index_bands.items()))
        return {"bytes": res.total_bytes, "bits_per_byte": res.bits_per_byte,
                "bands": bands, "by_position": [round(float(b), 5) for b in by_pos],
                "index_bands": index_bands,
                "index_bytes": {name: b for name, (_, b) in counted.items()},
                "seconds": round(res.seconds, 1)}

    return _evaluate_rows(out, POSITIONS_NAME, {"docs": docs}, rows, evaluate, required=("index_bands",))


def drift(out: str, streams: int, segments: int, rows: list[str] | None = None, corpus=None,
          log=print) -> dict:
    """Bits per byte by segment index on ``streams`` streams of ``segments`` segments each, cut
    one after the other from the test split's ``[BOS] doc [BOS] doc ...``
    (:func:`rmt_fast.tasks.lm_eval.long_streams`; a stream crosses document starts as the
    training windows do, but runs ``segments / --segments`` times longer), every trained row
    under ``out``: whether its recurrent state holds up or drifts. Written to
    ``out/drift.json`` (rows already there at the same step and stream shape are kept)."""
    from rmt_fast.tasks.lm_eval import long_streams, stream_nll

    split = (corpus if corpus is not None else load_corpus())["test"]

    def evaluate(row, model, settings) -> dict:
        pieces = long_streams(split, streams, segments * settings.segment_size)
        res = stream_nll(model, pieces, streams, amp=settings.eval_amp)
        w = DRIFT_WINDOW
        curve = [float(res.index_nll[i: i + w].sum() / math.log(2) / res.index_bytes[i: i + w].sum())
                 for i in range(0, len(res.index_bytes), w)]
        counted = _bands(res.index_nll, res.index_bytes, DRIFT_BANDS)
        bands = {name: bpb for name, (bpb, _) in counted.items()}
        log(f"[{row}] {res.total_bytes:,} bytes in {streams} streams of {segments} segments: "
            f"{res.bits_per_byte:.4f} bits/byte; by segment index "
            + ", ".join(f"{k}: {v:.4f}" for k, v in bands.items()))
        return {"bytes": res.total_bytes, "bits_per_byte": res.bits_per_byte, "bands": bands,
                "band_bytes": {name: b for name, (_, b) in counted.items()},
                "curve": [round(c, 5) for c in curve], "seconds": round(res.seconds, 1)}

    key = {"streams": streams, "segments": segments, "window": DRIFT_WINDOW}
    return _evaluate_rows(out, DRIFT_NAME, key, rows, evaluate)


def plot_drift(saved: dict, png: str, baseline: str = "plain") -> None:
    """Bits per byte over the segment index of the long streams (windows of ``window``
    segments), one line per row (top); each row's gain over ``baseline`` on the same bytes
    (bottom, when the baseline row is there: the text's own ups and downs cancel)."""
    from rmt_fast.bench.plotting import pyplot, save

    plt = pyplot()
    base = saved["rows"].get(baseline)
    fig, axes = plt.subplots(2 if base else 1, 1, figsize=(8, 8 if base else 4.5), squeeze=False)
    ax = axes[0, 0]
    w = saved["window"]
    for row, r in saved["rows"].items():
        x = [i * w + (w - 1) / 2 for i in range(len(r["curve"]))]
        style = "--" if ROWS[row]["mask"] == "rmt" else "-"
        line, = ax.plot(x, r["curve"], style, lw=1, label=f"{row} ({r['bits_per_byte']:.3f})")
        if base and row != baseline:
            axes[1, 0].plot(x, np.array(base["curve"]) - np.array(r["curve"]), style, lw=1,
                            c=line.get_color(), label=row)
    ax.set_ylabel("bits per byte")
    ax.set_title(f"{saved['streams']} streams of {saved['segments']} segments from the test split")
    for a in axes[:, 0]:
        a.set_xlabel(f"segment index in the stream (mean over {w} segments; training windows: 8)")
        a.grid(alpha=0.3)
        a.legend(fontsize=7)
    if base:
        axes[1, 0].axhline(0, c="gray", lw=0.8)
        axes[1, 0].set_ylabel(f"{baseline} minus row (bits per byte)")
    save(fig, png)


def drift_table(saved: dict) -> str:
    rows = saved["rows"]
    bands = max((list(r["bands"]) for r in rows.values()), key=len, default=[])
    lines = ["| row | bits/byte | " + " | ".join(f"segments {b}" for b in bands) + " |",
             "|---|---|" + "---|" * len(bands)]
    for row, r in rows.items():
        lines.append(f"| {row} | {r['bits_per_byte']:.4f} | "
                     + " | ".join(f"{r['bands'][b]:.4f}" if b in r["bands"] else "-" for b in bands) + " |")
    return "\n".join(lines)


def plot_positions(saved: dict, png: str, baseline: str = "plain") -> None:
    """Bits per byte by segment position (top), each row's gain over ``baseline`` (middle), and
    bits per byte by the segment's index in its document (bottom)."""
    from rmt_fast.bench.plotting import pyplot, save

    plt = pyplot()
    fig, (ax, ax2, ax3) = plt.subplots(3, 1, figsize=(8, 10))
    base = saved["rows"].get(baseline)
    palette = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    shown = [r for r in ROWS if r in saved["rows"]]
    colors = {row: palette[i % len(palette)] for i, row in enumerate(shown)}  # one per row shown
    for row, r in saved["rows"].items():
        style = "--" if ROWS[row]["mask"] == "rmt" else "-"
        ax.plot(r["by_position"], style, lw=1, c=colors[row], label=f"{row} ({r['bits_per_byte']:.3f})")
        if base is not None and row != baseline:
            gain = np.array(base["by_position"]) - np.array(r["by_position"])
            ax2.plot(gain[:48], style, lw=1, c=colors[row], marker=".", ms=3, label=row)
    ax.set_ylabel("bits per byte")
    ax.set_title(f"bits per byte by position in the 128-byte segment (first {saved['docs']} test documents)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    ax2.axhline(0, c="gray", lw=0.8)
    ax2.set_ylabel(f"{baseline} minus row (bits per byte)")
    ax.set_xlabel("position of the predicting byte in its segment")
    ax2.set_xlabel("position of the predicting byte in its segment (the first 48)")
    ax2.grid(alpha=0.3)
    ax2.legend(fontsize=7, ncol=2)
    names = [f"{lo}-{'' if hi is None else hi - 1}" for lo, hi in INDEX_BANDS]
    for row, r in saved["rows"].items():
        have = [n for n in names if n in r.get("index_bands", {})]
        if have:
            ax3.plot([names.index(n) for n in have], [r["index_bands"][n] for n in have], marker="o",
                     ls="--" if ROWS[row]["mask"] == "rmt" else "-", c=colors[row], label=row)
    values = [v for r in saved["rows"].values() for v in r.get("index_bands", {}).values()]
    if values:  # a row that breaks down off the scale keeps the others readable; its points are labelled
        top = min(max(values), sorted(values)[len(values) // 2] + 0.4) + 0.05
        ax3.set_ylim(min(values) - 0.05, top)
        for row, r in saved["rows"].items():
            for n, v in r.get("index_bands", {}).items():
                if v > top:
                    ax3.annotate(f"{row}: {v:.2f}", (names.index(n), top), textcoords="offset points",
                                 xytext=(0, -12), ha="center", fontsize=7, color=colors[row])
    ax3.set_xticks(range(len(names)), [f"segments {n}" for n in names])
    ax3.set_ylabel("bits per byte")
    ax3.set_xlabel("index of the segment in its document (8 segments per training window)")
    ax3.grid(alpha=0.3)
    ax3.legend(fontsize=7, ncol=2)
    save(fig, png)


def positions_table(saved: dict) -> str:
    rows = saved["rows"]
    bands = list(next(iter(rows.values()))["bands"]) if rows else []
    index = max((list(r.get("index_bands", {})) for r in rows.values()), key=len, default=[])
    lines = ["| row | bits/byte | " + " | ".join(f"positions {b}" for b in bands) + " | "
             + " | ".join(f"segments {b}" for b in index) + " |",
             "|---|---|" + "---|" * (len(bands) + len(index))]

    def cell(d, k):
        return f"{d[k]:.4f}" if k in d else "-"

    for row, r in rows.items():
        lines.append(f"| {row} | {r['bits_per_byte']:.4f} | " + " | ".join(cell(r["bands"], b) for b in bands)
                     + " | " + " | ".join(cell(r.get("index_bands", {}), b) for b in index) + " |")
    return "\n".join(lines)


# --- plot and table -------------------------------------------------------------------------------
def _runs(out: str) -> list[str]:
    return [r for r in ROWS if os.path.exists(os.path.join(out, r, LM_METRICS))]


def plot(png: str, out: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.8))
    for row in _runs(out):
        hist = _read_jsonl(os.path.join(out, row, LM_METRICS))
        if not hist:
            continue
        label = row
        res_path = os.path.join(out, row, RESULT_NAME)
        if os.path.exists(res_path):
            with open(res_path) as f:
                label += f" (test {json.load(f)['test']['bits_per_byte']:.3f})"
        style = "--" if ROWS[row]["mask"] == "rmt" else "-"
        ax.plot([h["step"] for h in hist], [h["valid_bpb"] for h in hist], style, label=label)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("validation bits per byte (training-length windows)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("stdlib bytes: validation curves (legend: streamed test bits/byte)")
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def table(out: str) -> str:
    lines = ["| row | memory | xl_cache | BPTT depth | mask | test bits/byte | valid bits/byte | "
             "state per row (float32 bytes) | steps | train wall time |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for row in _runs(out):
        path = os.path.join(out, row, RESULT_NAME)
        if not os.path.exists(path):
            continue
        with open(path) as f:
            r = json.load(f)
        t = r["test"]
        wall = f"{r['train_wall_time'] / 60:.0f} min" if r.get("train_wall_time") else "?"
        name = row if r.get("eval_docs") is None else f"{row} (first {r['eval_docs']} documents only)"
        lines.append(f"| {name} | {t['num_mem_tokens']} | {t['xl_cache']} | "
                     f"{t['bptt_depth'] if t['num_mem_tokens'] else '-'} | {t['mask']} | "
                     f"{t['bits_per_byte']:.4f} | {r['valid']['bits_per_byte']:.4f} | {t['state_bytes']:,} | "
                     f"{r['step']} | {wall} |")
    return "\n".join(lines)


# --- command line ---------------------------------------------------------------------------------
def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    mode = p.add_mutually_exclusive_group(required=True)
    mode.add_argument("--row", choices=sorted(ROWS), help="train and evaluate this row")
    mode.add_argument("--measure", action="store_true",
                      help="s/step, tokens/s and training memory of plain, rmt-d4 and rmt-d4 with "
                           "segment checkpointing, side by side (writes OUT/measure.json)")
    mode.add_argument("--plot", metavar="PNG", help="validation curves of the runs under --out")
    mode.add_argument("--table", action="store_true", help="markdown table of the results under --out")
    mode.add_argument("--positions", metavar="PNG",
                      help="bits/byte by position in the segment of every trained row on the first "
                           "--position-docs test documents (OUT/positions.json, PNG, table)")
    mode.add_argument("--drift", metavar="PNG",
                      help="bits/byte by segment index of every trained row on --drift-streams "
                           "streams of --drift-segments segments cut from the test split "
                           "(OUT/drift.json, PNG, table)")
    mode.add_argument("--measure-one", metavar="ROW", help=argparse.SUPPRESS)
    p.add_argument("--position-docs", type=int, default=20)
    p.add_argument("--position-rows", nargs="+", choices=sorted(ROWS), default=None,
                   help="the rows --positions / --drift evaluate (default: every trained row)")
    p.add_argument("--drift-streams", type=int, default=6)
    p.add_argument("--drift-segments", type=int, default=2048)
    p.add_argument("--baseline", default="plain", choices=sorted(ROWS),
                   help="the row whose bits/byte the --positions / --drift plots subtract")
    p.add_argument("--out", default="runs/lm", help="runs directory (one subdirectory per row)")
    p.add_argument("--cache-dir", default=None, help="corpus cache (default ~/.cache/rmt_fast)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--measure-steps", type=int, default=20)
    p.add_argument("--measure-warmup", type=int, default=2)
    p.add_argument("--checkpoint-segments", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--corpus-dir", default=None, help=argparse.SUPPRESS)
    p.add_argument("--settings-json", default=None, help=argparse.SUPPRESS)
    for name, f in SETTING_FLAGS.items():
        flag = "--" + name.replace("_", "-")
        if f.type in ("int", int):
            p.add_argument(flag, type=int, default=f.default)
        elif f.type in ("float", float):
            p.add_argument(flag, type=float, default=f.default)
        elif name in ("amp", "eval_amp"):
            p.add_argument(flag, type=lambda s: None if s == "none" else s,
                           choices=(None, "bf16", "auto"), default=f.default,
                           help="bf16, none (float32) or auto (bf16 where the CPU has native bf16)")
        elif name == "arch":
            p.add_argument(flag, choices=ARCHS, default=f.default)
        elif name == "eval_docs":
            p.add_argument(flag, type=int, default=None, help="evaluate only the first N documents")
        else:
            p.add_argument(flag, default=f.default)
    return p


def main(argv: list[str] | None = None):
    from transformers.utils import logging as hf_logging

    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    settings = Settings(**{k: getattr(args, k) for k in SETTING_FLAGS})
    if args.settings_json:
        settings = Settings(**json.loads(args.settings_json))
    if args.measure_one:
        rec = measure_one(args.measure_one, settings, args.checkpoint_segments, args.measure_steps,
                          args.measure_warmup, args.corpus_dir)
        print(json.dumps(rec), flush=True)
        return rec
    if args.measure:
        return measure(settings, args.out, args.measure_steps, args.measure_warmup, args.cache_dir,
                       log=lambda s: print(s, flush=True))
    if args.plot:
        plot(args.plot, args.out)
        return None
    if args.positions:
        hf_logging.disable_progress_bar()
        saved = positions(args.out, args.position_docs, args.position_rows, load_corpus(args.cache_dir),
                          log=lambda s: print(s, flush=True))
        plot_positions(saved, args.positions, args.baseline)
        print(positions_table(saved))
        return saved
    if args.drift:
        hf_logging.disable_progress_bar()
        saved = drift(args.out, args.drift_streams, args.drift_segments, args.position_rows,
                      load_corpus(args.cache_dir), log=lambda s: print(s, flush=True))
        plot_drift(saved, args.drift, args.baseline)
        print(drift_table(saved))
        return saved
    if args.table:
        text = table(args.out)
        print(text)
        return text
    hf_logging.disable_progress_bar()  # checkpoint loading bars would fill the logs
    corpus = load_corpus(args.cache_dir)
    return run_row(args.row, settings, args.out, corpus, log=lambda s: print(s, flush=True))


if __name__ == "__main__":
    main(sys.argv[1:])
