"""Decoder RMT: ``[read memory | segment | write memory]`` around any transformers causal LM."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from rmt_fast._extension import assemble_mask, assemble_segment, extract_memory
from rmt_fast.checkpoint import is_cut, segment_bptt
from rmt_fast.integrations.transformers import MemoryLayout, memory_layout
from rmt_fast.models.base import RMTBase
from rmt_fast.models.config import RMTConfig
from rmt_fast.models.modes import evaluating
from rmt_fast.models.segmenting import segment_bounds
from rmt_fast.validation import check_causal_lm_call

XLState = dict[int, tuple[torch.Tensor, torch.Tensor]]  # layer -> (k, v) [B, Hkv, P, D]


@dataclass
class RMTOutput(ModelOutput):
    """``loss``: scalar or None; ``logits``: ``[B, T, V]`` for every input position (None when
    ``return_logits=False``); ``memory``: the final memory state ``[B, M, d]``;
    ``xl``: the final Transformer-XL cache (``xl_cache > 0``). A transformers ``ModelOutput``:
    attribute, key (``out["loss"]``) and tuple (``out[0]``, the first field that is not None)
    access."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    memory: torch.Tensor | None = None
    xl: RecurrentState | None = None


@dataclass
class RecurrentState:
    """What carries over between segments besides memory: the XL cache and its padding."""

    kv: XLState
    padding: torch.Tensor  # [B, P] bool, True = real token

    def detach(self) -> RecurrentState:
        return RecurrentState({i: (k.detach(), v.detach()) for i, (k, v) in self.kv.items()},
                              self.padding)


@dataclass
class _Segment:
    """One segment of the batch: ``ids`` ``[B, S]``, ``mask`` ``[B, S]`` bool or None, and the
    next-token targets of its positions ``targets`` ``[B, S]`` (-100 = no loss)."""

    start: int
    end: int
    ids: torch.Tensor
    mask: torch.Tensor | None
    targets: torch.Tensor | None


