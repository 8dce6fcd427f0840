"""Mask predicates shared by every kernel (``@triton.jit`` helpers, inlined at compile time).

``MASK`` is the mode's name as a string ``constexpr`` (``"causal"``, ``"rmt"``, ``"full"``,
``"bottleneck"``; as FlashAttention's ``BIAS_TYPE``); these predicates are the kernels' copy of
:func:`rmt_fast.masks.current_key_visible`, and the tests check the kernels against it.
Row ``i`` is a read row when ``i < R``, a write row when ``i >= L - W``, a segment row otherwise.

Sliding window (``HAS_WINDOW`` constexpr, ``WINDOW`` runtime int, unused without it): row ``i``
sits at position ``P + i`` of the keys ``[past (P) | current (L)]`` and sees a key at position
``a`` only if ``P + i - a < WINDOW``. The helpers measure keys in the rows' frame, ``c = a - P``
(current key ``j``: ``c = j``; past key ``n``: ``c = n - P < 0``), so the rule is ``i - c < WINDOW``:
a tile whose farthest key (its first) is within every row's window needs no window mask, and a
key tile before the window of the block's first row is never loaded.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def tanh_f32(y):
    """``tanh(y)`` elementwise (float32, any shape), relative error below 2e-7.

    Written out because the interpreter lacks ``tanh`` in some Triton versions. From
    ``|y| >= 0.625``: ``(1 - e) / (1 + e)``, ``e = exp(-2 y)``, with ``y`` clamped to +-9.5
    (where ``tanh`` rounds to +-1 in float32) so that nothing overflows. Below 0.625 that form
    loses the low bits of ``t`` to cancellation in ``1 - e`` (all of them as ``y -> 0``: an
    absolute error of ``SOFTCAP * 6e-8`` on a capped score), so there the odd polynomial of
    Cephes' ``tanhf`` takes over (relative error 1.3e-7). A clamp rather than ``|y|`` and a
    sign select: with the latter, ptxas spilled 1 KB of registers in the float32 dQ kernel on
    sm_90a.
    """
    yc = tl.minimum(tl.maximum(y, -9.5), 9.5)
    e = tl.math.exp2(yc * -2.8853900817779268)  # exp(-2 y): -2 * log2(e)
    big = (1.0 - e) / (1.0 + e)
    z = yc * yc  # the clamped y here too: no overflow in the unused branch either
    small = ((((-5.70498872745e-3 * z + 2.06390887954e-2) * z - 5.37397155531e-2) * z
              + 1.33314422036e-1) * z - 3.33332819422e-1) * z * yc + yc
    return tl.where(z < 0.390625, small, big)  # |y| < 0.625


@triton.jit
def softcap_log2(qk, SOFTCAP):
    """Soft-cap base-2 logits ``qk = x * log2(e)`` ``[BM, BN]`` (``x`` the natural scaled score):
    returns the capped logits ``SOFTCAP * tanh(x / SOFTCAP) * log2(e)`` and ``t = tanh(x /
    SOFTCAP)``, whose ``1 - t^2`` is the cap's derivative for the backward. The lse stays that of
    natural scores: only the score changes, not its base-2 encoding."""
    cap2 = SOFTCAP * 1.4426950408889634  # the cap in base-2 units
    t = tanh_f32(qk * (1.0 / cap2))  # x / SOFTCAP = (x log2 e) / (SOFTCAP log2 e)
    return t * cap2, t


@triton.jit
def cur_visible(offs_m, offs_n, L, R, W, MASK: tl.constexpr):
    """Element mask ``[BM, BN]``: may row ``offs_m`` see current key ``offs_n``? (with bounds)"""
    qi = offs_m[:, None]
    kj = offs_n[None, :]
    inb = (qi < L) & (kj < L)
    if MASK == "causal":
        vis = kj <= qi
    elif MASK == "rmt":
        vis = tl.where(qi < R, kj < R, (kj <= qi) | (qi >= L - W))
    elif MASK == "full":
        vis = inb
    else:
        vis = (kj < R) | (kj >= L - W) | (qi < R) | (qi >= L - W)
    return vis & inb


@triton.jit
def past_visible(offs_m, offs_n, L, P, R, PAST_TO_READ: tl.constexpr):
    """Element mask ``[BM, BN]`` for past keys: all rows but read rows (unless PAST_TO_READ)."""
    qi = offs_m[:, None]
    kj = offs_n[None, :]
    vis = (qi < L) & (kj < P)
    if not PAST_TO_READ:
        vis = vis & (qi >= R)
    return vis


@triton.jit
def window_visible(offs_m, offs_c, WINDOW):
    """Element mask ``[BM, BN]`` of the sliding window: rows ``offs_m`` vs keys at ``offs_c``
    in the rows' frame (``a - P``)."""
    return (offs_m[:, None] - offs_c[None, :]) < WINDOW


