"""Checks at the API boundary: bad input gets a ``ValueError`` naming the argument, the offending
value and what is expected, before any state changes and before torch fails somewhere deep.

Cost: shape/dtype/device checks are free; token ids cost one ``aminmax`` per call (per chunk when
streaming), which on a GPU is one synchronisation. Nothing here runs per segment or per token
inside the models' loops. What is validated where, and what deliberately is not:
``docs/validation.md``.
"""

from __future__ import annotations

import warnings

import torch

IGNORE_INDEX = -100
#: what ``nn.Embedding`` takes as indices
EMBEDDING_DTYPES = (torch.long, torch.int32)


def _describe(x) -> str:
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {list(x.shape)}"
    return f"{type(x).__name__} {x!r}"[:200]


def check_finite_nonnegative(value: object, name: str, note: str = "") -> float:
    """``value`` as a float; a clear error naming ``name`` unless it is a finite number >= 0
    (``note``: what the message adds after the bound, e.g. ``" (0 = off)"``)."""
    if not (isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value < float("inf")):
        raise ValueError(f"{name} must be a finite float >= 0{note}, got {value!r}")
    return float(value)


def check_tensor(name: str, x, dims: tuple[int, ...], what: str) -> torch.Tensor:
    """``x`` if it is a tensor with one of ``dims`` dimensions, else a ValueError; ``what``
    describes the expected shape (``"[B, T] token ids"``)."""
    if not isinstance(x, torch.Tensor) or x.dim() not in dims:
        raise ValueError(f"{name} must be {what}, got {_describe(x)}")
    return x


def check_integer(name: str, x: torch.Tensor, allowed: tuple[torch.dtype, ...] | None = None) -> None:
    """Integer dtype (not bool, float or complex), one of ``allowed`` when given."""
    if allowed is not None:
        if x.dtype not in allowed:
            raise ValueError(f"{name} must hold integer ids of dtype {' or '.join(map(str, allowed))}, "
                             f"got dtype {x.dtype}")
    elif x.is_floating_point() or x.is_complex() or x.dtype == torch.bool:
        raise ValueError(f"{name} must hold integer ids, got dtype {x.dtype}")


def check_batch(name: str, x: torch.Tensor, *, length_dim: int | None = 1) -> None:
    """At least one row (dim 0) and, when ``length_dim`` is given, at least one token."""
    if x.shape[0] == 0:
        raise ValueError(f"{name} has batch size 0 (shape {list(x.shape)}): need at least one row")
    if length_dim is not None and x.shape[length_dim] == 0:
        raise ValueError(f"{name} has length 0 (shape {list(x.shape)}): need at least one token")


def _aminmax(x: torch.Tensor) -> tuple[int, int]:
    try:
        lo, hi = torch.aminmax(x)
    except (RuntimeError, NotImplementedError):  # e.g. uint16/uint32, which few kernels support
        lo, hi = torch.aminmax(x.long())
    return int(lo), int(hi)


def check_ids_in_range(name: str, ids: torch.Tensor, vocab_size: int, *,
                       ignore_index: int | None = None, what: str = "the vocabulary") -> None:
    """Every value of ``ids`` in ``[0, vocab_size)`` (or equal to ``ignore_index``): one
    reduction (``aminmax``, or one ``any`` with an ``ignore_index``); on failure the first
    offending value and its position are named."""
    if ids.numel() == 0:
        return
    if ignore_index is None:
        lo, hi = _aminmax(ids)
        if lo >= 0 and hi < vocab_size:
            return
        bad = (ids < 0) | (ids >= vocab_size)
    else:
        bad = ((ids < 0) & (ids != ignore_index)) | (ids >= vocab_size)
        if not bool(bad.any()):
            return
    where = tuple(int(i) for i in bad.nonzero()[0].tolist())
    allowed = f"[0, {vocab_size})" + ("" if ignore_index is None else f" or {ignore_index} (ignored)")
    raise ValueError(f"{name} holds {int(ids[where])} at index {list(where)}: every value must be in "
                     f"{allowed}, {what} of size {vocab_size}")


def check_token_ids(name: str, ids, vocab_size: int | None, *, dims: tuple[int, ...] = (2,),
                    ignore_index: int | None = None, allow_empty: bool = False,
                    dtypes: tuple[torch.dtype, ...] | None = None) -> torch.Tensor:
    """Token ids: a tensor with ``dims`` dimensions (``[B, T]`` by default), integer dtype (one of
    ``dtypes`` when given), at least one row and token (unless ``allow_empty``), values in
    ``[0, vocab_size)`` (or ``ignore_index``; not checked when ``vocab_size`` is None). Returns
    ``ids``."""
    shape = "[B, T]" if dims == (2,) else " or ".join("[n]" if d == 1 else "[B, n]" for d in dims)
    check_tensor(name, ids, dims, f"{shape} token ids (an integer tensor)")
    check_integer(name, ids, dtypes)
    if not allow_empty and ids.dim() == 1 and ids.shape[0] == 0:
        raise ValueError(f"{name} is empty: need at least one token")
    if not allow_empty and ids.dim() > 1:
        check_batch(name, ids, length_dim=ids.dim() - 1)
    if vocab_size is not None:
        check_ids_in_range(name, ids, vocab_size, ignore_index=ignore_index)
    return ids


