"""Autograd wiring: the ``rmt_fast::assoc_read`` and ``rmt_fast::assoc_update`` custom ops.

Both run on a backend (``"torch"``: :mod:`.chunked`; ``"triton"``: :mod:`.triton`) that
provides the same primitives (``phi_matmul``, ``phi_outer``, ``phi_grad``, ``rowdot``,
``feature_norm``). Their backward passes are custom ops too, so ``torch.compile`` sees opaque
nodes with fake implementations, forward and backward.

* read: ``(r, den, nrm) = assoc_read(x, A, z)`` with ``r = phi_n A / den``,
  ``den = phi_n . z + eps``, ``nrm = |phi|`` (``den`` and ``nrm`` are not differentiable); with
  ``floor > 0`` ``r = phi_n A / max(den, floor |phi_n|^2 + eps)`` (``den`` is still returned
  unfloored: the correction's ``gamma`` is computed from it).
* update: ``(A', z') = assoc_update(km, u, gamma, A, z)`` with ``A' = A + phi_n(km)^T u`` and
  ``z' = z + phi_n(km)^T gamma``: the rank-M part of the delta-rule write.

Backward of the read (``g = dL/dr``, ``delta = sum_d g r``): ``dden = -delta / den``,
``dA = phi_n^T (g / den)``, ``dz = phi_n^T dden``, ``d phi_n = (g / den) A^T + dden z``, and
``phi_n . d phi_n = delta eps / den`` (needed for the normalisation's chain rule). Rows where
the floor is the divisor use it for ``den``, and get ``dden = 0`` and ``phi_n . d phi_n = delta``
(the floor is a constant: :func:`.chunked.read_stats`).
"""

from __future__ import annotations

import importlib

import torch

from .chunked import read_stats, stat_dtype

BACKENDS = ("torch", "triton")


def backend_module(name: str):
    if name == "torch":
        from . import chunked

        return chunked
    if name == "triton":
        return importlib.import_module("rmt_fast.ops.associative_memory.triton")
    raise ValueError(f"backend must be one of {BACKENDS}, got {name!r}")


