"""ARMT's associative memory (Rodkin et al., arXiv 2407.04841): the layer-wise read and the
delta-rule write of the state ``A`` ``[B, d_key, d]``, ``z`` ``[B, d_key]``.

Implementations (same contract, chosen by ``backend``):

* ``reference``: dense, materialises everything, float64-capable (:mod:`.reference`).
* ``torch``: row-chunked PyTorch, no ``[B, L, d_key]`` feature tensor (:mod:`.chunked`).
* ``triton``: fused GPU kernels (:mod:`.triton`); on CPU tensors under ``TRITON_INTERPRET=1``.
* ``auto``: ``triton`` on CUDA tensors when Triton is installed, ``torch`` otherwise.

``torch`` and ``triton`` go through the ``rmt_fast::assoc_read`` / ``rmt_fast::assoc_update``
custom ops (:mod:`.function`), differentiable and traceable by ``torch.compile``.
"""

from __future__ import annotations

import functools
import importlib.util

import torch

from rmt_fast.validation import check_finite_nonnegative

from . import chunked
from .chunked import feature_sq, stat_dtype
from .reference import decay_state, dpfp, features, reference_read, reference_write

BACKENDS = ("auto", "torch", "triton", "reference")
#: ``armt``: ARMT's read and write (the reference code's); ``delta``: DeltaNet's rule on the same
#: features (see :func:`associative_write`)
RULES = ("armt", "delta")


def _resolve(backend: str, x: torch.Tensor) -> str:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if x.is_cuda and importlib.util.find_spec("triton") is not None else "torch"
    if backend == "triton":
        from .triton import ensure_interpreter

        ensure_interpreter(x.device)
    return backend


def _check(name: str, t, dims: int, shape_doc: str) -> None:
    if not isinstance(t, torch.Tensor) or t.dim() != dims:
        got = getattr(t, "shape", type(t).__name__)
        raise ValueError(f"{name} must be a {dims}-D tensor {shape_doc}, got {got}")
    if not t.is_floating_point():
        raise ValueError(f"{name} must be floating point, got {t.dtype}")


def _check_state(x: torch.Tensor, A: torch.Tensor, z: torch.Tensor, nu: int, what: str) -> None:
    _check(what, x, 3, "[B, L, d_mem]")
    _check("A", A, 3, "[B, d_key, d]")
    _check("z", z, 2, "[B, d_key]")
    if not isinstance(nu, int) or nu < 1:
        raise ValueError(f"nu must be an int >= 1, got {nu!r}")
    batch, _, dm = x.shape
    k = 2 * nu * dm
    if A.shape[0] != batch or A.shape[1] != k:
        raise ValueError(f"A must be [B={batch}, d_key=2*nu*d_mem={k}, d], got {list(A.shape)}")
    if tuple(z.shape) != (batch, k):
        raise ValueError(f"z must be [B={batch}, d_key={k}], got {list(z.shape)}")
    for name, t in (("A", A), ("z", z)):
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(f"{name} must match {what}'s dtype and device ({x.dtype}, {x.device}), "
                             f"got ({t.dtype}, {t.device})")


