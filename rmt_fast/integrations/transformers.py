"""``attn_implementation="rmt_fast"``: a drop-in attention backend for transformers models.

Registers the attention function with ``AttentionInterface`` and transformers' ``sdpa_mask`` with
``AttentionMaskInterface`` under the same name. Both are needed: without the mask function
transformers silently drops padding masks for unknown backends. Under a :func:`memory_layout`
that drives every call the mask function builds nothing (the layout carries the mask).

The bool mask transformers passes (``[B, 1, Lq, Lk]``, True = attend) is reduced to the structured
form ``memory_attention`` takes (causal or full, plus a key-padding vector, with the layer's
``sliding_window`` where it has one) whenever it is exactly that; other masks (packed sequences,
a window over a rolling cache) go through the dense-mask path.

The RMT wrappers use :func:`memory_layout` to pass the memory-token structure (read/write blocks,
mask mode, padding, Transformer-XL keys/values) down to every attention layer.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from rmt_fast.attention import memory_attention
from rmt_fast.masks import dense_visibility
from rmt_fast.ops.memory_attention.dense import dense_sdpa

BACKEND_NAME = "rmt_fast"


@dataclass
class MemoryLayout:
    """Memory-token structure of the sequence currently running through a wrapped model.

    ``past``: per-layer ``(past_k, past_v)`` ``[B, Hkv, P, D]`` (Transformer-XL cache), or None.
    ``record_kv``: if set, each layer stores its current ``(k, v)`` there, keyed by layer index.
    ``used_rows``: ``(layer, start, stop, rows)``: only the outputs of rows ``[start, stop)`` of
    layer ``layer`` are used (while reading; :mod:`rmt_fast.models.used_rows`), so that layer's
    attention computes only those query rows (write rows, or any rows under the ``"full"`` mask)
    and returns zeros for the others.
    ``length`` (generation): the layout drives only the prefill call of that many query rows;
    the later decoding calls run transformers' mask over its KV cache, and see ``past`` too
    (with its part of ``key_padding_mask``), as segment rows do.
    """

    num_read: int = 0
    num_write: int = 0
    mask: str = "causal"
    key_padding_mask: torch.Tensor | None = None  # [B, P + L]
    past: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = None
    past_visible_to_read: bool = False
    record_kv: dict[int, tuple[torch.Tensor, torch.Tensor]] | None = field(default=None)
    length: int | None = None  # apply only to calls with this many query rows (generation prefill)
    used_rows: tuple[int, int, int, int] | None = None
    #: this layout for other batch sizes (:func:`_for_batch`), made once, gone with the layout
    batches: dict[int, MemoryLayout] = field(default_factory=dict, init=False, repr=False,
                                             compare=False)


_LAYOUT: contextvars.ContextVar[MemoryLayout | None] = contextvars.ContextVar(
    "rmt_fast_memory_layout", default=None
)


@contextlib.contextmanager
def memory_layout(layout: MemoryLayout) -> Iterator[MemoryLayout]:
    """Within this context, every ``rmt_fast`` attention layer applies ``layout``."""
    token = _LAYOUT.set(layout)
    try:
        yield layout
    finally:
        _LAYOUT.reset(token)


def current_layout() -> MemoryLayout | None:
    return _LAYOUT.get()


_reduce_cache: list = [None, None, None]  # [last mask, window, its reduction]; layers share masks


def _reduce_bool_mask(mask: torch.Tensor, q_len: int, causal: bool, window: int | None = None):
    """``(mode, key_padding_mask [B, Lk])`` if ``mask`` is exactly causal/full & padding (cut by
    the sliding ``window``, :mod:`rmt_fast.masks`, when given), else None."""
    if _reduce_cache[0] is mask and _reduce_cache[1] == window:
        return _reduce_cache[2]
    result = None
    if mask.dim() == 4 and mask.shape[1] == 1 and mask.shape[2] == q_len:
        m = mask[:, 0]
        kv_len = m.shape[-1]
        if kv_len >= q_len:
            kpm = m.any(dim=1)  # a real key is seen by some row
            mode = "causal" if causal else "full"
            expect = dense_visibility(q_len, kv_len - q_len, mask=mode, key_padding_mask=kpm,
                                      device=m.device, window=window)
            if torch.equal(expect, m):
                result = (mode, kpm)
    _reduce_cache[:] = mask, window, result
    return result


def _split_past(key, value, q_len):
    """Keys beyond the query length are a cache: pass them as ``past_k``/``past_v``."""
    past = key.shape[2] - q_len
    if past <= 0:
        return key, value, None, None
    return key[:, :, past:], value[:, :, past:], key[:, :, :past], value[:, :, :past]


def rmt_fast_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention function: ``[B, H, L, D]`` in, ``([B, Lq, H, D], None)`` out.

    Models whose attention scores carry a ``position_bias`` (T5) run :func:`_exact_attention`,
    the eager formula on dense scores; the fused kernels serve all others wherever the mask has
    the structured form (a layer's ``sliding_window`` included): Gemma 2's logit ``softcap``
    in the kernels' scores, gpt-oss's sink logit per head (``s_aux``) from their log-sum-exp
    (:func:`_with_sinks`). Elsewhere (other bool masks, additive masks) those run the exact
    path too."""
    q_len = query.shape[2]
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    terms = _score_terms(kwargs)
    sinks = softcap = None
    if terms is not None and terms[2] is None:
        softcap, sinks, terms = terms[0], terms[1], None
    layout = current_layout()
    if layout is not None and layout.length is not None:
        layout = _for_batch(layout, query.shape[0])
    # a layout with ``length`` is for one prefill call: q_len rows and no cached keys (later
    # decoding steps carry a KV cache, so their keys outnumber their queries)
    prefill = layout is not None and layout.length == q_len and key.shape[2] == q_len
    if layout is not None and (layout.length is None or prefill):
        _check_window(kwargs.get("sliding_window"), layout, module, key.shape[2])
        if terms is None:
            out = _layout_attention(module, query, key, value, layout, dropout, scaling, sinks,
                                    softcap)
        else:
            out = _exact_layout_attention(module, query, key, value, layout, dropout, scaling,
                                          terms)
        return out.transpose(1, 2).contiguous(), None

    # a sliding-window layer (Mistral, Gemma 2/3, gpt-oss) passes its window: the kernels cut it
    common = dict(scale=scaling, dropout_p=dropout, window=kwargs.get("sliding_window"),
                  softcap=softcap)
    xl = _decoding_past(layout, module, key.shape[0])
    if xl is not None:
        _check_window(kwargs.get("sliding_window"), layout, module, key.shape[2])
    if terms is None:
        # the fused kernels where the mask is structured (with sinks: their lse too)
        result = _structured(query, key, value, attention_mask, q_len, causal, xl,
                             dict(common, return_lse=sinks is not None))
        if result is not None:
            out = result if sinks is None else _with_sinks(result, sinks)
            return out.transpose(1, 2).contiguous(), None
        if sinks is not None or softcap is not None:  # an unstructured mask: the exact path
            terms = (softcap, sinks, None)
    if terms is not None:
        if attention_mask is None:
            if causal and q_len > 1 and xl is None:  # as below: a causal prefill, first q_len keys
                key, value = key[:, :, :q_len], value[:, :, :q_len]
            k_len = key.shape[2]
            attention_mask = torch.ones(q_len, k_len, dtype=torch.bool, device=query.device)
            if causal and q_len > 1:
                attention_mask = attention_mask.tril(k_len - q_len)
            attention_mask = attention_mask[None, None]
        if xl is not None:
            key, value, attention_mask = _prepend_past(key, value, attention_mask, xl)
        out = _exact_attention(query, key, value, attention_mask, scaling, dropout, *terms)
        return out.transpose(1, 2).contiguous(), None
    if attention_mask is None:  # cross-attention to a shorter sequence
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, dropout_p=dropout, scale=scaling,
            enable_gqa=query.shape[1] != key.shape[1])
    elif attention_mask.dtype == torch.bool:
        if xl is not None:
            key, value, attention_mask = _prepend_past(key, value, attention_mask, xl)
        out = dense_sdpa(query, key, value, attention_mask, scale=scaling, dropout_p=dropout)
    else:  # additive float mask, as the user passed it
        if xl is not None:
            key, value, attention_mask = _prepend_past(key, value, attention_mask, xl)
        out = torch.nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=attention_mask, dropout_p=dropout, scale=scaling,
            enable_gqa=query.shape[1] != key.shape[1])
    return out.transpose(1, 2).contiguous(), None


