"""Mechanics shared by the RMT wrappers: the learned memory, attention switch, save/load."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rmt_fast.integrations.fused_activations import fuse_activations, fuse_layer_norms
from rmt_fast.manifest import base_fingerprint, reading, verify_manifest, write_manifest
from rmt_fast.models.config import RMTConfig

WEIGHTS_NAME = "rmt_weights.safetensors"
BASE_DIR = "base"
#: a whole-model state dict file, as ``transformers.Trainer`` writes one for a plain nn.Module
TRAINER_WEIGHTS_NAME = "model.safetensors"
EXTRA_STATE_KEY = "_extra_state"
EXTRA_STATE_FORMAT = "rmt_fast.wrapper/1"


def hidden_size(config) -> int:
    for name in ("hidden_size", "n_embd", "d_model"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    raise ValueError(f"cannot find the hidden size of {type(config).__name__}")


def relative_noise(x: torch.Tensor, std: float) -> torch.Tensor:
    """``x`` ``[..., d]`` plus ``std * rms(x) * N(0, 1)`` per vector (the RMS over the last dim,
    not differentiated); ``x`` itself when ``std == 0``. The memory noise of the wrappers."""
    if std == 0:
        return x
    wide = torch.promote_types(x.dtype, torch.float32)  # at least float32 (bf16 inputs), float64 stays
    rms = x.detach().to(wide).pow(2).mean(-1, keepdim=True).sqrt().to(x.dtype)
    return x + std * rms * torch.randn_like(x)


class MemoryGate(nn.Module):
    """The gated memory update (``RMTConfig.memory_update="gated"``): per memory vector and
    channel ``z = sigmoid(W [written; read] + b)``, next memory ``(1 - z) * written + z * read``,
    so a slot can keep what it held instead of being rewritten every segment.

    ``W`` ``[d, 2d]`` starts at zero and ``b`` at :attr:`INIT_BIAS` (``z`` about 0.05): a new gate
    is close to the plain replacement, so it can be added to a trained model.
    """

    INIT_BIAS = -3.0

    def __init__(self, d: int, dtype: torch.dtype | None = None):
        super().__init__()
        self.proj = nn.Linear(2 * d, d, dtype=dtype)
        with torch.no_grad():
            self.proj.weight.zero_()
            self.proj.bias.fill_(self.INIT_BIAS)

    def keep(self, read: torch.Tensor, written: torch.Tensor) -> torch.Tensor:
        """``z`` ``[B, M, d]``: the share of ``read`` each channel of the next memory keeps."""
        return torch.sigmoid(self.proj(torch.cat([written, read], dim=-1)))

    def forward(self, read: torch.Tensor, written: torch.Tensor) -> torch.Tensor:
        """``read`` (the memory the segment read), ``written`` (its write outputs) ``[B, M, d]``
        -> next memory ``[B, M, d]``."""
        return written + self.keep(read, written) * (read - written)


#: how a causal LM's forward applies ``config.logits_scaling`` after its output embedding, by
#: ``model_type`` of its text config (prefix match): Granite and MiniCPM3 divide, HyperCLOVA X
#: multiplies
LOGITS_SCALING = {"granite": "divide", "minicpm3": "divide", "hyperclovax": "multiply"}


def _text_config(lm):
    cfg = lm.config
    return cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg


def _logits_scaling(lm, cfg) -> str | None:
    """``"divide"``/``"multiply"`` for a model with ``config.logits_scaling`` (``cfg``: its
    text config), else None."""
    if getattr(cfg, "logits_scaling", None) is None:
        return None
    kind = str(getattr(cfg, "model_type", ""))
    for prefix, how in LOGITS_SCALING.items():
        if kind.startswith(prefix):
            return how
    raise TypeError(f"{type(lm).__name__} has config.logits_scaling, which rmt_fast does not know "
                    f"how to apply to its logits (model_type {kind!r}; known: "
                    f"{sorted(LOGITS_SCALING)}); its logits would differ from the model's own")


def check_logits_head(lm) -> None:
    """Refuse a causal LM whose forward changes its logits after the output embedding in a way
    :func:`lm_logits` does not reproduce."""
    cfg = _text_config(lm)
    _logits_scaling(lm, cfg)
    if getattr(cfg, "output_multiplier", None) is not None:
        raise TypeError(f"{type(lm).__name__} has config.output_multiplier, which rmt_fast does "
                        "not apply to its logits; its logits would differ from the model's own")


def lm_logits(lm, hidden: torch.Tensor) -> torch.Tensor:
    """``hidden`` ``[..., d]`` (the backbone's last hidden state) -> logits ``[..., V]`` as the
    causal LM's own forward makes them: its output embedding, then Cohere's ``logit_scale``,
    ``config.logits_scaling`` (:data:`LOGITS_SCALING`) and Gemma's
    ``final_logit_softcapping``, where the model has them."""
    logits = lm.get_output_embeddings()(hidden)
    scale = getattr(lm, "logit_scale", None)
    if isinstance(scale, (int, float)) and not isinstance(scale, bool):
        logits = logits * scale
    cfg = _text_config(lm)
    how = _logits_scaling(lm, cfg)
    if how is not None:
        logits = logits / cfg.logits_scaling if how == "divide" else logits * cfg.logits_scaling
    cap = getattr(cfg, "final_logit_softcapping", None)
    if cap is not None:
        logits = torch.tanh(logits / cap) * cap
    return logits


def max_positions(config) -> int | None:
    """The longest sequence the base model can number (absolute positions), if it has a limit."""
    for name in ("n_positions", "max_position_embeddings"):
        value = getattr(config, name, None)
        if isinstance(value, int):
            return value
    return None


class RMTBase(nn.Module):
    """Base for wrappers holding ``self.base`` (a transformers model) and a learned memory.

    Every wrapper is built as ``Wrapper(base_model, config=RMTConfig(...))`` or with the config's
    fields as keyword arguments (``Wrapper(base_model, num_mem_tokens=16, ...)``), or both (the
    keywords override the config's fields): :meth:`make_config` is the one place that turns them
    into the wrapper's (frozen) :class:`RMTConfig`, starting from the wrapper's own defaults.
    """

    auto_class: ClassVar[str] = "AutoModel"
    #: the ``RMTConfig.kind`` this wrapper implements
    kind: ClassVar[str] = "decoder"
    #: defaults of this kind that differ from the config class's
    config_defaults: ClassVar[dict[str, Any]] = {}
    #: the frozen dataclass holding this wrapper's configuration
    config_class: ClassVar[type] = RMTConfig
    #: config fields that shape parameters or modules: :meth:`replace_config` refuses them
    FIXED_FIELDS: ClassVar[tuple[str, ...]] = ("num_mem_tokens", "kind", "variant", "fuse_activations",
                                               "memory_update", "associative_d_mem",
                                               "associative_decay_gate")

    def __init__(self, base_model: nn.Module, config: RMTConfig | None = None, **kwargs):
        super().__init__()
        config = self.make_config(config, **kwargs)
        if not hasattr(base_model, "get_input_embeddings") or not hasattr(base_model, "config"):
            raise TypeError(f"unsupported base model {type(base_model).__name__}: expected a "
                            "transformers PreTrainedModel with input embeddings")
        self.base = base_model
        self.rmt_config = config
        embeddings = base_model.get_input_embeddings()
        d = hidden_size(base_model.config)
        if embeddings.weight.shape[1] != d:
            raise TypeError(
                f"unsupported base model {type(base_model).__name__}: its input embeddings are "
                f"{embeddings.weight.shape[1]} wide but its hidden states {d} (factorised or "
                "projected embeddings, as in ALBERT or OPT-350m): memory written from hidden "
                "states could not be read back as input embeddings")
        std = embeddings.weight.detach().float().std().item()
        self.memory = nn.Parameter(
            torch.randn(config.num_mem_tokens, d, dtype=embeddings.weight.dtype) * std)
        gated = getattr(config, "memory_update", "replace") == "gated"
        self.memory_gate = MemoryGate(d, embeddings.weight.dtype) if gated else None
        self._use_rmt_fast_attention()
        self.check_config(config)
        if getattr(config, "fuse_activations", True):  # same functions, the extension's kernels
            fuse_activations(self.base)
            fuse_layer_norms(self.base)
        # tied weights (GPT-2's lm_head = wte) appear once in state_dict(), so safetensors and
        # transformers.Trainer (which saves a plain nn.Module's state dict) can write it
        self.register_state_dict_post_hook(_drop_tied_aliases)
        self.register_load_state_dict_pre_hook(_fill_derived_entries)

    # --- self-description in the state dict -------------------------------------------------
    def get_extra_state(self) -> torch.Tensor:
        """``state_dict()["_extra_state"]``: what a bare state dict needs to rebuild this wrapper
        (the wrapper class, its RMTConfig and the base model's config) as UTF-8 JSON bytes,
        ``[n] uint8`` (a tensor, so safetensors can store it). With it, the ``model.safetensors``
        that ``transformers.Trainer`` writes loads back through :meth:`from_pretrained`."""
        base_config = json.loads(self.lm.config.to_json_string(use_diff=False))
        base_config.pop("_name_or_path", None)  # where it was loaded from: not part of the model
        meta = {"format": EXTRA_STATE_FORMAT, "wrapper": type(self).__name__,
                "rmt_config": self.rmt_config.to_dict(), "base_config": base_config}
        return torch.frombuffer(bytearray(json.dumps(meta).encode()), dtype=torch.uint8)

    def set_extra_state(self, state) -> None:
        """The live configuration stays as it is: the metadata only describes a saved state."""

    @staticmethod
    def read_extra_state(state: torch.Tensor) -> dict:
        """The metadata of :meth:`get_extra_state` from its tensor."""
        meta = json.loads(bytes(state.to(torch.uint8).tolist()).decode())
        if meta.get("format") != EXTRA_STATE_FORMAT:
            raise ValueError(f"unknown rmt_fast state format {meta.get('format')!r}")
        return meta

    @property
    def lm(self) -> nn.Module:
        """The transformers model inside ``self.base`` (unwrapped from a peft ``PeftModel``)."""
        get = getattr(self.base, "get_base_model", None)
        return get() if callable(get) else self.base

    @property
    def backbone(self) -> nn.Module:
        """The base model's transformer stack (``GPT2Model``, ``LlamaModel``, ``BertModel``, ...):
        what runs ``inputs_embeds`` to hidden states, found through transformers' own
        ``base_model`` accessor of the unwrapped model."""
        return self.lm.base_model

    @classmethod
    def make_config(cls, config: RMTConfig | None = None, **kwargs) -> RMTConfig:
        """``config`` (or this wrapper's defaults) with ``kwargs`` applied, validated."""
        fields = {f.name for f in dataclasses.fields(cls.config_class)}
        unknown = sorted(set(kwargs) - fields)
        if unknown:
            raise TypeError(f"{cls.__name__}: unexpected argument(s) {unknown}; the configuration "
                            f"fields are {sorted(fields - {'kind'})}")
        if config is None:
            config = cls.config_class(**{**cls.config_defaults, "kind": cls.kind, **kwargs})
        elif not isinstance(config, cls.config_class):
            raise TypeError(f"config must be an {cls.config_class.__name__}, got {type(config).__name__}")
        elif kwargs:
            config = dataclasses.replace(config, **kwargs)
        if config.kind != cls.kind:
            raise ValueError(f"{cls.__name__} needs an {cls.config_class.__name__} of kind {cls.kind!r}, got "
                             f"{config.kind!r}")
        return config

    def fixed_fields(self) -> tuple[str, ...]:
        """:attr:`FIXED_FIELDS`, and the state decay that initialised a learnt one and its
        ceiling (its gate on)."""
        cfg = self.rmt_config
        learnt = tuple(f"{prefix}{name}" for prefix in ("", "associative_")
                       if getattr(cfg, f"{prefix}decay_gate", False)
                       for name in ("state_decay", "decay_max"))
        return self.FIXED_FIELDS + learnt

    def replace_config(self, **changes) -> RMTConfig:
        """Swap in a copy of the config with ``changes`` (e.g. ``bptt_depth=2``) for settings
        that only affect how segments run, not the parameters; returns the new config."""
        fixed = set(self.fixed_fields()) & set(changes)
        if fixed:
            raise ValueError(f"{sorted(fixed)} cannot change after construction (they shape the "
                             "parameters or modules); build a new wrapper instead")
        config = self.make_config(self.rmt_config, **changes)
        self.check_config(config)
        self.rmt_config = config
        return config

    # --- attention backend ----------------------------------------------------------------
    def _use_rmt_fast_attention(self) -> None:
        import rmt_fast  # noqa: F401  registers the backend

        try:
            self.base.set_attn_implementation("rmt_fast")
        except (ValueError, AttributeError) as exc:
            raise TypeError(f"unsupported base model {type(self.base).__name__}: it does not "
                            f"support attn_implementation='rmt_fast' ({exc})") from exc
        if self.base.config._attn_implementation != "rmt_fast":
            raise TypeError(f"unsupported base model {type(self.base).__name__}: it ignores "
                            "attn_implementation (no AttentionInterface support)")

    def check_config(self, config: RMTConfig) -> None:
        """Raise if ``config`` does not fit the base model (at construction and in
        :meth:`replace_config`, before anything changes)."""
        self.check_positions(self.positions_needed(config))

    def positions_needed(self, config: RMTConfig | None = None) -> int:
        """Positions one segment occupies in the base model (0: not known before a forward)."""
        return 0

    def check_positions(self, length: int) -> None:
        limit = max_positions(self.base.config)
        if limit is not None and length > limit:
            cfg = self.rmt_config
            raise ValueError(f"segment of {length} positions (num_mem_tokens={cfg.num_mem_tokens}, "
                             f"segment_size={cfg.segment_size}) exceeds the base model's "
                             f"{limit} positions; lower segment_size or num_mem_tokens")

    def compile_base(self, **compile_kwargs) -> RMTBase:
        """Opt-in ``torch.compile`` of the base model's backbone, in place (state-dict keys stay).

        Measured on the CPU this project runs on it was not faster (bench/README.md).
        """
        self.backbone.compile(**compile_kwargs)
        return self

    def perturb_memory(self, memory: torch.Tensor) -> torch.Tensor:
        """The memory a segment reads: ``memory`` ``[B, M, d]`` plus, in training mode,
        ``memory_noise * rms(memory) * N(0, 1)`` per vector (see :class:`RMTConfig`)."""
        return relative_noise(memory, self.rmt_config.memory_noise if self.training else 0.0)

    def update_memory(self, read: torch.Tensor, written: torch.Tensor) -> torch.Tensor:
        """The next memory ``[B, M, d]`` from the memory a segment read and its write outputs
        (``RMTConfig.memory_update``): ``written`` itself, or :class:`MemoryGate`'s mix."""
        return written if self.memory_gate is None else self.memory_gate(read, written)

    def expand_memory(self, batch: int) -> torch.Tensor:
        """The learned memory as a batch: ``[B, M, d]``."""
        return self.memory.unsqueeze(0).expand(batch, -1, -1)

    @property
    def device(self) -> torch.device:
        return self.memory.device

    # --- persistence -----------------------------------------------------------------------
    def is_rmt_key(self, key: str) -> bool:
        """Whether a state-dict key belongs to the wrapper (saved in ``rmt_weights``) rather than
        to the base model's own weights."""
        return not key.startswith("base.")

    def base_key(self, key: str) -> str:
        """The base model's own name for one of its state-dict keys (``base.`` removed)."""
        return key.removeprefix("base.")

    def rmt_state_dict(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Parameters and buffers that are not the base model's (of ``state``, default: this
        module's ``state_dict()``)."""
        state = self.state_dict() if state is None else state
        return {k: v.detach().contiguous() for k, v in state.items() if self.is_rmt_key(k)}

    def base_state_dict(self, state: dict[str, torch.Tensor] | None = None
                        ) -> dict[str, torch.Tensor] | None:
        """The base model's weights under its own key names, or None when that is simply the
        base model's ``state_dict()`` (then transformers takes it from the model itself)."""
        renamed = any(self.base_key(k) != k.removeprefix("base.") for k in self.state_dict())
        if state is None and not renamed:
            return None
        state = self.state_dict() if state is None else state
        return {self.base_key(k): v for k, v in state.items()
                if k.startswith("base.") and not self.is_rmt_key(k)}

    def save_pretrained(self, directory: str | os.PathLike,
                        state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """``directory/base`` (the base model), ``rmt_config.json`` and ``rmt_weights.safetensors``.

        ``state_dict``: the whole model's tensors to write instead of this module's own (e.g.
        gathered from FSDP shards by :func:`rmt_fast.distributed.full_state_dicts`). A base
        model wrapped by ``peft`` writes only its adapter (and peft's ``modules_to_save``) to
        ``directory/base``: the saved part is small, and :meth:`from_pretrained` puts it back on
        top of the base weights."""
        os.makedirs(directory, exist_ok=True)
        base_dir = os.path.join(directory, BASE_DIR)
        base_state = None
        if self.is_peft:
            self.base.save_pretrained(base_dir, safe_serialization=True)
        else:
            base_state = self.base_state_dict(state_dict)
            self.base.save_pretrained(base_dir, safe_serialization=True, state_dict=base_state)
        self.rmt_config.save(directory)
        save_file(self.rmt_state_dict(state_dict), os.path.join(directory, WEIGHTS_NAME))
        # manifest (rmt_fast/manifest.py): sizes and SHA-256 of the files above, config, fingerprint
        write_manifest(directory, self.rmt_config.to_dict(),
                       base_fingerprint(self.base.state_dict() if base_state is None else base_state,
                                        self.base.config),
                       [BASE_DIR, self.config_class.FILE_NAME, WEIGHTS_NAME])

    @property
    def is_peft(self) -> bool:
        """Whether the base model is wrapped by ``peft`` (e.g. LoRA)."""
        return hasattr(self.base, "peft_config") and callable(getattr(self.base, "get_base_model", None))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, *, base_model: nn.Module | str | None = None,
                        is_trainable: bool = False, verify: bool = True, **base_kwargs):
        """Inverse of :meth:`save_pretrained` (``base_kwargs`` go to the base model's loader).
        Like transformers' ``from_pretrained``, the model comes back in eval mode.

        A directory whose ``base`` holds a peft adapter needs the model it was trained on:
        ``base_model`` (a model or its path; default: the adapter's ``base_model_name_or_path``);
        ``is_trainable=True`` keeps the adapter trainable. A ``transformers.Trainer`` checkpoint
        (one ``model.safetensors``) loads too.

        ``verify``: check every file against the checkpoint's manifest first (sizes, SHA-256,
        config; a ValueError naming the file on a mismatch; a warning when there is no manifest).
        """
        import transformers

        if not os.path.isfile(os.path.join(directory, cls.config_class.FILE_NAME)) and \
                os.path.isfile(os.path.join(directory, TRAINER_WEIGHTS_NAME)):
            return cls._from_state_dict_file(os.path.join(directory, TRAINER_WEIGHTS_NAME), **base_kwargs)
        config = RMTConfig.load(directory)
        if verify:  # rmt_fast/manifest.py
            verify_manifest(directory, config.to_dict())
        auto = getattr(transformers, cls.auto_class)
        base_dir = os.path.join(directory, BASE_DIR)
        if os.path.isfile(os.path.join(base_dir, "adapter_config.json")):
            from peft import PeftConfig, PeftModel

            if base_model is None:
                base_model = PeftConfig.from_pretrained(base_dir).base_model_name_or_path
                if not base_model or not os.path.exists(base_model):
                    raise ValueError(f"{base_dir} holds a peft adapter trained on {base_model!r}; pass "
                                     "base_model= (that model, or its path)")
            if isinstance(base_model, (str, os.PathLike)):
                base_model = auto.from_pretrained(base_model, **base_kwargs)
            with reading(base_dir, "the peft adapter"):
                base = PeftModel.from_pretrained(base_model, base_dir, is_trainable=is_trainable)
        elif base_model is not None:
            raise ValueError(f"base_model= is for checkpoints with a peft adapter; {base_dir} holds "
                             "a whole base model")
        else:
            with reading(base_dir, "the base model"):
                base = auto.from_pretrained(base_dir, **base_kwargs)
        model = cls(base, config=config)
        with reading(os.path.join(directory, WEIGHTS_NAME), "the RMT weights"):
            state = load_file(os.path.join(directory, WEIGHTS_NAME))
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if model.is_rmt_key(k)]
        if missing or unexpected:
            raise ValueError(f"checkpoint mismatch: missing {missing}, unexpected {unexpected}")
        return model.eval()

    @classmethod
    def _from_state_dict_file(cls, path: str, **base_kwargs):
        """A wrapper rebuilt from one whole-model safetensors file (e.g. ``transformers.Trainer``'s
        ``model.safetensors``) through its ``_extra_state`` metadata; the base model is built
        from its saved config (``base_kwargs`` go to ``from_config``), then every weight loads."""
        import transformers

        with reading(path, "the model weights"):
            state = load_file(path)
        if EXTRA_STATE_KEY not in state:
            raise ValueError(f"{path} has no {EXTRA_STATE_KEY!r} entry: not a state dict of an "
                             "rmt_fast wrapper (or written before rmt_fast 0.2)")
        meta = cls.read_extra_state(state[EXTRA_STATE_KEY])
        if meta["wrapper"] != cls.__name__:
            raise ValueError(f"{path} holds a {meta['wrapper']}, not a {cls.__name__} (use "
                             "rmt_fast.AutoRMT.from_pretrained to load whatever it holds)")
        base_config = dict(meta["base_config"])
        base_config = transformers.AutoConfig.for_model(base_config.pop("model_type"), **base_config)
        base = getattr(transformers, cls.auto_class).from_config(base_config, **base_kwargs)
        model = cls(base, config=RMTConfig(**meta["rmt_config"]))
        model.load_state_dict(state, strict=True)
        return model.eval()


def _tied_aliases(module: nn.Module) -> dict[str, str]:
    """``{alias: first name}`` for parameters/buffers registered under several names (tied
    weights), the first name in registration order being the one kept."""
    first: dict[int, str] = {}
    aliases = {}
    named = [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)]
    for name, tensor in named:
        if id(tensor) in first:
            aliases[name] = first[id(tensor)]
        else:
            first[id(tensor)] = name
    return aliases


def _drop_tied_aliases(module, state_dict, prefix, local_metadata) -> None:
    for alias in _tied_aliases(module):
        state_dict.pop(prefix + alias, None)


def _fill_derived_entries(module, state_dict, prefix, local_metadata, strict, missing_keys,
                          unexpected_keys, error_msgs) -> None:
    """Before a load: the tied aliases from their source, and the metadata entry (it describes
    a saved state; a state dict without it, e.g. from before 0.2, loads as well)."""
    state_dict.setdefault(prefix + EXTRA_STATE_KEY, module.get_extra_state())
    for alias, source in _tied_aliases(module).items():
        if prefix + alias not in state_dict and prefix + source in state_dict:
            state_dict[prefix + alias] = state_dict[prefix + source]