@triton.jit
def window_cuts(m0, c0, WINDOW, BLOCK_M: tl.constexpr):
    """Scalar: the window hides the key at ``c0`` (a tile's first key, rows' frame) from some
    row of query block ``m0`` (its last row is the farthest from it; rows past ``L`` are
    counted, which only masks a tile that may not need it)."""
    return m0 + (BLOCK_M - 1) - c0 >= WINDOW


@triton.jit
def window_cut_row(c0, WINDOW, BLOCK_M: tl.constexpr):
    """First query block start ``m0`` whose window cuts a key tile starting at ``c0`` (rows'
    frame): :func:`window_cuts` is ``m0 >= window_cut_row(c0)``, for loops over query blocks."""
    return c0 + WINDOW - (BLOCK_M - 1)


@triton.jit
def window_key_start(first_row, WINDOW, BLOCK_N: tl.constexpr):
    """First key (a buffer index, aligned down to ``BLOCK_N``) that row ``first_row`` may see
    through the window, with rows and keys in the same frame: ``first_row - WINDOW + 1``,
    clamped at 0. Later rows see no earlier key, so loops over a block whose first row (that
    sees the buffer) is ``first_row`` start here: ``m0`` for the current keys; the past buffer
    goes through :func:`window_past_start` (position ``P + first_row``)."""
    return (tl.maximum(first_row - WINDOW + 1, 0) // BLOCK_N) * BLOCK_N


@triton.jit
def window_past_start(m0, R, P, WINDOW, BLOCK_N: tl.constexpr, PAST_TO_READ: tl.constexpr):
    """Start of the past-key loop of query block ``m0``. Its first row that sees the past is
    ``m0`` (``max(m0, R)`` when read rows do not): :func:`window_key_start` of that row's
    position ``P + first_row``, or ``P`` (an empty loop) when its window does not reach back to
    the last past key (``first_row + 1`` positions back), which the aligned-down start alone
    would still visit."""
    first_row = m0
    if not PAST_TO_READ:
        first_row = tl.maximum(m0, R)
    return tl.where(first_row + 1 < WINDOW, window_key_start(P + first_row, WINDOW, BLOCK_N), P)


@triton.jit
def window_row_end(c_last, WINDOW, BLOCK_M: tl.constexpr):
    """End (exclusive, aligned up to ``BLOCK_M``) of the query rows that may see a key block
    whose last key is at ``c_last`` (rows' frame) through the window: rows ``< c_last + WINDOW``."""
    return tl.cdiv(tl.maximum(c_last + WINDOW, 0), BLOCK_M) * BLOCK_M


@triton.jit
def cur_block_full(m0, n0, L, R, W, WINDOW, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   MASK: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Scalar: every row of query block ``m0`` sees every key of current key block ``n0``
    (with ``HAS_WINDOW``: also through the window).

    Such interior tiles skip the element mask. Rows past ``L`` are ignored by the callers.
    """
    n_last = n0 + BLOCK_N - 1
    m_last = tl.minimum(m0 + BLOCK_M, L) - 1
    full = n_last < L
    if HAS_WINDOW:
        full = full & (window_cuts(m0, n0, WINDOW, BLOCK_M) == 0)
    if MASK == "causal":
        full = full & (n_last <= m0)
    elif MASK == "rmt":
        # read rows need n_last < R; segment rows (starting at max(m0, R)) need n_last <= that row
        full = full & tl.where(m0 < R, n_last < R, (m0 >= L - W) | (n_last <= m0))
    elif MASK == "bottleneck":
        has_seg = (m_last >= R) & (m0 < L - W)
        full = full & ((has_seg == 0) | (n_last < R) | (n0 >= L - W))
    return full


@triton.jit
def cur_key_ranges(m0, L, R, W, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   MASK: tl.constexpr):
    """Current key blocks query block ``m0`` may see: ``[0, hi1)`` then ``[lo2, hi2)``.

    Both are block-aligned and disjoint; ``hi2 == 0`` means no second range. Every other key
    block is invisible to all rows of the query block and is never loaded.
    """
    m_hi = tl.minimum(m0 + BLOCK_M, L)
    hi1 = L
    lo2 = L
    if MASK == "causal":
        hi1 = m_hi  # up to the diagonal
    elif MASK == "rmt":
        # read-only block: [0, R); no write rows: up to the diagonal; else everything
        hi1 = tl.where(m_hi <= R, R, tl.where(m_hi <= L - W, m_hi, L))
    elif MASK == "bottleneck":
        seg_only = (m0 >= R) & (m_hi <= L - W)
        hi1 = tl.where(seg_only, R, L)
        lo2 = tl.where(seg_only, L - W, L)
    hi1 = tl.cdiv(hi1, BLOCK_N) * BLOCK_N
    lo2 = tl.maximum((lo2 // BLOCK_N) * BLOCK_N, hi1)
    hi2 = tl.where(lo2 < L, L, 0)
    return hi1, lo2, hi2


@triton.jit
def cur_query_ranges(n0, L, R, W, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     MASK: tl.constexpr):
    """Query blocks that may see current key block ``n0``: ``[lo1, L)`` then ``[lo2, hi2)``.

    With a second range the first is ``[lo1, hi1)``; returns ``(lo1, hi1, lo2, hi2)``, aligned.
    """
    n_last = n0 + BLOCK_N - 1
    lo1 = 0
    hi1 = L
    lo2 = L
    if MASK == "causal":
        lo1 = n0  # rows at or below the diagonal
    elif MASK == "rmt":
        # read rows see keys < R; segment rows from the diagonal; write rows see every key
        lo1 = tl.where(n0 < R, 0, tl.minimum(n0, L - W))
    elif MASK == "bottleneck":
        seg_only = (n0 >= R) & (n_last < L - W)  # only read and write rows see these keys
        hi1 = tl.where(seg_only, R, L)
        lo2 = tl.where(seg_only, L - W, L)
    lo1 = (lo1 // BLOCK_M) * BLOCK_M
    hi1 = tl.cdiv(hi1, BLOCK_M) * BLOCK_M
    lo2 = tl.maximum((lo2 // BLOCK_M) * BLOCK_M, hi1)
    hi2 = tl.where(lo2 < L, L, 0)
    return lo1, hi1, lo2, hi2


@triton.jit
def tile_visible(offs_m, offs_n, n_len, L, P, R, W, WINDOW, kpm_base, IS_PAST: tl.constexpr,
                 PAST_TO_READ: tl.constexpr, MASK: tl.constexpr, HAS_KPM: tl.constexpr,
                 HAS_WINDOW: tl.constexpr):
    """Element mask ``[BM, BN]`` of a past (``IS_PAST``, ``n_len = P``) or current key tile, with
    key padding when ``HAS_KPM`` (``kpm_base``: int8 ``[n_len]`` row of the padding mask, 1 =
    real key) and the sliding window when ``HAS_WINDOW``."""
    if IS_PAST:
        vis = past_visible(offs_m, offs_n, L, n_len, R, PAST_TO_READ)
        if HAS_WINDOW:
            vis = vis & window_visible(offs_m, offs_n - P, WINDOW)
    else:
        vis = cur_visible(offs_m, offs_n, L, R, W, MASK)
        if HAS_WINDOW:
            vis = vis & window_visible(offs_m, offs_n, WINDOW)
    if HAS_KPM:
        kp = tl.load(kpm_base + offs_n, mask=offs_n < n_len, other=0)
        vis = vis & (kp != 0)[None, :]
    return vis