def _with_sinks(result: tuple[torch.Tensor, torch.Tensor], sinks: torch.Tensor) -> torch.Tensor:
    """The softmax with one more logit per head in its denominator (gpt-oss's sinks, ``[Hq]``)
    from ``(out [B, Hq, L, D], lse [B, Hq, L])`` of the softmax without it:
    ``out * exp(lse) / (exp(lse) + exp(sink)) = out * sigmoid(lse - sink)``, exact (rows that
    see nothing: lse -inf, 0). Computed in float32, returned in ``out``'s dtype."""
    out, lse = result
    if sinks.numel() != out.shape[1]:
        raise ValueError(f"s_aux (attention sinks) must have one logit per query head "
                         f"({out.shape[1]}), got shape {tuple(sinks.shape)}")
    weight = torch.sigmoid(lse - sinks.reshape(1, -1, 1).float())
    return (out.float() * weight.unsqueeze(-1)).to(out.dtype)


def _structured(query, key, value, attention_mask, q_len: int, causal: bool, xl, common):
    """``memory_attention``'s result where the mask has the structured form (none, or exactly
    causal/full and padding), else None (no mask with fewer keys than queries: cross-attention;
    any other bool mask; an additive mask)."""
    if attention_mask is None:
        if causal and q_len > 1 and xl is None:
            # as sdpa: an unmasked causal prefill into a longer (static) cache sees the first q_len
            return memory_attention(query, key[:, :, :q_len], value[:, :, :q_len], mask="causal",
                                    **common)
        if key.shape[2] < q_len and xl is None:
            return None
        return _cached(query, key, value, "causal" if causal and q_len > 1 else "full", None, xl,
                       common)
    if attention_mask.dtype == torch.bool:
        reduced = _reduce_bool_mask(attention_mask, q_len, causal, common["window"])
        if reduced is not None:
            return _cached(query, key, value, *reduced, xl, common)
    return None


