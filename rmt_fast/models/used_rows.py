"""Reading without outputs: the last layer computes only the rows whose outputs are used.

While an RMT model reads a segment into memory, the only outputs of the last transformer block
that anyone uses are a few rows: a decoder's (and ARMT's) memory rows (the next state), an
encoder classifier's ``[CLS]`` and memory rows. The block's keys and values must still come
from every row (the used rows attend to them), but everything after the attention is row-wise
(output projection, residuals, norms, MLP), so for the other rows the last block's attention,
output projection and MLP are wasted work: at 4 layers of d 256 (the bench's default decoder)
about a sixth of a segment's matrix-product FLOPs.

Used in evaluation mode only (in training mode dropout would draw other random numbers than a
full pass). Two pieces, both inactive unless the current
:class:`~rmt_fast.integrations.transformers.MemoryLayout` has
``used_rows = (layer, start, stop, rows)``:

* the ``rmt_fast`` attention function of layer ``layer`` computes only the query rows
  ``[start, stop)`` (every other row's keys are passed as past keys: the decoder's write rows
  and the encoder's rows see every earlier / every key under their masks) and returns zeros
  for the other rows;
* :func:`install` puts forward hooks on the last block's row-wise submodules (MLPs, attention
  output projections, BERT's intermediate/output layers, found by name: :data:`ROW_WISE`) that
  run them on the rows ``[start, stop)`` only and pad the output with zeros.

The used rows come out as with the full computation (to float rounding: the attention sums in
another tile order); the other rows of the last layer's output are not the model's and must not
be read. Models whose blocks have other names get the attention part only (still exact).
PyTorch hooks rather than a patched forward: they survive ``copy.deepcopy``, stay out of the
state dict, and compose with :func:`rmt_fast.integrations.packed_linear.packed_linears`.
"""

from __future__ import annotations

import torch
from torch import nn

from rmt_fast.integrations.transformers import current_layout
from rmt_fast.models.memory_transformer import find_layers

__all__ = ["ROW_WISE", "install", "last_layer", "row_wise_modules", "rows"]

#: paths, relative to a transformer block, of row-wise submodules (output row t depends on input
#: row t only): MLPs and attention output projections of GPT-2, GPT-NeoX, Llama/Qwen/Mistral,
#: Falcon, Phi, and BERT's ``attention.output`` / ``intermediate`` / ``output``
ROW_WISE = ("mlp", "feed_forward", "attn.c_proj", "self_attn.o_proj", "attention.dense",
            "self_attention.dense", "attention.output", "intermediate", "output")

_HANDLES = "_rmt_fast_used_rows_hooks"


def _active() -> tuple[int, int, int] | None:
    """``(start, stop, rows)`` of the current layout's ``used_rows``, or None."""
    layout = current_layout()
    return None if layout is None or layout.used_rows is None else layout.used_rows[1:]


def _pre_hook(module, args, kwargs):
    used = _active()
    if used is None or not args or not isinstance(args[0], torch.Tensor) or args[0].dim() < 2 \
            or args[0].shape[1] != used[2]:
        return None
    start, stop, rows = used

    def cut(a):  # contiguous: some layers view their input (transformers' Conv1D)
        if isinstance(a, torch.Tensor) and a.dim() >= 2 and a.shape[1] == rows:
            return a[:, start:stop].contiguous()
        return a

    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


def _post_hook(module, args, kwargs, out):
    used = _active()
    if used is None:
        return None
    if isinstance(out, tuple) and out and isinstance(out[0], torch.Tensor):
        # an MoE block's (hidden, router logits): the hidden rows are padded back; the router
        # logits (used by training's auxiliary loss only, and these hooks run in eval only)
        # keep the rows that ran
        padded = _pad(out[0], args, used)
        return None if padded is None else (padded, *out[1:])
    return _pad(out, args, used) if isinstance(out, torch.Tensor) else None


def _pad(out: torch.Tensor, args, used) -> torch.Tensor | None:
    """``out`` ``[B, stop - start, ...]`` back to ``[B, rows, ...]`` with zero rows around it."""
    start, stop, rows = used
    if out.dim() < 2 or out.shape[1] != stop - start or not args or args[0].shape[1] != stop - start:
        return None
    if stop - start == rows:
        return None
    parts = [out.new_zeros(out.shape[0], start, *out.shape[2:]), out,
             out.new_zeros(out.shape[0], rows - stop, *out.shape[2:])]
    return torch.cat(parts, dim=1)


def row_wise_modules(block: nn.Module) -> list[nn.Module]:
    """The submodules of ``block`` named in :data:`ROW_WISE` (at most one per path)."""
    found = []
    for path in ROW_WISE:
        module = block
        for part in path.split("."):
            module = getattr(module, part, None)
            if not isinstance(module, nn.Module):
                break
        else:
            found.append(module)
    return found


def install(block: nn.Module) -> int:
    """Hook the row-wise submodules of ``block`` (the model's last block); idempotent. Returns
    the number of submodules hooked."""
    if _HANDLES in block.__dict__:
        return len(block.__dict__[_HANDLES]) // 2
    handles = []
    for module in row_wise_modules(block):
        handles.append(module.register_forward_pre_hook(_pre_hook, with_kwargs=True))
        handles.append(module.register_forward_hook(_post_hook, with_kwargs=True))
    block.__dict__[_HANDLES] = handles
    return len(handles) // 2


def rows(owner: nn.Module, model: nn.Module, start: int, stop: int,
         total: int) -> tuple[int, int, int, int] | None:
    """The ``MemoryLayout.used_rows`` of a read whose caller uses only rows ``[start, stop)``
    of ``total`` from ``model``'s last block (``owner``: the RMT wrapper); None in training mode,
    where dropout would draw other random numbers than a full pass."""
    if owner.training:
        return None
    return last_layer(owner, model), start, stop, total


def last_layer(owner: nn.Module, model: nn.Module) -> int:
    """``layer_idx`` of the attention of ``model``'s last block (-1 when it has none), with the
    block's row-wise submodules hooked; found once and kept on ``owner`` (the RMT wrapper)."""
    if "_used_rows_layer" not in owner.__dict__:
        block = find_layers(model)[-1]
        install(block)
        idx = [mod.layer_idx for mod in block.modules()
               if isinstance(getattr(mod, "layer_idx", None), int)]
        owner.__dict__["_used_rows_layer"] = idx[0] if idx else -1
    return owner.__dict__["_used_rows_layer"]
