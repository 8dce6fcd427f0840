"""FlashAttention-2 style backward: preprocess, dK/dV over key blocks, dQ over query blocks.

P is recomputed from the saved natural-log LSE. Rows whose LSE is ``-inf`` (they saw no key)
get probabilities 0 and contribute nothing. GQA: a dK/dV program owns one kv head and loops
over its query heads, so no atomics are needed. A sliding window (``HAS_WINDOW``) skips blocks as
in the forward: dQ starts its key loops at the first row's window, dK/dV ends its query loops
after the last row whose window still reaches the key block. Logit soft-capping
(``HAS_SOFTCAP``): the tiles recompute the capped scores (P from the lse of the capped scores)
and scale dS, the gradient of the capped score, by the cap's derivative ``1 - t^2``,
``t = tanh(x / SOFTCAP)``, to get the gradient of the scaled score ``x``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .common import (
    cur_block_full,
    cur_key_ranges,
    cur_query_ranges,
    softcap_log2,
    tile_visible,
    window_cut_row,
    window_cuts,
    window_key_start,
    window_past_start,
    window_row_end,
)

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def bwd_preprocess_kernel(Out, DO, Delta, n_rows, head_dim, BLOCK_M: tl.constexpr,
                          BLOCK_D: tl.constexpr):
    """``Delta[r] = sum_d dO[r, d] * O[r, d]`` in float32.

    Out, DO: ``[n_rows, D]``; Delta: ``[n_rows]``. Grid ``(cdiv(n_rows, BLOCK_M),)``.
    """
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    msk = (offs_m[:, None] < n_rows) & (offs_d[None, :] < head_dim)
    off = offs_m.to(tl.int64)[:, None] * head_dim + offs_d[None, :]
    o = tl.load(Out + off, mask=msk, other=0.0).to(tl.float32)
    do = tl.load(DO + off, mask=msk, other=0.0).to(tl.float32)
    tl.store(Delta + offs_m, tl.sum(o * do, 1), mask=offs_m < n_rows)


@triton.jit
def _load_rows(q_base, do_base, lse_base, delta_base, offs_m, offs_d, L, head_dim,
               DOT_F32: tl.constexpr):
    """Query-side tiles of one query block: q, dO ``[BM, BD]``, base-2 LSE and delta ``[BM]``."""
    msk = (offs_m[:, None] < L) & (offs_d[None, :] < head_dim)
    off = offs_m[:, None] * head_dim + offs_d[None, :]
    q = tl.load(q_base + off, mask=msk, other=0.0)
    do = tl.load(do_base + off, mask=msk, other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
        do = do.to(tl.float32)
    lse = tl.load(lse_base + offs_m, mask=offs_m < L, other=float("inf"))
    # empty rows (-inf) and out-of-range rows (+inf) must give p = exp2(s - lse) = 0
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    delta = tl.load(delta_base + offs_m, mask=offs_m < L, other=0.0)
    return q, do, lse2, delta


@triton.jit
def _dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, kpm_base, m0, n0, n_len,
               offs_d, L, P, R, W, WINDOW, SOFTCAP, head_dim, qk_scale, need_mask,
               IS_PAST: tl.constexpr, PAST_TO_READ: tl.constexpr, MASK: tl.constexpr,
               HAS_KPM: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr,
               DOT_PREC: tl.constexpr):
    """Accumulate one query block's contribution to dK, dV ``[BN, BD]`` (float32)."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    q, do, lse2, delta = _load_rows(q_base, do_base, lse_base, delta_base, offs_m, offs_d, L,
                                    head_dim, DOT_F32)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # [BM, BN]
    if HAS_SOFTCAP:  # the forward's capped scores, which the lse normalises
        qk, t = softcap_log2(qk, SOFTCAP)
    p = tl.math.exp2(qk - lse2[:, None])
    if HAS_KPM:
        vis = tile_visible(offs_m, offs_n, n_len, L, P, R, W, WINDOW, kpm_base, IS_PAST,
                           PAST_TO_READ, MASK, HAS_KPM, HAS_WINDOW)
        p = tl.where(vis, p, 0.0)
    elif need_mask:
        vis = tile_visible(offs_m, offs_n, n_len, L, P, R, W, WINDOW, kpm_base, IS_PAST,
                           PAST_TO_READ, MASK, HAS_KPM, HAS_WINDOW)
        p = tl.where(vis, p, 0.0)
    dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=DOT_PREC)
    if HAS_SOFTCAP:  # dS = P (1 - t^2) (dP - delta): the cap's derivative, folded into P
        p = p * (1.0 - t * t)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)  # [BM, BN]
    ds = p * (dp - delta[:, None])
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def bwd_dkdv_kernel(
    Q, KB, VB, DO, Lse, Delta, KPM, DK, DV,
    qk_scale, sm_scale, L, P, R, W, head_dim, num_heads, groups, n_len, WINDOW, SOFTCAP,
    IS_PAST: tl.constexpr, MASK: tl.constexpr, PAST_TO_READ: tl.constexpr,
    HAS_KPM: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """dK, dV of one key buffer: the current keys (``IS_PAST=False``, ``n_len = L``) or the past.

    Q, DO: ``[B, Hq, L, D]``; KB, VB, DK, DV: ``[B, Hkv, n_len, D]``; Lse, Delta: ``[B, Hq, L]``
    float32; KPM ``[B, P + L]`` int8; ``WINDOW`` read only when ``HAS_WINDOW``, ``SOFTCAP`` only
    when ``HAS_SOFTCAP``. Grid ``(cdiv(n_len, BLOCK_N), B * Hkv)``.
    """
    pid_n = tl.program_id(0)
    pid_bhk = tl.program_id(1)
    num_kv = num_heads // groups
    b = pid_bhk // num_kv
    hk = pid_bhk % num_kv
    n0 = pid_n * BLOCK_N
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    kv_msk = (offs_n[:, None] < n_len) & (offs_d[None, :] < head_dim)
    kv_off = pid_bhk.to(tl.int64) * n_len * head_dim + offs_n[:, None] * head_dim + offs_d[None, :]
    k = tl.load(KB + kv_off, mask=kv_msk, other=0.0)
    v = tl.load(VB + kv_off, mask=kv_msk, other=0.0)
    if DOT_F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    kpm_base = KPM + b.to(tl.int64) * (P + L)
    if IS_PAST:
        lo1 = 0
        if not PAST_TO_READ:
            lo1 = (R // BLOCK_M) * BLOCK_M  # read rows never see the past
        hi1 = L
        if HAS_WINDOW:  # rows after the window of the block's last key (at n - P) see none of it
            hi1 = tl.minimum(hi1, window_row_end(tl.minimum(n0 + BLOCK_N, n_len) - 1 - P, WINDOW,
                                                 BLOCK_M))
            m_cut = window_cut_row(n0 - P, WINDOW, BLOCK_M)
    else:
        kpm_base = kpm_base + P
        lo1, hi1, lo2, hi2 = cur_query_ranges(n0, L, R, W, BLOCK_M, BLOCK_N, MASK)
        if HAS_WINDOW:
            w_hi = window_row_end(tl.minimum(n0 + BLOCK_N, n_len) - 1, WINDOW, BLOCK_M)
            hi1 = tl.minimum(hi1, w_hi)
            if MASK == "bottleneck":  # the one mode with a second range (elsewhere hi2 = 0;
                hi2 = tl.minimum(hi2, w_hi)  # bounding it anyway cost spills on sm_80)
            m_cut = window_cut_row(n0, WINDOW, BLOCK_M)  # blocks from here on: the window cuts
    for g in range(0, groups):
        bh = (b * num_heads + hk * groups + g).to(tl.int64)  # query heads sharing this kv head
        q_base = Q + bh * L * head_dim
        do_base = DO + bh * L * head_dim
        lse_base = Lse + bh * L
        delta_base = Delta + bh * L
        for m0 in range(lo1, hi1, BLOCK_M):
            if IS_PAST:
                if PAST_TO_READ:
                    need_mask = n0 + BLOCK_N > n_len
                else:  # a block with read rows needs the per-row mask
                    need_mask = (n0 + BLOCK_N > n_len) | (m0 < R)
            else:
                need_mask = cur_block_full(m0, n0, L, R, W, WINDOW, BLOCK_M, BLOCK_N, MASK,
                                           False) == 0  # the window: m_cut, set once above
            if HAS_WINDOW:
                need_mask = need_mask | (m0 >= m_cut)
            dk, dv = _dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base, kpm_base,
                                m0, n0, n_len, offs_d, L, P, R, W, WINDOW, SOFTCAP, head_dim,
                                qk_scale, need_mask, IS_PAST, PAST_TO_READ, MASK, HAS_KPM,
                                HAS_WINDOW, HAS_SOFTCAP, BLOCK_M, BLOCK_N, DOT_F32, DOT_PREC)
        if not IS_PAST:  # bottleneck: the write rows after a gap
            for m0 in range(lo2, hi2, BLOCK_M):
                need_mask = cur_block_full(m0, n0, L, R, W, WINDOW, BLOCK_M, BLOCK_N, MASK,
                                           False) == 0
                if HAS_WINDOW:
                    need_mask = need_mask | (m0 >= m_cut)
                dk, dv = _dkdv_tile(dk, dv, k, v, q_base, do_base, lse_base, delta_base,
                                    kpm_base, m0, n0, n_len, offs_d, L, P, R, W, WINDOW, SOFTCAP,
                                    head_dim, qk_scale, need_mask, IS_PAST, PAST_TO_READ, MASK,
                                    HAS_KPM, HAS_WINDOW, HAS_SOFTCAP, BLOCK_M, BLOCK_N, DOT_F32,
                                    DOT_PREC)
    dk = dk * sm_scale  # dS/dK = scale * Q; the base-2 factor lives only inside exp2
    tl.store(DK + kv_off, dk.to(DK.dtype.element_ty), mask=kv_msk)
    tl.store(DV + kv_off, dv.to(DV.dtype.element_ty), mask=kv_msk)


@triton.jit
def _dq_tile(dq, q, do, lse2, delta, k_base, v_base, kpm_base, n0, n_len, offs_m, offs_d, L, P,
             R, W, WINDOW, SOFTCAP, head_dim, qk_scale, need_mask,
             IS_PAST: tl.constexpr, PAST_TO_READ: tl.constexpr, MASK: tl.constexpr,
             HAS_KPM: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
             BLOCK_N: tl.constexpr, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr):
    """Accumulate one key tile's contribution to dQ ``[BM, BD]`` (float32, unscaled)."""
    offs_n = n0 + tl.arange(0, BLOCK_N)
    kv_msk = (offs_n[:, None] < n_len) & (offs_d[None, :] < head_dim)
    kv_off = offs_n[:, None] * head_dim + offs_d[None, :]
    k = tl.load(k_base + kv_off, mask=kv_msk, other=0.0)
    v = tl.load(v_base + kv_off, mask=kv_msk, other=0.0)
    if DOT_F32:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    qk = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
    if HAS_SOFTCAP:  # the forward's capped scores, which the lse normalises
        qk, t = softcap_log2(qk, SOFTCAP)
    p = tl.math.exp2(qk - lse2[:, None])
    if HAS_KPM:
        vis = tile_visible(offs_m, offs_n, n_len, L, P, R, W, WINDOW, kpm_base, IS_PAST,
                           PAST_TO_READ, MASK, HAS_KPM, HAS_WINDOW)
        p = tl.where(vis, p, 0.0)
    elif need_mask:
        vis = tile_visible(offs_m, offs_n, n_len, L, P, R, W, WINDOW, kpm_base, IS_PAST,
                           PAST_TO_READ, MASK, HAS_KPM, HAS_WINDOW)
        p = tl.where(vis, p, 0.0)
    if HAS_SOFTCAP:  # dS = P (1 - t^2) (dP - delta): the cap's derivative, folded into P
        p = p * (1.0 - t * t)
    dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
    ds = p * (dp - delta[:, None])
    dq += tl.dot(ds.to(k.dtype), k, input_precision=DOT_PREC)
    return dq


@triton.jit
def bwd_dq_kernel(
    Q, K, V, PK, PV, DO, Lse, Delta, KPM, DQ,
    qk_scale, sm_scale, L, P, R, W, head_dim, num_heads, groups, WINDOW, SOFTCAP,
    MASK: tl.constexpr, HAS_PAST: tl.constexpr, PAST_TO_READ: tl.constexpr,
    HAS_KPM: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    """dQ ``[B, Hq, L, D]``: visits the same key blocks as the forward. Grid like the forward."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    bhk = (b * (num_heads // groups) + h // groups).to(tl.int64)
    m0 = pid_m * BLOCK_M
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    bh = pid_bh.to(tl.int64)
    q, do, lse2, delta = _load_rows(Q + bh * L * head_dim, DO + bh * L * head_dim, Lse + bh * L,
                                    Delta + bh * L, offs_m, offs_d, L, head_dim, DOT_F32)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    kpm_base = KPM + b.to(tl.int64) * (P + L)
    m_last = tl.minimum(m0 + BLOCK_M, L) - 1
    if HAS_PAST:
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
            dq = _dq_tile(dq, q, do, lse2, delta, pk_base, pv_base, kpm_base, n0, P, offs_m,
                          offs_d, L, P, R, W, WINDOW, SOFTCAP, head_dim, qk_scale, need_mask,
                          True, PAST_TO_READ, MASK, HAS_KPM, HAS_WINDOW, HAS_SOFTCAP, BLOCK_N,
                          DOT_F32, DOT_PREC)
    k_base = K + bhk * L * head_dim
    v_base = V + bhk * L * head_dim
    kpm_cur = kpm_base + P
    hi1, lo2, hi2 = cur_key_ranges(m0, L, R, W, BLOCK_M, BLOCK_N, MASK)
    lo1 = 0
    if HAS_WINDOW:
        lo1 = window_key_start(m0, WINDOW, BLOCK_N)
        lo2 = tl.maximum(lo2, lo1)
    for n0 in range(lo1, hi1, BLOCK_N):
        need_mask = cur_block_full(m0, n0, L, R, W, WINDOW, BLOCK_M, BLOCK_N, MASK, HAS_WINDOW) == 0
        dq = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, kpm_cur, n0, L, offs_m, offs_d, L,
                      P, R, W, WINDOW, SOFTCAP, head_dim, qk_scale, need_mask, False,
                      PAST_TO_READ, MASK, HAS_KPM, HAS_WINDOW, HAS_SOFTCAP, BLOCK_N, DOT_F32,
                      DOT_PREC)
    for n0 in range(lo2, hi2, BLOCK_N):
        need_mask = cur_block_full(m0, n0, L, R, W, WINDOW, BLOCK_M, BLOCK_N, MASK, HAS_WINDOW) == 0
        dq = _dq_tile(dq, q, do, lse2, delta, k_base, v_base, kpm_cur, n0, L, offs_m, offs_d, L,
                      P, R, W, WINDOW, SOFTCAP, head_dim, qk_scale, need_mask, False,
                      PAST_TO_READ, MASK, HAS_KPM, HAS_WINDOW, HAS_SOFTCAP, BLOCK_N, DOT_F32,
                      DOT_PREC)
    dq = dq * sm_scale
    msk = (offs_m[:, None] < L) & (offs_d[None, :] < head_dim)
    tl.store(DQ + bh * L * head_dim + offs_m[:, None] * head_dim + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=msk)