def check_like(name: str, x, like_name: str, like: torch.Tensor) -> None:
    """``x`` a tensor of ``like``'s shape and device (``attention_mask``, ``labels``, ...)."""
    if not isinstance(x, torch.Tensor):
        raise ValueError(f"{name} must be a tensor shaped like {like_name} {list(like.shape)}, "
                         f"got {_describe(x)}")
    if tuple(x.shape) != tuple(like.shape):
        owner = like_name + ("'" if like_name.endswith("s") else "'s")
        raise ValueError(f"{name} must have {owner} shape {list(like.shape)}, got {list(x.shape)}")
    if x.device != like.device:
        raise ValueError(f"{name} must be on {like_name}'s device {like.device}, got {x.device}")


def check_mask(name: str, mask, like_name: str, like: torch.Tensor) -> None:
    """A 0/1 mask shaped like ``like``: bool, integer or floating (read as ``mask != 0``, as
    transformers reads 2-D attention masks; soft values are not rejected)."""
    check_like(name, mask, like_name, like)
    if mask.is_complex():
        raise ValueError(f"{name} must be bool or 0/1 integers, got dtype {mask.dtype}")


def check_device(name: str, x: torch.Tensor, device: torch.device) -> None:
    if x.device != device:
        raise ValueError(f"{name} is on {x.device} but the model is on {device}: move it with "
                         f"{name}.to({str(device)!r})")


def check_memory(name: str, memory, batch: int, num_mem_tokens: int, hidden: int,
                 dtype: torch.dtype, device: torch.device) -> None:
    """A memory state ``[B, M, d]`` of the model's dtype (also under autocast: the segment buffer
    is assembled from it and the embeddings, which autocast leaves in the model's dtype) and on
    its device."""
    want = [batch, num_mem_tokens, hidden]
    if not isinstance(memory, torch.Tensor) or list(memory.shape) != want:
        raise ValueError(f"{name} must be [B, M, d] = {want}, got {_describe(memory)}")
    if memory.dtype != dtype:
        raise ValueError(f"{name} must have the model's dtype {dtype}, got {memory.dtype}: convert it "
                         f"with {name}.to({dtype})")
    check_device(name, memory, device)


# --- per-model entry checks (one call at the top of each public method) -------------------------
def _input_vocab(model) -> int:
    return model.base.get_input_embeddings().weight.shape[0]


def _check_input(model, input_ids, attention_mask) -> None:
    check_token_ids("input_ids", input_ids, None, dtypes=EMBEDDING_DTYPES)
    check_device("input_ids", input_ids, model.device)
    check_ids_in_range("input_ids", input_ids, _input_vocab(model))
    if attention_mask is not None:
        check_mask("attention_mask", attention_mask, "input_ids", input_ids)


def _check_model_memory(model, memory, batch: int) -> None:
    from rmt_fast.models.segment_loop import SegmentState

    if isinstance(memory, SegmentState):  # an encoder's whole state: the wrapper checks the rest
        memory = memory.memory
    if memory is not None:
        mem = model.memory
        check_memory("memory", memory, batch, mem.shape[0], mem.shape[1], mem.dtype, model.device)


def _check_model_xl(model, xl, batch: int) -> None:
    """``xl``: the Transformer-XL cache a model with ``xl_cache > 0`` left (``.xl`` of its output,
    ``read``'s second value): per layer ``[B, Hkv, P, D]`` keys/values, ``padding`` ``[B, P]``."""
    from rmt_fast.models.segment_loop import RecurrentState

    if xl is None:
        return
    if not isinstance(xl, RecurrentState):
        raise TypeError(f"xl must be the RecurrentState a model with xl_cache > 0 returns (.xl of "
                        f"its output), got {type(xl).__name__}")
    if getattr(model.rmt_config, "xl_cache", 0) <= 0:
        raise ValueError("xl (a Transformer-XL cache) was given, but the model has xl_cache=0")
    pad = xl.padding
    if not (torch.is_tensor(pad) and pad.dtype == torch.bool and pad.dim() == 2
            and pad.shape[0] == batch):
        raise ValueError(f"xl.padding must be a bool tensor [B={batch}, P], got "
                         f"{_describe(pad)}")
    for layer, (k, v) in xl.kv.items():
        for name, t in (("keys", k), ("values", v)):
            if not (torch.is_tensor(t) and t.dim() == 4 and t.shape[0] == batch
                    and t.shape[2] == pad.shape[1]):
                raise ValueError(f"xl's layer-{layer} {name} must be [B={batch}, Hkv, "
                                 f"P={pad.shape[1]}, D], got {_describe(t)}")
            if t.device != model.device or pad.device != model.device:
                raise ValueError(f"xl must be on the model's device {model.device}, got {t.device}")


