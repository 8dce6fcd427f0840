"""Encoder RMT (BERT/RoBERTa-style): ``[CLS] [memory] [SEP] segment [SEP]``, the AAAI-24 setup.

Memory is read and written at the same positions (1..M): the last hidden state there becomes the
next segment's memory. Attention is bidirectional (``mask="full"``) with key padding.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn
from transformers.utils import ModelOutput

from rmt_fast.integrations.transformers import MemoryLayout, memory_layout
from rmt_fast.models import used_rows
from rmt_fast.models.base import RMTBase
from rmt_fast.models.config import RMTConfig
from rmt_fast.models.segment_loop import Segment, SegmentState, keep_rows, run_segments
from rmt_fast.models.segmenting import segment_bounds
from rmt_fast.validation import check_encoder_call


@dataclass
class RMTEncoderOutput(ModelOutput):
    """``loss``; ``logits`` (``[B, C]`` for sequence classification from the last segment, or
    ``[B, T, C]`` per token); ``memory`` ``[B, M, d]``; ``segment_logits``: per segment (sequence
    classification only). A transformers ``ModelOutput``."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    memory: torch.Tensor | None = None
    segment_logits: list[torch.Tensor] | None = None


class _RMTEncoderBase(RMTBase):
    """Shared by the encoder wrappers: ``Wrapper(base, config=RMTConfig(kind="encoder", ...))`` or
    keyword arguments (defaults: 10 memory tokens, segments of 499, right-aligned, loss on the
    last segment, the AAAI-24 setup). ``tokenizer=`` supplies ``cls_token_id``/``sep_token_id``."""

    kind = "encoder"
    config_defaults = dict(num_mem_tokens=10, segment_size=499, mask="full",
                           segment_alignment="right", loss_over="last")

    def __init__(self, base_model: nn.Module, config: RMTConfig | None = None, *, tokenizer=None,
                 **kwargs):
        if tokenizer is not None:
            for name in ("cls_token_id", "sep_token_id"):
                if kwargs.get(name) is None and (config is None or getattr(config, name) is None):
                    kwargs[name] = getattr(tokenizer, name)
        super().__init__(base_model, config, **kwargs)

    def positions_needed(self, config: RMTConfig | None = None) -> int:
        cfg = config or self.rmt_config
        return cfg.num_mem_tokens + cfg.segment_size + 3

    def segment_forward(self, memory: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None):
        """``memory`` ``[B, M, d]``, ``ids``/``mask`` ``[B, S]`` -> (base model output, new memory).

        Rows whose segment is all padding keep their memory.
        """
        out, new_memory = self._run_segment(memory, ids, mask)
        return out, keep_rows(None if mask is None else mask.any(dim=1), new_memory, memory)

    def _run_segment(self, memory: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor | None,
                     used_only: bool = False):
        """:meth:`segment_forward` without keeping the memory of empty rows (the loop does).
        ``used_only``: the caller reads only the head's logits and the memory, so the last
        layer may skip the other rows (:meth:`_used_rows`); their hidden states are then not
        the model's."""
        cfg = self.rmt_config
        m, batch = cfg.num_mem_tokens, ids.shape[0]
        emb = self.base.get_input_embeddings()
        special = torch.tensor([cfg.cls_token_id, cfg.sep_token_id], device=ids.device)
        cls, sep = emb(special).unsqueeze(0).expand(batch, -1, -1).split(1, dim=1)
        read = self.perturb_memory(memory)
        x = torch.cat([cls, read, sep, emb(ids), sep], dim=1)
        seg_mask = mask if mask is not None else torch.ones_like(ids, dtype=torch.bool)
        ones = torch.ones(batch, m + 2, dtype=torch.bool, device=ids.device)
        kpm = torch.cat([ones, seg_mask, ones[:, :1]], dim=1)
        # positions count real tokens only: a padded row is numbered as it would be alone
        position_ids = (kpm.long().cumsum(1) - 1).clamp(min=0)
        used = self._used_rows(x.shape[1]) if used_only else None
        layout = MemoryLayout(mask="full", key_padding_mask=kpm, used_rows=used)
        with memory_layout(layout):
            out = self.base(inputs_embeds=x, position_ids=position_ids, output_hidden_states=True)
        return out, self.update_memory(read, out.hidden_states[-1][:, 1: 1 + m])

    def _used_rows(self, rows: int) -> tuple[int, int, int, int] | None:
        """Rows of the last layer whose outputs are used (:mod:`rmt_fast.models.used_rows`):
        None (every row) unless a subclass reads fewer."""
        return None

    def _run(self, input_ids, attention_mask, memory, head):
        """Every segment through the segment loop (checkpointed with ``checkpoint_segments``
        when grad is enabled); ``head(base_output, segment)`` picks each segment's logits.
        Returns ``(final memory [B, M, d], per-segment logits)``."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [B, T] token ids with T >= 1, got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have input_ids' shape {list(input_ids.shape)}, "
                             f"got {list(attention_mask.shape)}")
        cfg = self.rmt_config
        bounds = segment_bounds(input_ids.shape[1], cfg.segment_size, cfg.segment_alignment)
        mask = None if attention_mask is None else attention_mask.to(torch.bool)
        memory = self.expand_memory(input_ids.shape[0]) if memory is None else memory
        segments = [Segment(s, e, input_ids[:, s:e], None if mask is None else mask[:, s:e])
                    for s, e in bounds]

        res = run_segments(partial(self._step, head=head), SegmentState(memory), segments,
                           bptt_depth=cfg.bptt_depth, checkpoint=cfg.checkpoint_segments,
                           offload=cfg.offload_memory)
        return res.state.memory, res.outputs["logits"]

    def _step(self, state: SegmentState, seg: Segment, t: int, *, head):
        """The encoder's step of :func:`rmt_fast.models.segment_loop.run_segments`: one segment,
        its logits as ``head(base_output, segment)`` picks them."""
        out, new_memory = self._run_segment(state.memory, seg.ids, seg.mask, used_only=True)
        return SegmentState(new_memory), {"logits": head(out, seg)}


class RMTEncoderForSequenceClassification(_RMTEncoderBase):
    """RMT around a ``*ForSequenceClassification`` encoder; the last segment classifies.

    ``loss_over="last"`` (default) uses the last segment's loss; ``"all"`` averages every
    segment's classification loss (the official ``sum_loss``).
    """

    auto_class = "AutoModelForSequenceClassification"

    def _used_rows(self, rows: int) -> tuple[int, int, int, int] | None:
        """``[CLS]`` (the head) and the memory rows (evaluation mode only)."""
        return used_rows.rows(self, self.base, 0, 1 + self.rmt_config.num_mem_tokens, rows)

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                memory: torch.Tensor | None = None) -> RMTEncoderOutput:
        """``input_ids``/``attention_mask`` ``[B, T]``, ``labels`` ``[B]`` class ids."""
        check_encoder_call(self, input_ids, attention_mask=attention_mask, labels=labels, memory=memory,
                           per_token=False)
        memory, seg_logits = self._run(input_ids, attention_mask, memory, lambda out, seg: out.logits)
        loss = None
        if labels is not None:
            used = seg_logits if self.rmt_config.loss_over == "all" else seg_logits[-1:]
            loss = torch.stack([F.cross_entropy(lg.float(), labels) for lg in used]).mean()
        return RMTEncoderOutput(loss, seg_logits[-1], memory, seg_logits)

    def classify_segments(self, memory: torch.Tensor, segments: Iterable[Segment],
                          callback=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Read ``segments`` (each ``ids``/``mask`` ``[B, S]``; an iterator is read lazily, one
        segment at a time) from ``memory`` ``[B, M, d]`` through the segment loop, under the
        caller's grad mode, with full BPTT and no checkpointing; ``callback(t, segment, state)``
        after each. Returns ``(memory [B, M, d], the last segment's logits [B, C])``."""
        last = []

        def head(out, seg):
            last[:] = [out.logits]
            return None  # no per-segment outputs kept: memory stays flat in the length

        res = run_segments(partial(self._step, head=head), SegmentState(memory), segments,
                           callback=callback)
        return res.state.memory, last[0]


class RMTEncoderForTokenClassification(_RMTEncoderBase):
    """RMT around a ``*ForTokenClassification`` encoder; logits for every input token."""

    auto_class = "AutoModelForTokenClassification"

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None,
                memory: torch.Tensor | None = None) -> RMTEncoderOutput:
        """``labels`` ``[B, T]`` (-100 = ignore). ``logits`` ``[B, T, C]``."""
        check_encoder_call(self, input_ids, attention_mask=attention_mask, labels=labels, memory=memory,
                           per_token=True)
        m = self.rmt_config.num_mem_tokens
        memory, pieces = self._run(input_ids, attention_mask, memory,
                                   lambda out, seg: out.logits[:, m + 2: m + 2 + seg.end - seg.start])
        logits = torch.cat(pieces, dim=1)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return RMTEncoderOutput(loss, logits, memory)