# --- read ------------------------------------------------------------------------------------
@torch.library.custom_op("rmt_fast::assoc_read", mutates_args=())
def assoc_read(x: torch.Tensor, A: torch.Tensor, z: torch.Tensor, nu: int, normalize: bool,
               eps: float, backend: str, floor: float = 0.0,
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``x`` ``[B, L, d_mem]``, ``A`` ``[B, K, D]``, ``z`` ``[B, K]`` -> ``(r [B, L, D],
    den [B, L], nrm [B, L])``, the statistics in float32 (float64 for float64 inputs)."""
    impl = backend_module(backend)
    out, den, nrm = impl.phi_matmul(x, A, z, nu=nu, normalize=normalize, eps=eps, floor=floor)
    return out, den, nrm


@assoc_read.register_fake
def _(x, A, z, nu, normalize, eps, backend, floor=0.0):
    b, length, _ = x.shape
    sd = stat_dtype(x.dtype)
    return (x.new_empty(b, length, A.shape[-1], dtype=A.dtype),
            x.new_empty(b, length, dtype=sd), x.new_empty(b, length, dtype=sd))


@torch.library.custom_op("rmt_fast::assoc_read_bwd", mutates_args=())
def assoc_read_bwd(g: torch.Tensor, x: torch.Tensor, A: torch.Tensor, z: torch.Tensor,
                   r: torch.Tensor, den: torch.Tensor, nrm: torch.Tensor, nu: int, normalize: bool,
                   eps: float, backend: str, floor: float = 0.0,
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dx, dA, dz)`` of :func:`assoc_read` given ``g = dL/dr`` ``[B, L, D]``."""
    impl = backend_module(backend)
    if hasattr(impl, "read_backward"):  # one pass over the rows (the PyTorch path)
        dx, dA, dz = impl.read_backward(g, x, A, z, r, den, nrm, nu=nu, normalize=normalize,
                                        eps=eps, floor=floor)
        return dx, dA, dz
    inv, dden, s = read_stats(g, r, den, nrm, normalize=normalize, eps=eps, floor=floor,
                              rowdot=impl.rowdot)
    dx = impl.phi_grad(x, g, inv, A, dden, z, s if normalize else None, nrm, nu=nu,
                       normalize=normalize)
    dA, dz = impl.phi_outer(x, g, inv, dden, nrm, None, None, nu=nu, normalize=normalize)
    return dx, dA, dz.to(z.dtype)


@assoc_read_bwd.register_fake
def _(g, x, A, z, r, den, nrm, nu, normalize, eps, backend, floor=0.0):
    return torch.empty_like(x), torch.empty_like(A), torch.empty_like(z)


def _read_setup(ctx, inputs, output):
    x, A, z, nu, normalize, eps, backend, *floor = inputs
    r, den, nrm = output
    ctx.save_for_backward(x, A, z, r, den, nrm)
    ctx.args = (nu, normalize, eps, backend, *floor)
    ctx.mark_non_differentiable(den, nrm)


def _read_backward(ctx, g, _gden, _gnrm):
    x, A, z, r, den, nrm = ctx.saved_tensors
    dx, dA, dz = assoc_read_bwd(g.contiguous(), x, A, z, r, den, nrm, *ctx.args)
    return (dx, dA, dz) + (None,) * len(ctx.args)


assoc_read.register_autograd(_read_backward, setup_context=_read_setup)


# --- update ----------------------------------------------------------------------------------
@torch.library.custom_op("rmt_fast::assoc_update", mutates_args=())
def assoc_update(km: torch.Tensor, u: torch.Tensor, gamma: torch.Tensor, A: torch.Tensor,
                 z: torch.Tensor, nu: int, normalize: bool, backend: str,
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """``km`` ``[B, M, d_mem]``, ``u`` ``[B, M, D]``, ``gamma`` ``[B, M]`` (float32, or float64), ``A``
    ``[B, K, D]``, ``z`` ``[B, K]`` -> ``(A + phi_n^T u, z + phi_n^T gamma)``."""
    impl = backend_module(backend)
    nrm = impl.feature_norm(km, nu) if normalize else None
    A2, z2 = impl.phi_outer(km, u, None, gamma, nrm, A, z, nu=nu, normalize=normalize)
    return A2, z2


@assoc_update.register_fake
def _(km, u, gamma, A, z, nu, normalize, backend):
    return torch.empty_like(A), torch.empty_like(z)


@torch.library.custom_op("rmt_fast::assoc_update_bwd", mutates_args=())
def assoc_update_bwd(gA: torch.Tensor, gz: torch.Tensor, km: torch.Tensor, u: torch.Tensor,
                     gamma: torch.Tensor, nu: int, normalize: bool, backend: str,
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(dkm, du, dgamma)`` of :func:`assoc_update` (``dA = gA`` and ``dz = gz`` pass through)."""
    impl = backend_module(backend)
    du, _, _ = impl.phi_matmul(km, gA, None, nu=nu, normalize=normalize, eps=0.0)
    dgamma3, _, nrm = impl.phi_matmul(km, gz[..., None], None, nu=nu, normalize=normalize, eps=0.0)
    sd = stat_dtype(km.dtype)
    dgamma = dgamma3[..., 0].to(sd)
    s = None
    if normalize:
        s = impl.rowdot(u, du) + gamma.to(sd) * dgamma
        nrm = impl.feature_norm(km, nu)
    dkm = impl.phi_grad(km, u, None, gA, gamma.to(sd), gz, s, nrm, nu=nu, normalize=normalize)
    return dkm, du, dgamma.to(gamma.dtype)


@assoc_update_bwd.register_fake
def _(gA, gz, km, u, gamma, nu, normalize, backend):
    return torch.empty_like(km), torch.empty_like(u), torch.empty_like(gamma)


def _update_setup(ctx, inputs, output):
    km, u, gamma, A, z, nu, normalize, backend = inputs
    ctx.save_for_backward(km, u, gamma)
    ctx.args = (nu, normalize, backend)


def _update_backward(ctx, gA, gz):
    km, u, gamma = ctx.saved_tensors
    dkm, du, dgamma = assoc_update_bwd(gA.contiguous(), gz.contiguous(), km, u, gamma, *ctx.args)
    return dkm, du, dgamma, gA, gz, None, None, None


assoc_update.register_autograd(_update_backward, setup_context=_update_setup)
