"""Autograd wiring: ``torch.autograd.Function`` (always) and a ``torch.library`` custom op.

The custom op ``rmt_fast::triton_memory_attention`` gives torch.compile an opaque node with a
fake (meta) implementation and a registered backward, so graphs trace through the kernels.
"""

from __future__ import annotations

import torch

from . import launch


class MemoryAttentionFunction(torch.autograd.Function):
    """``(q, k, v, past_k, past_v, kpm_int8, layout) -> (out, lse)``; lse is not differentiable."""

    @staticmethod
    def forward(ctx, q, k, v, past_k, past_v, kpm, layout):
        out, lse = launch.forward(q, k, v, past_k, past_v, kpm, layout)
        ctx.save_for_backward(q, k, v, past_k, past_v, kpm, out, lse)
        ctx.layout = layout
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, _dlse):
        q, k, v, past_k, past_v, kpm, out, lse = ctx.saved_tensors
        need_past = past_k is not None and (ctx.needs_input_grad[3] or ctx.needs_input_grad[4])
        dq, dk, dv, dpk, dpv = launch.backward(dout, q, k, v, past_k, past_v, kpm, out, lse,
                                               ctx.layout, need_past)
        return dq, dk, dv, dpk, dpv, None, None


def _decode_fits(q: torch.Tensor, past_k: torch.Tensor | None, *tensors) -> bool:
    """Flash-decoding pays off for a few query rows against many keys, forward only."""
    grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    past_len = 0 if past_k is None else past_k.shape[2]
    length = q.shape[2]
    return (not grad) and length <= launch.DECODE_MAX_ROWS and past_len + length >= 256


def apply(q, k, v, *, num_read, num_write, mask, past_k, past_v, past_visible_to_read,
          key_padding_mask, scale):
    """Launch the right path. Returns ``(out [B, Hq, L, D], lse [B, Hq, L] float32)``."""
    layout = launch.make_layout(num_read, num_write, mask, past_visible_to_read, scale)
    q_, k_, v_, pk_, pv_, kpm = launch.prepare(q, k, v, past_k, past_v, key_padding_mask)
    if _decode_fits(q, pk_, q, k, v, past_k, past_v):
        return launch.decode(q_, k_, v_, pk_, pv_, kpm, layout)
    return MemoryAttentionFunction.apply(q_, k_, v_, pk_, pv_, kpm, layout)


# --- torch.library custom op (for torch.compile) -------------------------------------------------


@torch.library.custom_op("rmt_fast::triton_memory_attention", mutates_args=())
def memory_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        past_k: torch.Tensor | None, past_v: torch.Tensor | None,
                        key_padding_mask: torch.Tensor | None, num_read: int, num_write: int,
                        mask: str, past_visible_to_read: bool, scale: float,
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Custom-op form of the forward: ``(out [B, Hq, L, D], lse [B, Hq, L] float32)``."""
    layout = launch.make_layout(num_read, num_write, mask, past_visible_to_read, scale)
    q, k, v, past_k, past_v, kpm = launch.prepare(q, k, v, past_k, past_v, key_padding_mask)
    return launch.forward(q, k, v, past_k, past_v, kpm, layout)


@memory_attention_op.register_fake
def _(q, k, v, past_k, past_v, key_padding_mask, num_read, num_write, mask,
      past_visible_to_read, scale):
    return torch.empty_like(q), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("rmt_fast::triton_memory_attention_bwd", mutates_args=())
def memory_attention_bwd_op(dout: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                            v: torch.Tensor, past_k: torch.Tensor | None,
                            past_v: torch.Tensor | None, key_padding_mask: torch.Tensor | None,
                            out: torch.Tensor, lse: torch.Tensor, num_read: int, num_write: int,
                            mask: str, past_visible_to_read: bool, scale: float,
                            ) -> list[torch.Tensor]:
    """Backward as an op: ``[dq, dk, dv]`` plus ``[dpast_k, dpast_v]`` when a past is given.

    An empty past (``P = 0``) still gets its two (empty) gradients, as the fake impl promises.
    """
    layout = launch.make_layout(num_read, num_write, mask, past_visible_to_read, scale)
    given_pk, given_pv = past_k, past_v
    q, k, v, past_k, past_v, kpm = launch.prepare(q, k, v, past_k, past_v, key_padding_mask)
    dq, dk, dv, dpk, dpv = launch.backward(dout, q, k, v, past_k, past_v, kpm, out.contiguous(),
                                           lse, layout, past_k is not None)
    grads = [dq, dk, dv]
    if given_pk is not None:
        grads += [torch.zeros_like(given_pk) if dpk is None else dpk,
                  torch.zeros_like(given_pv) if dpv is None else dpv]
    return grads


@memory_attention_bwd_op.register_fake
def _(dout, q, k, v, past_k, past_v, key_padding_mask, out, lse, num_read, num_write, mask,
      past_visible_to_read, scale):
    grads = [torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)]
    if past_k is not None:
        grads += [torch.empty_like(past_k), torch.empty_like(past_v)]
    return grads


def _setup_context(ctx, inputs, output):
    q, k, v, past_k, past_v, kpm, *rest = inputs
    ctx.save_for_backward(q, k, v, past_k, past_v, kpm, output[0], output[1])
    ctx.rest = rest


def _backward(ctx, dout, _dlse):
    q, k, v, past_k, past_v, kpm, out, lse = ctx.saved_tensors
    grads = memory_attention_bwd_op(dout, q, k, v, past_k, past_v, kpm, out, lse, *ctx.rest)
    if past_k is None:
        grads = [*grads, None, None]
    return (*grads, None, None, None, None, None, None)


memory_attention_op.register_autograd(_backward, setup_context=_setup_context)
