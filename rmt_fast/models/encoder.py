"""Encoder RMT (BERT/RoBERTa-style): ``[CLS] [memory] [SEP] segment [SEP]``, the AAAI-24 setup.

Memory is read and written at the same positions (1..M): the last hidden state there becomes the
next segment's memory. Attention is bidirectional (``mask="full"``) with key padding.

With ``RMTConfig(associative_d_mem=d_mem)`` every block also carries ARMT's associative memory
(:mod:`rmt_fast.models.armt`): each token reads the layer's state before the block, the block's
outputs at the memory positions 1..M write into it after. The recurrent state is then a
:class:`~rmt_fast.models.segment_loop.SegmentState`: ``memory`` ``[B, M, d]`` and ``extra``
``{"A.<layer>": [B, d_key, d], "z.<layer>": [B, d_key]}`` (zero = not yet written).
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
from rmt_fast.models.armt import (
    ARMTConfig,
    AssociativeMemory,
    AssociativeRun,
    install_hooks,
    running,
)
from rmt_fast.models.base import RMTBase, hidden_size
from rmt_fast.models.config import RMTConfig
from rmt_fast.models.memory_transformer import find_layers
from rmt_fast.models.segment_loop import Segment, SegmentState, keep_rows, run_segments
from rmt_fast.models.segmenting import segment_bounds
from rmt_fast.validation import check_encoder_call


@dataclass
class RMTEncoderOutput(ModelOutput):
    """``loss``; ``logits`` (``[B, C]`` for sequence classification from the last segment, or
    ``[B, T, C]`` per token); ``memory`` ``[B, M, d]``; ``segment_logits``: per segment (sequence
    classification only); ``state``: the whole recurrent state after the last segment (the
    memory and, with ``associative_d_mem``, the associative state; pass it as ``memory=`` to
    continue). A transformers ``ModelOutput``."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    memory: torch.Tensor | None = None
    segment_logits: list[torch.Tensor] | None = None
    state: SegmentState | None = None


def _pack_associative(A, z) -> dict[str, torch.Tensor]:
    """Per-layer associative states as :attr:`SegmentState.extra`: ``{"A.<i>", "z.<i>"}``."""
    extra = {}
    for i, (a, zi) in enumerate(zip(A, z, strict=True)):
        extra[f"A.{i}"], extra[f"z.{i}"] = a, zi
    return extra