def _outside_autocast(a_pos: int):
    """Under ``torch.autocast`` the projections arrive in the autocast dtype while the state
    ``A``/``z`` keeps its own (float32: it accumulates over every segment): the associative ops
    then cast their inputs to the state's dtype and compute with autocast off, as autocast runs
    its float32-listed ops (autocast would otherwise turn the products inside them to bf16).
    ``a_pos``: the position of ``A`` among the decorated function's arguments."""
    def decorate(fn):
        @functools.wraps(fn)
        def wrapped(*args, **kwargs):
            A = kwargs.get("A", args[a_pos] if len(args) > a_pos else None)
            if not isinstance(A, torch.Tensor) or not torch.is_autocast_enabled(A.device.type):
                return fn(*args, **kwargs)

            def cast(t):
                return t.to(A.dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t

            with torch.autocast(A.device.type, enabled=False):
                return fn(*map(cast, args), **{k: cast(v) for k, v in kwargs.items()})
        return wrapped
    return decorate


@_outside_autocast(a_pos=1)
def associative_read(x: torch.Tensor, A: torch.Tensor, z: torch.Tensor, *, nu: int = 3,
                     normalize: bool = False, eps: float = 1e-5, floor: float = 0.0,
                     rule: str = "armt", backend: str = "auto") -> torch.Tensor:
    """The associative read ``phi(x) A / (phi(x) . z + eps)`` (``phi(x) A`` with ``rule="delta"``).

    Args:
        x: ``[B, L, d_mem]``, the query projection ``W_q h``.
        A: ``[B, d_key, d]`` with ``d_key = 2 nu d_mem``; ``z``: ``[B, d_key]``; same dtype as ``x``.
        nu: DPFP order; normalize: L2-normalise the features (the newer upstream ARMT).
        eps: added to the normaliser.
        floor: ``c >= 0``; with ``c > 0`` the normaliser is ``max(phi . z, c |phi|^2) + eps``,
            the floor treated as a constant (not in the reference code:
            :func:`.reference.normaliser`). 0 = the reference read.
        rule: ``armt`` or ``delta`` (:data:`RULES`; ``delta`` reads ``phi(x) A``, ``z`` unused,
            and needs ``normalize``).
        backend: see the module docstring.

    Returns:
        ``[B, L, d]`` in ``x``'s dtype (to be added to the hidden states); under
        ``torch.autocast``, in the state's dtype (``x`` is cast to it).
    """
    _check_state(x, A, z, nu, "x")
    floor = check_floor(floor)
    z, eps = _rule_read_terms(rule, normalize, floor, z, eps)
    backend = _resolve(backend, x)
    if backend == "reference":
        return reference_read(x, A, z, nu=nu, normalize=normalize, eps=eps, floor=floor)
    from .function import assoc_read

    return assoc_read(x.contiguous(), A.contiguous(), z.contiguous(), nu, normalize, float(eps),
                      backend, floor)[0]


@_outside_autocast(a_pos=3)
def associative_write(km: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, A: torch.Tensor,
                      z: torch.Tensor, *, first: bool | torch.Tensor, correction: bool = True, nu: int = 3,
                      normalize: bool = False, eps: float = 1e-5, floor: float = 0.0,
                      gate: bool = False, rule: str = "armt",
                      decay: float | torch.Tensor = 1.0,
                      backend: str = "auto") -> tuple[torch.Tensor, torch.Tensor]:
    """The delta-rule write (see :mod:`.reference` for the formulas).

    Args:
        km: ``[B, M, d_mem]`` (``W_k m``); v: ``[B, M, d]`` (``W_v m``); beta: ``[B, M]``
            (``sigmoid(W_b m)``); A: ``[B, d_key, d]``, z: ``[B, d_key]``.
        first: the state is fresh (no previous write): ``v_bar = 0`` and ``gamma = 1``. A bool
            ``[B]`` tensor marks fresh rows individually (their ``A``, ``z`` must be zero, so that
            the read gives ``v_bar = 0`` exactly); the diagonal executor uses this.
        correction: ``gamma = clip(1 - (k . z + eps) / |k|^2, 0, 1)`` (detached) scales the
            keys added to ``z``; without it ``gamma = 1``.
        floor: divides ``v_bar`` as :func:`associative_read` does (``gamma`` is unchanged).
        gate: ``z`` takes ``beta_j gamma_j k_j`` (each key weighted by its write gate, as in
            ``A``) instead of ``gamma_j k_j``; ``beta`` gets the gradient of this use too.
        rule: ``delta``: DeltaNet's rule (Schlag et al. 2021; not in the ARMT code): the memory
            rows write one after another, ``A <- A + beta_j k_j (v_j - k_j A)^T``, with unit
            keys (``normalize`` required), so each write is a contraction of ``A`` along
            ``k_j`` and ``A`` stays bounded; ``z`` is returned unchanged but for ``decay``
            (``first``, ``correction``, ``floor`` and ``gate`` do not apply). Computed in
            DeltaNet's UT form (:func:`_delta_write`: one read, one solve, one update for all M rows).
        decay: ``alpha`` in (0, 1]: the write goes into ``alpha A``, ``alpha z`` (the state
            scaled first, so ``v_bar`` reads it scaled; a per-write gate as Gated DeltaNet's,
            not in the ARMT code). 1 = no decay. A float (fixed), or a ``[B]`` tensor, one
            ``alpha`` per row (a learnt decay, differentiated through; its values are not
            checked, which would synchronise with an accelerator: ``sigmoid`` keeps them in
            range).

    Returns:
        ``(A' [B, d_key, d], z' [B, d_key])``. Under ``torch.autocast`` ``km``, ``v`` and ``beta``
        are cast to the state's dtype first.
    """
    _check_state(km, A, z, nu, "km")
    floor = check_floor(floor)
    decay = check_decay(decay, batch=km.shape[0])
    zero, one = _rule_read_terms(rule, normalize, floor, z, eps)
    if rule == "delta" and gate:
        raise ValueError("gate applies to z, which rule='delta' does not use")
    batch, m, _ = km.shape
    want = (batch, m, A.shape[-1])
    if not isinstance(v, torch.Tensor) or tuple(v.shape) != want:
        raise ValueError(f"v must be [B, M, d] = {list(want)}, got {getattr(v, 'shape', v)}")
    if not isinstance(beta, torch.Tensor) or tuple(beta.shape) != (batch, m):
        raise ValueError(f"beta must be [B, M] = {[batch, m]}, got {getattr(beta, 'shape', beta)}")
    rows_first = isinstance(first, torch.Tensor)
    if rows_first and (first.dtype != torch.bool or tuple(first.shape) != (batch,)):
        raise ValueError(f"first must be a bool or a bool tensor [B={batch}], got "
                         f"{first.dtype} {list(first.shape)}")
    backend = _resolve(backend, km)
    if backend == "reference":
        if rows_first:
            raise ValueError("backend='reference' takes first as a bool")
        return reference_write(km, v, beta, A, z, first=first, correction=correction, nu=nu,
                               normalize=normalize, eps=eps, floor=floor, gate=gate, rule=rule,
                               decay=decay)
    from .function import assoc_read, assoc_update

    A, z = decay_state(A, z, decay)  # a fresh (zero) state stays zero

    km, A, z = km.contiguous(), A.contiguous(), z.contiguous()
    if rule == "delta":
        return _delta_write(km, v, beta, A, z, zero, one, nu, backend), z
    if rows_first:
        v_bar, den, nrm = assoc_read(km, A, z, nu, normalize, float(eps), backend, floor)
        u = beta[..., None].to(v.dtype) * (v - v_bar)
        gamma = torch.ones(batch, m, dtype=stat_dtype(km.dtype), device=km.device)
        if correction:
            gamma = torch.where(first[:, None], gamma, correction_gamma(den, nrm, normalize, eps))
    elif first:
        u = beta[..., None].to(v.dtype) * v
        gamma = torch.ones(batch, m, dtype=stat_dtype(km.dtype), device=km.device)
    else:
        v_bar, den, nrm = assoc_read(km, A, z, nu, normalize, float(eps), backend, floor)
        u = beta[..., None].to(v.dtype) * (v - v_bar)
        gamma = correction_gamma(den, nrm, normalize, eps) if correction else \
            torch.ones(batch, m, dtype=stat_dtype(km.dtype), device=km.device)
    if gate:
        gamma = gamma * beta.to(gamma.dtype)
    return assoc_update(km, u.contiguous(), gamma, A, z, nu, normalize, backend)


def _delta_write(km: torch.Tensor, v: torch.Tensor, beta: torch.Tensor, A: torch.Tensor,
                 z: torch.Tensor, zero: torch.Tensor, one: float, nu: int, backend: str,
                 ) -> torch.Tensor:
    """DeltaNet's sequential write of the M rows, ``A <- A + beta_j k_j (v_j - k_j A)^T`` for
    ``j = 1..M``, in the UT form of Yang et al. 2024 (DeltaNet's chunkwise training): with
    ``u_j = beta_j (v_j - k_j A_{j-1})`` and ``A_{j-1} = A + sum_{i<j} k_i^T u_i``,
    ``(I + diag(beta) tril(K K^T, -1)) U = diag(beta) (V - K A)``, one unit-lower-triangular
    ``[M, M]`` solve between one read (``K A``) and one update (``A + K^T U``) instead of M of
    each. ``km`` ``[B, M, d_mem]``, ``v`` ``[B, M, d]``, ``beta`` ``[B, M]``, ``A`` ``[B, d_key, d]``
    -> ``A'``; ``zero``, ``one``: the rule's read terms (:func:`_rule_read_terms`). The solve and
    the Gram matrix run in float32 at least (``stat_dtype``)."""
    from .function import assoc_read, assoc_update

    sd = stat_dtype(km.dtype)
    kA = assoc_read(km, A, zero, nu, True, one, backend)[0]  # K A: [B, M, d]
    k = features(km.to(sd), nu, True)  # [B, M, d_key]; M is small (the memory tokens)
    b = beta.to(sd)[..., None]
    lower = torch.eye(km.shape[1], dtype=sd, device=km.device) + \
        b * torch.tril(k @ k.transpose(1, 2), diagonal=-1)
    u = torch.linalg.solve_triangular(lower, b * (v.to(sd) - kA.to(sd)), upper=False,
                                      unitriangular=True)
    gamma = torch.zeros(km.shape[:2], dtype=sd, device=km.device)  # z unused by the rule
    return assoc_update(km, u.to(v.dtype).contiguous(), gamma, A, z, nu, True, backend)[0]


def _rule_read_terms(rule: str, normalize: bool, floor: float, z: torch.Tensor, eps: float):
    """``(z, eps)`` for the read under ``rule``: as given for ``armt``; ``(0, 1)`` for ``delta``,
    whose read ``phi_n A`` is ARMT's read with ``z = 0`` and ``eps = 1`` (the same kernels)."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    if rule == "armt":
        return z, eps
    if not normalize:
        raise ValueError("rule='delta' needs normalize=True: unit keys make each write a "
                         "contraction")
    if floor:
        raise ValueError("floor applies to z, which rule='delta' does not use")
    return torch.zeros_like(z), 1.0


def check_decay(decay, name: str = "decay", batch: int | None = None) -> float | torch.Tensor:
    """``decay`` as a float, or as the ``[batch]`` floating-point tensor it is (a decay per row,
    where ``batch`` is given); a clear error naming ``name`` unless it is a number in (0, 1] or
    such a tensor."""
    if isinstance(decay, torch.Tensor) and batch is not None:
        if not decay.is_floating_point() or tuple(decay.shape) != (batch,):
            raise ValueError(f"{name} as a tensor must be floating point [B={batch}] (one decay per "
                             f"row), got {decay.dtype} {list(decay.shape)}")
        return decay
    if not (isinstance(decay, (int, float)) and not isinstance(decay, bool) and 0 < decay <= 1):
        per_row = " or a [B] tensor" if batch is not None else ""
        raise ValueError(f"{name} must be a float in (0, 1] (1 = no decay){per_row}, got "
                         f"{decay!r}")
    return float(decay)


def check_floor(floor, name: str = "floor") -> float:
    """``floor`` as a float; a clear error naming ``name`` unless it is a finite number >= 0."""
    return check_finite_nonnegative(floor, name, " (0 = the reference normaliser)")


def correction_gamma(den: torch.Tensor, nrm: torch.Tensor, normalize: bool, eps: float) -> torch.Tensor:
    """``clip(1 - den / |k|^2, 0, 1)`` from the read's ``den = k . z + eps`` and ``nrm = |phi|``
    (``|k|^2 + eps`` for unnormalised features, ``|phi_n|^2`` for normalised ones), detached."""
    sq = feature_sq(nrm, normalize)
    if not normalize:
        sq = sq + eps
    return torch.clip(1 - den / sq, 0, 1).detach()


__all__ = ["BACKENDS", "RULES", "associative_read", "chunked", "associative_write", "check_decay",
           "check_floor",
           "correction_gamma", "dpfp",
           "features", "reference_read", "reference_write"]