def generation_rows(t: torch.Tensor, batch: int) -> torch.Tensor:
    """``t`` ``[B, ...]`` for the ``batch`` rows transformers' ``generate`` runs: it repeats each
    row ``batch // B`` times (``repeat_interleave``: beams, ``num_return_sequences``); beams of
    one row share the row's state, so reordering beams needs nothing. ``t`` itself when
    ``batch`` is ``B`` or not a multiple of it."""
    rows = t.shape[0]
    if batch == rows or batch % rows:
        return t
    return t.repeat_interleave(batch // rows, 0)


def _for_batch(layout: MemoryLayout, batch: int) -> MemoryLayout:
    """A generation layout for ``batch`` rows: its per-row tensors through
    :func:`generation_rows`, once per generation and batch size (the layout itself where
    the batch is its own)."""
    kpm = layout.key_padding_mask
    per_row = kpm if kpm is not None else next(iter(layout.past.values()))[0] if layout.past else None
    if per_row is None or per_row.shape[0] == batch:
        return layout
    if batch not in layout.batches:
        past = None if layout.past is None else {
            i: (generation_rows(k, batch), generation_rows(v, batch))
            for i, (k, v) in layout.past.items()}
        layout.batches[batch] = dataclasses.replace(
            layout, past=past, key_padding_mask=None if kpm is None else generation_rows(kpm, batch))
    return layout.batches[batch]


def _score_terms(kwargs: dict):
    """``(softcap, sinks, position_bias)`` when a model passes any of them, else None; refuses
    what this backend does not implement."""
    cache = kwargs.get("cache")
    if cache is not None and type(cache).__name__ == "PagedAttentionCache":
        raise NotImplementedError("attn_implementation='rmt_fast' does not implement transformers' "
                                  "paged attention cache (continuous batching); use 'sdpa' there")
    softcap, sinks, bias = (kwargs.get(k) for k in ("softcap", "s_aux", "position_bias"))
    if softcap is None and sinks is None and bias is None:
        return None
    return softcap, sinks, bias


def _exact_attention(query, key, value, mask: torch.Tensor, scaling, dropout: float, softcap,
                     sinks, bias) -> torch.Tensor:
    """transformers' eager attention on dense scores, for the terms the fused kernels do not
    have: ``q k^T * scaling``, then ``softcap * tanh(. / softcap)``, ``+ position_bias``, the
    mask (bool, True = attend, or additive), a sink logit per head (``sinks`` ``[H]``) in the
    softmax's denominator. ``[B, H, Lq, D]``; rows that see nothing return zeros (bool mask).
    Dense ``[B, H, Lq, Lk]`` scores: for these models only (why: no fused kernel has them)."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    scores = torch.matmul(query, key.transpose(-1, -2)) * scale
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if bias is not None:
        scores = scores + bias
    seen = None
    if mask.dtype == torch.bool:
        seen = mask.any(dim=-1, keepdim=True)
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    else:
        scores = scores + mask
    if sinks is not None:
        sink = sinks.reshape(1, -1, 1, 1).to(scores.dtype).expand(scores.shape[0], -1,
                                                                 scores.shape[2], 1)
        scores = torch.cat([scores, sink], dim=-1)
    probs = torch.softmax(scores.float() if scores.element_size() < 4 else scores, dim=-1)
    probs = probs.to(value.dtype)
    if sinks is not None:
        probs = probs[..., :-1]
    if dropout:
        probs = torch.nn.functional.dropout(probs, p=dropout, training=True)
    out = torch.matmul(probs, value)
    return out if seen is None else out.masked_fill(~seen, 0.0)


def _layer_past(layout: MemoryLayout, module):
    """``(past_k, past_v)`` of the layout for this attention layer, or ``(None, None)``."""
    layer = getattr(module, "layer_idx", None)
    if layout.past is not None and layer in layout.past:
        return layout.past[layer]
    return None, None


def _check_window(sliding_window, layout: MemoryLayout, module, length: int) -> None:
    """A layer with a sliding window shorter than the layout's keys (past + ``length``) is
    refused: the layout's keys (XL cache, read memory, segment, write memory) are not one
    position-ordered sequence that the window could cut as the base model would."""
    if sliding_window is None:
        return
    past_k, _ = _layer_past(layout, module)
    keys = length + (0 if past_k is None else past_k.shape[2])
    if keys > sliding_window:
        raise ValueError(
            f"the base model's attention has a sliding window of {sliding_window} keys, shorter "
            f"than the {keys} keys of a segment (its tokens, memory tokens and any XL cache): "
            "choose segment_size / num_mem_tokens / xl_cache so that they fit")


def _exact_layout_attention(module, query, key, value, layout: MemoryLayout, dropout, scaling,
                            terms) -> torch.Tensor:
    """:func:`_exact_attention` under a memory layout: its visibility (past keys, masks,
    padding) as a dense mask."""
    past_k, past_v = _layer_past(layout, module)
    if layout.record_kv is not None:
        layout.record_kv[getattr(module, "layer_idx", None)] = (key, value)
    p = 0 if past_k is None else past_k.shape[2]
    if terms[2] is not None and p:
        raise ValueError("position_bias (T5-style relative attention bias) has no entries for the "
                         "XL cache's keys: use xl_cache=0 with this model")
    vis = dense_visibility(query.shape[2], p, num_read=layout.num_read,
                           num_write=layout.num_write, mask=layout.mask,
                           past_visible_to_read=layout.past_visible_to_read,
                           key_padding_mask=layout.key_padding_mask, device=query.device)
    vis = vis[:, None] if vis.dim() == 3 else vis[None, None]
    if past_k is not None:
        key, value = torch.cat([past_k, key], 2), torch.cat([past_v, value], 2)
    return _exact_attention(query, key, value, vis, scaling, dropout, *terms)


def _decoding_past(layout: MemoryLayout | None, module, batch: int):
    """A generation layout's ``past`` for this layer, seen by the decoding calls (which the
    layout does not drive): ``(past_k, past_v, padding [B, P] bool)``, or None."""
    if layout is None or layout.length is None:
        return None
    pk, pv = _layer_past(layout, module)
    if pk is None:
        return None
    kpm = layout.key_padding_mask
    padding = (kpm[:, :pk.shape[2]] if kpm is not None
               else torch.ones(batch, pk.shape[2], dtype=torch.bool, device=pk.device))
    return pk, pv, padding


def _cached(query, key, value, mode: str, kpm, xl, common):
    """``memory_attention`` with the keys beyond the query rows as past keys (a KV cache), and
    ``xl``'s past keys before those."""
    k, v, pk, pv = _split_past(key, value, query.shape[2])
    if xl is not None:
        xk, xv, padding = xl
        pk = xk if pk is None else torch.cat([xk, pk], 2)
        pv = xv if pv is None else torch.cat([xv, pv], 2)
        if kpm is None:
            kpm = torch.ones(key.shape[0], key.shape[2], dtype=torch.bool, device=key.device)
        kpm = torch.cat([padding, kpm], 1)
    return memory_attention(query, k, v, mask=mode, past_k=pk, past_v=pv, key_padding_mask=kpm,
                            **common)