def _unpack_associative(extra: dict[str, torch.Tensor], layers: int):
    """Inverse of :func:`_pack_associative`: ``(A, z)`` lists of ``layers`` tensors."""
    return ([extra[f"A.{i}"] for i in range(layers)], [extra[f"z.{i}"] for i in range(layers)])


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
        self.assoc = None
        if self.rmt_config.associative_d_mem:
            layers = find_layers(self.base)
            weight = self.base.get_input_embeddings().weight
            self._assoc_layers = [layers]  # a list: the blocks stay registered under base only
            self.assoc = nn.ModuleList(
                AssociativeMemory.for_config(hidden_size(self.base.config), self._assoc_config,
                                             weight.dtype, weight.device) for _ in layers)
            self._assoc_hooks = install_hooks(layers)

    # --- the recurrent state ---------------------------------------------------------------------
    def init_state(self, batch: int) -> SegmentState:
        """A new state for ``batch`` rows: the learned memory and, with an associative memory,
        zero ``A``/``z`` per layer."""
        return SegmentState(self.expand_memory(batch), extra=self._fresh_associative(batch))

    @property
    def _assoc_config(self) -> ARMTConfig | None:
        """The associative memory's options, from the current config (``replace_config`` of an
        ``associative_*`` field reaches every layer)."""
        return self.rmt_config.associative_config()

    @property
    def associative_layers(self) -> nn.ModuleList | None:
        """The base model's blocks that carry the associative read/write hooks (None without an
        associative memory)."""
        return None if self.assoc is None else self._assoc_layers[0]

    def _fresh_associative(self, batch: int) -> dict[str, torch.Tensor]:
        if self.assoc is None:
            return {}
        w = self.assoc[0].W_mq.weight
        d_key, d = self._assoc_config.d_key, w.shape[1]
        n = len(self.assoc)
        return _pack_associative(
            [torch.zeros(batch, d_key, d, dtype=w.dtype, device=w.device) for _ in range(n)],
            [torch.zeros(batch, d_key, dtype=w.dtype, device=w.device) for _ in range(n)])

    def _as_state(self, memory, batch: int) -> SegmentState:
        """``memory``: None (a new state), a memory tensor ``[B, M, d]`` (with a new associative
        state) or a :class:`SegmentState` this model returned (checked)."""
        if memory is None:
            return self.init_state(batch)
        if not isinstance(memory, SegmentState):
            return SegmentState(memory, extra=self._fresh_associative(batch))
        want = self._fresh_associative(batch)
        got = memory.extra
        if set(got) != set(want) or any(got[k].shape != v.shape for k, v in want.items()):
            raise ValueError(f"memory: a state of this model has extra "
                             f"{ {k: list(v.shape) for k, v in want.items()} or 'none'}, got "
                             f"{ {k: list(getattr(v, 'shape', [])) for k, v in got.items()} or 'none'}")
        return memory

    def positions_needed(self, config: RMTConfig | None = None) -> int:
        """``[CLS] memory [SEP] segment [SEP]``, numbered from :attr:`position_offset`."""
        cfg = config or self.rmt_config
        return self.position_offset + cfg.num_mem_tokens + cfg.segment_size + 3

    @property
    def position_offset(self) -> int:
        """The position id of a sequence's first token: ``padding_idx + 1`` for RoBERTa-style
        embeddings (RoBERTa, XLM-R, CamemBERT, ...: they number tokens after the padding id
        and take given position ids as they are), else 0. Found once."""
        if "_position_offset" not in self.__dict__:
            offset = 0
            for module in self.base.modules():
                if hasattr(type(module), "create_position_ids_from_inputs_embeds") \
                        and isinstance(getattr(module, "padding_idx", None), int):
                    offset = module.padding_idx + 1
                    break
            self.__dict__["_position_offset"] = offset
        return self.__dict__["_position_offset"]

    def segment_forward(self, memory, ids: torch.Tensor, mask: torch.Tensor | None):
        """``memory`` ``[B, M, d]`` (or a :class:`SegmentState`), ``ids``/``mask`` ``[B, S]``
        (``mask`` bool or 0/1 as ``attention_mask``) -> (base model output, new memory, of
        ``memory``'s kind).

        Rows whose segment is all padding keep their state.
        """
        mask = None if mask is None else mask.to(torch.bool)
        state = self._as_state(memory, ids.shape[0])
        out, new = self._run_segment(state, ids, mask)
        new = keep_rows(None if mask is None else mask.any(dim=1), new, state)
        return out, (new if isinstance(memory, SegmentState) else new.memory)

    def _run_segment(self, state: SegmentState, ids: torch.Tensor, mask: torch.Tensor | None,
                     used_only: bool = False) -> tuple[object, SegmentState]:
        """:meth:`segment_forward` on a :class:`SegmentState` without keeping the state of empty
        rows (the loop does). ``used_only``: the caller reads only the head's logits and the
        memory, so the last layer may skip the other rows (:meth:`_used_rows`); their hidden
        states are then not the model's."""
        cfg = self.rmt_config
        m, batch = cfg.num_mem_tokens, ids.shape[0]
        emb = self.base.get_input_embeddings()
        special = torch.tensor([cfg.cls_token_id, cfg.sep_token_id], device=ids.device)
        cls, sep = emb(special).unsqueeze(0).expand(batch, -1, -1).split(1, dim=1)
        read = self.perturb_memory(state.memory)
        x = torch.cat([cls, read, sep, emb(ids), sep], dim=1)
        seg_mask = mask if mask is not None else torch.ones_like(ids, dtype=torch.bool)
        ones = torch.ones(batch, m + 2, dtype=torch.bool, device=ids.device)
        kpm = torch.cat([ones, seg_mask, ones[:, :1]], dim=1)
        # positions count real tokens only: a padded row is numbered as it would be alone
        position_ids = (kpm.long().cumsum(1) - 1).clamp(min=0) + self.position_offset
        used = self._used_rows(x.shape[1]) if used_only else None
        layout = MemoryLayout(mask="full", key_padding_mask=kpm, used_rows=used)
        run = self._associative_run(state, slice(1, 1 + m))
        with running(run), memory_layout(layout):
            out = self.base(inputs_embeds=x, position_ids=position_ids, output_hidden_states=True)
        extra = {} if run is None else _pack_associative(run.new_A, run.new_z)
        return out, SegmentState(self.update_memory(read, out.hidden_states[-1][:, 1: 1 + m]),
                                 extra=extra)

    def _associative_run(self, state: SegmentState, write: slice) -> AssociativeRun | None:
        """The associative hooks' view of one segment (None without an associative memory).
        Rows whose ``z`` is zero have never been written: they do not read and write as ARMT's
        first segment does (ARMT's rule; under the delta rule every segment reads)."""
        if self.assoc is None:
            return None
        A, z = _unpack_associative(state.extra, len(self.assoc))
        cfg = self._assoc_config
        if cfg.update_rule == "delta":
            # z stays zero under this rule, so it cannot mark a written state, and `first` does
            # not change its write: every segment reads (a never-written A is zero, so is its
            # read, and the gradient still reaches W_v through it)
            first = False
        else:
            fresh = ~z[0].any(dim=-1)
            if bool(fresh.all()):
                first = True
            elif not bool(fresh.any()):
                first = False
            else:
                first = fresh  # some rows not yet written (their first segments were padding)
        return AssociativeRun(self.associative_layers, self.assoc, A, z, read=first is not True,
                              write=write, first=first, cfg=cfg,
                              noise=self.rmt_config.memory_noise if self.training else 0.0)

    def _used_rows(self, rows: int) -> tuple[int, int, int, int] | None:
        """Rows of the last layer whose outputs are used (:mod:`rmt_fast.models.used_rows`):
        None (every row) unless a subclass reads fewer."""
        return None

    def _run(self, input_ids, attention_mask, memory, head):
        """Every segment through the segment loop (checkpointed with ``checkpoint_segments``
        when grad is enabled); ``head(base_output, segment)`` picks each segment's logits.
        Returns ``(final state, per-segment logits)``."""
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids must be [B, T] token ids with T >= 1, got "
                             f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
        if attention_mask is not None and attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have input_ids' shape {list(input_ids.shape)}, "
                             f"got {list(attention_mask.shape)}")
        cfg = self.rmt_config
        bounds = segment_bounds(input_ids.shape[1], cfg.segment_size, cfg.segment_alignment)
        mask = None if attention_mask is None else attention_mask.to(torch.bool)
        state = self._as_state(memory, input_ids.shape[0])
        segments = [Segment(s, e, input_ids[:, s:e], None if mask is None else mask[:, s:e])
                    for s, e in bounds]

        res = run_segments(partial(self._step, head=head), state, segments,
                           bptt_depth=cfg.bptt_depth, checkpoint=cfg.checkpoint_segments,
                           offload=cfg.offload_memory)
        return res.state, res.outputs["logits"]

    def _step(self, state: SegmentState, seg: Segment, t: int, *, head):
        """The encoder's step of :func:`rmt_fast.models.segment_loop.run_segments`: one segment,
        its logits as ``head(base_output, segment)`` picks them."""
        out, new = self._run_segment(state, seg.ids, seg.mask, used_only=True)
        return new, {"logits": head(out, seg)}


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
        state, seg_logits = self._run(input_ids, attention_mask, memory, lambda out, seg: out.logits)
        loss = None
        if labels is not None:
            used = seg_logits if self.rmt_config.loss_over == "all" else seg_logits[-1:]
            loss = torch.stack([F.cross_entropy(lg.float(), labels) for lg in used]).mean()
        return RMTEncoderOutput(loss, seg_logits[-1], state.memory, seg_logits, state)

    def classify_segments(self, memory, segments: Iterable[Segment],
                          callback=None) -> tuple[torch.Tensor | SegmentState, torch.Tensor]:
        """Read ``segments`` (each ``ids``/``mask`` ``[B, S]``; an iterator is read lazily, one
        segment at a time) from ``memory`` ``[B, M, d]`` (or a :class:`SegmentState`) through
        the segment loop, under the caller's grad mode, with full BPTT and no checkpointing;
        ``callback(t, segment, state)`` after each. Returns ``(memory [B, M, d] or the state, as
        given; the last segment's logits [B, C])``."""
        last = []

        def head(out, seg):
            last[:] = [out.logits]
            return None  # no per-segment outputs kept: memory stays flat in the length

        state = self._as_state(memory, memory.memory.shape[0] if isinstance(memory, SegmentState)
                               else memory.shape[0])
        res = run_segments(partial(self._step, head=head), state, segments, callback=callback)
        return (res.state if isinstance(memory, SegmentState) else res.state.memory), last[0]


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
        state, pieces = self._run(input_ids, attention_mask, memory,
                                  lambda out, seg: out.logits[:, m + 2: m + 2 + seg.end - seg.start])
        logits = torch.cat(pieces, dim=1)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits.flatten(0, 1).float(), labels.flatten(), ignore_index=-100)
        return RMTEncoderOutput(loss, logits, state.memory, state=state)
