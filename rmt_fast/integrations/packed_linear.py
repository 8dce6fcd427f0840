"""CPU inference through oneDNN with pre-packed weights for a model's linear layers.

ATen sends a CPU ``addmm`` to MKL, and MKL runs its AVX2 code on AMD CPUs: on this project's AMD
EPYC (AVX-512) float32 products of our shapes ran at about 95-99 GFLOP/s through ``addmm`` and at
about 215-223 GFLOP/s through oneDNN (which torch also ships) with the weight reordered once into
oneDNN's blocked layout; bf16 products gained 0-10%. Measurements: ``bench/README.md``. oneDNN's
packed linear op (``torch.ops.mkldnn._linear_pointwise``, the op ``torch.compile``'s CPU backend
emits for linear layers) is called directly because ``torch.compile`` did not speed our reading up
(it graph-breaks at every segment; ``bench/README.md``).

:func:`packed_linears` swaps the classes of a module's ``nn.Linear`` and transformers ``Conv1D``
layers for subclasses whose forward takes the packed path where it is valid and the layer's own
forward everywhere else, and swaps them back on exit (the model is unchanged outside the block;
parameters, state-dict keys and ``isinstance`` checks are untouched inside). The packed path is
taken only where autograd does not record (``torch.no_grad``/``inference_mode``, or no input
requiring grad), on CPU, for float32 or bfloat16 (under CPU autocast: the autocast dtype, as
``F.linear`` would compute), when oneDNN is available (bf16: where oneDNN has bf16), not while
``torch.compile`` traces. Outputs equal the layer's own to float rounding (tests/test_packed_linear.py).

Packed weights are kept with the model (weakly: they go with the layer) so that a new reader or
a new call does not pack again: oneDNN's reorder and its first call with a new weight cost about
3 ms per layer, a quarter of a 4K-token read at the default bench size. A layer's packed weight
is packed again when its weight's storage, version counter (``model.to``, optimizer steps,
``load_state_dict``) or fingerprint changed; the fingerprint (the exact integer sum of the
weight's raw bits) is taken when a block begins and catches writes through ``.data`` (which bump
no version counter: peft's merge) between blocks, though not a change that only permutes a
weight's elements (or changes several whose bit patterns cancel in the sum). Weights must not
change inside a block. :func:`clear` frees a module's packed weights.
"""

from __future__ import annotations

import contextlib
import os
import threading
import weakref
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["packed_linears", "available", "clear", "PackedLinear"]

_LOCK = threading.Lock()
_USERS, _SWAPPED = "_rmt_fast_pack_users", "_rmt_fast_pack_swapped"
#: layer -> {"fingerprint": (ptr, version, bit sum) or None, dtype: (ptr, version, packed), ...}
_PACKED: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _ops_present() -> bool:
    mk = getattr(torch.ops, "mkldnn", None)
    return (torch.backends.mkldnn.is_available() and mk is not None
            and hasattr(mk, "_linear_pointwise") and hasattr(mk, "_reorder_linear_weight"))


_AVAILABLE: dict[torch.dtype, bool] = {}


def available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether the packed path can run ``dtype`` (float32 or bfloat16) on this machine."""
    ok = _AVAILABLE.get(dtype)
    if ok is None:  # asked once per dtype: every packed call checks it
        ok = (dtype in (torch.float32, torch.bfloat16) and _ops_present()
              and (dtype != torch.bfloat16 or bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())))
        _AVAILABLE[dtype] = ok
    return ok


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor,
                   bias: torch.Tensor | None) -> torch.dtype | None:
    """The dtype the packed path computes ``x @ weight^T`` in, or None where it must not run."""
    if not (x.is_cpu and weight.is_cpu) or torch.compiler.is_compiling():
        return None
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad
                                    or (bias is not None and bias.requires_grad)):
        return None
    if torch.is_autocast_enabled("cpu"):
        dtype = torch.get_autocast_dtype("cpu")
        if not {x.dtype, weight.dtype} <= {torch.float32, torch.bfloat16}:
            return None
    else:
        dtype = x.dtype
        if weight.dtype != dtype:
            return None
    return dtype if available(dtype) else None


# Per call this path costs a few microseconds of Python beside oneDNN's own call (a 16K-token
# read at the default bench size makes 1,024 of them): no copies or casts where none are needed.
def _packed_forward(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None, transposed: bool) -> torch.Tensor | None:
    """``x @ W^T + bias`` through the packed weight, or None where the packed path must not run.
    ``W`` is ``weight`` ``[out, in]`` (``nn.Linear``), or its transpose when ``transposed``
    (``Conv1D``: ``weight`` ``[in, out]``)."""
    dtype = _compute_dtype(x, weight, bias)
    in_features = weight.shape[0] if transposed else weight.shape[1]
    if dtype is None or x.shape[-1] != in_features:
        return None
    cache = _PACKED.get(layer)
    if cache is None:
        return None
    entry = cache.get(dtype)
    x2 = x.reshape(-1, in_features)
    if entry is None or entry[0] != weight.data_ptr() or entry[1] != weight._version:
        w = weight.detach().t() if transposed else weight.detach()
        # the row count of the first call is oneDNN's layout hint; any row count computes
        entry = cache[dtype] = (weight.data_ptr(), weight._version,
                                torch.ops.mkldnn._reorder_linear_weight(
                                    w.to(dtype).contiguous(), max(x2.shape[0], 1)))
    if x2.dtype != dtype:
        x2 = x2.to(dtype)
    if bias is not None and bias.dtype != dtype:
        bias = bias.to(dtype)
    # not recording (checked above): no detach needed
    out = torch.ops.mkldnn._linear_pointwise(x2, entry[2], bias, "none", [], "")
    return out.view(x.shape[:-1] + out.shape[-1:])


class PackedLinear(nn.Linear):
    """``nn.Linear`` whose forward takes the packed oneDNN path where valid (see the module doc);
    swapped in by :func:`packed_linears` only."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = _packed_forward(self, x, self.weight, self.bias, transposed=False)
        return F.linear(x, self.weight, self.bias) if out is None else out


