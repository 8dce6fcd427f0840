"""PyTorch implementation of the associative-memory primitives (the CPU path; runs on any device).

The three primitives below are what the read and the write (forward and backward) are made of;
the Triton backend implements the same three with the same signatures. ``phi`` are the DPFP
features of ``x`` ``[B, L, d_mem]`` (``K = d_key = 2 nu d_mem`` columns), ``phi_n`` the same
L2-normalised when ``normalize``:

* :func:`phi_matmul`: ``phi_n @ Bm`` (divided by ``phi_n . w + eps`` when ``w`` is given);
* :func:`phi_outer`: ``base_B + phi_n^T (gscale * G)`` and ``base_w + phi_n^T c``;
* :func:`phi_grad`: the gradient w.r.t. ``x`` given ``d phi_n = (gscale * G) Bm^T + c w^T``.

Rows are processed in chunks so that only a ``[B, chunk, K]`` feature tile exists at a time,
never the ``[B, L, K]`` feature tensor: the backward recomputes the features from ``x`` instead
of saving them (bench/README.md has the measured time and peak memory against the dense path).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

#: feature elements per chunk (``B * rows * K``): ~4 MB of float32, cache-sized on CPUs
CHUNK_ELEMENTS = 1 << 20
NORM_EPS = 1e-12  # F.normalize's eps


def stat_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the per-row statistics (``den``, ``nrm``, ``gamma``): float64 for float64 inputs,
    float32 otherwise."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _xprime(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([F.relu(x), F.relu(-x)], dim=-1)


def _phi(xp: torch.Tensor, nu: int) -> torch.Tensor:
    return torch.cat([xp * xp.roll(j, dims=-1) for j in range(1, nu + 1)], dim=-1)


def _chunks(x: torch.Tensor, nu: int):
    """Row ranges of ``x`` ``[B, L, d_mem]`` with at most CHUNK_ELEMENTS feature elements."""
    batch, length, dm = x.shape
    rows = max(1, CHUNK_ELEMENTS // max(1, batch * 2 * nu * dm))
    return [(s, min(s + rows, length)) for s in range(0, length, rows)]


def feature_norm(x: torch.Tensor, nu: int) -> torch.Tensor:
    """``|phi(x)|`` ``[B, L]`` float32 without the features: ``|phi|^2 = sum_j sum_i y_i y_{i-j}``
    with ``y = x'^2`` (only a ``[B, L, 2 d_mem]`` temporary)."""
    y = _xprime(x.to(stat_dtype(x.dtype))).square()
    sq = sum((y * y.roll(j, dims=-1)).sum(-1) for j in range(1, nu + 1))
    return sq.sqrt()


def _normalized(phi: torch.Tensor, nrm: torch.Tensor) -> torch.Tensor:
    return phi / nrm.clamp_min(NORM_EPS)[..., None].to(phi.dtype)


def phi_matmul(x: torch.Tensor, Bm: torch.Tensor, w: torch.Tensor | None, *, nu: int,
               normalize: bool, eps: float):
    """``x`` ``[B, L, d_mem]``, ``Bm`` ``[B, K, D]``, ``w`` ``[B, K]`` or None.

    Returns ``(out [B, L, D], den [B, L] or None, nrm [B, L])``: ``out = phi_n @ Bm`` (``/ den``
    with ``den = phi_n . w + eps`` when ``w`` is given) and ``nrm = |phi|``; the statistics in
    :func:`stat_dtype`."""
    batch, length, _ = x.shape
    sd = stat_dtype(x.dtype)
    out = x.new_empty(batch, length, Bm.shape[-1], dtype=Bm.dtype)
    den = x.new_empty(batch, length, dtype=sd) if w is not None else None
    nrm = x.new_empty(batch, length, dtype=sd)
    for s, e in _chunks(x, nu):
        phi = _phi(_xprime(x[:, s:e]), nu)
        nrm[:, s:e] = phi.to(sd).norm(dim=-1)
        if normalize:
            phi = _normalized(phi, nrm[:, s:e])
        num = torch.bmm(phi, Bm)
        if w is not None:
            d = torch.bmm(phi.to(sd), w[..., None].to(sd))[..., 0] + eps
            den[:, s:e] = d
            num = (num / d[..., None]).to(num.dtype)
        out[:, s:e] = num
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
        phi = _phi(_xprime(x[:, s:e]), nu)
        if normalize:
            phi = _normalized(phi, nrm[:, s:e])
        g = G[:, s:e]
        if gscale is not None:
            g = g * gscale[:, s:e, None].to(g.dtype)
        out_B.baddbmm_(phi.transpose(1, 2), g)
        if c is not None:
            out_w += torch.bmm(phi.transpose(1, 2), c[:, s:e, None].to(phi.dtype))[..., 0]
    return out_B, out_w


def phi_grad(x: torch.Tensor, G: torch.Tensor, gscale: torch.Tensor | None, Bm: torch.Tensor,
             c: torch.Tensor | None, w: torch.Tensor | None, s: torch.Tensor | None,
             nrm: torch.Tensor | None, *, nu: int, normalize: bool) -> torch.Tensor:
    """Gradient w.r.t. ``x`` ``[B, L, d_mem]`` for ``d phi_n = (gscale G) Bm^T + c w^T``
    (``G`` ``[B, L, D]``, ``Bm`` ``[B, K, D]``, ``c`` ``[B, L]``, ``w`` ``[B, K]``). With
    ``normalize`` the chain goes through ``phi_n = phi / |phi|`` (``nrm``); ``s`` (``phi_n .
    d phi_n``, which the Triton kernel needs) is recomputed here from the features."""
    dx = torch.empty_like(x)
    dm = x.shape[-1]
    for st, e in _chunks(x, nu):
        xc = x[:, st:e]
        xp = _xprime(xc)
        g = G[:, st:e]
        if gscale is not None:
            g = g * gscale[:, st:e, None].to(g.dtype)
        dphi = torch.bmm(g, Bm.transpose(1, 2))
        if c is not None:
            dphi = dphi + c[:, st:e, None].to(dphi.dtype) * w[:, None, :].to(dphi.dtype)
        if normalize:
            phi = _phi(xp, nu)
            n = nrm[:, st:e, None].to(phi.dtype)
            big = n > NORM_EPS
            inv = 1 / n.clamp_min(NORM_EPS)
            proj = (phi * dphi).sum(-1, keepdim=True) * inv * inv * inv  # (phi_n . dphi_n) / |phi|^2
            dphi = dphi * inv - torch.where(big, phi * proj, torch.zeros_like(phi))
        # phi_j[i] = x'[i] x'[i - j]  =>  dx'[k] = sum_j dphi_j[k] x'[k - j] + dphi_j[k + j] x'[k + j]
        dxp = torch.zeros_like(xp)
        n2 = xp.shape[-1]
        for j in range(1, nu + 1):
            dj = dphi[..., (j - 1) * n2: j * n2]
            dxp += dj * xp.roll(j, dims=-1) + (dj * xp).roll(-j, dims=-1)
        dx[:, st:e] = dxp[..., :dm] * (xc > 0) - dxp[..., dm:] * (xc < 0)
    return dx


def rowdot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``sum_d a * b`` ``[B, L]`` (:func:`stat_dtype`) for ``a``, ``b`` ``[B, L, D]``."""
    sd = stat_dtype(a.dtype)
    return torch.linalg.vecdot(a.to(sd), b.to(sd))
