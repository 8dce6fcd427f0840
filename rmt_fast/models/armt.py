"""ARMT: the Associative Recurrent Memory Transformer (Rodkin, Kuratov, Bulatov, Burtsev,
arXiv 2407.04841) around any transformers causal LM.

Each segment runs as ``[segment (<= S) | memory (M)]`` with a plain causal mask; the M memory
tokens are the same learned ``[M, d]`` parameter every segment (write tokens only). Every
transformer block carries an associative state ``A`` ``[B, d_key, d]``, ``z`` ``[B, d_key]``
(``d_key = 2 nu d_mem``, DPFP features, ``nu = 3``):

* before the block, from the second segment on, every token reads
  ``h <- h + phi(W_q h) A / (phi(W_q h) . z + eps)``;
* after the block, its outputs at the memory positions ``m`` write with the delta rule
  (:func:`rmt_fast.ops.associative_memory.associative_write`: ``beta = sigmoid(W_b m)``,
  ``v - v_bar``, the detached ``gamma`` correction of ``z``).

Semantics follow the reference code (``RodkinIvan/associative-recurrent-memory-transformer``,
``modeling_amt/language_modeling.py``: ``AssociativeLayerWrapper``, ``AssociativeMemoryCell``,
``AssociativeRecurrentWrapper``): the state is never detached between segments (full BPTT;
only ``gamma`` is detached), the first segment neither reads nor corrects, the loss is the
mean next-token cross-entropy over the concatenated segments. ``position_mode="wrap"`` is the
reference's ``wrap_pos=True`` (the learned position table grows by M rows that only the memory
tokens use); ``position_mode="model"`` numbers ``[segment | memory]`` as the base model does
(the newer upstream code, and the only choice for rotary models). The newer upstream code
(``src/armt.py``) also L2-normalises the DPFP features (``use_l2_norm=True`` here), drops the
``+ eps`` from ``|k|^2`` in the correction (done here when ``use_l2_norm``), and initialises
``W_q``/``W_k``/``W_b`` and the memory differently (not replicated: this follows the reference).
Not in any upstream code: ``correction=False``, ``ARMTConfig.normaliser_floor`` (reads divide by
at least ``c |phi|^2 + eps``), ``normaliser_gate``, ``update_rule="delta"`` (DeltaNet's rule),
``value_norm``, ``read_clip`` and ``state_decay``, ways to keep the state bounded on long inputs.

Implementation: the blocks stay the base model's own (state-dict keys unchanged); forward
pre-hooks and hooks on them do the read and the write while a segment runs. The recurrent state
is :class:`ARMTState` (per layer ``A``, ``z``), passed in and returned functionally; the
stateful ``reset_memory``/``detach_memory``/``clone_state``/``restore_state`` API of the newer
upstream code works on ``model.memory_state`` (``forward(..., persist=True)``).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import os
import re
from dataclasses import dataclass
from functools import partial
from typing import ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn import functional as F
from torch.utils import _pytree as pytree
from transformers.utils import ModelOutput

from rmt_fast.integrations.transformers import (
    MemoryLayout,
    generation_rows,
    layout_attention_mask,
    memory_layout,
)
from rmt_fast.models import used_rows
from rmt_fast.models.base import (
    BASE_DIR,
    WEIGHTS_NAME,
    RMTBase,
    check_logits_head,
    hidden_size,
    lm_logits,
    max_positions,
    relative_noise,
)
from rmt_fast.models.config import ALIGNMENTS, SavedConfig, check_memory_noise
from rmt_fast.models.decoder import (
    _count_targets,
    _Segment,
    check_rolling,
    generate_rolling,
    lm_outputs,
)
from rmt_fast.models.memory_transformer import find_layers
from rmt_fast.models.modes import evaluating
from rmt_fast.models.segment_loop import run_segments
from rmt_fast.models.segmenting import next_token_targets, segment_bounds
from rmt_fast.ops.associative_memory import (
    BACKENDS,
    RULES,
    associative_read,
    associative_write,
    check_decay,
    check_floor,
)
from rmt_fast.validation import check_causal_lm_call, check_finite_nonnegative

CONFIG_NAME = "armt_config.json"
STATE_DTYPES = ("float32", "float16", "bfloat16", "float64")
POSITION_MODES = ("model", "wrap")


@dataclass(frozen=True)
class ARMTConfig(SavedConfig):
    """Hyper-parameters of :class:`ARMTForCausalLM`, saved as ``armt_config.json``.

    Attributes:
        num_mem_tokens: M memory (write) tokens appended to every segment.
        d_mem: width of the key/query projections; the state has ``d_key = 2 nu d_mem`` rows.
        segment_size: tokens per segment S (without memory).
        correction: the ``gamma`` correction of ``z`` (reference default True). With it ``z``
            stops growing after the first segment while ``A`` keeps every write, and reads far
            past the trained length can explode; False (``z`` sums every key) keeps the read a
            bounded average but dilutes old content (``docs/results.md``, "Why ARMT breaks
            down on long streams"; ``docs/armt.md``).
        normaliser_floor: ``c >= 0``; with ``c > 0`` reads (and ``v_bar``) divide by
            ``max(phi . z, c |phi|^2) + eps`` instead of ``phi . z + eps``, the floor a constant
            (not in the reference code). The correction leaves each written key at
            ``k . z = |k|^2``, so ``c = 1`` keeps every read of a written key as it was, keeps
            queries that ``z`` barely covers from dividing by almost nothing, and bounds each
            write's step to ``beta / c``. 0 = the reference. Measured on qa1 and language
            modelling in ``docs/armt.md`` ("Bounded reads and writes"), as the other two.
        normaliser_gate: ``z`` takes each written key weighted by its write gate ``beta``, as
            ``A`` does (``z' = z + sum_j beta_j gamma_j k_j``; not in the reference code): a
            write the model gates off then changes neither ``A`` nor ``z``, and without the
            correction the read stays a weighted average of the written ``v - v_bar``.
        update_rule: ``armt`` (the reference's read and write) or ``delta``: DeltaNet's rule on
            the same features (not in the ARMT code): reads ``phi(W_q h) A``, the memory tokens
            write one after another ``A <- A + beta_j k_j (v_j - k_j A)^T``; needs
            ``use_l2_norm`` (unit keys make each write a contraction, so ``A`` stays bounded);
            ``z``, ``correction``, ``normaliser_floor`` and ``normaliser_gate`` do not apply.
        use_l2_norm: L2-normalise the DPFP features (newer upstream ARMT; the paper and the
            reference code do not).
        value_norm: the values are ``W_v rms_norm(mem)`` instead of ``W_v mem`` (``mem``: the
            block's outputs at the memory positions; no weight, not in the reference code).
            The read is added to the block's input, so what a layer reads flows into what it
            writes next; the normalised values cannot grow with its scale. Tried on qa1 with
            three seeds, it did not make the delta rule hold further (``docs/armt.md``, "What
            tells a seed that holds from one that does not").
        read_clip: ``c >= 0``; with ``c > 0`` each token's read is scaled down where its RMS
            exceeds ``c`` times the RMS of the hidden state it is added to
            (:func:`clip_read`; not in the reference code), so the read cannot become a larger
            share of a block's input past the trained length than ``c``. 0 = off (the
            reference). Tried at 0.1 with the delta rule on qa1, three seeds: it evened the
            seeds out but made none reliable to 1M tokens; the state grew behind the bound
            (``docs/armt.md``, "A bound on the read's share").
        state_decay: ``alpha`` in (0, 1]; every write goes into the state scaled by ``alpha``
            (``A <- alpha A``, ``z <- alpha z``, then the write; a fixed gate as Gated
            DeltaNet's, not in the reference code), so content not written again fades by
            ``alpha`` a segment and the state's statistics stop depending on the length after
            about ``1 / (1 - alpha)`` segments; to keep a fact longer the model must write it
            again, as RMT rewrites its memory every segment. 1 = off (the reference). At 0.5
            with the delta rule on qa1, three seeds kept the fact to 1M tokens
            (``docs/armt.md``, "A decay of the state").
        decay_gate: learn the decay instead (not in the reference code): each layer's write
            goes into the state scaled by ``alpha = sigmoid(W_ma mean_j(m_j) + b_ma)``, one per
            row and write, from the mean of the memory tokens' block outputs ``m_j``
            (Gated DeltaNet's data-dependent gate, one per write); ``W_ma`` starts at zero and
            ``b_ma`` at ``logit(state_decay / decay_max)``, so training starts from the fixed
            decay, which must then be below ``decay_max`` (and cannot change after
            construction).
        decay_max: with ``decay_gate``, the learnt decay's ceiling in (0, 1]: ``alpha =
            decay_max * sigmoid(...)``, so the model may forget faster than ``decay_max`` a
            write, never slower (fixed after construction). 1 = no ceiling.
        nu: DPFP order (the reference fixes 3).
        eps: added to the read's normaliser and to ``|k|^2`` in the correction (reference 1e-5).
        position_mode: ``model`` (the base model numbers ``[segment | memory]``) or ``wrap``
            (the reference's ``wrap_pos``: M new rows of the learned position table for the
            memory tokens; learned absolute position tables only, e.g. GPT-2).
        bptt_depth: the state carries gradient into the last ``bptt_depth`` segments of a
            forward; -1 = all (the reference).
        segment_alignment: ``left``, ``right`` or ``center`` (as the reference wrapper).
        state_dtype: dtype of the associative parameters and state (``float32``, ...); None =
            the base model's dtype.
        backend: associative-memory backend (``auto``, ``torch``, ``triton``, ``reference``).
        checkpoint_segments: segment-level gradient checkpointing (the shared segment loop's:
            only each segment's state and token ids are kept between forward and backward).
        offload_memory: with ``checkpoint_segments``, keep those states in pinned host memory
            (accelerator states only).
        memory_noise: training only (``model.train()``): Gaussian noise of this std, relative to
            each token's read vector's RMS, is added to what every layer reads from its
            associative state (ARMT's counterpart of :class:`RMTConfig`'s memory noise, not in
            the reference code). 0 = off; eval is never affected.
    """

    #: the file ``save``/``load`` use inside a checkpoint directory
    FILE_NAME: ClassVar[str] = CONFIG_NAME
    #: fields added after ARMT checkpoints were first written, with the value an older file means
    LOAD_DEFAULTS: ClassVar[dict[str, object]] = {
        "checkpoint_segments": False,  # ARMT had no segment checkpointing before these existed
        "offload_memory": False,
        "memory_noise": 0.0,
        "normaliser_floor": 0.0,
        "normaliser_gate": False,
        "update_rule": "armt",
        "value_norm": False,
        "read_clip": 0.0,
        "state_decay": 1.0,
        "decay_gate": False,
        "decay_max": 1.0,
    }

    num_mem_tokens: int = 16
    d_mem: int = 64
    segment_size: int = 512
    correction: bool = True
    normaliser_floor: float = 0.0
    normaliser_gate: bool = False
    update_rule: str = "armt"
    use_l2_norm: bool = False
    value_norm: bool = False
    read_clip: float = 0.0
    state_decay: float = 1.0
    decay_gate: bool = False
    decay_max: float = 1.0
    nu: int = 3
    eps: float = 1e-5
    position_mode: str = "model"
    bptt_depth: int = -1
    segment_alignment: str = "left"
    state_dtype: str | None = None
    backend: str = "auto"
    fuse_activations: bool = True
    checkpoint_segments: bool = False
    offload_memory: bool = False
    memory_noise: float = 0.0
    kind: str = "armt"

    def __post_init__(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(msg)

        def pos_int(name: str, minimum: int) -> None:
            v = getattr(self, name)
            need(isinstance(v, int) and not isinstance(v, bool) and v >= minimum,
                 f"{name} must be an int >= {minimum}, got {v!r}")

        pos_int("num_mem_tokens", 1)
        pos_int("d_mem", 1)
        pos_int("segment_size", 1)
        pos_int("nu", 1)
        for name in ("correction", "normaliser_gate", "use_l2_norm", "value_norm", "decay_gate",
                     "checkpoint_segments", "offload_memory"):
            need(isinstance(getattr(self, name), bool), f"{name} must be a bool, got "
                                                          f"{getattr(self, name)!r}")
        need(isinstance(self.eps, (int, float)) and not isinstance(self.eps, bool) and self.eps > 0,
             f"eps must be a float > 0, got {self.eps!r}")
        need(self.position_mode in POSITION_MODES,
             f"position_mode must be one of {POSITION_MODES}, got {self.position_mode!r}")
        need(isinstance(self.bptt_depth, int) and (self.bptt_depth == -1 or self.bptt_depth >= 0),
             f"bptt_depth must be -1 (full) or an int >= 0, got {self.bptt_depth!r}")
        need(self.segment_alignment in ALIGNMENTS,
             f"segment_alignment must be one of {ALIGNMENTS}, got {self.segment_alignment!r}")
        need(self.state_dtype is None or self.state_dtype in STATE_DTYPES,
             f"state_dtype must be None or one of {STATE_DTYPES}, got {self.state_dtype!r}")
        check_memory_noise(self.memory_noise)
        need(self.update_rule in RULES, f"update_rule must be one of {RULES}, got {self.update_rule!r}")
        if self.update_rule == "delta":
            need(self.use_l2_norm, "update_rule='delta' needs use_l2_norm=True (unit keys make "
                                   "each write a contraction)")
            need(not self.normaliser_floor and not self.normaliser_gate,
                 "normaliser_floor and normaliser_gate act on z, which update_rule='delta' "
                 "does not use")
        check_floor(self.normaliser_floor, "normaliser_floor")
        check_finite_nonnegative(self.read_clip, "read_clip", " (0 = off)")
        check_decay(self.state_decay, "state_decay")
        check_decay(self.decay_max, "decay_max")
        need(self.decay_max == 1 or self.decay_gate,
             f"decay_max is the learnt decay's ceiling: it needs decay_gate=True, got "
             f"decay_max={self.decay_max!r} without it")
        need(not self.decay_gate or self.state_decay < self.decay_max,
             f"decay_gate=True learns the decay from state_decay: set state_decay below "
             f"decay_max={self.decay_max!r} (e.g. 0.5 below 1), got {self.state_decay!r}")
        need(self.backend in BACKENDS, f"backend must be one of {BACKENDS}, got {self.backend!r}")
        need(self.kind == "armt", f"kind must be 'armt', got {self.kind!r}")

    @property
    def d_key(self) -> int:
        return 2 * self.nu * self.d_mem


@dataclass
class ARMTState:
    """The recurrent state: per layer ``A[i]`` ``[B, d_key, d]`` and ``z[i]`` ``[B, d_key]``, and
    how many segments have written it (0 = fresh: the next segment does not read, and writes
    without ``v_bar`` and correction, as the reference's first segment)."""

    A: tuple[torch.Tensor, ...]
    z: tuple[torch.Tensor, ...]
    segments: int = 0

    @property
    def fresh(self) -> bool:
        return self.segments == 0

    @property
    def batch_size(self) -> int:
        return self.A[0].shape[0]

    def detach(self) -> ARMTState:
        """The same values without autograd history (truncated BPTT)."""
        return ARMTState(tuple(a.detach() for a in self.A), tuple(z.detach() for z in self.z),
                         self.segments)

    def clone(self) -> ARMTState:
        """An independent copy (detached), e.g. to resume a stream from this point."""
        return ARMTState(tuple(a.detach().clone() for a in self.A),
                         tuple(z.detach().clone() for z in self.z), self.segments)

    def to(self, *args, **kwargs) -> ARMTState:
        return ARMTState(tuple(a.to(*args, **kwargs) for a in self.A),
                         tuple(z.to(*args, **kwargs) for z in self.z), self.segments)

    def save(self, path: str | os.PathLike) -> None:
        """Write a safetensors file (``A.{i}``, ``z.{i}``; ``segments`` in the metadata)."""
        tensors = {f"A.{i}": a.detach().contiguous() for i, a in enumerate(self.A)}
        tensors.update({f"z.{i}": z.detach().contiguous() for i, z in enumerate(self.z)})
        save_file(tensors, os.fspath(path), metadata={"segments": str(self.segments),
                                                       "layers": str(len(self.A))})

    @classmethod
    def load(cls, path: str | os.PathLike, device: str | torch.device = "cpu") -> ARMTState:
        from safetensors import safe_open

        with safe_open(os.fspath(path), framework="pt", device=str(device)) as f:
            meta = f.metadata() or {}
            if "layers" not in meta or "segments" not in meta:
                raise ValueError(f"{path} is not an ARMTState file (no layers/segments metadata)")
            n = int(meta["layers"])
            A = tuple(f.get_tensor(f"A.{i}") for i in range(n))
            z = tuple(f.get_tensor(f"z.{i}") for i in range(n))
        return cls(A, z, int(meta["segments"]))


@dataclass
class ARMTOutput(ModelOutput):
    """``loss``: scalar or None; ``logits``: ``[B, T, V]`` for every input position (None with
    ``return_logits=False``); ``state``: the :class:`ARMTState` after the last segment."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    state: ARMTState | None = None


def associative_options(cfg: ARMTConfig) -> dict:
    """Keyword options of :func:`associative_read` from ``cfg``, the model's current config (so
    that ``replace_config(use_l2_norm=...)`` reaches every layer)."""
    return dict(nu=cfg.nu, normalize=cfg.use_l2_norm, eps=cfg.eps,
                floor=float(cfg.normaliser_floor), rule=cfg.update_rule, backend=cfg.backend)


def write_options(cfg: ARMTConfig) -> dict:
    """Keyword options of :func:`associative_write` from ``cfg`` (the read's and the write's
    own)."""
    return dict(associative_options(cfg), correction=cfg.correction, gate=cfg.normaliser_gate,
                decay=float(cfg.state_decay))


class AssociativeMemory(nn.Module):
    """One layer's associative memory: ``W_mq``, ``W_mk`` (``d -> d_mem``), ``W_mv`` (``d -> d``,
    zero-initialised), ``W_mb`` (``d -> 1`` with bias), names as in the reference code, and with
    ``decay_init`` the learnt decay's ``W_ma`` (``d -> 1`` with bias, :attr:`ARMTConfig.decay_gate`;
    weight zero, bias ``logit(decay_init / decay_max)``; ``decay_max``: its ceiling,
    :attr:`ARMTConfig.decay_max`). Holds the weights only: the options come with each call
    (:func:`associative_options`)."""

    def __init__(self, d_model: int, d_mem: int, dtype: torch.dtype | None = None,
                 device: torch.device | None = None, decay_init: float | None = None,
                 decay_max: float = 1.0):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.W_mq = nn.Linear(d_model, d_mem, bias=False, **kw)
        self.W_mk = nn.Linear(d_model, d_mem, bias=False, **kw)
        self.W_mv = nn.Linear(d_model, d_model, bias=False, **kw)
        nn.init.zeros_(self.W_mv.weight)
        self.W_mb = nn.Linear(d_model, 1, **kw)
        self.W_ma, self.decay_max = None, float(decay_max)
        if not 0 < self.decay_max <= 1:
            raise ValueError(f"decay_max must be in (0, 1], got {decay_max!r}")
        if decay_init is not None:
            if not 0 < decay_init < self.decay_max:
                raise ValueError(f"decay_init must be in (0, decay_max={self.decay_max}), got {decay_init!r}")
            self.W_ma = nn.Linear(d_model, 1, **kw)
            nn.init.zeros_(self.W_ma.weight)
            start = decay_init / self.decay_max
            nn.init.constant_(self.W_ma.bias, math.log(start / (1 - start)))

    @classmethod
    def for_config(cls, d_model: int, cfg: ARMTConfig, dtype: torch.dtype | None = None,
                   device: torch.device | None = None) -> AssociativeMemory:
        """One layer's memory as ``cfg`` asks (``d_mem``; ``W_ma`` with ``decay_gate``)."""
        return cls(d_model, cfg.d_mem, dtype, device,
                   decay_init=cfg.state_decay if cfg.decay_gate else None, decay_max=cfg.decay_max)

    def read(self, h: torch.Tensor, A: torch.Tensor, z: torch.Tensor, opts: dict) -> torch.Tensor:
        """``h`` ``[B, L, d]`` -> the read ``[B, L, d]`` (to add to ``h``), in ``h``'s dtype."""
        x = self.W_mq(h.to(self.W_mq.weight.dtype))
        return associative_read(x, A, z, **opts).to(h.dtype)

    def write(self, mem: torch.Tensor, A: torch.Tensor, z: torch.Tensor, first, opts: dict,
              value_norm: bool = False):
        """``mem`` ``[B, M, d]`` (the block's outputs at the memory positions) -> ``(A', z')``;
        ``opts``: :func:`write_options`; ``value_norm``: :attr:`ARMTConfig.value_norm`."""
        mem = mem.to(self.W_mk.weight.dtype)
        beta = torch.sigmoid(self.W_mb(mem))[..., 0]
        if self.W_ma is not None:
            opts = dict(opts, decay=learnt_decay(mem, self.W_ma.weight, self.W_ma.bias, self.decay_max))
        return associative_write(self.W_mk(mem), self.W_mv(value_input(mem, value_norm)), beta,
                                 A, z, first=first, **opts)


def learnt_decay(mem: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor,
                 ceiling: float = 1.0) -> torch.Tensor:
    """The learnt decay ``ceiling * sigmoid(W_ma mean_j(m_j) + b_ma)`` ``[B]`` of one write, from
    the memory tokens' block outputs ``mem`` ``[B, M, d]``, ``weight`` ``[1, d]``, ``bias``
    ``[1]`` (:attr:`ARMTConfig.decay_gate`, ``ceiling``: :attr:`ARMTConfig.decay_max`)."""
    return ceiling * torch.sigmoid(F.linear(mem.mean(1), weight, bias))[:, 0]


def value_input(mem: torch.Tensor, value_norm: bool) -> torch.Tensor:
    """What the value projection reads: ``mem`` ``[..., d]``, RMS-normalised over ``d`` with
    ``value_norm`` (:attr:`ARMTConfig.value_norm`)."""
    return F.rms_norm(mem, (mem.shape[-1],)) if value_norm else mem


def clip_read(read: torch.Tensor, h: torch.Tensor, clip: float) -> torch.Tensor:
    """``read`` ``[..., d]`` scaled per vector by ``min(1, clip rms(h) / rms(read))``, so that
    its RMS is at most ``clip`` times that of ``h`` ``[..., d]``, the hidden state it is added to
    (:attr:`ARMTConfig.read_clip`); ``read`` itself when ``clip == 0``. Differentiated through
    (the scale is a function of both); a zero read (a fresh state) stays zero, with finite
    gradients: the scale is ``sqrt((b + t) / (max(ms(read), b) + t))``, ``b = clip^2 ms(h)``
    (ms: the mean square over ``d``; t: the dtype's smallest normal number, so that small
    hidden states keep their bound), with no square root or division at zero."""
    if clip == 0:
        return read
    wide = torch.promote_types(read.dtype, torch.float32)  # bf16 inputs: RMS in float32
    r, x = read.to(wide), h.to(wide)
    bound = clip * clip * x.pow(2).mean(-1, keepdim=True)
    eps = torch.finfo(wide).tiny
    scale = ((bound + eps) / (torch.maximum(r.pow(2).mean(-1, keepdim=True), bound) + eps)).sqrt()
    return (r * scale).to(read.dtype)


class AssociativeRun:
    """What the block hooks need while one segment runs through the base model.

    ``A``/``z``: per layer the state the blocks read (``[B, d_key, d]``, ``[B, d_key]``);
    ``read``: whether the blocks read it; ``write``: the positions (a slice of the sequence) whose
    block outputs write, or None (no write); ``first``: the state is fresh (a bool, or ``[B]``
    bool for fresh rows, see :func:`associative_write`); ``cfg``: the options
    (:func:`associative_options`, :func:`write_options`); ``noise``: relative std of the noise
    on every read (training only)."""

    def __init__(self, layers, assoc, A, z, *, read: bool, write: slice | None, first,
                 cfg: ARMTConfig, noise: float = 0.0):
        self.layers, self.assoc, self.A, self.z = layers, assoc, A, z
        self.read, self.write, self.first = read, write, first
        self.opts, self.write_opts, self.noise = associative_options(cfg), write_options(cfg), noise
        self.value_norm, self.read_clip = cfg.value_norm, cfg.read_clip
        self.new_A, self.new_z = list(A), list(z)
        self._repeated: dict[tuple[int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def state_for(self, idx: int, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``idx``'s ``(A, z)`` for ``batch`` rows: while generating (no writes), through
        :func:`~rmt_fast.integrations.transformers.generation_rows`, once per layer."""
        A, z = self.A[idx], self.z[idx]
        if batch == A.shape[0] or self.write is not None:
            return A, z
        if (idx, batch) not in self._repeated:
            self._repeated[idx, batch] = (generation_rows(A, batch), generation_rows(z, batch))
        return self._repeated[idx, batch]


_RUN: contextvars.ContextVar[AssociativeRun | None] = contextvars.ContextVar("rmt_fast_armt_run",
                                                                             default=None)


def _active(idx: int, module: nn.Module) -> AssociativeRun | None:
    run = _RUN.get()
    if run is None or run.layers[idx] is not module:
        return None
    return run


def _make_pre_hook(idx: int):
    def hook(module, args, kwargs):
        run = _active(idx, module)
        if run is None or not run.read:
            return None
        h = args[0] if args else kwargs["hidden_states"]
        A, z = run.state_for(idx, h.shape[0])
        read = clip_read(run.assoc[idx].read(h, A, z, run.opts), h, run.read_clip)
        h = h + relative_noise(read, run.noise)
        if args:
            return (h, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": h}

    return hook


def _make_hook(idx: int):
    def hook(module, args, kwargs, output):
        run = _active(idx, module)
        if run is None or run.write is None:
            return None
        out = output[0] if isinstance(output, tuple) else output
        run.new_A[idx], run.new_z[idx] = run.assoc[idx].write(
            out[:, run.write], run.A[idx], run.z[idx], run.first, run.write_opts, run.value_norm)
        return None

    return hook


def install_hooks(layers: nn.ModuleList) -> list:
    """The associative read (pre-hook) and write (hook) on every block of ``layers``; active only
    inside :func:`running`. Returns the hook handles."""
    handles = []
    for i, layer in enumerate(layers):
        handles.append(layer.register_forward_pre_hook(_make_pre_hook(i), with_kwargs=True))
        handles.append(layer.register_forward_hook(_make_hook(i), with_kwargs=True))
    return handles


@contextlib.contextmanager
def running(run: AssociativeRun | None):
    """Makes ``run`` the one the block hooks of :func:`install_hooks` serve (None: none)."""
    token = _RUN.set(run)
    try:
        yield run
    finally:
        _RUN.reset(token)


def _flatten_state(state: ARMTState):
    return [state.A, state.z], state.segments


def _unflatten_state(children, segments: int) -> ARMTState:
    return ARMTState(tuple(children[0]), tuple(children[1]), segments)


# a pytree (leaves: every A and z; the segment count is context), so that the shared segment loop
# can detach it, keep padded rows and checkpoint it
pytree.register_pytree_node(ARMTState, _flatten_state, _unflatten_state,
                            serialized_type_name="rmt_fast.models.armt.ARMTState")


def split_segments(input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
                   labels: torch.Tensor | None, labels_mask: torch.Tensor | None, segment_size: int,
                   alignment: str) -> list[_Segment]:
    """Cut ``[B, T]`` inputs into segments; position ``p`` predicts ``labels[p + 1]`` and
    ``labels_mask[p]`` selects it (the reference's loss over the concatenated segments)."""
    targets = None if labels is None else next_token_targets(labels, labels_mask)
    mask = None if attention_mask is None else attention_mask.to(torch.bool)
    return [_Segment(s, e, input_ids[:, s:e], None if mask is None else mask[:, s:e],
                     None if targets is None else targets[:, s:e])
            for s, e in segment_bounds(input_ids.shape[1], segment_size, alignment)]


def _dtype(name: str | None, default: torch.dtype) -> torch.dtype:
    return default if name is None else getattr(torch, name)


class ARMTForCausalLM(RMTBase):
    """ARMT around a transformers causal LM (GPT-2, Llama/Qwen with GQA and rotary, ...).

    Args:
        base_model: a transformers ``*ForCausalLM``; its attention switches to ``rmt_fast``
            and its blocks (found by :func:`rmt_fast.models.memory_transformer.find_layers`)
            get the associative read/write hooks.
        config: an :class:`ARMTConfig`; keyword arguments (``num_mem_tokens=...``) build one,
            or override fields of ``config``.
    """

    auto_class = "AutoModelForCausalLM"
    kind = "armt"
    config_class = ARMTConfig
    # d_mem, state_dtype and decay_gate shape the associative weights; position_mode="wrap" is set
    # up once
    FIXED_FIELDS = RMTBase.FIXED_FIELDS + ("d_mem", "state_dtype", "position_mode", "decay_gate")

    def __init__(self, base_model: nn.Module, config: ARMTConfig | None = None, **kwargs):
        config = self.make_config(config, **kwargs)
        if not hasattr(base_model, "get_output_embeddings") or base_model.get_output_embeddings() is None:
            raise TypeError(f"unsupported base model {type(base_model).__name__}: ARMTForCausalLM "
                            "needs a causal LM with an output embedding (lm_head)")
        check_logits_head(base_model)
        super().__init__(base_model, config)
        layers = find_layers(base_model)
        self._layers = [layers]  # a list, so that the ModuleList is not registered twice
        self._layers_name = next(n for n, mod in base_model.named_modules() if mod is layers)
        d = hidden_size(base_model.config)
        weight = base_model.get_input_embeddings().weight
        sdtype = _dtype(config.state_dtype, weight.dtype)
        self.assoc = nn.ModuleList(AssociativeMemory.for_config(d, config, sdtype, weight.device)
                                   for _ in range(len(layers)))
        self._hooks = install_hooks(layers)
        self._position_base = None
        if config.position_mode == "wrap":
            self._position_base = self._wrap_positions()
            if config.segment_size > self._position_base:
                raise ValueError(f"segment_size={config.segment_size} exceeds the base model's "
                                 f"{self._position_base} positions")
        else:
            self.check_positions(config.segment_size + config.num_mem_tokens)
        self.memory_state: ARMTState | None = None

    @property
    def armt_config(self) -> ARMTConfig:
        return self.rmt_config

    @property
    def layers(self) -> nn.ModuleList:
        """The base model's blocks (each with the read/write hooks)."""
        return self._layers[0]

    # --- positions -----------------------------------------------------------------------------
    def _position_table(self) -> tuple[nn.Module, str, nn.Embedding]:
        limit = max_positions(self.base.config)
        parent = self.base.base_model
        tok = self.base.get_input_embeddings()
        wrapped = getattr(self.base.config, "armt_wrapped_positions", 0)
        for name, child in parent.named_children():
            if isinstance(child, nn.Embedding) and child is not tok and limit is not None \
                    and child.num_embeddings == limit:
                return parent, name, child
        raise TypeError(f"position_mode='wrap' needs a learned absolute position table of "
                        f"{limit} rows in {type(parent).__name__} (e.g. GPT-2's wpe); "
                        f"this model has none (wrapped={wrapped}): use position_mode='model'")

    def _wrap_positions(self) -> int:
        """The reference's ``wrap_pos``: the position table gets M more rows (``nn.Embedding``'s
        default N(0, 1) init, as the reference) used only by the memory tokens. The base config's
        position limit grows with it, so ``save_pretrained``/``from_pretrained`` round-trip.
        Returns the number of positions the segment tokens may use."""
        m = self.rmt_config.num_mem_tokens
        parent, name, table = self._position_table()
        if getattr(self.base.config, "armt_wrapped_positions", 0) == m:
            return table.num_embeddings - m  # already wrapped (from_pretrained)
        n, d = table.weight.shape
        new = nn.Embedding(n + m, d, dtype=table.weight.dtype, device=table.weight.device)
        with torch.no_grad():
            new.weight[:n] = table.weight
        setattr(parent, name, new)
        for attr in ("n_positions", "max_position_embeddings"):
            if getattr(self.base.config, attr, None) == n:
                setattr(self.base.config, attr, n + m)
        self.base.config.armt_wrapped_positions = m
        return n

    def _position_ids(self, seg_mask: torch.Tensor | None, seg_len: int, write: bool, device):
        """None (the base model's ``0..L-1``) unless padding or ``wrap``. With padding, segment
        positions count real tokens only; ``wrap`` gives memory tokens the extra table rows."""
        m = self.rmt_config.num_mem_tokens if write else 0
        wrap = self._position_base is not None
        if seg_mask is None and not wrap:
            return None
        if seg_mask is None:
            seg_mask = torch.ones(1, seg_len, dtype=torch.bool, device=device)
        ones = torch.ones(seg_mask.shape[0], m, dtype=torch.long, device=device)
        pos = (torch.cat([seg_mask.long(), ones], dim=1).cumsum(dim=1) - 1).clamp(min=0)
        if wrap and m:
            pos[:, seg_len:] = self._position_base + torch.arange(m, device=device)
        return pos

    # --- state -----------------------------------------------------------------------------------
    def init_state(self, batch_size: int) -> ARMTState:
        """A fresh (zero) state for ``batch_size`` rows."""
        cfg = self.rmt_config
        d = hidden_size(self.base.config)
        w = self.assoc[0].W_mq.weight
        n = len(self.assoc)
        A = tuple(torch.zeros(batch_size, cfg.d_key, d, dtype=w.dtype, device=w.device) for _ in range(n))
        z = tuple(torch.zeros(batch_size, cfg.d_key, dtype=w.dtype, device=w.device) for _ in range(n))
        return ARMTState(A, z, 0)

    def _check_state(self, state: ARMTState, batch: int) -> None:
        if not isinstance(state, ARMTState):
            raise TypeError(f"state must be an ARMTState, got {type(state).__name__}")
        n, cfg, d = len(self.assoc), self.rmt_config, hidden_size(self.base.config)
        if len(state.A) != n or len(state.z) != n:
            raise ValueError(f"state must have {n} layers, got {len(state.A)} A and {len(state.z)} z")
        for a, z in zip(state.A, state.z, strict=True):
            if tuple(a.shape) != (batch, cfg.d_key, d) or tuple(z.shape) != (batch, cfg.d_key):
                raise ValueError(f"state tensors must be A [B={batch}, d_key={cfg.d_key}, d={d}] and "
                                 f"z [B, d_key], got {list(a.shape)} and {list(z.shape)}")

    def reset_memory(self) -> None:
        """Forget ``memory_state`` (the next ``persist=True`` forward starts fresh)."""
        self.memory_state = None

    def detach_memory(self) -> None:
        """Cut ``memory_state``'s autograd history (truncated BPTT between calls)."""
        if self.memory_state is not None:
            self.memory_state = self.memory_state.detach()

    def clone_state(self) -> ARMTState | None:
        """A detached copy of ``memory_state`` (None when fresh)."""
        return None if self.memory_state is None else self.memory_state.clone()

    def restore_state(self, state: ARMTState | None) -> None:
        """Continue from ``state`` (copied) on the next ``persist=True`` forward."""
        self.memory_state = None if state is None else state.clone()

    def save_state(self, path: str | os.PathLike) -> None:
        if self.memory_state is None:
            raise ValueError("no memory state to save: run forward(..., persist=True) first")
        self.memory_state.save(path)

    def load_state(self, path: str | os.PathLike) -> None:
        state = ARMTState.load(path, device=self.device)
        self._check_state(state, state.batch_size)
        self.memory_state = state

    # --- one segment -----------------------------------------------------------------------------
    def _run(self, state: ARMTState, write: slice | None, noise: float = 0.0) -> AssociativeRun:
        """The hooks' view of one segment from ``state`` (a fresh state is not read)."""
        cfg = self.rmt_config
        return AssociativeRun(self.layers, self.assoc, state.A, state.z, read=not state.fresh,
                              write=write, first=state.fresh, cfg=cfg, noise=noise)

    def segment_forward(self, state: ARMTState, ids: torch.Tensor, mask: torch.Tensor | None, *,
                        write: bool = True, need_hidden: bool = True):
        """Run one segment ``ids`` ``[B, S]`` (``mask`` ``[B, S]`` bool or 0/1, or None) from ``state``.

        Returns ``(hidden [B, S, d] at the segment positions or None, new state)``. With
        ``write=False`` no memory tokens are appended and the state is returned unchanged (the
        read stays active). Rows whose segment is all padding keep their state.
        """
        if self._base_checkpointing() and torch.is_grad_enabled():
            # its recomputation would run the blocks outside this segment, without read/write
            raise ValueError("transformers' gradient checkpointing of the base model is not "
                             "supported by ARMTForCausalLM (disable it; see bptt_depth)")
        mask = None if mask is None else mask.to(torch.bool)
        m, seg_len = self.rmt_config.num_mem_tokens, ids.shape[1]
        embeds = self.base.get_input_embeddings()(ids)
        if write:
            embeds = torch.cat([embeds, self.expand_memory(ids.shape[0]).to(embeds.dtype)], dim=1)
        kpm = None
        if mask is not None:
            kpm = torch.cat([mask, torch.ones(mask.shape[0], m if write else 0, dtype=torch.bool,
                                              device=mask.device)], dim=1)
        # reading (only the new state is used): the last block computes the memory rows only
        used = used_rows.rows(self, self.base, seg_len, seg_len + m, seg_len + m) \
            if write and not need_hidden else None
        layout = MemoryLayout(num_read=0, num_write=m if write else 0, mask="causal",
                              key_padding_mask=kpm, used_rows=used)
        run = self._run(state, slice(seg_len, seg_len + m) if write else None,
                        noise=self.rmt_config.memory_noise if self.training else 0.0)
        with running(run), memory_layout(layout):
            hidden = self.base.base_model(inputs_embeds=embeds, use_cache=False,
                                          attention_mask=layout_attention_mask(embeds),
                                          position_ids=self._position_ids(mask, seg_len, write,
                                                                          ids.device),
                                          ).last_hidden_state
        new = state
        if write:
            new = ARMTState(tuple(run.new_A), tuple(run.new_z), state.segments + 1)
            if mask is not None:
                has = mask.any(dim=1)
                new.A = tuple(torch.where(has[:, None, None], a, old) for a, old in zip(new.A, state.A,
                                                                                       strict=True))
                new.z = tuple(torch.where(has[:, None], z, old) for z, old in zip(new.z, state.z,
                                                                                 strict=True))
        return (hidden[:, :seg_len] if need_hidden else None), new

    def _base_checkpointing(self) -> bool:
        for name in ("is_activation_checkpointing", "is_gradient_checkpointing"):  # new, old name
            if hasattr(type(self.base), name):
                return bool(getattr(self.base, name))
        return False

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[B, S, d]`` -> ``[B, S, V]`` with the base model's output embedding."""
        return lm_logits(self.base, hidden)

    # --- whole sequences -------------------------------------------------------------------------
    def _check_inputs(self, input_ids, attention_mask, labels, labels_mask, state):
        check_causal_lm_call(self, input_ids, attention_mask=attention_mask, labels=labels,
                             labels_mask=labels_mask)
        if state is not None:
            self._check_state(state, input_ids.shape[0])

    def _step(self, state: ARMTState, seg: _Segment, t: int, *, n_targets: int | None,
              logits: bool):
        """ARMT's step of :func:`rmt_fast.models.segment_loop.run_segments`: one segment, its
        summed cross-entropy over ``n_targets`` (when it has targets) and its logits
        ``[B, S, V]`` when asked for."""
        has_loss = bool(n_targets) and seg.targets is not None
        hidden, state = self.segment_forward(state, seg.ids, seg.mask,
                                             need_hidden=logits or has_loss)
        return state, lm_outputs(self.logits, hidden, seg, n_targets, logits=logits,
                                 has_loss=has_loss)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels_mask: torch.Tensor | None = None,
                state: ARMTState | None = None, return_logits: bool = True,
                persist: bool = False) -> ARMTOutput:
        """``input_ids`` ``[B, T]`` of any length; ``labels`` ``[B, T]`` (shifted inside,
        -100 = ignore); ``labels_mask`` ``[B, T]`` bool selects the predicting positions;
        ``attention_mask`` ``[B, T]`` (1 = real token); ``state`` continues from an
        :class:`ARMTState` (default: fresh). ``persist=True`` starts from ``self.memory_state``
        (when ``state`` is None) and stores the final state there."""
        if persist and state is None:
            state = self.memory_state
        self._check_inputs(input_ids, attention_mask, labels, labels_mask, state)
        cfg = self.rmt_config
        segments = split_segments(input_ids, attention_mask, labels, labels_mask, cfg.segment_size,
                                  cfg.segment_alignment)
        if state is None:
            state = self.init_state(input_ids.shape[0])
        n_targets = _count_targets(segments) if labels is not None else None
        step = partial(self._step, n_targets=n_targets, logits=return_logits)
        res = run_segments(step, state, segments, bptt_depth=cfg.bptt_depth,
                           checkpoint=cfg.checkpoint_segments, offload=cfg.offload_memory)
        loss = res.loss
        if n_targets is not None and loss is None:  # no target position at all
            loss = torch.zeros((), device=self.device,
                               dtype=torch.promote_types(self.memory.dtype, torch.float32))
        if persist:
            self.memory_state = res.state
        return ARMTOutput(loss=loss, logits=torch.cat(res.outputs["logits"], dim=1)
                          if return_logits else None, state=res.state)

    def num_targets(self, input_ids: torch.Tensor, labels: torch.Tensor,
                    labels_mask: torch.Tensor | None = None,
                    attention_mask: torch.Tensor | None = None) -> int:
        """How many positions the loss of ``forward(input_ids, labels, ...)`` averages over (its
        denominator; data-parallel training weights each rank's mean loss by it)."""
        self._check_inputs(input_ids, attention_mask, labels, labels_mask, None)
        cfg = self.rmt_config
        return _count_targets(split_segments(input_ids, attention_mask, labels, labels_mask,
                                             cfg.segment_size, cfg.segment_alignment))

    # --- long-context use ------------------------------------------------------------------------
    def read_segments(self, state: ARMTState, segments: list[_Segment],
                      callback=None) -> ARMTState:
        """Read ``segments`` into ``state`` through the segment loop (no logits, no loss);
        ``callback(t, segment, state)`` after each. Runs under the caller's grad mode (what
        :class:`rmt_fast.StreamingReader` calls)."""
        step = partial(self._step, n_targets=None, logits=False)
        return run_segments(step, state, segments, callback=callback).state

    @torch.no_grad()
    @evaluating  # inference semantics (eval mode, packed linear layers on CPU), modes restored
    def read(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             state: ARMTState | None = None) -> ARMTState:
        """Read a context into the state without keeping logits."""
        return self.forward(input_ids, attention_mask=attention_mask, state=state,
                            return_logits=False).state

    @torch.no_grad()
    @evaluating  # inference semantics (eval mode, packed linear layers on CPU), modes restored
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 state: ARMTState | None = None, roll_segments: bool = False,
                 **generate_kwargs) -> torch.Tensor:
        """Write every segment but the last into the state, then ``base.generate`` from the last
        segment (no memory tokens) with the associative read active in every block and no
        writes (the reference's ``generate_mode``). Returns only the new tokens ``[B, N]``.
        ``roll_segments=True``: each full segment is written into the state and generation goes
        on in a new one (as :meth:`RMTForCausalLM.generate`)."""
        self._check_inputs(input_ids, attention_mask, None, None, state)
        if roll_segments:
            check_rolling(generate_kwargs)
        cfg = self.rmt_config
        segments = split_segments(input_ids, attention_mask, None, None, cfg.segment_size,
                                  cfg.segment_alignment)
        if state is None:
            state = self.init_state(input_ids.shape[0])
        for seg in segments[:-1]:
            _, state = self.segment_forward(state, seg.ids, seg.mask, need_hidden=False)
        last = segments[-1]
        if roll_segments:
            def write(state, ids, mask):
                return self.segment_forward(state, ids, mask, need_hidden=False)[1]

            return generate_rolling(self._generate_in_segment, write, state, last.ids, last.mask,
                                    generate_kwargs, cfg.segment_size, self.base.generation_config)
        return self._generate_in_segment(state, last.ids, last.mask, **generate_kwargs)

    def _generate_in_segment(self, state: ARMTState, ids: torch.Tensor, mask, **generate_kwargs):
        """``base.generate`` from ``ids`` ``[B, S]`` (``mask`` or None) reading ``state``."""
        embeds = self.base.get_input_embeddings()(ids)
        mask = mask if mask is not None else torch.ones_like(ids, dtype=torch.bool)
        with running(self._run(state, None)):
            return self.base.generate(inputs_embeds=embeds, attention_mask=mask.long(),
                                      **generate_kwargs)

    def diagonal(self, grouped: bool = True):
        """A :class:`rmt_fast.models.diagonal.DiagonalExecutor` for inference over this model
        (weights are snapshotted: build a new one after changing them)."""
        from rmt_fast.models.diagonal import DiagonalExecutor

        return DiagonalExecutor(self, grouped=grouped)

    # --- persistence -----------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, **base_kwargs) -> ARMTForCausalLM:
        """Inverse of :meth:`save_pretrained` (``base_kwargs`` go to the base model's loader);
        the model comes back in eval mode."""
        from transformers import AutoModelForCausalLM

        config = ARMTConfig.load(directory)
        base = AutoModelForCausalLM.from_pretrained(os.path.join(directory, BASE_DIR), **base_kwargs)
        model = cls(base, config=config)
        state = load_file(os.path.join(directory, WEIGHTS_NAME))
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("base.")]
        if missing or unexpected:
            raise ValueError(f"checkpoint mismatch: missing {missing}, unexpected {unexpected}")
        return model.eval()

    def load_official_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a state dict of the reference code (``AssociativeRecurrentWrapper`` or
        ``AssociativeMemoryCell``): ``[memory_cell.]memory``, ``[memory_cell.]model.*`` where
        the wrapped blocks are ``<layers>.{i}.layer.*`` and their associative weights
        ``<layers>.{i}.W_m{q,k,v,b}.*`` (the cell's ``layers.*`` alias of the same blocks is
        skipped). A ``wrap_pos`` checkpoint needs ``position_mode="wrap"`` (its position table
        has M extra rows)."""
        prefix = re.escape(self._layers_name)
        assoc_re = re.compile(rf"^{prefix}\.(\d+)\.(W_m[qkvb])\.(weight|bias)$")
        layer_re = re.compile(rf"^{prefix}\.(\d+)\.layer\.(.+)$")
        ours: dict[str, torch.Tensor] = {}
        own = self.state_dict()
        for key, value in state_dict.items():
            k = key.removeprefix("memory_cell.")
            if k == "memory":
                ours["memory"] = value
                continue
            if k.startswith("layers."):  # the cell's alias of model.<layers> (same tensors)
                continue
            if not k.startswith("model."):
                raise ValueError(f"unexpected key {key!r} in the official state dict")
            k = k.removeprefix("model.")
            if (mt := assoc_re.match(k)) is not None:
                ours[f"assoc.{mt.group(1)}.{mt.group(2)}.{mt.group(3)}"] = value
            elif (mt := layer_re.match(k)) is not None:
                ours[f"base.{self._layers_name}.{mt.group(1)}.{mt.group(2)}"] = value
            else:
                ours["base." + k] = value
        # non-persistent causal-mask buffers of old GPT-2 versions (rebuilt by wrap_pos)
        ours = {k: v for k, v in ours.items()
                if k in own or not re.search(r"\.attn\.(bias|masked_bias)$", k)}
        if "memory" not in ours:
            raise ValueError("the official state dict has no 'memory' parameter")
        for k, v in ours.items():
            if k in own and tuple(own[k].shape) != tuple(v.shape):
                hint = (" (a wrap_pos checkpoint: use position_mode='wrap')"
                        if k.endswith("wpe.weight") else "")
                raise ValueError(f"official {k} is {list(v.shape)}, this model's is "
                                 f"{list(own[k].shape)}{hint}")
        missing, unexpected = self.load_state_dict(ours, strict=False)
        tied = {"base." + k for k in (getattr(self.base, "_tied_weights_keys", None) or [])}
        missing = [k for k in missing if k not in tied]
        if missing or unexpected:
            raise ValueError(f"official state dict mismatch: missing {missing}, unexpected {unexpected}")
