"""Memory Transformer (Burtsev et al. 2020) on one segment: MemTransformer, MemCtrl, MemBottleneck.

* ``MemTransformer``: M memory tokens prepended; processed like any other token.
* ``MemCtrl``: as MemTransformer, but memory rows are computed by a dedicated copy of every layer
  (the memory controller) while input rows use the original layer; both attend to everything.
* ``MemBottleneck``: per layer, first memory is updated attending to memory and input, then input
  is updated attending to the *updated* memory only: all input-to-input flow goes through memory.

The variants that change layers wrap each block of the base model's layer list, so they work for
any transformers model whose blocks take the hidden states as first argument.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass

import torch
from torch import nn
from transformers.utils import ModelOutput

from rmt_fast.integrations.transformers import MemoryLayout, current_layout, memory_layout
from rmt_fast.models.base import RMTBase, lm_logits
from rmt_fast.models.config import VARIANTS, RMTConfig
from rmt_fast.models.segment_loop import Segment, SegmentState, run_segments
from rmt_fast.validation import check_memory_transformer_call


@dataclass
class MemoryTransformerOutput(ModelOutput):
    """``hidden``: last hidden state at the input positions ``[B, T, d]``; ``memory``
    ``[B, M, d]``; ``logits`` ``[B, T, V]`` when the base model has an output embedding. A
    transformers ``ModelOutput``."""

    hidden: torch.Tensor | None = None
    memory: torch.Tensor | None = None
    logits: torch.Tensor | None = None


def find_layers(model: nn.Module) -> nn.ModuleList:
    """The base model's list of transformer blocks (the ModuleList with num_hidden_layers items)."""
    n = getattr(model.config, "num_hidden_layers", None) or getattr(model.config, "n_layer", None)
    for module in model.modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise TypeError(f"cannot find the list of {n} transformer blocks in {type(model).__name__}")


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def _replace_first(out, hidden):
    return (hidden, *out[1:]) if isinstance(out, tuple) else hidden


class MemCtrlLayer(nn.Module):
    """Memory rows from ``ctrl`` (a copy of ``layer``), input rows from ``layer``."""

    def __init__(self, layer: nn.Module, num_mem_tokens: int):
        super().__init__()
        self.layer, self.ctrl, self.m = layer, copy.deepcopy(layer), num_mem_tokens

    def forward(self, hidden_states, *args, **kwargs):
        main = self.layer(hidden_states, *args, **kwargs)
        ctrl = _first(self.ctrl(hidden_states, *args, **kwargs))
        h = _first(main)
        return _replace_first(main, torch.cat([ctrl[:, : self.m], h[:, self.m:]], dim=1))


class MemBottleneckLayer(nn.Module):
    """Two passes of one block: memory over everything, then input over the updated memory."""

    def __init__(self, layer: nn.Module, num_mem_tokens: int):
        super().__init__()
        self.layer, self.m = layer, num_mem_tokens

    def forward(self, hidden_states, *args, **kwargs):
        outer = current_layout() or MemoryLayout(num_read=self.m)
        with memory_layout(dataclasses.replace(outer, mask="full")):
            first = self.layer(hidden_states, *args, **kwargs)
        memory = _first(first)[:, : self.m]
        updated = torch.cat([memory, hidden_states[:, self.m:]], dim=1)
        with memory_layout(dataclasses.replace(outer, mask="bottleneck")):
            second = self.layer(updated, *args, **kwargs)
        return _replace_first(second, torch.cat([memory, _first(second)[:, self.m:]], dim=1))


