"""Triton kernels of the associative-memory primitives (see :mod:`..chunked` for the contract).

The DPFP features are never stored: every kernel rebuilds the tile of ``phi`` it needs from
``x`` ``[B, L, d_mem]`` with gathered loads. Feature column ``key = (j - 1) 2 d_mem + i``
(``j = 1..nu``, ``i < 2 d_mem``) is ``x'[i] x'[(i - j) mod 2 d_mem]`` with
``x' = [relu(x), relu(-x)]``.

* :func:`phi_matmul_kernel` (read forward; ``phi_n @ B`` in the write's backward): one program
  per (row block, column block, batch) streams the key dimension; the normaliser
  ``phi_n . w`` and ``|phi|`` ride along, so the division happens in registers.
* :func:`phi_outer_kernel` (the rank-M update ``A + phi_n^T u``, ``z + phi_n^T gamma``; the read's
  ``dA``, ``dz``): one program per (key block, column block, batch) streams the rows.
* :func:`phi_grad_kernel` (``dx``): one program per (row block, batch). The gradient of
  ``x'[k]`` collects ``dphi`` at key ``k`` (times ``x'[k - j]``) and at key ``k + j`` (times
  ``x'[k + j]``); both are computed as ``G B^T`` with ``B``'s rows gathered at those keys, so
  no scatter and no ``[L, d_key]`` buffer is needed (at twice the minimal product count).

Accumulation is float32; ``DOT_F32`` casts the dot operands to float32 (the interpreter
mishandles bf16 dots), ``DOT_PREC`` is ``"ieee"`` for float32 inputs.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _xprime(xrow, p, dm, rmask):
    """``x'[rows, p]`` as float32 ``[BM, BP]``: ``xrow`` ``[BM]`` row pointers, ``p`` ``[BP]`` in
    ``[0, 2 dm)`` (other lanes give 0)."""
    first = p < dm
    col = tl.where(first, p, p - dm)
    ok = (p >= 0) & (p < 2 * dm)
    val = tl.load(xrow[:, None] + col[None, :], mask=rmask[:, None] & ok[None, :], other=0.0)
    val = val.to(tl.float32)
    val = tl.where(first[None, :], val, -val)
    return tl.maximum(val, 0.0)


@triton.jit
def _phi(xrow, kidx, dm, K, rmask):
    """Feature tile ``phi[rows, kidx]`` float32 ``[BM, BK]`` (0 for ``kidx >= K``)."""
    n2 = 2 * dm
    kmask = kidx < K
    kk = tl.where(kmask, kidx, 0)
    j = kk // n2 + 1
    i = kk % n2
    i2 = ((i - j) % n2 + n2) % n2
    a = _xprime(xrow, i, dm, rmask)
    b = _xprime(xrow, i2, dm, rmask)
    return tl.where(kmask[None, :], a * b, 0.0)


@triton.jit
def _mod(a, n):
    return (a % n + n) % n


@triton.jit
def phi_matmul_kernel(
    X, Bm, W, Out, Den, Nrm,
    L, dm, K, D, eps, floor,
    HAS_W: tl.constexpr, NORMALIZE: tl.constexpr, HAS_FLOOR: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """``Out[b, rows, cols] = phi_n @ Bm`` (``/ Den`` with ``Den = phi_n . W + eps`` when
    ``HAS_W``; ``/ max(Den, floor |phi_n|^2 + eps)`` with ``HAS_FLOOR``); ``Nrm = |phi|`` (and
    ``Den``, unfloored) are written by the first column block."""
    pid_m = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < L
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    xrow = X + b * L * dm + rows.to(tl.int64) * dm
    b_base = Bm + b * K * D
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    den = tl.zeros([BLOCK_M], dtype=tl.float32)
    sq = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        kidx = k0 + tl.arange(0, BLOCK_K)
        kmask = kidx < K
        phi = _phi(xrow, kidx, dm, K, rmask)
        bt = tl.load(b_base + kidx[:, None] * D + cols[None, :],
                     mask=kmask[:, None] & cmask[None, :], other=0.0)
        if DOT_F32:
            acc += tl.dot(phi, bt.to(tl.float32), input_precision=DOT_PREC)
        else:
            acc += tl.dot(phi.to(bt.dtype), bt, input_precision=DOT_PREC)
        sq += tl.sum(phi * phi, 1)
        if HAS_W:
            wv = tl.load(W + b * K + kidx, mask=kmask, other=0.0).to(tl.float32)
            den += tl.sum(phi * wv[None, :], 1)
    nrm = tl.sqrt(sq)
    if NORMALIZE:
        inv = 1.0 / tl.maximum(nrm, 1e-12)
        acc = acc * inv[:, None]
        den = den * inv
        sq = sq * inv * inv
    if HAS_W:
        den = den + eps
        if HAS_FLOOR:
            acc = acc / tl.maximum(den, floor * sq + eps)[:, None]
        else:
            acc = acc / den[:, None]
    out_ptr = Out + b * L * D + rows.to(tl.int64)[:, None] * D + cols[None, :]
    tl.store(out_ptr, acc.to(Out.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])
    if pid_d == 0:
        tl.store(Nrm + b * L + rows, nrm, mask=rmask)
        if HAS_W:
            tl.store(Den + b * L + rows, den, mask=rmask)


@triton.jit
def phi_outer_kernel(
    X, G, Gs, C, Nrm, BaseB, BaseW, OutB, OutW,
    L, dm, K, D,
    HAS_GS: tl.constexpr, HAS_C: tl.constexpr, HAS_BASE: tl.constexpr,
    NORMALIZE: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """``OutB[b, keys, cols] = BaseB + phi_n^T (Gs * G)``; ``OutW[b, keys] = BaseW + phi_n^T C``
    (first column block, when ``HAS_C``)."""
    pid_k = tl.program_id(0)
    pid_d = tl.program_id(1)
    b = tl.program_id(2).to(tl.int64)
    kidx = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    kmask = kidx < K
    cols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    cmask = cols < D
    acc = tl.zeros([BLOCK_K, BLOCK_D], dtype=tl.float32)
    acc_w = tl.zeros([BLOCK_K], dtype=tl.float32)
    for r0 in range(0, L, BLOCK_R):
        rows = r0 + tl.arange(0, BLOCK_R)
        rmask = rows < L
        xrow = X + b * L * dm + rows.to(tl.int64) * dm
        phi = _phi(xrow, kidx, dm, K, rmask)
        if NORMALIZE:
            n = tl.load(Nrm + b * L + rows, mask=rmask, other=1.0)
            phi = phi * (1.0 / tl.maximum(n, 1e-12))[:, None]
        g = tl.load(G + b * L * D + rows.to(tl.int64)[:, None] * D + cols[None, :],
                    mask=rmask[:, None] & cmask[None, :], other=0.0)
        if HAS_GS:
            gs = tl.load(Gs + b * L + rows, mask=rmask, other=0.0)
            g = (g.to(tl.float32) * gs[:, None]).to(g.dtype)
        if DOT_F32:
            acc += tl.dot(tl.trans(phi), g.to(tl.float32), input_precision=DOT_PREC)
        else:
            acc += tl.dot(tl.trans(phi.to(g.dtype)), g, input_precision=DOT_PREC)
        if HAS_C:
            c = tl.load(C + b * L + rows, mask=rmask, other=0.0).to(tl.float32)
            acc_w += tl.sum(phi * c[:, None], 0)
    b_off = b * K * D + kidx[:, None] * D + cols[None, :]
    bmask = kmask[:, None] & cmask[None, :]
    if HAS_BASE:
        acc += tl.load(BaseB + b_off, mask=bmask, other=0.0).to(tl.float32)
    tl.store(OutB + b_off, acc.to(OutB.dtype.element_ty), mask=bmask)
    if HAS_C:
        if pid_d == 0:
            if HAS_BASE:
                acc_w += tl.load(BaseW + b * K + kidx, mask=kmask, other=0.0).to(tl.float32)
            tl.store(OutW + b * K + kidx, acc_w.to(OutW.dtype.element_ty), mask=kmask)


@triton.jit
def phi_grad_kernel(
    X, G, Gs, Bm, C, Wv, S, Nrm, DX,
    L, dm, K, D,
    HAS_GS: tl.constexpr, HAS_C: tl.constexpr, NORMALIZE: tl.constexpr, NU: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_KM: tl.constexpr, BLOCK_D: tl.constexpr,
    DOT_F32: tl.constexpr, DOT_PREC: tl.constexpr,
):
    """``DX[b, rows] = d x`` for ``d phi_n = (Gs * G) Bm^T + C Wv^T``; with ``NORMALIZE`` through
    ``phi_n = phi / Nrm`` using ``S = phi_n . d phi_n`` per row."""
    pid_m = tl.program_id(0)
    b = tl.program_id(1).to(tl.int64)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < L
    n2 = 2 * dm
    xrow = X + b * L * dm + rows.to(tl.int64) * dm
    g_rows = G + b * L * D + rows.to(tl.int64) * D
    b_base = Bm + b * K * D
    if HAS_GS:
        gs = tl.load(Gs + b * L + rows, mask=rmask, other=0.0)
    if HAS_C:
        c = tl.load(C + b * L + rows, mask=rmask, other=0.0).to(tl.float32)
    if NORMALIZE:
        n = tl.load(Nrm + b * L + rows, mask=rmask, other=1.0)
        inv = 1.0 / tl.maximum(n, 1e-12)
        s = tl.load(S + b * L + rows, mask=rmask, other=0.0)
        coef = tl.where(n > 1e-12, s * inv * inv, 0.0)
    for m0 in range(0, dm, BLOCK_KM):
        mm = m0 + tl.arange(0, BLOCK_KM)
        mmask = mm < dm
        k0 = mm            # x'[k0] = relu(x[mm])
        k1 = mm + dm       # x'[k1] = relu(-x[mm])
        acc0 = tl.zeros([BLOCK_M, BLOCK_KM], dtype=tl.float32)
        acc1 = tl.zeros([BLOCK_M, BLOCK_KM], dtype=tl.float32)
        corr0 = tl.zeros([BLOCK_M, BLOCK_KM], dtype=tl.float32)
        corr1 = tl.zeros([BLOCK_M, BLOCK_KM], dtype=tl.float32)
        for j in tl.static_range(1, NU + 1):
            base = (j - 1) * n2
            p0 = base + k0
            q0 = base + _mod(k0 + j, n2)
            p1 = base + k1
            q1 = base + _mod(k1 + j, n2)
            a_p0 = tl.zeros([BLOCK_M, BLOCK_KM], dtype=tl.float32)
            a_q0 = tl.zeros([BLOCK_M, BLOCK_KM], dtype=tl.float32)
            a_p1 = tl.zeros([BLOCK_M, BLOCK_KM], dtype=tl.float32)
            a_q1 = tl.zeros([BLOCK_M, BLOCK_KM], dtype=tl.float32)
            for d0 in range(0, D, BLOCK_D):
                cols = d0 + tl.arange(0, BLOCK_D)
                cmask = cols < D
                g = tl.load(g_rows[:, None] + cols[None, :], mask=rmask[:, None] & cmask[None, :],
                            other=0.0)
                if HAS_GS:
                    g = (g.to(tl.float32) * gs[:, None]).to(g.dtype)
                bmask = cmask[:, None] & mmask[None, :]
                col_off = b_base + cols[:, None]
                b_p0 = tl.load(col_off + p0[None, :] * D, mask=bmask, other=0.0)
                b_q0 = tl.load(col_off + q0[None, :] * D, mask=bmask, other=0.0)
                b_p1 = tl.load(col_off + p1[None, :] * D, mask=bmask, other=0.0)
                b_q1 = tl.load(col_off + q1[None, :] * D, mask=bmask, other=0.0)
                if DOT_F32:
                    g = g.to(tl.float32)
                    b_p0 = b_p0.to(tl.float32)
                    b_q0 = b_q0.to(tl.float32)
                    b_p1 = b_p1.to(tl.float32)
                    b_q1 = b_q1.to(tl.float32)
                a_p0 += tl.dot(g, b_p0, input_precision=DOT_PREC)
                a_q0 += tl.dot(g, b_q0, input_precision=DOT_PREC)
                a_p1 += tl.dot(g, b_p1, input_precision=DOT_PREC)
                a_q1 += tl.dot(g, b_q1, input_precision=DOT_PREC)
            if HAS_C:
                w_p0 = tl.load(Wv + b * K + p0, mask=mmask, other=0.0).to(tl.float32)
                w_q0 = tl.load(Wv + b * K + q0, mask=mmask, other=0.0).to(tl.float32)
                w_p1 = tl.load(Wv + b * K + p1, mask=mmask, other=0.0).to(tl.float32)
                w_q1 = tl.load(Wv + b * K + q1, mask=mmask, other=0.0).to(tl.float32)
                a_p0 += c[:, None] * w_p0[None, :]
                a_q0 += c[:, None] * w_q0[None, :]
                a_p1 += c[:, None] * w_p1[None, :]
                a_q1 += c[:, None] * w_q1[None, :]
            xa0 = _xprime(xrow, _mod(k0 - j, n2), dm, rmask)
            xb0 = _xprime(xrow, _mod(k0 + j, n2), dm, rmask)
            xa1 = _xprime(xrow, _mod(k1 - j, n2), dm, rmask)
            xb1 = _xprime(xrow, _mod(k1 + j, n2), dm, rmask)
            acc0 += a_p0 * xa0 + a_q0 * xb0
            acc1 += a_p1 * xa1 + a_q1 * xb1
            if NORMALIZE:
                corr0 += xa0 * xa0 + xb0 * xb0
                corr1 += xa1 * xa1 + xb1 * xb1
        if NORMALIZE:
            x0 = _xprime(xrow, k0, dm, rmask)
            x1 = _xprime(xrow, k1, dm, rmask)
            acc0 = acc0 * inv[:, None] - coef[:, None] * x0 * corr0
            acc1 = acc1 * inv[:, None] - coef[:, None] * x1 * corr1
        xmask = rmask[:, None] & mmask[None, :]
        xv = tl.load(xrow[:, None] + mm[None, :], mask=xmask, other=0.0).to(tl.float32)
        dx = tl.where(xv > 0, acc0, 0.0) - tl.where(xv < 0, acc1, 0.0)
        tl.store(DX + b * L * dm + rows.to(tl.int64)[:, None] * dm + mm[None, :],
                 dx.to(DX.dtype.element_ty), mask=xmask)


@triton.jit
def rowdot_kernel(A, B, Out, n_rows, D, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """``Out[r] = sum_d A[r, d] B[r, d]`` (float32) over ``n_rows`` rows of ``D``."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n_rows
    base = rows.to(tl.int64)[:, None] * D
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        mask = rmask[:, None] & (cols < D)[None, :]
        a = tl.load(A + base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        bb = tl.load(B + base + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        acc += tl.sum(a * bb, 1)
    tl.store(Out + rows, acc, mask=rmask)


__all__ = ["phi_grad_kernel", "phi_matmul_kernel", "phi_outer_kernel", "rowdot_kernel", "triton"]
