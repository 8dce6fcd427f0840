"""FlashAttention-2 style forward kernel for memory-token attention.

One program per (query block, batch * query head). It streams the past key buffer (when the
block's rows may see it) and then only the current key blocks the mask can make visible, with an
online softmax in base 2 and float32 accumulators. Element masks are applied on boundary tiles
only; interior tiles skip them. With a sliding window (``HAS_WINDOW``) both loops start at the
first key tile inside the window of the block's first row, and tiles the window cuts for some
row of the block are boundary tiles. With logit soft-capping (``HAS_SOFTCAP``) every tile caps
its scores before the mask (:func:`softcap_log2`).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (
    cur_block_full,
    cur_key_ranges,
    softcap_log2,
    tile_visible,
    window_cuts,
    window_key_start,
    window_past_start,
)


@triton.jit
def _fwd_tile(acc, l_i, m_i, q, k_base, v_base, kpm_base, n0, n_len, offs_m, offs_d, head_dim,
              L, P, R, W, WINDOW, SOFTCAP, qk_scale, need_mask,
              IS_PAST: tl.constexpr, PAST_TO_READ: tl.constexpr, MASK: tl.constexpr,
              HAS_KPM: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
              BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr):
    """One key tile ``[BLOCK_N, BLOCK_D]`` of the online softmax; returns ``(acc, l_i, m_i)``."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    kv_mask = (offs_n[:, None] < n_len) & (offs_d[None, :] < head_dim)
    kv_off = offs_n[:, None] * head_dim + offs_d[None, :]
    k = tl.load(k_base + kv_off, mask=kv_mask, other=0.0)
    v = tl.load(v_base + kv_off, mask=kv_mask, other=0.0)
    if DOT_F32:  # the interpreter multiplies raw bf16 bits in tl.dot
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # [BM, BN], base-2 logits
    if HAS_SOFTCAP:  # cap first: the mask below sets hidden keys to -inf, never capped
        qk, _ = softcap_log2(qk, SOFTCAP)
    if HAS_KPM:  # padding can hit any tile: always mask
        vis = tile_visible(offs_m, offs_n, n_len, L, P, R, W, WINDOW, kpm_base, IS_PAST,
                           PAST_TO_READ, MASK, HAS_KPM, HAS_WINDOW)
        qk = tl.where(vis, qk, float("-inf"))
    elif need_mask:  # boundary tile only
        vis = tile_visible(offs_m, offs_n, n_len, L, P, R, W, WINDOW, kpm_base, IS_PAST,
                           PAST_TO_READ, MASK, HAS_KPM, HAS_WINDOW)
        qk = tl.where(vis, qk, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(qk, 1))
    # a row that has seen nothing yet keeps m = -inf; shift by 0 there so exp2 gives 0, not NaN
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(qk - m_safe[:, None])
    alpha = tl.math.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
    return acc, l_i, m_new


