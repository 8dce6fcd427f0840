"""Decoder RMT: ``[read memory | segment | write memory]`` around any transformers causal LM."""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial

import torch
from torch import nn
from torch.utils import _pytree as pytree
from transformers.utils import ModelOutput

from rmt_fast._extension import assemble_mask, assemble_segment, cross_entropy_sum, extract_memory
from rmt_fast.integrations.transformers import (
    MemoryLayout,
    generation_rows,
    layout_attention_mask,
    memory_layout,
)
from rmt_fast.models import used_rows
from rmt_fast.models.base import RMTBase, check_logits_head, lm_logits, max_positions
from rmt_fast.models.config import RMTConfig
from rmt_fast.models.modes import evaluating
from rmt_fast.models.rotary import find_rotary, shift_keys
from rmt_fast.models.segment_loop import (
    RecurrentState,
    Segment,
    SegmentState,
    XLState,
    keep_rows,
    run_segments,
)
from rmt_fast.models.segmenting import next_token_targets, segment_bounds
from rmt_fast.validation import check_causal_lm_call

__all__ = ["RMTForCausalLM", "RMTOutput", "RecurrentState"]


@dataclass
class RMTOutput(ModelOutput):
    """``loss``: scalar or None; ``logits``: ``[B, T, V]`` for every input position (None when
    ``return_logits`` is off, the default under segment checkpointing); ``memory``: the final
    memory state ``[B, M, d]``; ``xl``: the final Transformer-XL cache (``xl_cache > 0``);
    ``hidden_states``: the last hidden state ``[B, T, d]`` at every input position
    (``return_hidden=True``). A transformers ``ModelOutput``: attribute, key (``out["loss"]``)
    and tuple (``out[0]``, the first field that is not None) access."""

    loss: torch.Tensor | None = None
    logits: torch.Tensor | None = None
    memory: torch.Tensor | None = None
    xl: RecurrentState | None = None
    hidden_states: torch.Tensor | None = None


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
        check_logits_head(base_model)
        super().__init__(base_model, config, **kwargs)

    def positions_needed(self, config: RMTConfig | None = None) -> int:
        cfg = config or self.rmt_config
        return 2 * cfg.num_mem_tokens + cfg.segment_size

    def check_config(self, config: RMTConfig) -> None:
        super().check_config(config)
        if config.xl_cache > 0 and config.xl_positions != "before_memory" and self._xl_rotary() is None:
            raise ValueError(f"xl_positions={config.xl_positions!r} moves the cached keys, which needs "
                             f"rotary positions; {type(self.lm).__name__} has absolute ones (use "
                             "'before_memory', where they keep their own segment's positions)")

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
        """Run one segment. ``memory`` ``[B, M, d]``, ``ids`` ``[B, S]``, ``mask`` ``[B, S]`` bool
        (or 0/1 as ``attention_mask``).

        Returns ``(hidden [B, S, d] at the segment positions, new memory [B, M, d],
        new XL state or None)``. Rows whose segment is all padding keep their memory and cache
        (:func:`rmt_fast.models.segment_loop.keep_rows`, as in the segment loop).
        ``need_hidden=False`` (reading a context) returns ``None`` for ``hidden``.
        """
        mask = None if mask is None else mask.to(torch.bool)
        hidden, new_memory, new_xl = self._run_segment(memory, ids, mask, xl, write=write,
                                                       need_hidden=need_hidden)
        has = None if mask is None else mask.any(dim=1)
        kept = keep_rows(has, SegmentState(new_memory, new_xl), SegmentState(memory, xl))
        return hidden, kept.memory, kept.xl

    def _run_segment(self, memory, ids, mask, xl, *, write: bool = True, need_hidden: bool = True):
        """:meth:`segment_forward` without keeping the state of empty rows (the loop does that)."""
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
        # reading (only the new memory is used): the last block computes the write rows only
        used = used_rows.rows(self, self.lm, m + seg_len, x.shape[1], x.shape[1]) \
            if write and not need_hidden else None
        layout = MemoryLayout(num_read=m, num_write=num_write, mask=cfg.mask, key_padding_mask=kpm,
                              past=None if xl is None else xl.kv, record_kv=record, used_rows=used)
        position_ids = self._position_ids(mask, seg_len, write, ids.device)
        with memory_layout(layout):
            hidden = self.backbone(inputs_embeds=x, position_ids=position_ids, use_cache=False,
                                   attention_mask=layout_attention_mask(x)).last_hidden_state
        new_memory = self.update_memory(read, extract_memory(hidden, m + seg_len, m)) if write else memory
        hidden = hidden[:, m: m + seg_len] if need_hidden else None
        new_xl = self._next_xl(xl, record, mask, m, seg_len) if record is not None else None
        return hidden, new_memory, new_xl

    def _next_xl(self, xl, record, mask, m, seg_len) -> RecurrentState:
        """Each row's last ``xl_cache`` real tokens' keys/values (detached): the segment's
        appended to the old cache. With padding (``mask``), every row's real entries are moved
        to the end first (in order), so a row keeps as many real tokens as it would alone.

        With rotary position embeddings the kept keys are moved ``-(M + r)`` positions (``r``:
        the row's real segment tokens), so that in the next segment, whose read memory starts
        at position 0 again, the last cached token sits at -1 and every cached key keeps its
        true distance to the new queries (:mod:`rmt_fast.models.rotary`); with
        ``xl_positions="before_segment"`` they move ``-r``: the last cached token sits at
        ``M - 1``, right before the first segment token. A row with no token in the segment
        does not move. Absolute position embeddings (GPT-2) have no such move: there the cache
        keeps its own segment's positions.
        """
        keep = self.rmt_config.xl_cache
        batch = mask.shape[0] if mask is not None else next(iter(record.values()))[0].shape[0]
        device = next(iter(record.values()))[0].device
        seg_mask = mask if mask is not None else torch.ones(batch, seg_len, dtype=torch.bool,
                                                              device=device)
        padding = seg_mask if xl is None else torch.cat([xl.padding, seg_mask], 1)
        order = None
        if mask is not None:  # padding first, then the real entries in their order (stable)
            order = torch.sort(padding.to(torch.uint8), dim=1, stable=True).indices[:, -keep:]
            padding = padding.gather(1, order)
        kv = {}
        for layer, (k, v) in record.items():
            k, v = k[:, :, m: m + seg_len].detach(), v[:, :, m: m + seg_len].detach()
            if xl is not None:
                k, v = torch.cat([xl.kv[layer][0], k], 2), torch.cat([xl.kv[layer][1], v], 2)
            if order is not None:
                k, v = (t.gather(2, order[:, None, :, None].expand(-1, t.shape[1], -1, t.shape[3]))
                        for t in (k, v))
            # contiguous: a view would keep the whole [B, H, 2M + S, D] keys of the segment alive
            # (a state is kept per segment under checkpointing, and by a streaming reader)
            kv[layer] = (k[:, :, -keep:].contiguous(), v[:, :, -keep:].contiguous())
        rotary = self._xl_rotary()
        if rotary is not None:
            before_memory = self.rmt_config.xl_positions == "before_memory"
            real = seg_mask.sum(dim=1)
            delta = torch.where(real > 0, -((m if before_memory else 0) + real), 0)
            kv = {layer: (shift_keys(k, delta, rotary), v) for layer, (k, v) in kv.items()}
        return RecurrentState(kv, padding[:, -keep:].contiguous())

    def _xl_rotary(self):
        """The base model's rotary embedding (None without one), found on first use; kept out
        of the module tree (the base model owns it)."""
        if "_rotary" not in self.__dict__:
            self.__dict__["_rotary"] = find_rotary(self.lm)
        return self.__dict__["_rotary"]

    def compile_step(self, **compile_kwargs) -> RMTForCausalLM:
        """Opt-in ``torch.compile`` of the per-segment step the segment loop calls (checkpointed
        or not; ``compile_kwargs`` go to ``torch.compile``). In place; returns ``self``."""
        self._step = torch.compile(type(self)._step.__get__(self), **compile_kwargs)
        return self

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[B, S, d]`` -> ``[B, S, V]`` with the base model's output embedding."""
        return lm_logits(self.lm, hidden)

    def _step(self, state: SegmentState, seg: Segment, t: int, *, n_targets: int = 0,
              logits: bool = False, hidden: bool = False):
        """The decoder's step of :func:`rmt_fast.models.segment_loop.run_segments`: one segment,
        its summed cross-entropy over ``n_targets`` (when it has targets), its logits
        ``[B, S, V]`` and hidden states ``[B, S, d]`` when asked for."""
        has_loss = n_targets > 0 and seg.targets is not None and seg.num_targets != 0
        h, memory, xl = self._run_segment(state.memory, seg.ids, seg.mask, state.xl,
                                          need_hidden=logits or hidden or has_loss)
        out = lm_outputs(self.logits, h, seg, n_targets, logits=logits, has_loss=has_loss)
        if hidden:
            out["hidden"] = h
        return SegmentState(memory, xl, state.extra), out

    # --- whole sequences ---------------------------------------------------------------------
    def _segments(self, input_ids, attention_mask, labels, labels_mask) -> list[Segment]:
        total = input_ids.shape[1]
        targets = None if labels is None else next_token_targets(labels, labels_mask)
        bounds = segment_bounds(total, self.rmt_config.segment_size, self.rmt_config.segment_alignment)
        if labels is not None and self.rmt_config.loss_over == "last":
            targets[:, : bounds[-1][0]] = -100
        counts = [0] * len(bounds)
        if targets is not None:  # one device-to-host copy for all segments
            counts = torch.stack([(targets[:, s:e] != -100).sum() for s, e in bounds]).tolist()
        mask = None if attention_mask is None else attention_mask.to(torch.bool)
        return [Segment(s, e, input_ids[:, s:e], None if mask is None else mask[:, s:e],
                        None if targets is None else targets[:, s:e], int(c))
                for (s, e), c in zip(bounds, counts, strict=True)]

    def forward(self, input_ids: torch.Tensor, labels: torch.Tensor | None = None,
                attention_mask: torch.Tensor | None = None, labels_mask: torch.Tensor | None = None,
                memory: torch.Tensor | None = None, xl: RecurrentState | None = None,
                return_logits: bool | None = None, return_hidden: bool = False) -> RMTOutput:
        """``input_ids`` ``[B, T]`` of any length. ``labels`` ``[B, T]`` (shifted inside, -100 =
        ignore); ``labels_mask`` ``[B, T]`` bool selects the predicting positions (answer-only
        loss); ``attention_mask`` ``[B, T]`` (1 = real token); ``memory`` ``[B, M, d]`` resumes
        from a saved state, ``xl`` from a saved Transformer-XL cache. The loss is the mean
        next-token cross-entropy over all selected positions of all segments (or the last,
        ``loss_over="last"``).

        ``return_logits``: return ``.logits`` ``[B, T, V]``. Default: on, except under segment
        checkpointing (``checkpoint_segments=True`` with grad enabled), where logits of every
        position would grow with the input length and are off unless asked for.
        ``return_hidden``: also return ``.hidden_states`` ``[B, T, d]``.
        """
        check_causal_lm_call(self, input_ids, attention_mask=attention_mask, labels=labels,
                             labels_mask=labels_mask, memory=memory, xl=xl)
        cfg = self.rmt_config
        segments = self._segments(input_ids, attention_mask, labels, labels_mask)
        if memory is None:
            memory = self.expand_memory(input_ids.shape[0])
        checkpoint = cfg.checkpoint_segments and torch.is_grad_enabled()
        if return_logits is None:
            return_logits = not checkpoint
        n_targets = _count_targets(segments) if labels is not None else 0
        step = partial(self._step, n_targets=n_targets, logits=return_logits, hidden=return_hidden)
        res = run_segments(step, SegmentState(memory, xl), segments, bptt_depth=cfg.bptt_depth,
                           checkpoint=checkpoint, offload=cfg.offload_memory)
        loss = res.loss
        if labels is not None and loss is None:  # no target position at all
            loss = torch.zeros((), device=input_ids.device)
        logits = torch.cat(res.outputs["logits"], dim=1) if return_logits else None
        hidden = torch.cat(res.outputs["hidden"], dim=1) if return_hidden else None
        return RMTOutput(loss, logits, res.state.memory, res.state.xl, hidden)

    def num_targets(self, input_ids: torch.Tensor, labels: torch.Tensor,
                    labels_mask: torch.Tensor | None = None,
                    attention_mask: torch.Tensor | None = None) -> int:
        """How many positions the loss of ``forward(input_ids, labels, ...)`` averages over
        (its denominator). Data-parallel training weights each rank's mean loss by this count
        so that the synchronised gradient is the mean over the global batch."""
        check_causal_lm_call(self, input_ids, attention_mask=attention_mask, labels=labels,
                             labels_mask=labels_mask)
        return _count_targets(self._segments(input_ids, attention_mask, labels, labels_mask))

    # --- long-context use ----------------------------------------------------------------------
    def read_segments(self, state: SegmentState, segments: list[Segment],
                      callback=None) -> SegmentState:
        """Read ``segments`` into ``state`` through the segment loop (no logits, no loss);
        ``callback(t, segment, state)`` after each. Runs under the caller's grad mode."""
        return run_segments(self._step, state, segments, callback=callback).state

    @torch.no_grad()
    @evaluating  # inference semantics: no dropout, no memory noise; the model's modes are restored
    def read(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
             memory: torch.Tensor | None = None, xl: RecurrentState | None = None):
        """Read a context into memory without keeping logits: ``(memory [B, M, d], xl)``."""
        check_causal_lm_call(self, input_ids, attention_mask=attention_mask, memory=memory, xl=xl)
        if memory is None:
            memory = self.expand_memory(input_ids.shape[0])
        segments = self._segments(input_ids, attention_mask, None, None)
        state = self.read_segments(SegmentState(memory, xl), segments)
        return state.memory, state.xl

    @torch.no_grad()
    @evaluating  # inference semantics: no dropout, no memory noise; the model's modes are restored
    def generate(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 memory: torch.Tensor | None = None, xl: RecurrentState | None = None,
                 roll_segments: bool = False, **generate_kwargs) -> torch.Tensor:
        """Read every segment but the last into memory (as :meth:`read`, with the XL cache when
        ``xl_cache > 0``), then ``base.generate`` from ``[read memory | last segment]`` with the
        base model's KV cache. ``memory`` ``[B, M, d]`` and ``xl`` resume from a saved state.
        The last segment and every new token attend to the XL cache the segments before left,
        as in :meth:`forward`. Returns only the new tokens ``[B, N]`` (or transformers' output
        dict when asked for).

        By default memory and cache are not updated while generating: the segment grows past
        ``segment_size`` (up to the base model's positions). With ``roll_segments=True`` a
        segment that is full is written into memory (and the cache) and generation goes on in
        a new one, as :meth:`forward` reads the prompt and the new tokens with left-aligned
        segments: any length (``max_new_tokens`` required; ``num_return_sequences`` with
        sampling; no beams or output dict; rows that ended with EOS get ``pad_token_id`` after
        it).
        """
        check_causal_lm_call(self, input_ids, attention_mask=attention_mask, memory=memory, xl=xl)
        if roll_segments:
            check_rolling(generate_kwargs)
        segments = self._segments(input_ids, attention_mask, None, None)
        if memory is None:
            memory = self.expand_memory(input_ids.shape[0])
        if len(segments) > 1:
            state = self.read_segments(SegmentState(memory, xl), segments[:-1])
            memory, xl = state.memory, state.xl
        last = segments[-1]
        if roll_segments:
            return self._generate_rolling(memory, xl, last.ids, last.mask, generate_kwargs)
        self._check_generation_length(self.rmt_config.num_mem_tokens + last.ids.shape[1],
                                      generate_kwargs)
        return self._generate_in_segment(memory, xl, last.ids, last.mask, **generate_kwargs)

    def _generate_in_segment(self, memory, xl, ids, seg_mask, **generate_kwargs):
        """``base.generate`` from ``[read memory | ids]`` (``seg_mask`` ``[B, S]`` or None),
        attending to ``xl``: the new tokens."""
        m, batch = self.rmt_config.num_mem_tokens, ids.shape[0]
        embeds = torch.cat([memory, self.base.get_input_embeddings()(ids)], dim=1)
        if seg_mask is None:
            seg_mask = torch.ones_like(ids, dtype=torch.bool)
        mask = torch.cat([torch.ones(batch, m, dtype=torch.bool, device=ids.device), seg_mask], 1)
        kpm = mask if xl is None else torch.cat([xl.padding, mask], 1)
        layout = MemoryLayout(num_read=m, num_write=0, mask=self.rmt_config.mask,
                              key_padding_mask=kpm, past=None if xl is None else xl.kv,
                              length=embeds.shape[1])
        with memory_layout(layout):
            return self.lm.generate(inputs_embeds=embeds, attention_mask=mask.long(),
                                    **generate_kwargs)

    def _generate_rolling(self, memory, xl, ids, seg_mask, kwargs: dict) -> torch.Tensor:
        """:meth:`generate` with ``roll_segments=True``: fill the segment, write it, go on."""
        def generate(state, ids, seg_mask, **kw):
            return self._generate_in_segment(state[0], state[1], ids, seg_mask, **kw)

        def write(state, ids, seg_mask):
            return self.segment_forward(state[0], ids, seg_mask, state[1])[1:]

        return generate_rolling(generate, write, (memory, xl), ids, seg_mask, kwargs,
                                self.rmt_config.segment_size, self.lm.generation_config)

    def _check_generation_length(self, prompt: int, generate_kwargs: dict) -> None:
        """Refuse up front a generation that would run past the base model's positions: the
        ``[read memory | last segment]`` prompt takes ``prompt`` positions and every new token
        but the last one more (memory is not rolled into a new segment while generating)."""
        limit = max_positions(self.lm.config)
        new = generate_kwargs.get("max_new_tokens")
        if new is None and generate_kwargs.get("max_length") is not None:
            new = generate_kwargs["max_length"] - prompt
        if new is None:
            gen = getattr(self.lm, "generation_config", None)
            new = getattr(gen, "max_new_tokens", None)
            if new is None and getattr(gen, "max_length", None) is not None:
                new = gen.max_length - prompt
        if limit is None or new is None or prompt + new - 1 <= limit:
            return
        cfg = self.rmt_config
        raise ValueError(
            f"generate: {new} new tokens after a last segment of {prompt - cfg.num_mem_tokens} "
            f"tokens need {prompt + new - 1} positions ({cfg.num_mem_tokens} memory + segment + "
            f"new tokens but the last), the base model has {limit}; ask for at most "
            f"{limit - prompt + 1} new tokens (max_new_tokens), or end the prompt with a shorter "
            "last segment")

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


