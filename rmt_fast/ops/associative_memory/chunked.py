"""PyTorch implementation of the associative-memory primitives (the CPU path; runs on any device).

The three primitives below are what the read and the write (forward and backward) are made of;
the Triton backend implements the same three with the same signatures. ``phi`` are the DPFP
features of ``x`` ``[B, L, d_mem]`` (``K = d_key = 2 nu d_mem`` columns), ``phi_n`` the same
L2-normalised when ``normalize``:

* :func:`phi_matmul`: ``phi_n @ Bm`` (divided by ``phi_n . w + eps`` when ``w`` is given);
* :func:`phi_outer`: ``base_B + phi_n^T (gscale * G)`` and ``base_w + phi_n^T c``;
* :func:`phi_grad`: the gradient w.r.t. ``x`` given ``d phi_n = (gscale * G) Bm^T + c w^T``.

:func:`read_backward` is the read's whole backward in one pass over the rows (the features
are rebuilt once per chunk for both ``dx`` and ``dA``, ``dz``).

Rows are processed in chunks so that only a ``[B, chunk, K]`` feature tile exists at a time,
never the ``[B, L, K]`` feature tensor: the backward recomputes the features from ``x`` instead
of saving them. The features are written straight into one buffer (no ``roll``/``cat`` copies),
and per-row scalings are applied to the ``K``-wide operand rather than the ``d``-wide one.
"""

from __future__ import annotations

import torch

#: feature elements per chunk (``B * rows * K``): ~4 MB of float32, cache-sized on CPUs
CHUNK_ELEMENTS = 1 << 20
NORM_EPS = 1e-12  # F.normalize's eps


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the per-row statistics (``den``, ``nrm``, ``gamma``): float64 for float64 inputs,
    float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _xprime(x: torch.Tensor) -> torch.Tensor:
    """``[relu(x), relu(-x)]`` ``[..., 2 d_mem]`` in one buffer."""
    dm = x.shape[-1]
    out = x.new_empty(*x.shape[:-1], 2 * dm)
    torch.clamp(x, min=0, out=out[..., :dm])
    torch.clamp(x, max=0, out=out[..., dm:]).neg_()
    return out


def _shifted_mul(a: torch.Tensor, b: torch.Tensor, j: int, out: torch.Tensor) -> None:
    """``out = a * roll(b, j)`` along the last dim (``roll(b, j)[i] = b[i - j]``), no copies."""
    n = a.shape[-1]
    j %= n
    if j == 0:
        torch.mul(a, b, out=out)
        return
    torch.mul(a[..., j:], b[..., :-j], out=out[..., j:])
    torch.mul(a[..., :j], b[..., n - j:], out=out[..., :j])


def _phi(xp: torch.Tensor, nu: int) -> torch.Tensor:
    """DPFP features of ``x'``: block ``j`` is ``x' * roll(x', j)``."""
    n2 = xp.shape[-1]
    out = xp.new_empty(*xp.shape[:-1], nu * n2)
    for j in range(1, nu + 1):
        _shifted_mul(xp, xp, j, out[..., (j - 1) * n2: j * n2])
    return out


def _dpfp_backward(dphi: torch.Tensor, xp: torch.Tensor, x: torch.Tensor, nu: int) -> torch.Tensor:
    """``dx`` from ``d phi``: ``phi_j[i] = x'[i] x'[i - j]`` gives
    ``dx'[k] = sum_j dphi_j[k] x'[k - j] + dphi_j[k + j] x'[k + j]``."""
    n2 = xp.shape[-1]
    dm = n2 // 2
    dxp = torch.zeros_like(xp)
    tmp = torch.empty_like(xp)
    for j in range(1, nu + 1):
        dj = dphi[..., (j - 1) * n2: j * n2]
        _shifted_mul(dj, xp, j, tmp)       # dphi_j[k] x'[k - j]
        dxp += tmp
        torch.mul(dj, xp, out=tmp)         # t[i] = dphi_j[i] x'[i]; add t[k + j]
        s = j % n2
        if s == 0:
            dxp += tmp
        else:
            dxp[..., :-s] += tmp[..., s:]
            dxp[..., n2 - s:] += tmp[..., :s]
    dx = dxp[..., :dm] * (x > 0)
    dx -= dxp[..., dm:] * (x < 0)
    return dx