def _prepend_past(key, value, mask: torch.Tensor, xl):
    """Keys, values and a 4-d mask (bool or additive) with ``xl``'s past keys in front, seen by
    every query row where ``xl``'s padding says they are real."""
    xk, xv, padding = xl
    b, q = key.shape[0], mask.shape[2]
    mask = mask.expand(b, -1, -1, -1)
    seen = padding[:, None, None, :].expand(b, mask.shape[1], q, -1)
    if mask.dtype != torch.bool:
        seen = torch.zeros(seen.shape, dtype=mask.dtype, device=mask.device).masked_fill(
            ~seen, torch.finfo(mask.dtype).min)
    return torch.cat([xk, key], 2), torch.cat([xv, value], 2), torch.cat([seen, mask], 3)


def _layout_attention(module, query, key, value, layout: MemoryLayout, dropout, scaling,
                      sinks=None, softcap=None):
    """``memory_attention`` under the layout (``sinks`` ``[Hq]``: :func:`_with_sinks`;
    ``softcap``: the logit cap)."""
    layer = getattr(module, "layer_idx", None)
    past_k, past_v = _layer_past(layout, module)
    if layout.record_kv is not None:
        layout.record_kv[layer] = (key, value)
    used = layout.used_rows
    if used is not None and layer == used[0] and query.shape[2] == used[3] \
            and 0 <= used[1] < used[2] <= used[3] \
            and (layout.mask == "full" or used[3] - layout.num_write <= used[1] and used[2] == used[3]):
        return _rows_attention(query, key, value, layout, used[1], used[2], past_k, past_v, dropout,
                               scaling, sinks, softcap)
    result = memory_attention(
        query, key, value, num_read=layout.num_read, num_write=layout.num_write, mask=layout.mask,
        past_k=past_k, past_v=past_v, past_visible_to_read=layout.past_visible_to_read,
        key_padding_mask=layout.key_padding_mask, scale=scaling, dropout_p=dropout,
        softcap=softcap, return_lse=sinks is not None,
    )
    return result if sinks is None else _with_sinks(result, sinks)


