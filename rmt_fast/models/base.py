"""Mechanics shared by the RMT wrappers: the learned memory, attention switch, save/load."""

from __future__ import annotations

import dataclasses
import os
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from rmt_fast.integrations.fused_activations import fuse_activations
from rmt_fast.manifest import base_fingerprint, reading, verify_manifest, write_manifest
from rmt_fast.models.config import CONFIG_NAME, RMTConfig

WEIGHTS_NAME = "rmt_weights.safetensors"
BASE_DIR = "base"


def hidden_size(config) -> int:
    for name in ("hidden_size", "n_embd", "d_model"):
        if isinstance(getattr(config, name, None), int):
            return getattr(config, name)
    raise ValueError(f"cannot find the hidden size of {type(config).__name__}")


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
    #: defaults of this kind that differ from RMTConfig's
    config_defaults: ClassVar[dict[str, Any]] = {}

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
        std = embeddings.weight.detach().float().std().item()
        self.memory = nn.Parameter(
            torch.randn(config.num_mem_tokens, d, dtype=embeddings.weight.dtype) * std)
        self._use_rmt_fast_attention()
        self.check_positions(self.positions_needed())
        if config.fuse_activations:  # same function, one fused kernel (GPT-2's gelu_new)
            fuse_activations(self.base)

    @classmethod
    def make_config(cls, config: RMTConfig | None = None, **kwargs) -> RMTConfig:
        """``config`` (or this wrapper's defaults) with ``kwargs`` applied, validated."""
        fields = {f.name for f in dataclasses.fields(RMTConfig)}
        unknown = sorted(set(kwargs) - fields)
        if unknown:
            raise TypeError(f"{cls.__name__}: unexpected argument(s) {unknown}; the configuration "
                            f"fields are {sorted(fields - {'kind'})}")
        if config is None:
            config = RMTConfig(**{**cls.config_defaults, "kind": cls.kind, **kwargs})
        elif not isinstance(config, RMTConfig):
            raise TypeError(f"config must be an RMTConfig, got {type(config).__name__}")
        elif kwargs:
            config = dataclasses.replace(config, **kwargs)
        if config.kind != cls.kind:
            raise ValueError(f"{cls.__name__} needs an RMTConfig of kind {cls.kind!r}, got "
                             f"{config.kind!r}")
        return config

    def replace_config(self, **changes) -> RMTConfig:
        """Swap in a copy of the config with ``changes`` (e.g. ``bptt_depth=2``) for settings
        that only affect how segments run, not the parameters; returns the new config."""
        fixed = {"num_mem_tokens", "kind", "variant", "fuse_activations"} & set(changes)
        if fixed:
            raise ValueError(f"{sorted(fixed)} cannot change after construction (they shape the "
                             "parameters or modules); build a new wrapper instead")
        config = self.make_config(self.rmt_config, **changes)
        self.check_positions(self.positions_needed(config))
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
        self.base.base_model.compile(**compile_kwargs)
        return self

    def perturb_memory(self, memory: torch.Tensor) -> torch.Tensor:
        """The memory a segment reads: ``memory`` ``[B, M, d]`` plus, in training mode,
        ``memory_noise * rms(memory) * N(0, 1)`` per vector (see :class:`RMTConfig`)."""
        std = self.rmt_config.memory_noise
        if not self.training or std == 0:
            return memory
        rms = memory.detach().float().pow(2).mean(-1, keepdim=True).sqrt().to(memory.dtype)
        return memory + std * rms * torch.randn_like(memory)

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
        gathered from FSDP shards by :func:`rmt_fast.distributed.full_state_dicts`)."""
        os.makedirs(directory, exist_ok=True)
        base_state = self.base_state_dict(state_dict)
        self.base.save_pretrained(os.path.join(directory, BASE_DIR), safe_serialization=True,
                                  state_dict=base_state)
        self.rmt_config.save(directory)
        save_file(self.rmt_state_dict(state_dict), os.path.join(directory, WEIGHTS_NAME))
        # manifest (rmt_fast/manifest.py): sizes and SHA-256 of the files above, config, fingerprint
        write_manifest(directory, self.rmt_config.to_dict(),
                       base_fingerprint(self.base.state_dict() if base_state is None else base_state,
                                        self.base.config), [BASE_DIR, CONFIG_NAME, WEIGHTS_NAME])

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, verify: bool = True, **base_kwargs):
        """Inverse of :meth:`save_pretrained` (``base_kwargs`` go to the base model's loader).
        Like transformers' ``from_pretrained``, the model comes back in eval mode.

        ``verify``: check every file against the checkpoint's manifest first (sizes, SHA-256,
        config; a ValueError naming the file on a mismatch; a warning when there is no manifest).
        """
        import transformers

        config = RMTConfig.load(directory)
        if verify:  # rmt_fast/manifest.py
            verify_manifest(directory, config.to_dict())
        auto = getattr(transformers, cls.auto_class)
        with reading(os.path.join(directory, BASE_DIR), "the base model"):
            base = auto.from_pretrained(os.path.join(directory, BASE_DIR), **base_kwargs)
        model = cls(base, config=config)
        with reading(os.path.join(directory, WEIGHTS_NAME), "the RMT weights"):
            state = load_file(os.path.join(directory, WEIGHTS_NAME))
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if model.is_rmt_key(k)]
        if missing or unexpected:
            raise ValueError(f"checkpoint mismatch: missing {missing}, unexpected {unexpected}")
        return model.eval()
