"""Flash-decoding forward: a few query rows against a long ``[past | current]`` key range.

With ``L`` tiny, the regular forward has only ``B * Hq`` programs; here the keys are split over
programs (grid ``(n_splits, B * Hq)``), each writes a partial ``(out, lse)`` for all ``L`` rows,
and a second kernel merges the partials with their LSE weights. Forward only. With a sliding
window (``HAS_WINDOW``) the past splits start at ``past_lo``, the first past key tile inside the
window of the first row that sees the past (the launcher launches no split before it); every
tile is masked anyway. Logit soft-capping (``HAS_SOFTCAP``) caps the scores in the tiles, as in
the forward.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .fwd import _fwd_tile


@triton.jit
def _split_range(acc, l_i, m_i, q, k_base, v_base, kpm_base, start, end, n_len, offs_m, offs_d,
                 head_dim, L, P, R, W, WINDOW, SOFTCAP, qk_scale, IS_PAST: tl.constexpr,
                 PAST_TO_READ: tl.constexpr, MASK: tl.constexpr, HAS_KPM: tl.constexpr,
                 HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_N: tl.constexpr,
                 DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr):
    """Online softmax over keys ``[start, end)`` of one buffer, always with the element mask."""
    for n0 in range(start, end, BLOCK_N):
        acc, l_i, m_i = _fwd_tile(acc, l_i, m_i, q, k_base, v_base, kpm_base, n0, n_len, offs_m,
                                  offs_d, head_dim, L, P, R, W, WINDOW, SOFTCAP, qk_scale, True,
                                  IS_PAST, PAST_TO_READ, MASK, HAS_KPM, HAS_WINDOW, HAS_SOFTCAP,
                                  BLOCK_N, DOT_F32, DOT_PREC)
    return acc, l_i, m_i


@triton.jit
def decode_split_kernel(
    Q, K, V, PK, PV, KPM, OutPart, LsePart,
    qk_scale, L, P, R, W, head_dim, num_heads, groups, split_size, n_past_splits, n_splits,
    WINDOW, past_lo, SOFTCAP,
    MASK: tl.constexpr, PAST_TO_READ: tl.constexpr, HAS_KPM: tl.constexpr,
    HAS_WINDOW: tl.constexpr, HAS_SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """Partial attention of all ``L <= BLOCK_M`` rows over one key split.

    Splits ``[0, n_past_splits)`` cover the past buffer, the rest the current keys, each
    ``split_size`` keys (a multiple of BLOCK_N). OutPart: ``[B * Hq, n_splits, BLOCK_M, BLOCK_D]``
    float32 (normalised); LsePart: ``[B * Hq, n_splits, BLOCK_M]`` float32 base-2 LSE.
    With ``HAS_WINDOW`` (``WINDOW`` keys) the past splits cover ``[past_lo, P)`` (``past_lo`` a
    multiple of BLOCK_N); both are unused without it. ``SOFTCAP``: the logit soft-cap, read only
    when ``HAS_SOFTCAP`` (the partial lse are then of the capped scores).
    """
    s = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // num_heads
    h = pid_bh % num_heads
    bhk = (b * (num_heads // groups) + h // groups).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q_mask = (offs_m[:, None] < L) & (offs_d[None, :] < head_dim)
    q = tl.load(Q + pid_bh.to(tl.int64) * L * head_dim + offs_m[:, None] * head_dim
                + offs_d[None, :], mask=q_mask, other=0.0)
    if DOT_F32:
        q = q.to(tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    kpm_base = KPM + b.to(tl.int64) * (P + L)
    if s < n_past_splits:
        start = s * split_size
        if HAS_WINDOW:
            start = start + past_lo
        acc, l_i, m_i = _split_range(
            acc, l_i, m_i, q, PK + bhk * P * head_dim, PV + bhk * P * head_dim, kpm_base, start,
            tl.minimum(start + split_size, P), P, offs_m, offs_d, head_dim, L, P, R, W, WINDOW,
            SOFTCAP, qk_scale, True, PAST_TO_READ, MASK, HAS_KPM, HAS_WINDOW, HAS_SOFTCAP, BLOCK_N,
            DOT_F32, DOT_PREC)
    else:  # current keys: row 0's window reaches key 0, nothing to skip
        start = (s - n_past_splits) * split_size
        acc, l_i, m_i = _split_range(
            acc, l_i, m_i, q, K + bhk * L * head_dim, V + bhk * L * head_dim, kpm_base + P, start,
            tl.minimum(start + split_size, L), L, offs_m, offs_d, head_dim, L, P, R, W, WINDOW,
            SOFTCAP, qk_scale, False, PAST_TO_READ, MASK, HAS_KPM, HAS_WINDOW, HAS_SOFTCAP, BLOCK_N,
            DOT_F32, DOT_PREC)
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    part = (pid_bh.to(tl.int64) * n_splits + s)
    tl.store(OutPart + part * BLOCK_M * BLOCK_D + offs_m[:, None] * BLOCK_D + offs_d[None, :],
             acc / l_safe[:, None])
    tl.store(LsePart + part * BLOCK_M + offs_m,
             tl.where(empty, float("-inf"), m_i + tl.math.log2(l_safe)))


@triton.jit
def decode_reduce_kernel(OutPart, LsePart, Out, Lse, L, head_dim, n_splits,
                         BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """Merge the partials of one (batch, head): Out ``[B, Hq, L, D]``, Lse ``[B, Hq, L]`` natural.

    Grid ``(B * Hq,)``.
    """
    pid_bh = tl.program_id(0).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    lse_base = LsePart + pid_bh * n_splits * BLOCK_M
    out_base = OutPart + pid_bh * n_splits * BLOCK_M * BLOCK_D
    m = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    for s in range(0, n_splits):
        m = tl.maximum(m, tl.load(lse_base + s * BLOCK_M + offs_m))
    m_safe = tl.where(m == float("-inf"), 0.0, m)  # every split empty: weights 0, not NaN
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    den = tl.zeros([BLOCK_M], dtype=tl.float32)
    for s in range(0, n_splits):
        w = tl.math.exp2(tl.load(lse_base + s * BLOCK_M + offs_m) - m_safe)
        o = tl.load(out_base + s * BLOCK_M * BLOCK_D + offs_m[:, None] * BLOCK_D + offs_d[None, :])
        acc += w[:, None] * o
        den += w
    empty = den == 0.0
    den_safe = tl.where(empty, 1.0, den)
    msk = (offs_m[:, None] < L) & (offs_d[None, :] < head_dim)
    tl.store(Out + pid_bh * L * head_dim + offs_m[:, None] * head_dim + offs_d[None, :],
             (acc / den_safe[:, None]).to(Out.dtype.element_ty), mask=msk)
    tl.store(Lse + pid_bh * L + offs_m,
             tl.where(empty, float("-inf"), (m_safe + tl.math.log2(den_safe)) * 0.6931471805599453),
             mask=offs_m < L)
