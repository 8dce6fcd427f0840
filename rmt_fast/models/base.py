"""Mechanics shared by the RMT wrappers: the learned memory, attention switch, save/load."""

from __future__ import annotations

import inspect
import os
from typing import ClassVar

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
    """Base for wrappers holding ``self.base`` (a transformers model) and a learned memory."""

    auto_class: ClassVar[str] = "AutoModel"

    def __init__(self, base_model: nn.Module, config: RMTConfig):
        super().__init__()
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
        fuse_activations(self.base)  # same function, one fused kernel (GPT-2's gelu_new)

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
    def rmt_state_dict(self, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
        """Parameters and buffers that are not the base model's (of ``state``, default: this
        module's ``state_dict()``)."""
        state = self.state_dict() if state is None else state
        return {k: v.detach().contiguous() for k, v in state.items() if not k.startswith("base.")}

    def save_pretrained(self, directory: str | os.PathLike,
                        state_dict: dict[str, torch.Tensor] | None = None) -> None:
        """``directory/base`` (the base model), ``rmt_config.json`` and ``rmt_weights.safetensors``.

        ``state_dict``: the whole model's tensors to write instead of this module's own (e.g.
        gathered from FSDP shards by :func:`rmt_fast.distributed.full_state_dicts`)."""
        os.makedirs(directory, exist_ok=True)
        base_state = None
        if state_dict is not None:
            base_state = {k.removeprefix("base."): v for k, v in state_dict.items() if k.startswith("base.")}
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
        accepted = inspect.signature(cls.__init__).parameters
        model = cls(base, **{k: v for k, v in config.to_dict().items() if k in accepted})
        with reading(os.path.join(directory, WEIGHTS_NAME), "the RMT weights"):
            state = load_file(os.path.join(directory, WEIGHTS_NAME))
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("base.")]
        if missing or unexpected:
            raise ValueError(f"checkpoint mismatch: missing {missing}, unexpected {unexpected}")
        return model.eval()
