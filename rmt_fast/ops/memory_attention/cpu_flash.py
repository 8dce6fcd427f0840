"""Fast CPU path for ``memory_attention``.

The mask is decomposed into row groups that each see a few contiguous key ranges, either fully
or with a causal diagonal (:func:`rmt_fast.masks.block_plan`). Each (row group, key range) pair
runs through PyTorch's fused CPU flash-attention kernel, which also returns the log-sum-exp; the
partial results are merged by their log-sum-exps. No ``L x L`` mask or score matrix is built and
past keys are never concatenated with the current ones. Small segments
(``L x (P + L) <= DENSE_MAX_ELEMENTS``), where per-call overhead dominates, instead run the
current keys as one call with the mode's small element mask (:func:`rmt_fast.masks.dense_plan`).

Backward uses the flash-attention identity: given the *merged* output and log-sum-exp, the CPU
flash backward of each partial call yields that block's exact share of dQ, dK and dV.
Grouped-query attention runs one call per query group on strided views (no repeated K/V).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from rmt_fast.masks import DENSE, DIAG, AttentionLayout, RowGroup, block_plan, dense_plan, structure_bias
from rmt_fast.ops.memory_attention.reference import reference_memory_attention

#: below this many (query, key) pairs one masked call beats splitting into blocks
DENSE_MAX_ELEMENTS = 16384

_flash_fwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
_flash_bwd = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward


def _key_slices(k, past_k, past_length, ks, ke):
    if ks < past_length:
        return past_k[:, :, ks:ke]
    return k[:, :, ks - past_length : ke - past_length]


def _block_inputs(group: RowGroup, layout: AttentionLayout, length: int, k, v, past_k, past_v, kpm,
                  dtype):
    """Per key block of ``group``: ``(k, v, bias, seen, causal, source is past, key slice)``.

    ``bias``: additive ``[B or 1, 1, rows or 1, keys]`` (padding and, for dense blocks, the
    mode's element mask) or None. ``seen``: bool ``[B, rows]``, does a row see any key of the
    block (None when every row does).
    """
    past_length = 0 if past_k is None else past_k.shape[2]
    rows = group.end - group.start
    out = []
    for b in group.blocks:
        src_past = b.source == "past"
        off = 0 if src_past else past_length
        ks, ke = off + b.start, off + b.end
        keep = None if kpm is None else kpm[:, ks:ke]
        if keep is not None and bool(keep.all()):
            keep = None
        bias = seen = None
        if keep is not None:
            bias = torch.zeros(keep.shape, dtype=dtype, device=kpm.device).masked_fill_(
                ~keep, float("-inf"))[:, None, None, :]
        if b.kind == DENSE:
            structure, vis = structure_bias(length, layout, dtype)
            structure = structure[group.start:group.end].to(k.device)[None, None]
            vis = vis[group.start:group.end].to(k.device)
            bias = structure if bias is None else structure + bias
            seen_rows = (vis[None] & keep[:, None, :]).any(-1) if keep is not None else vis.any(-1)[None]
            if not bool(seen_rows.all()):
                seen = seen_rows.expand(kpm.shape[0] if kpm is not None else k.shape[0], rows)
        elif keep is not None:
            seen = keep.cumsum(dim=1)[:, :rows] > 0 if b.kind == DIAG else \
                keep.any(dim=1, keepdim=True).expand(keep.shape[0], rows)
        out.append((_key_slices(k, past_k, past_length, ks, ke),
                    _key_slices(v, past_v, past_length, ks, ke), bias, seen, b.kind == DIAG,
                    src_past, slice(b.start, b.end)))
    return out


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _merge(parts, acc, like: torch.Tensor):
    """Combine partial ``(out, lse)`` results over disjoint key blocks of the same rows
    (``like``: the query rows, for the shapes when no block is visible at all)."""
    if not parts:
        return (torch.zeros(like.shape, dtype=acc, device=like.device),
                torch.full(like.shape[:-1], float("-inf"), dtype=acc, device=like.device))
    if len(parts) == 1:
        return parts[0][0].to(acc), parts[0][1]
    lses = torch.stack([lse for _, lse in parts])
    total = torch.logsumexp(lses, dim=0)
    safe = torch.where(torch.isinf(total), torch.zeros_like(total), total)  # rows seeing nothing
    weights = torch.exp(lses - safe).unsqueeze(-1)
    out = sum(o.to(acc) * w for (o, _), w in zip(parts, weights, strict=True))
    return out, total


def _forward(q, k, v, past_k, past_v, kpm, plan, layout):
    batch, hq, length, _ = q.shape
    acc = _acc_dtype(q.dtype)
    groups = hq // k.shape[1]
    single = len(plan) == 1 and len(plan[0].blocks) == 1 and plan[0].blocks[0].kind != DENSE
    if single and kpm is None and groups == 1:
        # one block covering every row (plain causal/full): nothing to merge
        (kb, vb, _, _, causal, _, _), = _block_inputs(plan[0], layout, length, k, v, past_k, past_v,
                                                     None, q.dtype)
        out, lse = _flash_fwd(q, kb, vb, is_causal=causal, scale=layout.scale)
        return out, lse.to(acc)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((batch, hq, length), dtype=acc, device=q.device)
    for group in plan:
        qs, qe = group.start, group.end
        blocks = _block_inputs(group, layout, length, k, v, past_k, past_v, kpm, q.dtype)
        masked_rows = any(seen is not None for _, _, _, seen, _, _, _ in blocks)
        for g in range(groups):
            qg = q[:, g::groups, qs:qe]
            parts = []
            for kb, vb, bias, seen, causal, _, _ in blocks:
                o, l_blk = _flash_fwd(qg, kb, vb, is_causal=causal, attn_mask=bias, scale=layout.scale)
                l_blk = l_blk.to(acc)
                if seen is not None:
                    l_blk = l_blk.masked_fill(~seen[:, None, :], float("-inf"))
                parts.append((o, l_blk))
            o, l_tot = _merge(parts, acc, qg)
            if masked_rows:  # rows that see no key at all return zeros
                o = o.masked_fill(torch.isneginf(l_tot).unsqueeze(-1), 0.0)
            out[:, g::groups, qs:qe] = o.to(q.dtype)
            lse[:, g::groups, qs:qe] = l_tot
    return out, lse


class _CPUFlashMemoryAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, past_k, past_v, kpm, plan, layout):
        out, lse = _forward(q, k, v, past_k, past_v, kpm, plan, layout)
        ctx.save_for_backward(q, k, v, past_k, past_v, kpm, out, lse)
        ctx.plan, ctx.layout = plan, layout
        # an unused output gets None, not zeros: no lse term (and its copies) unless a loss uses it
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, grad_out, grad_lse):
        q, k, v, past_k, past_v, kpm, out, lse = ctx.saved_tensors
        hq, hkv = q.shape[1], k.shape[1]
        groups = hq // hkv
        dim = q.shape[-1]
        grad_out = torch.zeros_like(out) if grad_out is None else grad_out.contiguous()
        if grad_lse is not None:
            # ATen's flash backward forms dS = P (dP - delta) with delta = rowsum(dO * O) and has
            # no input for the lse's gradient (d lse / d s = P, i.e. delta - dlse). One extra
            # head-dim column carries it: q, k, v get a 0 there (scores and dP unchanged), O gets
            # -dlse and dO gets 1, so delta becomes delta - dlse; the column's gradients are dropped.
            pad = lambda t: None if t is None else F.pad(t, (0, 1))  # noqa: E731
            q, k, v, past_k, past_v = (pad(t) for t in (q, k, v, past_k, past_v))
            out = torch.cat([out, -grad_lse.to(out.dtype).unsqueeze(-1)], -1)
            grad_out = torch.cat([grad_out, grad_out.new_ones(grad_out.shape[:-1] + (1,))], -1)
        # rows that saw nothing: +inf makes every recomputed probability exp(s - inf) = 0
        lse_b = torch.where(torch.isneginf(lse), torch.full_like(lse, float("inf")), lse)
        acc = _acc_dtype(q.dtype)
        dq = torch.zeros_like(q, dtype=acc)
        dk = torch.zeros_like(k, dtype=acc)
        dv = torch.zeros_like(v, dtype=acc)
        dpk = None if past_k is None else torch.zeros_like(past_k, dtype=acc)
        dpv = None if past_v is None else torch.zeros_like(past_v, dtype=acc)
        for group in ctx.plan:
            rows = slice(group.start, group.end)
            for kb, vb, bias, _, causal, src_past, rk in _block_inputs(
                    group, ctx.layout, q.shape[2], k, v, past_k, past_v, kpm, q.dtype):
                gk, gv = (dpk, dpv) if src_past else (dk, dv)
                for g in range(groups):
                    hs = slice(g, None, groups)
                    gq_, gk_, gv_ = _flash_bwd(
                        grad_out[:, hs, rows], q[:, hs, rows], kb, vb, out[:, hs, rows],
                        lse_b[:, hs, rows], 0.0, causal, attn_mask=bias, scale=ctx.layout.scale)
                    dq[:, hs, rows] += gq_
                    gk[:, :, rk] += gk_
                    gv[:, :, rk] += gv_
        cast = lambda g, ref: None if g is None else g[..., :dim].to(ref.dtype)  # noqa: E731
        return (cast(dq, q), cast(dk, k), cast(dv, v), cast(dpk, past_k), cast(dpv, past_v),
                None, None, None)


def unit_last_stride(t: torch.Tensor | None) -> torch.Tensor | None:
    """``t`` itself when its last dimension is contiguous (stride 1), else a contiguous copy
    (differentiable). ATen's CPU flash kernel takes any stride on the other dimensions (views
    such as ``[B, L, H, D].transpose(1, 2)`` and stride-0 expanded dims are read correctly) but,
    unlike ``F.scaled_dot_product_attention``, assumes a unit stride on the head dimension."""
    if t is None or t.stride(-1) == 1:
        return t
    return t.clone(memory_format=torch.contiguous_format)


def cpu_flash_memory_attention(q, k, v, past_k, past_v, key_padding_mask, layout: AttentionLayout
                               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Validated inputs in (``layout.scale`` resolved), ``(out [B, Hq, L, D], lse [B, Hq, L]
    float32)`` out. CPU tensors only, of any strides (the head dimension is copied to a unit
    stride when it is not one already). A sliding window or a logit soft-cap (which ATen's
    flash attention does not take) runs the dense reference in float64: this path sees one only
    where the fused kernel cannot take it (float16 inputs, or an extension built without them)."""
    if layout.window is not None or layout.softcap is not None:
        return reference_memory_attention(q, k, v, layout, past_k=past_k, past_v=past_v,
                                          key_padding_mask=key_padding_mask, upcast=True)
    q, k, v, past_k, past_v = (unit_last_stride(t) for t in (q, k, v, past_k, past_v))
    if q.numel() == 0 or k.shape[2] == 0:  # the fused kernel crashes (SIGFPE) on empty inputs
        lse = torch.full(q.shape[:3], float("-inf"), dtype=torch.float32, device=q.device)
        # zeros still connected to every input, so backward gives (empty or zero) gradients
        tie = sum(t.sum() for t in (q, k, v, past_k, past_v) if t is not None) * 0
        return q.new_zeros(q.shape) + tie.to(q.dtype), lse
    length, past_length = q.shape[2], 0 if past_k is None else past_k.shape[2]
    plan = block_plan(length, past_length, layout)
    if sum(len(g.blocks) for g in plan) > 1 + (past_length > 0) and \
            length * (past_length + length) <= DENSE_MAX_ELEMENTS:
        plan = dense_plan(length, past_length, layout)
    kpm = None if key_padding_mask is None else key_padding_mask.to(torch.bool)
    return _CPUFlashMemoryAttention.apply(q, k, v, past_k, past_v, kpm, plan, layout)