_Segment = Segment  # the name rmt_fast.models.armt imports


def _count_targets(segments: list[Segment]) -> int:
    """Target positions over ``segments`` (counted here for segments that were not)."""
    return sum(s.num_targets if s.num_targets is not None
               else 0 if s.targets is None else int((s.targets != -100).sum()) for s in segments)


def generate_rolling(generate, write, state, ids: torch.Tensor, seg_mask: torch.Tensor | None,
                     kwargs: dict, size: int, generation_config) -> torch.Tensor:
    """Generation that writes each full segment into the recurrent state (``roll_segments=True``
    of the decoders' ``generate``): ``generate(state, ids, seg_mask, **kw)`` -> new tokens
    ``[B, n]`` after the partial segment ``ids`` ``[B, s]``; ``write(state, ids, seg_mask)`` -> the
    state after the full segment ``ids`` ``[B, size]``. The full segment's last position
    predicts the first token of the next one. Rows that produced EOS get the pad id after it.
    ``num_return_sequences=k`` (sampling) repeats each row's state, ``ids`` and mask ``k`` times
    first (:func:`~rmt_fast.integrations.transformers.generation_rows`, as transformers orders
    them).
    Returns the new tokens ``[B k, max_new_tokens]`` (fewer when every row ended)."""
    kwargs = dict(kwargs)
    copies = kwargs.pop("num_return_sequences", None) or 1
    if copies > 1:
        if not kwargs.get("do_sample", generation_config.do_sample):
            raise ValueError(f"generate(roll_segments=True): num_return_sequences={copies} needs "
                             "do_sample=True (greedy decoding gives every copy the same tokens)")
        rows = ids.shape[0] * copies
        state = pytree.tree_map(
            lambda t: generation_rows(t, rows) if isinstance(t, torch.Tensor) else t, state)
        ids = generation_rows(ids, rows)
        seg_mask = None if seg_mask is None else generation_rows(seg_mask, rows)
    left, least = kwargs.pop("max_new_tokens"), kwargs.pop("min_new_tokens", None) or 0
    pad = kwargs.get("pad_token_id", generation_config.pad_token_id)
    eos = kwargs.get("eos_token_id", generation_config.eos_token_id)
    eos = torch.tensor([] if eos is None else eos, device=ids.device).flatten()
    batch = ids.shape[0]
    if seg_mask is None:
        seg_mask = torch.ones_like(ids, dtype=torch.bool)
    done = torch.zeros(batch, dtype=torch.bool, device=ids.device)
    out = []
    while left > 0:
        n = min(left, size - ids.shape[1] + 1)  # the full segment's last position predicts one more
        new = generate(state, ids, seg_mask, max_new_tokens=n, min_new_tokens=min(least, n),
                       **kwargs)
        if done.any():
            new = new.masked_fill(done[:, None], pad)
        out.append(new)
        done |= torch.isin(new, eos).any(dim=1)
        left, least = left - new.shape[1], max(0, least - new.shape[1])
        if new.shape[1] < n or bool(done.all()) or left == 0:
            break
        ones = torch.ones(batch, n - 1, dtype=torch.bool, device=ids.device)
        state = write(state, torch.cat([ids, new[:, :-1]], 1), torch.cat([seg_mask, ones], 1))
        ids, seg_mask = new[:, -1:], ones[:, :1]
    return torch.cat(out, dim=1)