def check_causal_lm_call(model, input_ids, *, attention_mask=None, labels=None, labels_mask=None,
                         memory=None, xl=None) -> None:
    """:meth:`RMTForCausalLM.forward` / ``generate``: ``input_ids`` ``[B, T]`` in the input
    vocabulary; ``labels`` ``[B, T]`` in the output vocabulary or -100; ``labels_mask`` only with
    ``labels``; ``memory`` ``[B, M, d]`` of the model's dtype and device. Warns when the labels
    select no position at all (the loss is then 0 and carries no gradient)."""
    _check_input(model, input_ids, attention_mask)
    if labels_mask is not None and labels is None:
        raise ValueError("labels_mask was given without labels: it selects which positions of "
                         "labels are predicted, pass labels=... too")
    if labels is not None:
        check_like("labels", labels, "input_ids", input_ids)
        check_integer("labels", labels, (torch.long,))  # what F.cross_entropy takes (with -100)
        out_vocab = model.base.get_output_embeddings().weight.shape[0]
        check_ids_in_range("labels", labels, out_vocab, ignore_index=IGNORE_INDEX,
                           what="the output vocabulary")
        if labels_mask is not None:
            check_mask("labels_mask", labels_mask, "input_ids", input_ids)
        _warn_if_no_targets(model, labels, labels_mask)
    _check_model_memory(model, memory, input_ids.shape[0])
    _check_model_xl(model, xl, input_ids.shape[0])


def _warn_if_no_targets(model, labels: torch.Tensor, labels_mask) -> None:
    """Position ``p`` predicts ``labels[p + 1]`` and counts when ``labels_mask[p]`` (the decoder's
    loss); with ``loss_over="last"`` only the last segment's positions count."""
    from rmt_fast.models.segmenting import segment_bounds  # here: rmt_fast.models imports this module

    selected = labels[:, 1:] != IGNORE_INDEX
    if labels_mask is not None:
        selected = selected & labels_mask[:, :-1].to(torch.bool)
    cfg = model.rmt_config
    if getattr(cfg, "loss_over", "all") == "last":  # ARMT's config has no loss_over: all
        start = segment_bounds(labels.shape[1], cfg.segment_size, cfg.segment_alignment)[-1][0]
        selected = selected[:, start:]
    if not bool(selected.any()):
        warnings.warn("labels select no position to predict (every next-token label is -100 or "
                      "masked out by labels_mask): the loss is 0 and carries no gradient",
                      RuntimeWarning, stacklevel=3)


def check_encoder_call(model, input_ids, *, attention_mask=None, labels=None, memory=None,
                       per_token: bool) -> None:
    """Encoder RMT ``forward``: ``labels`` ``[B]`` class ids (``per_token=False``) or ``[B, T]``
    with -100 = ignore (``per_token=True``), in ``[0, num_labels)``. Warns when every label is
    -100 (the loss is then NaN, as ``F.cross_entropy``'s mean over no position)."""
    _check_input(model, input_ids, attention_mask)
    if labels is not None:
        num_labels = model.base.config.num_labels
        if per_token:
            check_like("labels", labels, "input_ids", input_ids)
        else:
            check_tensor("labels", labels, (1,), f"a [B] = [{input_ids.shape[0]}] tensor of class ids")
            if labels.shape[0] != input_ids.shape[0] or labels.device != input_ids.device:
                raise ValueError(f"labels must be [B] = [{input_ids.shape[0]}] class ids on "
                                 f"{input_ids.device}, got {list(labels.shape)} on {labels.device}")
        check_integer("labels", labels, (torch.long,))
        check_ids_in_range("labels", labels, num_labels, ignore_index=IGNORE_INDEX,
                           what="the classes (base config num_labels)")
        if not bool((labels != IGNORE_INDEX).any()):
            warnings.warn("every label is -100: the loss is NaN (F.cross_entropy's mean over no "
                          "position)", RuntimeWarning, stacklevel=3)
    _check_model_memory(model, memory, input_ids.shape[0])


def check_memory_transformer_call(model, input_ids, *, attention_mask=None) -> None:
    """:class:`MemoryTransformer` ``forward``: ``input_ids`` ``[B, T]`` in the vocabulary."""
    _check_input(model, input_ids, attention_mask)
