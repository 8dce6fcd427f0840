"""Dense reference of ARMT's associative memory: obviously correct, float64-capable, the ground
truth of the tests. Every tensor is materialised (including the ``[B, L, d_key]`` features).

Notation (per transformer layer, per batch row): the state is ``A`` ``[d_key, d]`` and ``z``
``[d_key]``; ``phi`` is the DPFP feature map (:func:`dpfp`), optionally L2-normalised.

* read: ``r = phi(x) A / (phi(x) . z + eps)`` for ``x = W_q h`` ``[L, d_mem]``; the layer then
  sees ``h + r``. With a ``floor`` ``c > 0`` the normaliser is ``max(phi . z, c |phi|^2) + eps``,
  the floor detached (not in the reference code; see :func:`reference_read`).
* write, from the layer's memory-token outputs ``m`` ``[M, d]``: ``k = phi(W_k m)``,
  ``v = W_v m``, ``beta = sigmoid(W_b m)`` ``[M]``, and

  - ``v_bar = read(W_k m)`` (zero on the first segment),
  - ``A' = A + sum_j beta_j k_j (v_j - v_bar_j)^T`` (the delta rule),
  - ``z' = z + sum_j gamma_j k_j`` with ``gamma = clip(1 - (k . z + eps) / |k|^2, 0, 1)``,
    detached (the correction; 1 on the first segment or without correction). Unnormalised
    features use ``|k|^2 + eps`` in the denominator, normalised ones ``|k|^2``. With ``gate``
    (not in the reference code) ``z' = z + sum_j beta_j gamma_j k_j``.
* ``decay`` ``alpha`` in (0, 1] (not in the ARMT code; Gated DeltaNet's gate, one per write):
  every write first scales the state, ``A <- alpha A``, ``z <- alpha z``, then writes as above
  (so ``v_bar`` reads the decayed state); 1 = the reference. A float, or one ``alpha`` per row.
* ``rule="delta"`` (DeltaNet's rule, not in the ARMT code; unit features): read ``phi(x) A``;
  the rows write one after another, ``A <- A + beta_j k_j (v_j - k_j A)^T``; ``z`` unused.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def dpfp(x: torch.Tensor, nu: int = 3) -> torch.Tensor:
    """Deterministic parameter-free projection (Schlag et al. 2021): ``[..., n]`` ->
    ``[..., 2 nu n]``. With ``x' = [relu(x), relu(-x)]``, block ``j = 1..nu`` is
    ``x' * roll(x', j)`` (``roll`` as :func:`torch.roll`: element ``i`` of the rolled vector is
    ``x'[(i - j) mod 2n]``)."""
    xp = torch.cat([F.relu(x), F.relu(-x)], dim=-1)
    return torch.cat([xp * xp.roll(j, dims=-1) for j in range(1, nu + 1)], dim=-1)


def features(x: torch.Tensor, nu: int = 3, normalize: bool = False) -> torch.Tensor:
    """``phi(x)``: :func:`dpfp`, L2-normalised along the last dim when ``normalize``
    (``F.normalize``: ``phi / max(|phi|, 1e-12)``)."""
    phi = dpfp(x, nu)
    return F.normalize(phi, dim=-1) if normalize else phi


def _up(upcast: bool, *tensors):
    return tuple(t.double() if upcast and t is not None else t for t in tensors)


def normaliser(q: torch.Tensor, z: torch.Tensor, eps: float, floor: float) -> torch.Tensor:
    """The read's divisor ``[B, L, 1]`` for features ``q`` ``[B, L, d_key]``: ``q . z + eps``, or
    with ``floor > 0`` ``max(q . z, floor |q|^2) + eps`` with the floor detached. The correction
    leaves every written key at ``k . z' = |k|^2``, so ``floor = 1`` changes nothing for keys the
    state has taken, and keeps a query that ``z`` barely covers from dividing by almost nothing
    (the long-stream breakdown of ``docs/results.md``); it also bounds each write's delta-rule
    step to ``beta / floor``."""
    den = torch.einsum("blk,bk->bl", q, z)[..., None]
    if floor > 0:
        den = torch.maximum(den, floor * q.square().sum(-1, keepdim=True).detach())
    return den + eps


def reference_read(x: torch.Tensor, A: torch.Tensor, z: torch.Tensor, *, nu: int = 3,
                   normalize: bool = False, eps: float = 1e-5, floor: float = 0.0,
                   rule: str = "armt", upcast: bool = False) -> torch.Tensor:
    """``phi(x) A / (phi(x) . z + eps)`` (the divisor as :func:`normaliser`; ``phi(x) A`` for
    ``rule="delta"``): ``x`` ``[B, L, d_mem]``, ``A`` ``[B, d_key, d]``, ``z`` ``[B, d_key]`` ->
    ``[B, L, d]`` (``x``'s dtype; computed in float64 when ``upcast``)."""
    dtype = x.dtype
    x, A, z = _up(upcast, x, A, z)
    q = features(x, nu, normalize)
    num = torch.einsum("blk,bkd->bld", q, A)
    if rule == "delta":
        return num.to(dtype)
    return (num / normaliser(q, z, eps, floor)).to(dtype)


def decay_state(A: torch.Tensor, z: torch.Tensor, decay: float | torch.Tensor):
    """``(alpha A, alpha z)`` for ``A`` ``[B, d_key, d]``, ``z`` ``[B, d_key]`` and ``decay`` a
    float or a ``[B]`` tensor (cast to the state's dtype); the state itself when ``decay`` is 1."""
    if isinstance(decay, torch.Tensor):
        return A * decay.to(A.dtype)[:, None, None], z * decay.to(z.dtype)[:, None]
    if decay == 1.0:
        return A, z
    return A * decay, z * decay


def reference_write(km: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, A: torch.Tensor,
                    z: torch.Tensor, *, first: bool, correction: bool = True, nu: int = 3,
                    normalize: bool = False, eps: float = 1e-5, floor: float = 0.0,
                    gate: bool = False, rule: str = "armt",
                    decay: float | torch.Tensor = 1.0, upcast: bool = False,
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """The delta-rule write (``v_bar`` divided as :func:`normaliser`; ``gamma`` always from
    ``k . z + eps``) into the state scaled by ``decay`` first. ``km = W_k m`` ``[B, M, d_mem]``,
    ``v = W_v m`` ``[B, M, d]``, ``beta = sigmoid(W_b m)`` ``[B, M]``, state ``A``
    ``[B, d_key, d]``, ``z`` ``[B, d_key]``, ``decay`` a float or ``[B]``. Returns ``(A', z')`` in
    ``A``'s dtype (float64 arithmetic when ``upcast``)."""
    dtype = A.dtype
    km, v, beta, A, z = _up(upcast, km, v, beta, A, z)
    k = features(km, nu, normalize)
    A, z = decay_state(A, z, decay)
    if rule == "delta":  # DeltaNet's rule, the rows one after another; z unused
        for j in range(k.shape[1]):
            prev = torch.einsum("bk,bkd->bd", k[:, j], A)
            A = A + torch.einsum("bk,bd,b->bkd", k[:, j], v[:, j] - prev, beta[:, j])
        return A.to(dtype), z.to(dtype)
    if first:
        prev = torch.zeros_like(v)
        gamma = 1.0
    else:
        prev = torch.einsum("bmk,bkd->bmd", k, A) / normaliser(k, z, eps, floor)
        den = torch.einsum("bmk,bk->bm", k, z)[..., None] + eps
        if correction:
            sq = torch.linalg.norm(k, dim=-1) ** 2
            sq = sq if normalize else sq + eps
            gamma = torch.clip(1 - den / sq[..., None], 0, 1).detach()
        else:
            gamma = 1.0
    A2 = A + torch.einsum("bmk,bmd,bm->bkd", k, v - prev, beta)
    if gate:
        gamma = gamma * beta[..., None]
    z2 = z + (gamma * k).sum(dim=1)
    return A2.to(dtype), z2.to(dtype)