def _conv1d_class():
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:
        return None, None

    class PackedConv1D(Conv1D):
        """transformers ``Conv1D`` (GPT-2's linear layer; weight ``[in, out]``) with the packed
        path; swapped in by :func:`packed_linears` only."""

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            out = _packed_forward(self, x, self.weight, self.bias, transposed=True)
            return super().forward(x) if out is None else out

    return Conv1D, PackedConv1D


def _swap_table() -> dict[type, type]:
    table: dict[type, type] = {nn.Linear: PackedLinear}
    conv1d, packed_conv1d = _conv1d_class()
    if conv1d is not None:
        table[conv1d] = packed_conv1d
    return table


_TABLE: dict[type, type] | None = None


#: integer dtype of each element size (larger elements, e.g. complex128, view as several int64)
_BITS = {1: torch.int8, 2: torch.int16, 4: torch.int32}


def _fingerprint(weight: torch.Tensor) -> tuple:
    """``(ptr, version, sum of the raw bits)``: the weight's bytes summed as int64 words
    (wrapping), so any one changed element changes it. Whole 8-byte words where the size and
    offset allow (no conversion: 20x cheaper than summing int16 views of bf16 weights in int64,
    which was 15% of a 4,096-token GPT-2-small read); else the elements as integers of their
    size."""
    w = weight.detach().contiguous()
    if (w.numel() * w.element_size()) % 8 == 0 and w.storage_offset() * w.element_size() % 8 == 0:
        words = w.reshape(-1).view(torch.uint8).view(torch.int64)
        return (w.data_ptr(), w._version, int(words.sum()))
    bits = _BITS.get(w.element_size(), torch.int64)
    return (w.data_ptr(), w._version, int(w.view(bits).sum(dtype=torch.int64)))


def _validate(layer: nn.Module) -> None:
    """Drop ``layer``'s packed weights if its weight changed since they were packed."""
    cache = _PACKED.setdefault(layer, {})
    if len(cache) <= 1:  # nothing packed yet: fingerprint lazily, when something is
        cache["fingerprint"] = None
        return
    now = _fingerprint(layer.weight)
    if cache.get("fingerprint") != now:
        cache.clear()
    cache["fingerprint"] = now


def clear(module: nn.Module) -> None:
    """Free the packed weights of ``module``'s layers."""
    for m in module.modules():
        _PACKED.pop(m, None)


@contextlib.contextmanager
def packed_linears(module: nn.Module, enabled: bool = True) -> Iterator[int]:
    """Inside the block, ``module``'s ``nn.Linear`` and ``Conv1D`` layers (exactly those types,
    not subclasses) run CPU inference through oneDNN with pre-packed weights; yields the number
    of layers swapped (0 where oneDNN is missing, or ``enabled`` is False, or the environment
    sets ``RMT_FAST_PACKED_LINEAR=0``). Nested and concurrent uses with one module are counted:
    the first in swaps, the last out restores."""
    global _TABLE
    if not enabled or os.environ.get("RMT_FAST_PACKED_LINEAR", "1") == "0" or not available():
        yield 0
        return
    with _LOCK:
        if _TABLE is None:
            _TABLE = _swap_table()
        users = module.__dict__.get(_USERS, 0)
        if users == 0:
            swapped = []
            for m in module.modules():
                new = _TABLE.get(type(m))
                if new is not None:
                    swapped.append((m, type(m)))
                    m.__class__ = new
                    _validate(m)
            module.__dict__[_SWAPPED] = swapped
        module.__dict__[_USERS] = users + 1
        count = len(module.__dict__[_SWAPPED])
    try:
        yield count
    finally:
        with _LOCK:
            module.__dict__[_USERS] -= 1
            if module.__dict__[_USERS] == 0:
                del module.__dict__[_USERS]
                for m, cls in module.__dict__.pop(_SWAPPED):
                    m.__class__ = cls
                    cache = _PACKED.get(m)
                    if cache and len(cache) > 1 and cache.get("fingerprint") is None:
                        cache["fingerprint"] = _fingerprint(m.weight)  # packed in this block