def _join(parts: list[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(parts, 2)``, without a copy when at most one part has rows (the decoder's
    write rows are the last rows: the keys after them are empty; the kernels take strided keys)."""
    full = [t for t in parts if t.shape[2]]
    return full[0] if len(full) == 1 else torch.cat(parts, 2)


def _rows_attention(query, key, value, layout: MemoryLayout, start: int, stop: int, past_k, past_v,
                    dropout, scaling, sinks=None, softcap=None):
    """Query rows ``[start, stop)`` only: write rows (which see every earlier key under every
    mask) or any rows under the ``"full"`` mask. Every other row's keys join the past keys
    (``[past | rows before | rows after]``, the key-padding mask reordered to match), which those
    rows see. ``[B, H, L, D]`` with zeros outside ``[start, stop)``."""
    ks = [key[:, :, :start], key[:, :, stop:]]
    vs = [value[:, :, :start], value[:, :, stop:]]
    if past_k is not None:
        ks, vs = [past_k] + ks, [past_v] + vs
    kpm = layout.key_padding_mask
    if kpm is not None:
        p = kpm.shape[1] - key.shape[2]  # past keys
        kpm = torch.cat([kpm[:, :p + start], kpm[:, p + stop:], kpm[:, p + start:p + stop]], 1)
    out = memory_attention(
        query[:, :, start:stop], key[:, :, start:stop], value[:, :, start:stop], num_read=0,
        num_write=stop - start, mask=layout.mask, past_k=_join(ks), past_v=_join(vs),
        key_padding_mask=kpm, scale=scaling, dropout_p=dropout, softcap=softcap,
        return_lse=sinks is not None,
    )
    if sinks is not None:
        out = _with_sinks(out, sinks)
    b, h, _, d = out.shape
    return torch.cat([out.new_zeros(b, h, start, d), out,
                      out.new_zeros(b, h, query.shape[2] - stop, d)], dim=2)


def register(name: str = BACKEND_NAME, fn: Callable = rmt_fast_attention_forward) -> bool:
    """Register ``name`` with transformers; returns False when transformers is not installed."""
    try:
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    except ImportError:
        return False
    def mask_fn(*args, **kwargs):
        """``sdpa_mask``, except under a layout that drives every attention call, whose mask
        (padding included) the layout carries: then no mask is built."""
        layout = current_layout()
        if layout is not None and layout.length is None:
            return None
        return sdpa_mask(*args, **kwargs)

    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, mask_fn)
    return True


def layout_attention_mask(x: torch.Tensor) -> torch.Tensor:
    """All-ones ``[B, L]`` bool mask for ``x`` ``[B, L, d]``, for a base-model call under a
    :func:`memory_layout` (without ``length``), whose attention the layout drives (padding in its
    key-padding mask). Passing it spares transformers its scan of the position ids for packed
    sequences, which it runs on every call without a mask (about 1% of a bf16 read at the
    default bench size); the registered mask function then builds no mask."""
    return torch.ones(x.shape[:2], dtype=torch.bool, device=x.device)
