"""Fast CPU path for ``memory_attention``.

The mask is decomposed into row groups that each see a few contiguous key ranges, either fully
or with a causal diagonal (:func:`rmt_fast.masks.block_plan`). Each (row group, key range) pair
runs through PyTorch's fused CPU flash-attention kernel, which also returns the log-sum-exp; the
partial results are merged by their log-sum-exps. No ``L x L`` mask or score matrix is built and
past keys are never concatenated with the current ones.

Backward uses the flash-attention identity: given the *merged* output and log-sum-exp, the CPU
flash backward of each partial call yields that block's exact share of dQ, dK and dV.
Grouped-query attention runs one call per query group on strided views (no repeated K/V).
"""

from __future__ import annotations

import torch

from rmt_fast.masks import DIAG, RowGroup, block_plan

_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _padding_bias(kpm: torch.Tensor | None, start: int, end: int, dtype: torch.dtype):
    """Additive key-padding bias ``[B, 1, 1, end - start]`` (0 or -inf), or None."""
    if kpm is None:
        return None
    keep = kpm[:, start:end]
    if bool(keep.all()):
        return None
    bias = torch.zeros(keep.shape, dtype=dtype, device=kpm.device).masked_fill_(~keep, float("-inf"))
    return bias[:, None, None, :]


def _block_visible(kpm: torch.Tensor | None, start: int, end: int, rows: int, diag: bool, batch: int):
    """Bool ``[B, rows]``: does each row see at least one key of the block?"""
    if kpm is None:
        return None
    keep = kpm[:, start:end]
    if diag:
        seen = keep.cumsum(dim=1) > 0  # row r sees keys [start, start + r]
        return seen[:, :rows]
    return keep.any(dim=1, keepdim=True).expand(batch, rows)


def _calls(plan: list[RowGroup], past_length: int):
    """Flatten the plan into (row start, row end, key offset in [past | cur], key end, causal)."""
    for g in plan:
        for b in g.blocks:
            off = 0 if b.source == "past" else past_length
            yield g.start, g.end, off + b.start, off + b.end, b.kind == DIAG


def _key_slices(k, past_k, past_length, ks, ke):
    if ks < past_length:
        return past_k[:, :, ks:ke]
    return k[:, :, ks - past_length : ke - past_length]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _forward(q, k, v, past_k, past_v, kpm, plan, scale):
    batch, hq, length, _ = q.shape
    acc = _acc_dtype(q.dtype)
    past_length = 0 if past_k is None else past_k.shape[2]
    calls = list(_calls(plan, past_length))
    if len(calls) == 1 and kpm is None and q.shape[1] == k.shape[1] and calls[0][:2] == (0, length):
        # one block covering every row (plain causal/full): nothing to merge
        qs, qe, ks, ke, causal = calls[0]
        kb = _key_slices(k, past_k, past_length, ks, ke)
        vb = _key_slices(v, past_v, past_length, ks, ke)
        out, lse = _flash_fwd(q, kb, vb, is_causal=causal, scale=scale)
        return out, lse.to(acc)
    groups = hq // k.shape[1]
    out = torch.zeros(q.shape, dtype=acc, device=q.device)
    lse = torch.full((batch, hq, length), float("-inf"), dtype=acc, device=q.device)
    for qs, qe, ks, ke, causal in _calls(plan, past_length):
        kb = _key_slices(k, past_k, past_length, ks, ke)
        vb = _key_slices(v, past_v, past_length, ks, ke)
        bias = _padding_bias(kpm, ks, ke, q.dtype)
        seen = _block_visible(kpm, ks, ke, qe - qs, causal, batch)
        for g in range(groups):
            qg = q[:, g::groups, qs:qe]
            o, l_blk = _flash_fwd(qg, kb, vb, is_causal=causal, attn_mask=bias, scale=scale)
            l_blk = l_blk.to(acc)
            if seen is not None:
                l_blk = l_blk.masked_fill(~seen[:, None, :], float("-inf"))
            l_old = lse[:, g::groups, qs:qe]
            l_new = torch.logaddexp(l_old, l_blk)
            safe = torch.where(torch.isinf(l_new), torch.zeros_like(l_new), l_new)
            w_old = torch.exp(l_old - safe).unsqueeze(-1)
            w_blk = torch.exp(l_blk - safe).unsqueeze(-1)
            out[:, g::groups, qs:qe] = out[:, g::groups, qs:qe] * w_old + o.to(acc) * w_blk
            lse[:, g::groups, qs:qe] = l_new
    return out.to(q.dtype), lse


