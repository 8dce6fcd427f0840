"""Reading without outputs: the last layer computes only the rows whose outputs are used.

While an RMT decoder reads a segment into memory (no logits, no loss, no hidden states), the only
outputs of the last transformer block that anyone uses are those of the write-memory rows: the
next read memory. The block's keys and values must still come from every row (the write rows
attend to them), but everything after the attention is row-wise (output projection, residuals,
norms, MLP), so for the other ``L - W`` rows the attention, the output projection and the MLP of
the last block are wasted work: at 4 layers of d 256 (the bench's default model) about a sixth of
a segment's matrix-product FLOPs.

Used in evaluation mode only (in training mode dropout would draw other random numbers than
a full pass). Two pieces, both inactive unless the current
:class:`~rmt_fast.integrations.transformers.MemoryLayout` has ``tail = (layer, first_row, rows)``:

* the ``rmt_fast`` attention function of layer ``layer`` computes only the query rows
  ``[first_row, rows)`` (the write block; every earlier row's keys are passed as past keys, which
  the write rows see under every mask) and returns zeros for the other rows;
* :func:`install` puts forward hooks on the last block's row-wise submodules (the MLP and the
  attention's output projection, found by name: :data:`ROW_WISE`) that run them on the rows
  ``[first_row, rows)`` only and pad the output with zeros.

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

__all__ = ["ROW_WISE", "install", "row_wise_modules"]

#: paths, relative to a transformer block, of row-wise submodules (output row t depends on input
#: row t only): MLPs and attention output projections of GPT-2, GPT-NeoX, Llama/Qwen/Mistral,
#: Falcon, Phi
ROW_WISE = ("mlp", "feed_forward", "attn.c_proj", "self_attn.o_proj", "attention.dense",
            "self_attention.dense")

_HANDLES = "_rmt_fast_tail_hooks"


def _active(x) -> tuple[int, int] | None:
    """``(first_row, rows)`` when a tail layout is active and ``x`` is ``[B, rows, ...]``."""
    layout = current_layout()
    tail = None if layout is None else layout.tail
    if tail is None or not isinstance(x, torch.Tensor) or x.dim() < 2 or x.shape[1] != tail[2]:
        return None
    return tail[1], tail[2]


def _pre_hook(module, args, kwargs):
    if not args:
        return None
    active = _active(args[0])
    if active is None:
        return None
    first, rows = active

    def cut(a):  # contiguous: some layers view their input (transformers' Conv1D)
        if isinstance(a, torch.Tensor) and a.dim() >= 2 and a.shape[1] == rows:
            return a[:, first:].contiguous()
        return a

    return tuple(cut(a) for a in args), {k: cut(v) for k, v in kwargs.items()}


def _post_hook(module, args, kwargs, out):
    layout = current_layout()
    tail = None if layout is None else layout.tail
    if tail is None or not isinstance(out, torch.Tensor) or out.dim() < 2:
        return None
    first, rows = tail[1], tail[2]
    if out.shape[1] != rows - first or not args or args[0].shape[1] != rows - first:
        return None
    pad = out.new_zeros(out.shape[0], first, *out.shape[2:])
    return torch.cat([pad, out], dim=1)


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
