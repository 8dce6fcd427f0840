"""Autograd wiring: the ``rmt_fast::triton_memory_attention`` custom op (``torch.library``).

Every differentiable call goes through this one op, eager or under ``torch.compile`` (which sees
an opaque node with a fake implementation and a registered backward). Forward-only calls with
few query rows against many keys take the flash-decoding path instead (no autograd there).
"""

from __future__ import annotations

import torch

from rmt_fast.masks import AttentionLayout

from . import launch


def _layout(num_read, num_write, mask, past_visible_to_read, scale, window=None,
            softcap=None) -> AttentionLayout:
    return AttentionLayout(num_read, num_write, mask, past_visible_to_read, scale, window, softcap)


def _op_fields(layout: AttentionLayout) -> tuple:
    """The custom ops' layout arguments; raises if they would not rebuild ``layout`` exactly (a
    layout field the ops do not carry must not be dropped on the way to the kernels)."""
    fields = (layout.num_read, layout.num_write, layout.mask, layout.past_visible_to_read,
              layout.scale, layout.window, layout.softcap)
    if _layout(*fields) != layout:
        raise NotImplementedError(f"the Triton custom op does not carry every field of {layout}")
    return fields


def _decode_fits(q: torch.Tensor, past_k: torch.Tensor | None, *tensors) -> bool:
    """Flash-decoding pays off for a few query rows against many keys, forward only."""
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    past_len = 0 if past_k is None else past_k.shape[2]
    length = q.shape[2]
    return (not grad) and length <= launch.DECODE_MAX_ROWS and past_len + length >= 256


def apply(q, k, v, past_k, past_v, key_padding_mask, layout: AttentionLayout):
    """Launch the right path (``layout.scale`` resolved). Returns ``(out [B, Hq, L, D],
    lse [B, Hq, L] float32)``; differentiable in q, k, v, past_k, past_v."""
    if _decode_fits(q, past_k, q, k, v, past_k, past_v):
        return launch.decode(*launch.prepare(q, k, v, past_k, past_v, key_padding_mask), layout)
    return memory_attention_op(q, k, v, past_k, past_v, key_padding_mask, *_op_fields(layout))


@torch.library.custom_op("rmt_fast::triton_memory_attention", mutates_args=())
def memory_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        past_k: torch.Tensor | None, past_v: torch.Tensor | None,
                        key_padding_mask: torch.Tensor | None, num_read: int, num_write: int,
                        mask: str, past_visible_to_read: bool, scale: float,
                        window: int | None = None, softcap: float | None = None,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward: ``(out [B, Hq, L, D], lse [B, Hq, L] float32)``; ``window``, ``softcap``: the
    layout's sliding window and logit soft-cap (None for none)."""
    layout = _layout(num_read, num_write, mask, past_visible_to_read, scale, window, softcap)
    q, k, v, past_k, past_v, kpm = launch.prepare(q, k, v, past_k, past_v, key_padding_mask)
    return launch.forward(q, k, v, past_k, past_v, kpm, layout)


@memory_attention_op.register_fake
def _(q, k, v, past_k, past_v, key_padding_mask, num_read, num_write, mask,
      past_visible_to_read, scale, window=None, softcap=None):
    # contiguous like the real outputs, whatever q's strides (launch.prepare copies such inputs)
    return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("rmt_fast::triton_memory_attention_bwd", mutates_args=())
def memory_attention_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                            v: torch.Tensor, past_k: torch.Tensor | None,
                            past_v: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
                            out: torch.Tensor, lse: torch.Tensor, num_read: int, num_write: int,
                            mask: str, past_visible_to_read: bool, scale: float,
                            need_past_grad: bool = True, grad_lse: torch.Tensor | None = None,
                            window: int | None = None, softcap: float | None = None,
                            ) -> list[torch.Tensor]:
    """Backward: ``[dq, dk, dv]``, plus ``[dpast_k, dpast_v]`` when ``need_past_grad`` (an
    empty past, ``P = 0``, still gets its two empty gradients, as the fake promises).
    ``grad_lse`` ``[B, Hq, L]`` float32: the gradient reaching the lse output, if any;
    ``window``, ``softcap`` as in the forward op."""
    layout = _layout(num_read, num_write, mask, past_visible_to_read, scale, window, softcap)
    given_pk, given_pv = past_k, past_v
    q, k, v, past_k, past_v, kpm = launch.prepare(q, k, v, past_k, past_v, key_padding_mask)
    dq, dk, dv, dpk, dpv = launch.backward(dout, q, k, v, past_k, past_v, kpm, out.contiguous(),
                                           lse, layout, need_past_grad and past_k is not None,
                                           grad_lse)
    grads = [dq, dk, dv]
    if need_past_grad:
        grads += [given_pk.new_zeros(given_pk.shape) if dpk is None else dpk,
                  given_pv.new_zeros(given_pv.shape) if dpv is None else dpv]
    return grads


@memory_attention_bwd_op.register_fake
def _(dout, q, k, v, past_k, past_v, key_padding_mask, out, lse, num_read, num_write, mask,
      past_visible_to_read, scale, need_past_grad=True, grad_lse=None, window=None, softcap=None):
    grads = [q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)]
    if need_past_grad:
        grads += [past_k.new_empty(past_k.shape), past_v.new_empty(past_v.shape)]
    return grads


def _setup_context(ctx, inputs, output):
    # inputs come with their defaults filled in: the five layout fields, the window, the softcap
    q, k, v, past_k, past_v, kpm, *rest, window, softcap = inputs
    ctx.save_for_backward(q, k, v, past_k, past_v, kpm, output[0], output[1])
    ctx.rest = rest
    ctx.window = window
    ctx.softcap = softcap
    ctx.set_materialize_grads(False)  # an unused output (the lse, mostly) gets None, not zeros


def _backward(ctx, dout, dlse):
    q, k, v, past_k, past_v, kpm, out, lse = ctx.saved_tensors
    need_past = past_k is not None and (ctx.needs_input_grad[3] or ctx.needs_input_grad[4])
    if dout is None:  # only the lse was used
        dout = torch.zeros_like(out)
    if dlse is not None:
        dlse = dlse.float().contiguous()
    grads = memory_attention_bwd_op(dout.contiguous(), q, k, v, past_k, past_v, kpm, out, lse,
                                    *ctx.rest, need_past, dlse, ctx.window, ctx.softcap)
    if not need_past:
        grads = [*grads, None, None]
    return (*grads, *[None] * 8)  # key_padding_mask and the seven layout arguments


memory_attention_op.register_autograd(_backward, setup_context=_setup_context)