def _chunks(x: torch.Tensor, nu: int):
    """Row ranges of ``x`` ``[B, L, d_mem]`` with at most CHUNK_ELEMENTS feature elements."""
    batch, length, dm = x.shape
    rows = max(1, CHUNK_ELEMENTS // max(1, batch * 2 * nu * dm))
    return [(s, min(s + rows, length)) for s in range(0, length, rows)]


def feature_norm(x: torch.Tensor, nu: int) -> torch.Tensor:
    """``|phi(x)|`` ``[B, L]`` without the features: ``|phi|^2 = sum_j sum_i y_i y_{i-j}``
    with ``y = x'^2`` (only a ``[B, L, 2 d_mem]`` temporary); float32 (float64 for float64)."""
    y = _xprime(x.to(stat_dtype(x.dtype))).square_()
    tmp = torch.empty_like(y)
    sq = torch.zeros(y.shape[:-1], dtype=y.dtype, device=y.device)
    for j in range(1, nu + 1):
        _shifted_mul(y, y, j, tmp)
        sq += tmp.sum(-1)
    return sq.sqrt_()


def _features(xc: torch.Tensor, nu: int, normalize: bool, nrm: torch.Tensor | None):
    """``(x', phi_n)`` of a chunk; ``phi_n = phi / max(nrm, eps)`` when ``normalize``."""
    xp = _xprime(xc)
    phi = _phi(xp, nu)
    if normalize:
        phi /= nrm.clamp_min(NORM_EPS)[..., None].to(phi.dtype)
    return xp, phi


def feature_sq(nrm: torch.Tensor, normalize: bool) -> torch.Tensor:
    """``|phi_n|^2`` from ``nrm = |phi|``: ``|phi|^2``, or 1 (0 for a zero feature vector) when
    the features are normalised."""
    return (nrm / nrm.clamp_min(NORM_EPS)).square() if normalize else nrm.square()


def divisor(den: torch.Tensor, nrm: torch.Tensor, *, normalize: bool, eps: float,
            floor: float) -> torch.Tensor:
    """The read's divisor from ``den = phi_n . w + eps`` and ``nrm = |phi|``: ``den``, or with
    ``floor > 0`` ``max(den, floor |phi_n|^2 + eps)`` (the floor treated as a constant; see
    :func:`rmt_fast.ops.associative_memory.reference.normaliser`)."""
    if floor <= 0:
        return den
    return torch.maximum(den, feature_sq(nrm, normalize).mul_(floor).add_(eps))


def phi_matmul(x: torch.Tensor, Bm: torch.Tensor, w: torch.Tensor | None, *, nu: int,
               normalize: bool, eps: float, floor: float = 0.0):
    """``x`` ``[B, L, d_mem]``, ``Bm`` ``[B, K, D]``, ``w`` ``[B, K]`` or None.

    Returns ``(out [B, L, D], den [B, L] or None, nrm [B, L])``: ``out = phi_n @ Bm`` (``/``
    :func:`divisor` when ``w`` is given) with ``den = phi_n . w + eps`` and ``nrm = |phi|``; the
    statistics in :func:`stat_dtype`."""
    batch, length, _ = x.shape
    sd = stat_dtype(x.dtype)
    chunks = _chunks(x, nu)
    out = None if len(chunks) == 1 else x.new_empty(batch, length, Bm.shape[-1], dtype=Bm.dtype)
    den = x.new_empty(batch, length, dtype=sd) if w is not None else None
    nrm = x.new_empty(batch, length, dtype=sd)
    for s, e in chunks:
        phi = _phi(_xprime(x[:, s:e]), nu)
        n = torch.linalg.vector_norm(phi, dim=-1, dtype=sd)
        nrm[:, s:e] = n
        if normalize:
            phi /= n.clamp_min(NORM_EPS)[..., None].to(phi.dtype)
        num = torch.bmm(phi, Bm)
        if w is not None:
            d = torch.bmm(phi.to(sd), w[..., None].to(sd))[..., 0].add_(eps)
            den[:, s:e] = d
            d = divisor(d, n, normalize=normalize, eps=eps, floor=floor)
            num = num.div_(d[..., None].to(num.dtype)) if num.dtype == sd else \
                (num / d[..., None]).to(num.dtype)
        if out is None:
            out = num
        else:
            out[:, s:e] = num
    if out is None:  # L == 0
        out = x.new_empty(batch, length, Bm.shape[-1], dtype=Bm.dtype)
    return out, den, nrm


def phi_outer(x: torch.Tensor, G: torch.Tensor, gscale: torch.Tensor | None, c: torch.Tensor | None,
              nrm: torch.Tensor | None, base_B: torch.Tensor | None, base_w: torch.Tensor | None, *,
              nu: int, normalize: bool):
    """``x`` ``[B, L, d_mem]``, ``G`` ``[B, L, D]``, ``gscale``/``c``/``nrm`` ``[B, L]``,
    ``base_B`` ``[B, K, D]``, ``base_w`` ``[B, K]`` (None = zeros).

    Returns ``(base_B + phi_n^T (gscale G) [B, K, D], base_w + phi_n^T c [B, K] or None)``."""
    batch, _, dm = x.shape
    k = 2 * nu * dm
    out_B = base_B.clone() if base_B is not None else G.new_zeros(batch, k, G.shape[-1])
    out_w = None
    if c is not None:
        out_w = base_w.clone() if base_w is not None else G.new_zeros(batch, k)
    for s, e in _chunks(x, nu):
        _, phi = _features(x[:, s:e], nu, normalize, None if nrm is None else nrm[:, s:e])
        if c is not None:
            out_w += torch.bmm(phi.transpose(1, 2), c[:, s:e, None].to(phi.dtype))[..., 0]
        if gscale is not None:  # scale the K-wide features, not the D-wide G
            phi *= gscale[:, s:e, None].to(phi.dtype)
        out_B.baddbmm_(phi.transpose(1, 2), G[:, s:e])
    return out_B, out_w


def _normalized_grad(dphi, phi_n, nrm, normalize):
    """``d phi`` from ``d phi_n`` through ``phi_n = phi / max(|phi|, eps)`` (in place)."""
    if not normalize:
        return dphi
    n = nrm[..., None].to(dphi.dtype)
    inv = 1 / n.clamp_min(NORM_EPS)
    # (I - phi_n phi_n^T) / |phi|; below eps F.normalize divides by eps (no projection)
    proj = (phi_n * dphi).sum(-1, keepdim=True) * (n > NORM_EPS)
    return dphi.sub_(phi_n * proj).mul_(inv)


def phi_grad(x: torch.Tensor, G: torch.Tensor, gscale: torch.Tensor | None, Bm: torch.Tensor,
             c: torch.Tensor | None, w: torch.Tensor | None, s: torch.Tensor | None,
             nrm: torch.Tensor | None, *, nu: int, normalize: bool) -> torch.Tensor:
    """Gradient w.r.t. ``x`` ``[B, L, d_mem]`` for ``d phi_n = (gscale G) Bm^T + c w^T``
    (``G`` ``[B, L, D]``, ``Bm`` ``[B, K, D]``, ``c`` ``[B, L]``, ``w`` ``[B, K]``). With
    ``normalize`` the chain goes through ``phi_n = phi / |phi|`` (``nrm``); ``s`` (``phi_n .
    d phi_n``, which the Triton kernel needs) is recomputed here from the features."""
    dx = torch.empty_like(x)
    for st, e in _chunks(x, nu):
        xc = x[:, st:e]
        dphi = torch.bmm(G[:, st:e], Bm.transpose(1, 2))
        if gscale is not None:
            dphi *= gscale[:, st:e, None].to(dphi.dtype)
        if c is not None:
            dphi += c[:, st:e, None].to(dphi.dtype) * w[:, None, :].to(dphi.dtype)
        xp, phi_n = _features(xc, nu, normalize, None if nrm is None else nrm[:, st:e])
        dphi = _normalized_grad(dphi, phi_n, None if nrm is None else nrm[:, st:e], normalize)
        dx[:, st:e] = _dpfp_backward(dphi, xp, xc, nu)
    return dx


def read_backward(g: torch.Tensor, x: torch.Tensor, A: torch.Tensor, z: torch.Tensor,
                  r: torch.Tensor, den: torch.Tensor, nrm: torch.Tensor, *, nu: int,
                  normalize: bool, eps: float, floor: float = 0.0):
    """The read's ``(dx, dA, dz)`` for ``g = dL/dr`` in one pass over the rows (see
    :mod:`rmt_fast.ops.associative_memory.function` for the formulas)."""
    dx = torch.empty_like(x)
    dA = torch.zeros_like(A)
    dz = torch.zeros_like(z)
    inv, dden, _ = read_stats(g, r, den, nrm, normalize=normalize, eps=eps, floor=floor,
                              rowdot=rowdot)
    for st, e in _chunks(x, nu):
        xc, gc = x[:, st:e], g[:, st:e]
        xp, phi_n = _features(xc, nu, normalize, nrm[:, st:e])
        dz += torch.bmm(phi_n.transpose(1, 2), dden[:, st:e, None].to(phi_n.dtype))[..., 0]
        dphi = torch.bmm(gc, A.transpose(1, 2))
        dphi *= inv[:, st:e, None].to(dphi.dtype)
        dphi += dden[:, st:e, None].to(dphi.dtype) * z[:, None, :]
        dA.baddbmm_((phi_n * inv[:, st:e, None].to(phi_n.dtype)).transpose(1, 2), gc)
        dphi = _normalized_grad(dphi, phi_n, nrm[:, st:e], normalize)
        dx[:, st:e] = _dpfp_backward(dphi, xp, xc, nu)
    return dx, dA, dz


def read_stats(g, r, den, nrm, *, normalize: bool, eps: float, floor: float, rowdot):
    """Per-row terms of the read's backward ``(inv, dden, s)`` ``[B, L]``: ``inv = 1 / divisor``,
    ``dden = -(g . r) inv`` (zero where the floor is the divisor: it is a constant), and
    ``s = phi_n . d phi_n`` (``(g . r) eps / den``; ``g . r`` where floored)."""
    delta = rowdot(g, r)
    div = divisor(den, nrm, normalize=normalize, eps=eps, floor=floor)
    inv = 1.0 / div
    dden = -delta * inv
    s = delta * eps * inv
    if floor > 0:
        floored = div > den
        dden = dden.masked_fill_(floored, 0.0)
        s = torch.where(floored, delta, s)
    return inv, dden, s


def rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum_d a * b`` ``[B, L]`` (:func:`stat_dtype`) for ``a``, ``b`` ``[B, L, D]``."""
    sd = stat_dtype(a.dtype)
    if a.dtype == sd:
        return torch.linalg.vecdot(a, b)
    return torch.linalg.vecdot(a.to(sd), b.to(sd))