def check_rolling(kwargs: dict) -> None:
    """What ``generate(roll_segments=True)`` supports: ``max_new_tokens``, no beams (a beam
    search would have to carry its beams' states across segments), plain token output;
    ``num_return_sequences`` an int >= 1."""
    bad = [k for k in ("num_beams",) if kwargs.get(k, 1) != 1]
    bad += [k for k in ("max_length", "return_dict_in_generate") if kwargs.get(k)]
    if bad or kwargs.get("max_new_tokens") is None:
        raise ValueError(f"generate(roll_segments=True) needs max_new_tokens and returns the new "
                         f"tokens without beams; not supported: {bad or 'no max_new_tokens'}")
    copies = kwargs.get("num_return_sequences")
    if copies is not None and (isinstance(copies, bool) or not isinstance(copies, int)
                               or copies < 1):
        raise ValueError(f"generate(roll_segments=True): num_return_sequences must be an int >= 1, "
                         f"got {copies!r}")


def lm_outputs(logits_fn, hidden: torch.Tensor | None, seg: Segment, n_targets: int | None, *,
               logits: bool, has_loss: bool) -> dict[str, torch.Tensor]:
    """A language-model step's outputs for one segment: ``"loss"``, its summed cross-entropy
    divided by ``n_targets`` (when ``has_loss``), and ``"logits"`` ``[B, S, V]`` (when asked
    for); ``logits_fn`` maps ``hidden`` ``[B, S, d]`` to logits."""
    out = {}
    if logits or has_loss:
        seg_logits = logits_fn(hidden)
        if has_loss:
            out["loss"] = _ce_sum(seg_logits, seg.targets) / n_targets
        if logits:
            out["logits"] = seg_logits
    return out


def _ce_sum(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Summed cross-entropy over positions whose target is not -100 (float32 at least; the
    extension's fused kernel on CPU: :func:`rmt_fast._extension.cross_entropy_sum`)."""
    return cross_entropy_sum(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
