"""RMT configuration: what a wrapper needs besides the base model, saved as ``rmt_config.json``."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from typing import ClassVar

from rmt_fast.manifest import read_json
from rmt_fast.masks import MASK_MODES
from rmt_fast.validation import check_finite_nonnegative

ALIGNMENTS = ("left", "right", "center")
LOSS_OVER = ("all", "last")
POSITION_MODES = ("model", "mirror")
XL_POSITIONS = ("before_memory", "before_segment")
KINDS = ("decoder", "encoder", "memory_transformer")
VARIANTS = ("mem", "ctrl", "bottleneck")
MEMORY_UPDATES = ("replace", "gated")
#: ``ARMTConfig`` fields an encoder's associative memory takes, as ``RMTConfig`` fields named
#: ``associative_<field>`` (:meth:`RMTConfig.associative_config`)
ASSOCIATIVE_FIELDS = ("update_rule", "use_l2_norm", "correction", "normaliser_floor",
                      "normaliser_gate", "value_norm", "read_clip", "state_decay", "decay_gate",
                      "decay_max")
CONFIG_NAME = "rmt_config.json"


def check_memory_noise(value: object) -> None:
    """The ``memory_noise`` check every model config shares (a finite float >= 0)."""
    check_finite_nonnegative(value, "memory_noise")


class SavedConfig:
    """``save``/``load`` of a frozen config dataclass as ``directory/FILE_NAME`` (JSON). Loading is
    strict: every field is required except those in ``LOAD_DEFAULTS`` (fields added after files
    were first written, with the value an older file means), unknown keys are errors, and every
    error names the file."""

    FILE_NAME: ClassVar[str]
    LOAD_DEFAULTS: ClassVar[dict[str, object]] = {}

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def save(self, directory: str | os.PathLike) -> None:
        with open(os.path.join(directory, self.FILE_NAME), "w") as f:
            json.dump(self.to_dict(), f, indent=2)

    @classmethod
    def load(cls, directory: str | os.PathLike):
        path = os.path.join(directory, cls.FILE_NAME)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"{path} not found: is {directory} an rmt_fast checkpoint "
                                    f"({cls.__name__})?")
        data = read_json(path, "rmt_fast config")
        if not isinstance(data, dict):
            raise ValueError(f"{path}: expected a JSON object of {cls.__name__} fields, got "
                             f"{type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)}
        missing = sorted(known - data.keys() - cls.LOAD_DEFAULTS.keys())
        if missing:
            raise ValueError(f"{path}: missing required key(s) {missing}")
        unknown = sorted(data.keys() - known)
        if unknown:
            raise ValueError(f"{path}: unknown key(s) {unknown}; known keys: {sorted(known)}")
        try:
            return cls(**{**cls.LOAD_DEFAULTS, **data})
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{path}: {exc}") from exc


@dataclass(frozen=True)
class RMTConfig(SavedConfig):
    """Hyper-parameters of a recurrent-memory wrapper (frozen: derive a changed copy with
    ``dataclasses.replace(config, ...)``).

    Attributes:
        num_mem_tokens: memory size M (rows of the learned ``[M, d]`` memory).
        segment_size: tokens per segment S (the segment part, without memory or special tokens).
        mask: attention mask mode over ``[read | segment | write]`` (see :mod:`rmt_fast.masks`).
        bptt_depth: memory carries gradient into the last ``bptt_depth`` segments; -1 = all.
        xl_cache: keys/values of the previous segment's last ``xl_cache`` tokens are kept
            (detached, per layer) and attended to as past keys (RMT + Transformer-XL). 0 = off.
            Rotary models (Llama, ...) see them at their true distances (the cached keys are
            re-rotated, :mod:`rmt_fast.models.rotary`); with absolute position embeddings
            (GPT-2) they keep the positions of the segment they came from.
        xl_positions: where a rotary model's cache sits: ``before_memory`` (the last cached
            token one position before the read memory, the sequence order
            ``[cache | read | segment | write]`` of the official LM-RMT code; the first segment
            token sees it ``M + 1`` back) or ``before_segment`` (one position before the first
            segment token, as if the memory took no positions: the cache's tail shares positions
            with the read memory). Needs rotary positions when ``xl_cache > 0``.
        checkpoint_segments: segment-level gradient checkpointing: only each segment's inputs
            (memory, XL cache, token ids) are kept between forward and backward, each segment
            is recomputed in backward (``torch.utils.checkpoint``, non-reentrant).
        offload_memory: with ``checkpoint_segments``, keep those states in pinned host memory
            (the extension's memory-state store, prefetched in reverse order in backward).
            Accelerator states only: on CPU they stay in place.
        segment_alignment: ``left`` (fixed chunks from the start, the last may be short),
            ``right`` (the first may be short) or ``center`` (``torch.chunk``).
        loss_over: ``all`` segments or only the ``last`` one.
        position_mode: ``model`` numbers ``[read | segment | write]`` 0..2M+S-1 as the base
            model does (the official wrapper; needed for its checkpoints); ``mirror`` gives the
            write block the read block's positions 0..M-1, so a memory slot keeps its position
            when it is read back.
        memory_noise: training only (``model.train()``): Gaussian noise of this std, relative to
            each memory vector's RMS, is added to the memory every segment reads. It makes the
            memory update correct small drifts, so that a state survives far more segments than
            the training length (``docs/results.md``, needle). With an associative memory the same
            relative noise is added to every read of it. 0 = off; eval is never affected.
        memory_update: how the write outputs become the next memory. ``replace`` (RMT): they
            are the next memory. ``gated``: a learned per-channel gate keeps part of the memory
            the segment read, ``z = sigmoid(W [written; read] + b)``, next memory
            ``(1 - z) * written + z * read`` (:class:`rmt_fast.models.base.MemoryGate`; starts
            close to ``replace``). Decoders and encoders; a Memory Transformer has no recurrence.
        associative_d_mem: 0 = none; ``d_mem > 0`` adds ARMT's layer-wise associative memory to
            an encoder RMT (:class:`rmt_fast.models.armt.AssociativeMemory` per block, keys of
            width ``d_mem``, ``d_key = 6 d_mem`` DPFP features): before every block each token
            reads the layer's state ``A``, ``z``; after it the block's outputs at the memory
            positions write into it (the delta rule), next to the memory tokens' own recurrence.
            ``W_v`` starts at zero, so it can be added to a trained RMT encoder without changing
            its outputs. Encoders only (``ARMTForCausalLM`` is ARMT for decoders).
        associative_update_rule, associative_use_l2_norm, associative_correction,
            associative_normaliser_floor, associative_normaliser_gate,
            associative_value_norm, associative_read_clip, associative_state_decay,
            associative_decay_gate, associative_decay_max: the
            associative memory's ``ARMTConfig`` options of the same names (defaults: ARMT's
            reference read and write; e.g. ``associative_update_rule="delta",
            associative_use_l2_norm=True`` for DeltaNet's rule); they need
            ``associative_d_mem > 0`` unless left at the defaults.
        fuse_activations: replace the base model's tanh-GELU modules by the identical one-kernel
            :class:`rmt_fast.integrations.fused_activations.TanhGELU` and swap its
            ``nn.LayerNorm`` modules to :class:`~rmt_fast.integrations.fused_activations.FastLayerNorm`
            (same parameters, the extension's kernel) when wrapping (the only module
            replacements the wrappers make; ``False`` leaves the base model untouched).
        kind: ``decoder``, ``encoder`` or ``memory_transformer`` (set by the wrapper class).
        variant: Memory Transformer variant: ``mem``, ``ctrl`` or ``bottleneck``.
        cls_token_id, sep_token_id: encoder special tokens around ``[CLS] [mem] [SEP] seg [SEP]``.
    """

    #: the file ``save``/``load`` use inside a checkpoint directory
    FILE_NAME: ClassVar[str] = CONFIG_NAME
    #: fields added after checkpoints were first written, with the value an older file means (what
    #: the code that wrote it did); any other missing field is an error
    LOAD_DEFAULTS: ClassVar[dict[str, object]] = {
        "fuse_activations": True,  # wrappers always fused tanh-GELU before this switch existed
        "variant": "mem",  # decoder and encoder checkpoints (Memory Transformers kept it in `kind`)
        "offload_memory": False,  # checkpointed states were never offloaded before this switch
        "memory_update": "replace",  # the only update before the gate existed
        "associative_d_mem": 0,  # no associative memory before it existed
        # the associative memory's options: ARMT's defaults (all it had before they existed)
        "associative_update_rule": "armt",
        "associative_use_l2_norm": False,
        "associative_correction": True,
        "associative_normaliser_floor": 0.0,
        "associative_normaliser_gate": False,
        "associative_value_norm": False,
        "associative_read_clip": 0.0,
        "associative_state_decay": 1.0,
        "associative_decay_gate": False,
        "associative_decay_max": 1.0,
        "xl_positions": "before_memory",  # the only placement before the switch existed
    }

    num_mem_tokens: int = 16
    segment_size: int = 512
    mask: str = "causal"
    bptt_depth: int = -1
    xl_cache: int = 0
    xl_positions: str = "before_memory"
    checkpoint_segments: bool = False
    offload_memory: bool = False
    segment_alignment: str = "left"
    loss_over: str = "all"
    position_mode: str = "model"
    memory_noise: float = 0.0
    memory_update: str = "replace"
    associative_d_mem: int = 0
    associative_update_rule: str = "armt"
    associative_use_l2_norm: bool = False
    associative_correction: bool = True
    associative_normaliser_floor: float = 0.0
    associative_normaliser_gate: bool = False
    associative_value_norm: bool = False
    associative_read_clip: float = 0.0
    associative_state_decay: float = 1.0
    associative_decay_gate: bool = False
    associative_decay_max: float = 1.0
    fuse_activations: bool = True
    kind: str = "decoder"
    variant: str = "mem"
    cls_token_id: int | None = None
    sep_token_id: int | None = None

    def __post_init__(self) -> None:
        self.validate()

    def associative_options(self) -> dict[str, object]:
        """The ``associative_<field>`` values by ``ARMTConfig`` field name."""
        return {f: getattr(self, f"associative_{f}") for f in ASSOCIATIVE_FIELDS}

    def associative_config(self):
        """The :class:`rmt_fast.models.armt.ARMTConfig` of the encoder's associative memory
        (``associative_d_mem`` and the ``associative_*`` options; ARMT's defaults for the rest),
        None without one."""
        if not self.associative_d_mem:
            return None
        from rmt_fast.models.armt import ARMTConfig  # armt imports this module

        return ARMTConfig(d_mem=self.associative_d_mem, **self.associative_options())

    def _check_associative_options(self) -> None:
        if not self.associative_d_mem:
            fields = self.__dataclass_fields__
            changed = sorted(f"associative_{k}" for k, v in self.associative_options().items()
                             if v != fields[f"associative_{k}"].default)
            if changed:
                raise ValueError(f"{', '.join(changed)}: options of the associative memory, which "
                                 "needs associative_d_mem > 0")
            return
        try:
            self.associative_config()
        except ValueError as e:  # its message names the field without the prefix
            raise ValueError(f"associative memory options (RMTConfig.associative_<field>): {e}") \
                from e

    def validate(self) -> None:
        def need(cond: bool, msg: str) -> None:
            if not cond:
                raise ValueError(msg)

        def is_int(x) -> bool:
            return isinstance(x, int) and not isinstance(x, bool)

        need(is_int(self.num_mem_tokens) and self.num_mem_tokens >= 0,
             f"num_mem_tokens must be an int >= 0, got {self.num_mem_tokens!r}")
        need(is_int(self.segment_size) and self.segment_size >= 1,
             f"segment_size must be an int >= 1, got {self.segment_size!r}")
        need(self.mask in MASK_MODES, f"mask must be one of {MASK_MODES}, got {self.mask!r}")
        need(is_int(self.bptt_depth) and (self.bptt_depth == -1 or self.bptt_depth >= 0),
             f"bptt_depth must be -1 (full) or an int >= 0, got {self.bptt_depth!r}")
        need(is_int(self.xl_cache) and self.xl_cache >= 0,
             f"xl_cache must be an int >= 0, got {self.xl_cache!r}")
        need(self.xl_positions in XL_POSITIONS,
             f"xl_positions must be one of {XL_POSITIONS}, got {self.xl_positions!r}")
        need(isinstance(self.offload_memory, bool),
             f"offload_memory must be a bool, got {self.offload_memory!r}")
        need(self.segment_alignment in ALIGNMENTS,
             f"segment_alignment must be one of {ALIGNMENTS}, got {self.segment_alignment!r}")
        need(self.loss_over in LOSS_OVER, f"loss_over must be one of {LOSS_OVER}, got {self.loss_over!r}")
        check_memory_noise(self.memory_noise)
        need(self.position_mode in POSITION_MODES,
             f"position_mode must be one of {POSITION_MODES}, got {self.position_mode!r}")
        need(isinstance(self.checkpoint_segments, bool),
             f"checkpoint_segments must be a bool, got {self.checkpoint_segments!r}")
        need(isinstance(self.fuse_activations, bool),
             f"fuse_activations must be a bool, got {self.fuse_activations!r}")
        need(self.kind in KINDS, f"kind must be one of {KINDS}, got {self.kind!r}")
        need(self.memory_update in MEMORY_UPDATES,
             f"memory_update must be one of {MEMORY_UPDATES}, got {self.memory_update!r}")
        need(self.memory_update == "replace" or self.kind != "memory_transformer",
             f"memory_update {self.memory_update!r}: a Memory Transformer has no recurrent memory "
             "to update (use 'replace')")
        need(is_int(self.associative_d_mem) and self.associative_d_mem >= 0,
             f"associative_d_mem must be an int >= 0, got {self.associative_d_mem!r}")
        need(self.associative_d_mem == 0 or self.kind == "encoder",
             f"associative_d_mem={self.associative_d_mem}: the associative memory is for encoder "
             f"RMTs (kind 'encoder', got {self.kind!r}); ARMTForCausalLM is ARMT for decoders")
        self._check_associative_options()
        need(self.variant in VARIANTS, f"variant must be one of {VARIANTS}, got {self.variant!r}")
        for name in ("cls_token_id", "sep_token_id"):
            value = getattr(self, name)
            need(value is None or (isinstance(value, int) and not isinstance(value, bool) and value >= 0),
                 f"{name} must be a token id (int >= 0) or None, got {value!r}")
        if self.kind == "encoder":
            need(self.cls_token_id is not None and self.sep_token_id is not None,
                 "an encoder RMT: cls_token_id and sep_token_id are required (or pass tokenizer=)")