class MemoryTransformer(RMTBase):
    """One-segment memory transformer around a transformers model (encoder or decoder).

    Args:
        base_model: a transformers model (``*Model``, ``*ForCausalLM``, ...).
        config: an :class:`rmt_fast.RMTConfig` of ``kind="memory_transformer"``, or its fields as
            keyword arguments: ``num_mem_tokens`` (M memory tokens prepended to the input, default
            10), ``variant`` (``"mem"`` MemTransformer, ``"ctrl"`` MemCtrl or ``"bottleneck"``),
            ``mask`` (over ``[memory | input]`` for ``mem``/``ctrl``: ``"full"`` for encoders; for
            decoders ``"rmt"`` (memory bidirectional, input causal) or ``"causal"``;
            ``bottleneck`` always uses the ``"bottleneck"`` mask), ``checkpoint_segments``
            (activation checkpointing of the one-segment forward through the segment loop: only
            the inputs are kept, the forward is recomputed in backward), ``offload_memory``.
    """

    kind = "memory_transformer"
    config_defaults = dict(num_mem_tokens=10, segment_size=1, mask="full")

    def __init__(self, base_model: nn.Module, config: RMTConfig | None = None, **kwargs):
        variant = kwargs.get("variant", config.variant if config is not None else "mem")
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if variant == "bottleneck":
            kwargs["mask"] = "bottleneck"
        super().__init__(base_model, config, **kwargs)
        self._wrapped = None  # matches the wrapped blocks' keys: "base.<blocks>.<i>.layer."
        if self.rmt_config.variant != "mem":
            layers = find_layers(base_model)
            prefix = next(name for name, module in base_model.named_modules() if module is layers)
            self._wrapped = re.compile(rf"^({re.escape(prefix)}\.\d+\.)layer\.")
            wrap = MemCtrlLayer if self.rmt_config.variant == "ctrl" else MemBottleneckLayer
            for i, layer in enumerate(layers):
                layers[i] = wrap(layer, self.rmt_config.num_mem_tokens)

    @property
    def variant(self) -> str:
        return self.rmt_config.variant

    # ctrl/bottleneck wrap each block (``layers.i`` -> ``layers.i.layer``); the memory controller
    # copies (``layers.i.ctrl``) are the wrapper's own weights, the rest keep the base's names
    def is_rmt_key(self, key: str) -> bool:
        return super().is_rmt_key(key) or ".ctrl." in key

    def base_key(self, key: str) -> str:
        key = super().base_key(key)
        return key if self._wrapped is None else self._wrapped.sub(r"\1", key)

    def forward(self, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> MemoryTransformerOutput:
        """``input_ids``/``attention_mask`` ``[B, T]``; memory is prepended. One segment through
        the segment loop (a row whose input is all padding keeps the initial memory)."""
        check_memory_transformer_call(self, input_ids, attention_mask=attention_mask)
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T], got {list(input_ids.shape)}")
        cfg = self.rmt_config
        self.check_positions(cfg.num_mem_tokens + input_ids.shape[1])
        mask = None if attention_mask is None else attention_mask.to(torch.bool)
        segment = Segment(0, input_ids.shape[1], input_ids, mask)
        res = run_segments(self._step, SegmentState(self.expand_memory(input_ids.shape[0])), [segment],
                           checkpoint=cfg.checkpoint_segments, offload=cfg.offload_memory)
        logits = res.outputs.get("logits", [None])[0]
        return MemoryTransformerOutput(res.outputs["hidden"][0], res.state.memory, logits)

    def _step(self, state: SegmentState, seg: Segment, t: int):
        """``[memory | input]`` through the base model: new memory ``[B, M, d]``, hidden
        ``[B, T, d]`` and logits ``[B, T, V]`` (when the base model has an output embedding)."""
        m, batch = self.rmt_config.num_mem_tokens, seg.ids.shape[0]
        x = torch.cat([state.memory, self.base.get_input_embeddings()(seg.ids)], 1)
        kpm = None
        if seg.mask is not None:
            ones = torch.ones(batch, m, dtype=torch.bool, device=seg.ids.device)
            kpm = torch.cat([ones, seg.mask], dim=1)
        layout = MemoryLayout(num_read=m, mask=self.rmt_config.mask, key_padding_mask=kpm)
        with memory_layout(layout):
            hidden = self.backbone(inputs_embeds=x).last_hidden_state
        head = getattr(self.base, "get_output_embeddings", lambda: None)()
        out = {"hidden": hidden[:, m:],
               "logits": lm_logits(self.base, hidden[:, m:]) if head is not None else None}
        return SegmentState(hidden[:, :m]), out