class RMTForCausalLM(RMTBase):
    """Recurrent Memory Transformer around a causal LM (GPT-2, GPT-NeoX, Llama, Qwen, ...).

    Each segment runs as ``[read memory (M) | segment (<= S) | write memory (M)]``; the base
    model's last hidden state at the write positions is the next segment's read memory. With
    ``num_mem_tokens=0`` it is the base model run segment by segment (no recurrence).

    Args:
        base_model: a transformers ``*ForCausalLM`` (its attention switches to ``rmt_fast``).
        config: an :class:`rmt_fast.RMTConfig` (``kind="decoder"``); its fields may also be given
            (or overridden) as keyword arguments: ``num_mem_tokens``, ``segment_size``, ``mask``,
            ``bptt_depth``, ``xl_cache``, ``checkpoint_segments``, ...
    """

    auto_class = "AutoModelForCausalLM"
    kind = "decoder"

    def __init__(self, base_model: nn.Module, config: RMTConfig | None = None, **kwargs):
        if not hasattr(base_model, "get_output_embeddings") or base_model.get_output_embeddings() is None:
            raise TypeError(f"unsupported base model {type(base_model).__name__}: RMTForCausalLM "
                            "needs a causal LM with an output embedding (lm_head)")
        super().__init__(base_model, config, **kwargs)

    def positions_needed(self, config: RMTConfig | None = None) -> int:
        cfg = config or self.rmt_config
        return 2 * cfg.num_mem_tokens + cfg.segment_size

    # --- one segment -------------------------------------------------------------------------
    def _position_ids(self, seg_mask: torch.Tensor | None, seg_len: int, write: bool, device):
        """``None`` (the base model's own 0..L-1) unless padding or ``position_mode="mirror"``.

        With padding, positions count real tokens only, so a padded row is numbered as it would
        be alone (as transformers' generate does for left padding).
        """
        m = self.rmt_config.num_mem_tokens
        mirror = self.rmt_config.position_mode == "mirror"
        if seg_mask is None and not mirror:
            return None
        if seg_mask is None:
            seg_mask = torch.ones(1, seg_len, dtype=torch.bool, device=device)
        ones = torch.ones(seg_mask.shape[0], m, dtype=torch.long, device=device)
        real = torch.cat([ones, seg_mask.long()] + ([ones] if write else []), dim=1)
        pos = (real.cumsum(dim=1) - 1).clamp(min=0)
        if mirror and write:
            pos[:, m + seg_len:] = torch.arange(m, device=device)
        return pos

    def segment_forward(self, memory: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None,
                        xl: RecurrentState | None = None, *, write: bool = True,
                        need_hidden: bool = True):
        """Run one segment. ``memory`` ``[B, M, d]``, ``ids`` ``[B, S]``, ``mask`` ``[B, S]`` bool.

        Returns ``(hidden [B, S, d] at the segment positions, new memory [B, M, d],
        new XL state or None)``. Rows whose segment is all padding keep their memory.
        ``need_hidden=False`` (reading a context) returns ``None`` for ``hidden``.
        """
        cfg = self.rmt_config
        m, seg_len = cfg.num_mem_tokens, ids.shape[1]
        embeds = self.base.get_input_embeddings()(ids)
        num_write = m if write else 0
        # one pass into the [read | segment | write] buffer (the extension's op when built)
        read = self.perturb_memory(memory)
        x = assemble_segment(read, embeds, read if write else read[:, :0])
        kpm = None
        if mask is not None or xl is not None:
            seg_mask = mask if mask is not None else torch.ones_like(ids, dtype=torch.bool)
            kpm = assemble_mask(seg_mask, m, num_write)
            if xl is not None:
                kpm = torch.cat([xl.padding, kpm], dim=1)
        record: XLState | None = {} if cfg.xl_cache > 0 else None
        layout = MemoryLayout(num_read=m, num_write=num_write, mask=cfg.mask, key_padding_mask=kpm,
                              past=None if xl is None else xl.kv, record_kv=record)
        position_ids = self._position_ids(mask, seg_len, write, ids.device)
        with memory_layout(layout):
            hidden = self.backbone(inputs_embeds=x, position_ids=position_ids,
                                          use_cache=False).last_hidden_state
        new_memory = extract_memory(hidden, m + seg_len, m) if write else memory
        hidden = hidden[:, m: m + seg_len] if need_hidden else None
        if mask is not None:
            has_tokens = mask.any(dim=1)[:, None, None]
            new_memory = torch.where(has_tokens, new_memory, memory)
        new_xl = self._next_xl(xl, record, mask, m, seg_len) if record is not None else None
        return hidden, new_memory, new_xl

    def _next_xl(self, xl, record, mask, m, seg_len) -> RecurrentState:
        """Last ``xl_cache`` segment tokens' keys/values (detached), appended to the old cache."""
        keep = self.rmt_config.xl_cache
        batch = mask.shape[0] if mask is not None else next(iter(record.values()))[0].shape[0]
        device = next(iter(record.values()))[0].device
        seg_mask = mask if mask is not None else torch.ones(batch, seg_len, dtype=torch.bool,
                                                              device=device)
        kv = {}
        for layer, (k, v) in record.items():
            k, v = k[:, :, m: m + seg_len].detach(), v[:, :, m: m + seg_len].detach()
            if xl is not None:
                k, v = torch.cat([xl.kv[layer][0], k], 2), torch.cat([xl.kv[layer][1], v], 2)
            kv[layer] = (k[:, :, -keep:], v[:, :, -keep:])
        padding = seg_mask if xl is None else torch.cat([xl.padding, seg_mask], 1)
        new = RecurrentState(kv, padding[:, -keep:])
        if mask is not None and xl is not None and xl.padding.shape[1] == new.padding.shape[1]:
            # rows with an empty segment keep their old cache
            has = mask.any(dim=1)
            new.kv = {i: (torch.where(has[:, None, None, None], k, xl.kv[i][0]),
                          torch.where(has[:, None, None, None], v, xl.kv[i][1]))
                      for i, (k, v) in new.kv.items()}
            new.padding = torch.where(has[:, None], new.padding, xl.padding)
        return new

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[B, S, d]`` -> ``[B, S, V]`` with the base model's output embedding."""
        return self.lm.get_output_embeddings()(hidden)

    # --- whole sequences ---------------------------------------------------------------------
    def _segments(self, input_ids, attention_mask, labels, labels_mask) -> list[_Segment]:
        total = input_ids.shape[1]
        targets = None
        if labels is not None:
            # official semantics: position p predicts labels[p + 1]; labels_mask[p] selects p
            targets = torch.full_like(labels, -100)
            targets[:, :-1] = labels[:, 1:]
            if labels_mask is not None:
                targets = targets.masked_fill(~labels_mask.to(torch.bool), -100)
        bounds = segment_bounds(total, self.rmt_config.segment_size, self.rmt_config.segment_alignment)
        if labels is not None and self.rmt_config.loss_over == "last":
            targets[:, : bounds[-1][0]] = -100
        mask = None if attention_mask is None else attention_mask.to(torch.bool)
        return [_Segment(s, e, input_ids[:, s:e], None if mask is None else mask[:, s:e],
                         None if targets is None else targets[:, s:e]) for s, e in bounds]

    def _check_inputs(self, input_ids, attention_mask, labels, labels_mask, memory):
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2:
            raise ValueError(f"input_ids must be [B, T] token ids, got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        if input_ids.shape[1] == 0:
            raise ValueError("input_ids must hold at least one token")
        for name, t in (("attention_mask", attention_mask), ("labels", labels),
                        ("labels_mask", labels_mask)):
            if t is not None and tuple(t.shape) != tuple(input_ids.shape):
                raise ValueError(f"{name} must have input_ids' shape {list(input_ids.shape)}, "
                                 f"got {list(t.shape)}")
        if memory is not None:
            want = (input_ids.shape[0], *self.memory.shape)
            if tuple(memory.shape) != want:
                raise ValueError(f"memory must be [B, M, d] = {list(want)}, got {list(memory.shape)}")

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels_mask: torch.Tensor | None = None,
                memory: torch.Tensor | None = None, xl: RecurrentState | None = None,
                return_logits: bool = True) -> RMTOutput:
        """``input_ids`` ``[B, T]`` of any length. ``labels`` ``[B, T]`` (shifted inside, -100 =
        ignore); ``labels_mask`` ``[B, T]`` bool selects the predicting positions (answer-only
        loss); ``attention_mask`` ``[B, T]`` (1 = real token); ``memory`` ``[B, M, d]`` resumes
        from a saved state. The loss is the mean next-token cross-entropy over all selected
        positions of all segments (or the last, ``loss_over="last"``)."""
        check_causal_lm_call(self, input_ids, attention_mask=attention_mask, labels=labels,
                             labels_mask=labels_mask, memory=memory)
        self._check_inputs(input_ids, attention_mask, labels, labels_mask, memory)
        segments = self._segments(input_ids, attention_mask, labels, labels_mask)
        if memory is None:
            memory = self.expand_memory(input_ids.shape[0])
        n_targets = None
        if labels is not None:
            n_targets = _count_targets(segments)
        if self.rmt_config.checkpoint_segments and labels is not None and torch.is_grad_enabled():
            if xl is not None or self.rmt_config.xl_cache:
                raise ValueError("checkpoint_segments=True does not support xl_cache yet")
            res = segment_bptt(self._make_step(n_targets), memory, segments,
                               bptt_depth=self.rmt_config.bptt_depth, checkpoint=True)
            return RMTOutput(res.loss, None, res.memory)
        loss = None if labels is None else torch.zeros((), device=input_ids.device)
        logits = []
        for t, seg in enumerate(segments):
            if is_cut(t, len(segments), self.rmt_config.bptt_depth):
                memory = memory.detach()
            need = return_logits or labels is not None
            hidden, memory, xl = self.segment_forward(memory, seg.ids, seg.mask, xl, need_hidden=need)
            if need:
                seg_logits = self.logits(hidden)
                if labels is not None and n_targets:
                    loss = loss + _ce_sum(seg_logits, seg.targets) / n_targets
                if return_logits:
                    logits.append(seg_logits)
        return RMTOutput(loss, torch.cat(logits, dim=1) if return_logits else None, memory, xl)

    def num_targets(self, input_ids: torch.Tensor, labels: torch.Tensor,
                    labels_mask: torch.Tensor | None = None,
                    attention_mask: torch.Tensor | None = None) -> int:
        """How many positions the loss of ``forward(input_ids, labels, ...)`` averages over
        (its denominator). Data-parallel training weights each rank's mean loss by this count
        so that the synchronised gradient is the mean over the global batch."""
        self._check_inputs(input_ids, attention_mask, labels, labels_mask, None)
        return _count_targets(self._segments(input_ids, attention_mask, labels, labels_mask))

    def _make_step(self, n_targets: int | None):
        """The per-segment function of :func:`rmt_fast.checkpoint.segment_bptt`."""

        def step(memory: torch.Tensor, seg: _Segment, _t: int):
            hidden, new_memory, _ = self.segment_forward(memory, seg.ids, seg.mask)
            loss = None
            if seg.targets is not None and n_targets:
                loss = _ce_sum(self.logits(hidden), seg.targets) / n_targets
            return loss, new_memory, None

        return step

    # --- long-context use ----------------------------------------------------------------------
    @torch.no_grad()
    @evaluating  # inference semantics: no dropout, no memory noise; the model's modes are restored
    def read(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             memory: torch.Tensor | None = None, xl: RecurrentState | None = None):
        """Read a context into memory without keeping logits: ``(memory [B, M, d], xl)``."""
        out = self.forward(input_ids, attention_mask=attention_mask, memory=memory, xl=xl,
                           return_logits=False)
        return out.memory, out.xl

    @torch.no_grad()
    @evaluating  # inference semantics: no dropout, no memory noise; the model's modes are restored
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 memory: torch.Tensor | None = None, **generate_kwargs) -> torch.Tensor:
        """Read every segment but the last into memory, then ``base.generate`` from
        ``[read memory | last segment]`` with the base model's KV cache. Memory is not updated
        while generating; the XL cache is not used here. Returns only the new tokens ``[B, N]``.
        """
        check_causal_lm_call(self, input_ids, attention_mask=attention_mask, memory=memory)
        self._check_inputs(input_ids, attention_mask, None, None, memory)
        segments = self._segments(input_ids, attention_mask, None, None)
        if memory is None:
            memory = self.expand_memory(input_ids.shape[0])
        for seg in segments[:-1]:
            _, memory, _ = self.segment_forward(memory, seg.ids, seg.mask, need_hidden=False)
        last = segments[-1]
        m, batch = self.rmt_config.num_mem_tokens, input_ids.shape[0]
        embeds = torch.cat([memory, self.base.get_input_embeddings()(last.ids)], dim=1)
        seg_mask = last.mask if last.mask is not None else torch.ones_like(last.ids, dtype=torch.bool)
        mask = torch.cat([torch.ones(batch, m, dtype=torch.bool, device=input_ids.device), seg_mask], 1)
        layout = MemoryLayout(num_read=m, num_write=0, mask=self.rmt_config.mask,
                              key_padding_mask=mask, length=embeds.shape[1])
        with memory_layout(layout):
            return self.lm.generate(inputs_embeds=embeds, attention_mask=mask.long(),
                                      **generate_kwargs)

    # --- compatibility -------------------------------------------------------------------------
    def load_official_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load a state dict of the official RMT code (``MemoryCell`` or ``RecurrentWrapper``:
        ``[memory_cell.]memory`` and ``[memory_cell.]model.*``)."""
        ours = {}
        for key, value in state_dict.items():
            k = key.removeprefix("memory_cell.")
            if k == "memory":
                ours["memory"] = value
            elif k.startswith("model."):
                ours["base." + k.removeprefix("model.")] = value
            else:
                raise ValueError(f"unexpected key {key!r} in the official state dict")
        if "memory" not in ours:
            raise ValueError("the official state dict has no 'memory' parameter")
        if ours["memory"].shape != self.memory.shape:
            raise ValueError(f"official memory is {list(ours['memory'].shape)}, this wrapper's is "
                             f"{list(self.memory.shape)}")
        missing, unexpected = self.load_state_dict(ours, strict=False)
        if missing or unexpected:
            raise ValueError(f"official state dict mismatch: missing {missing}, unexpected {unexpected}")


def _count_targets(segments: list[_Segment]) -> int:
    return sum(int((s.targets != -100).sum()) for s in segments)


def _ce_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over positions whose target is not -100."""
    return F.cross_entropy(logits.flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                           reduction="sum")