class _CPUFlashMemoryAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, past_k, past_v, kpm, plan, scale):
        out, lse = _forward(q, k, v, past_k, past_v, kpm, plan, scale)
        ctx.save_for_backward(q, k, v, past_k, past_v, kpm, out, lse)
        ctx.plan, ctx.scale = plan, scale
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, _grad_lse):
        q, k, v, past_k, past_v, kpm, out, lse = ctx.saved_tensors
        hq, hkv = q.shape[1], k.shape[1]
        groups = hq // hkv
        past_length = 0 if past_k is None else past_k.shape[2]
        grad_out = grad_out.contiguous()
        # rows that saw nothing: +inf makes every recomputed probability exp(s - inf) = 0
        lse_b = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)
        acc = _acc_dtype(q.dtype)
        dq = torch.zeros_like(q, dtype=acc)
        dk = torch.zeros_like(k, dtype=acc)
        dv = torch.zeros_like(v, dtype=acc)
        dpk = None if past_k is None else torch.zeros_like(past_k, dtype=acc)
        dpv = None if past_v is None else torch.zeros_like(past_v, dtype=acc)
        for qs, qe, ks, ke, causal in _calls(ctx.plan, past_length):
            src_past = ks < past_length
            kb = _key_slices(k, past_k, past_length, ks, ke)
            vb = _key_slices(v, past_v, past_length, ks, ke)
            rk = slice(ks, ke) if src_past else slice(ks - past_length, ke - past_length)
            gk, gv = (dpk, dpv) if src_past else (dk, dv)
            bias = _padding_bias(kpm, ks, ke, q.dtype)
            for g in range(groups):
                hs = slice(g, None, groups)
                gq_, gk_, gv_ = _flash_bwd(
                    grad_out[:, hs, qs:qe], q[:, hs, qs:qe], kb, vb,
                    out[:, hs, qs:qe], lse_b[:, hs, qs:qe], 0.0, causal, attn_mask=bias,
                    scale=ctx.scale,
                )
                dq[:, hs, qs:qe] += gq_
                gk[:, :, rk] += gk_
                gv[:, :, rk] += gv_
        cast = lambda g, ref: None if g is None else g.to(ref.dtype)  # noqa: E731
        return (cast(dq, q), cast(dk, k), cast(dv, v), cast(dpk, past_k), cast(dpv, past_v),
                None, None, None)


def cpu_flash_memory_attention(
    q, k, v, *, num_read, num_write, mask, past_k, past_v, past_visible_to_read,
    key_padding_mask, scale,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated inputs in, ``(out [B, Hq, L, D], lse [B, Hq, L] float32)`` out. CPU tensors only."""
    if q.numel() == 0 or k.shape[2] == 0:  # the fused kernel crashes (SIGFPE) on empty inputs
        lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
        return q.new_zeros(q.shape), lse
    past_length = 0 if past_k is None else past_k.shape[2]
    plan = block_plan(q.shape[2], past_length, num_read, num_write, mask, past_visible_to_read)
    kpm = None if key_padding_mask is None else key_padding_mask.to(torch.bool)
    return _CPUFlashMemoryAttention.apply(q, k, v, past_k, past_v, kpm, plan, scale)