@triton.jit
def memory_attention_fwd_kernel(
    Q, K, V, PK, PV, KPM, Out, Lse,
    qk_scale, L, P, R, W, head_dim, num_heads, groups, WINDOW, SOFTCAP,
    MASK: tl.constexpr, HAS_PAST: tl.constexpr, PAST_TO_READ: tl.constexpr,
    HAS_KPM: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """Forward pass.

    Q, Out: ``[B, Hq, L, D]``; K, V: ``[B, Hkv, L, D]``; PK, PV: ``[B, Hkv, P, D]``;
    KPM: ``[B, P + L]`` int8 (1 = real key); Lse: ``[B, Hq, L]`` float32, natural log, ``-inf``
    on empty rows. All contiguous. ``qk_scale`` = softmax scale * log2(e). ``DOT_PREC``: the
    ``tl.dot`` input precision (``"ieee"`` for float32 inputs, else ``"tf32"``, the default).
    ``WINDOW``: the sliding window in keys, read only when ``HAS_WINDOW``; ``SOFTCAP``: the
    logit soft-cap (natural units), read only when ``HAS_SOFTCAP``; the lse is then that of the
    capped scores. Grid ``(cdiv(L, BLOCK_M), B * Hq)``.
    """
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    bhk = (b * (num_heads // groups) + h // groups).to(tl.int64)  # GQA: kv head = h // groups
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_base = Q + pid_bh.to(tl.int64) * L * head_dim
    q_mask = (offs_m[:, None] < L) & (offs_d[None, :] < head_dim)
    q = tl.load(q_base + offs_m[:, None] * head_dim + offs_d[None, :], mask=q_mask, other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    kpm_base = KPM + b.to(tl.int64) * (P + L)
    m_last = tl.minimum(m0 + BLOCK_M, L) - 1

    if HAS_PAST:
        # read rows see the past only with PAST_TO_READ; a block of read rows only skips it
        if PAST_TO_READ:
            p_hi = P
            past_full_rows = m0 >= 0
        else:
            p_hi = tl.where(m_last >= R, P, 0)
            past_full_rows = m0 >= R
        p_lo = 0
        if HAS_WINDOW:  # past keys before the window of the block's first row that sees them
            p_lo = window_past_start(m0, R, P, WINDOW, BLOCK_N, PAST_TO_READ)
        pk_base = PK + bhk * P * head_dim
        pv_base = PV + bhk * P * head_dim
        for n0 in range(p_lo, p_hi, BLOCK_N):
            need_mask = (past_full_rows == 0) | (n0 + BLOCK_N > P)
            if HAS_WINDOW:
                need_mask = need_mask | window_cuts(m0, n0 - P, WINDOW, BLOCK_M)
            acc, l_i, m_i = _fwd_tile(
                acc, l_i, m_i, q, pk_base, pv_base, kpm_base, n0, P, offs_m, offs_d, head_dim,
                L, P, R, W, WINDOW, SOFTCAP, qk_scale, need_mask, True, PAST_TO_READ, MASK,
                HAS_KPM, HAS_WINDOW, HAS_SOFTCAP, BLOCK_N, DOT_F32, DOT_PREC)

    k_base = K + bhk * L * head_dim
    v_base = V + bhk * L * head_dim
    kpm_cur = kpm_base + P
    hi1, lo2, hi2 = cur_key_ranges(m0, L, R, W, BLOCK_M, BLOCK_N, MASK)
    lo1 = 0
    if HAS_WINDOW:  # keys before the first row's window are hidden from every row
        lo1 = window_key_start(m0, WINDOW, BLOCK_N)
        lo2 = tl.maximum(lo2, lo1)
    for n0 in range(lo1, hi1, BLOCK_N):
        need_mask = cur_block_full(m0, n0, L, R, W, WINDOW, BLOCK_M, BLOCK_N, MASK, HAS_WINDOW) == 0
        acc, l_i, m_i = _fwd_tile(
            acc, l_i, m_i, q, k_base, v_base, kpm_cur, n0, L, offs_m, offs_d, head_dim,
            L, P, R, W, WINDOW, SOFTCAP, qk_scale, need_mask, False, PAST_TO_READ, MASK,
            HAS_KPM, HAS_WINDOW, HAS_SOFTCAP, BLOCK_N, DOT_F32, DOT_PREC)
    for n0 in range(lo2, hi2, BLOCK_N):
        need_mask = cur_block_full(m0, n0, L, R, W, WINDOW, BLOCK_M, BLOCK_N, MASK, HAS_WINDOW) == 0
        acc, l_i, m_i = _fwd_tile(
            acc, l_i, m_i, q, k_base, v_base, kpm_cur, n0, L, offs_m, offs_d, head_dim,
            L, P, R, W, WINDOW, SOFTCAP, qk_scale, need_mask, False, PAST_TO_READ, MASK,
            HAS_KPM, HAS_WINDOW, HAS_SOFTCAP, BLOCK_N, DOT_F32, DOT_PREC)

    empty = l_i == 0.0  # saw no key: output 0, lse -inf
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    o_base = Out + pid_bh.to(tl.int64) * L * head_dim
    tl.store(o_base + offs_m[:, None] * head_dim + offs_d[None, :],
             out.to(Out.dtype.element_ty), mask=q_mask)
    tl.store(Lse + pid_bh.to(tl.int64) * L + offs_m, lse, mask=offs_m < L)
