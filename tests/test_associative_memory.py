"""ARMT's associative read and delta-rule write: every backend against the float64 reference.

Triton kernels run under the interpreter on CPU. Tolerance (as tests/test_kernels.py): the
error against the float64 reference must be within ``mult`` times the error of the same-dtype
PyTorch reference, plus a floor relative to the magnitude (one rounding of the dtype).
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from rmt_fast.ops.associative_memory import (  # noqa: E402
    RULES,
    associative_read,
    associative_write,
    chunked,
    dpfp,
    features,
    reference_read,
    reference_write,
)
from rmt_fast.ops.associative_memory.function import assoc_read, assoc_update  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL_FLOOR = {torch.float32: 2e-7, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _close(name, got, ref64, ref_lowp, mult, dtype):
    """``|got - ref64| <= mult * |ref_lowp - ref64| + floor * max|ref64|`` (max norms), NaN-free."""
    assert got is not None, name
    assert not torch.isnan(got).any(), f"{name}: NaN (an unwritten poisoned output?)"
    err = (got.double() - ref64).abs().max().item()
    base = (ref_lowp.double() - ref64).abs().max().item()
    scale = ref64.abs().max().item()
    assert err <= mult * base + REL_FLOOR[dtype] * scale, \
        f"{name}: err {err:.3e} vs base {base:.3e} (scale {scale:.3e})"


def _inputs(dtype, b=2, length=21, dm=5, d=19, m=4, nu=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    k = 2 * nu * dm

    def rnd(*shape, scale=1.0, shift=0.0):
        t = torch.randn(*shape, generator=g, dtype=torch.float64) * scale + shift
        return t.to(dtype).requires_grad_()

    x = rnd(b, length, dm)
    A = rnd(b, k, d, scale=0.3)
    z = (torch.rand(b, k, generator=g, dtype=torch.float64) + 0.5).to(dtype).requires_grad_()
    km, v = rnd(b, m, dm), rnd(b, m, d)
    beta = torch.rand(b, m, generator=g, dtype=torch.float64).to(dtype).requires_grad_()
    return x, A, z, km, v, beta


def _grads(outs, inputs, seed=1):
    g = torch.Generator().manual_seed(seed)
    cots = [torch.randn(o.shape, generator=g, dtype=torch.float64) for o in outs]
    return cots, torch.autograd.grad(outs, inputs, [c.to(o.dtype) for c, o in zip(cots, outs, strict=True)])


def _check_read(backend, dtype, normalize, floor=0.0, **shape):
    x, A, z, *_ = _inputs(dtype, **shape)
    if floor == "split":
        floor = _split_floor(x, z, normalize)
    kw = dict(normalize=normalize, floor=floor)
    out = associative_read(x, A, z, backend=backend, **kw)
    ref = reference_read(x, A, z, upcast=True, **kw)
    low = reference_read(x, A, z, **kw)
    assert out.dtype == dtype
    _close("read", out, ref, low, 2, dtype)
    cots, got = _grads([out], (x, A, z))
    want = torch.autograd.grad(ref, (x, A, z), cots[0])
    lowg = torch.autograd.grad(low, (x, A, z), cots[0].to(dtype))
    for name, a, r, lo in zip(("dx", "dA", "dz"), got, want, lowg, strict=True):
        _close(f"read {name}", a, r, lo, 3, dtype)


def _check_write(backend, dtype, normalize, first, correction=True, floor=0.0, **shape):
    _, A, z, km, v, beta = _inputs(dtype, **shape)
    if floor == "split":
        floor = _split_floor(km, z, normalize)
    ins = (km, v, beta, A, z)
    kw = dict(first=first, correction=correction, normalize=normalize, floor=floor)
    out = associative_write(*ins, backend=backend, **kw)
    ref = reference_write(*ins, upcast=True, **kw)
    low = reference_write(*ins, **kw)
    for name, o, r, lo in zip(("A'", "z'"), out, ref, low, strict=True):
        assert o.dtype == dtype
        _close(f"write {name}", o, r, lo, 2, dtype)
    cots, got = _grads(list(out), ins)
    want = torch.autograd.grad(ref, ins, cots)
    lowg = torch.autograd.grad(low, ins, [c.to(dtype) for c in cots])
    for name, a, r, lo in zip(("dkm", "dv", "dbeta", "dA", "dz"), got, want, lowg, strict=True):
        _close(f"write {name}", a, r, lo, 3, dtype)


def _floor_ratios(x, z, normalize):
    """``phi . z / |phi|^2`` per row ``[B, L]`` (float64): the floor ``c`` is the divisor of the
    rows whose ratio is below ``c``."""
    q = features(x.detach().double(), 3, normalize)
    return (q * z.detach().double()[:, None]).sum(-1) / q.square().sum(-1)


def _split_floor(x, z, normalize):
    """A floor halfway between the two middle ratios: about half the rows floored, none at a
    tie (where the floor's max has no single derivative)."""
    r = _floor_ratios(x, z, normalize).flatten().sort().values
    n = r.numel()
    assert r[n // 2] - r[n // 2 - 1] > 1e-6 * r[n // 2]
    return float((r[n // 2 - 1] + r[n // 2]) / 2)


# --- the PyTorch (CPU) path ---------------------------------------------------------------------
@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("dm", [5, 1])
def test_torch_read_float64_exact(normalize, dm, monkeypatch):
    """float64, chunked into several row blocks: equal to the dense reference to ~1e-13.
    ``d_mem=1`` makes DPFP's shifts wrap (2 nu > 2 d_mem)."""
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 2 * 6 * dm * 4)  # 4 rows per chunk
    x, A, z, *_ = _inputs(torch.float64, dm=dm)
    out = associative_read(x, A, z, normalize=normalize, backend="torch")
    ref = reference_read(x, A, z, normalize=normalize)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    cots, got = _grads([out], (x, A, z))
    want = torch.autograd.grad(ref, (x, A, z), cots[0])
    for a, r in zip(got, want, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("first", [True, False])
@pytest.mark.parametrize("correction", [True, False])
def test_torch_write_float64_exact(normalize, first, correction):
    _, A, z, km, v, beta = _inputs(torch.float64)
    ins = (km, v, beta, A, z)
    kw = dict(first=first, correction=correction, normalize=normalize)
    out = associative_write(*ins, backend="torch", **kw)
    ref = reference_write(*ins, **kw)
    for o, r in zip(out, ref, strict=True):
        torch.testing.assert_close(o, r, rtol=1e-12, atol=1e-12)
    cots, got = _grads(list(out), ins)
    want = torch.autograd.grad(ref, ins, cots)
    for a, r in zip(got, want, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("normalize", [False, True])
@pytest.mark.parametrize("correction", [True, False])
def test_torch_floor_float64_exact(normalize, correction, monkeypatch):
    """``floor``: the read and ``v_bar`` divide by ``max(phi . z, c |phi|^2) + eps``, about half
    the rows floored; equal to the dense reference in float64 (chunked rows, gradients); the
    floor changes the read and ``A'``, and leaves ``z'`` as it was (``gamma`` comes from
    ``phi . z``)."""
    monkeypatch.setattr(chunked, "CHUNK_ELEMENTS", 2 * 6 * 5 * 4)  # 4 rows per chunk
    x, A, z, km, v, beta = _inputs(torch.float64)
    floor = _split_floor(x, z, normalize)
    ratios = _floor_ratios(x, z, normalize)
    assert 0 < int((ratios < floor).sum()) < ratios.numel()
    out = associative_read(x, A, z, normalize=normalize, floor=floor, backend="torch")
    ref = reference_read(x, A, z, normalize=normalize, floor=floor)
    torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    plain = reference_read(x, A, z, normalize=normalize)
    floored = ratios < floor
    assert (out - plain).abs().amax(-1)[floored].min() > 1e-6  # every floored row changed
    torch.testing.assert_close(out[~floored], plain[~floored], rtol=1e-12, atol=1e-12)
    cots, got = _grads([out], (x, A, z))
    want = torch.autograd.grad(ref, (x, A, z), cots[0])
    for a, r in zip(got, want, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-11, atol=1e-11)

    floor = _split_floor(km, z, normalize)
    ins = (km, v, beta, A, z)
    kw = dict(first=False, correction=correction, normalize=normalize)
    got = associative_write(*ins, floor=floor, backend="torch", **kw)
    want = reference_write(*ins, floor=floor, **kw)
    unfloored = reference_write(*ins, **kw)
    for a, r in zip(got, want, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-12, atol=1e-12)
    assert (got[0] - unfloored[0]).abs().max() > 1e-6
    torch.testing.assert_close(got[1], associative_write(*ins, backend="torch", **kw)[1],
                               rtol=0, atol=0)
    cots, ga = _grads(list(got), ins)
    gr = torch.autograd.grad(want, ins, cots)
    for a, r in zip(ga, gr, strict=True):
        torch.testing.assert_close(a, r, rtol=1e-11, atol=1e-11)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("first,correction,normalize", [(True, True, False), (False, True, True),
                                                         (False, False, False)])
def test_write_gate(backend, first, correction, normalize):
    """``gate``: ``z`` takes ``beta_j gamma_j k_j``; against the reference (float64 on the PyTorch
    path, float32 vs the float64 reference under the Triton interpreter), gradients included
    (``beta`` gets one through ``z`` too); ``A'`` is the ungated one, ``z'`` is not."""
    dtype = torch.float64 if backend == "torch" else torch.float32
    _, A, z, km, v, beta = _inputs(dtype)
    z = (z.detach() * 1e-3).requires_grad_()  # small: the correction's gamma is not all 0
    ins = (km, v, beta, A, z)
    up = [t.detach().double().requires_grad_() for t in ins]
    kw = dict(first=first, correction=correction, normalize=normalize)
    got = associative_write(*ins, gate=True, backend=backend, **kw)
    want = reference_write(*up, gate=True, **kw)
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    for a, r in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), r, rtol=tol, atol=tol)
    ungated = reference_write(*up, **kw)
    torch.testing.assert_close(got[0].double(), ungated[0], rtol=tol, atol=tol)
    assert (got[1].double() - ungated[1]).abs().max() > 1e-4
    cots, ga = _grads(list(got), ins)
    gr = torch.autograd.grad(want, up, cots, retain_graph=True)
    g0 = torch.autograd.grad(ungated, up, cots)
    for a, r in zip(ga, gr, strict=True):
        torch.testing.assert_close(a.double(), r, rtol=10 * tol, atol=10 * tol)
    assert (gr[2] - g0[2]).abs().max() > 1e-4  # beta's gradient through z


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_delta_rule(backend):
    """``rule="delta"``: the read is ``phi_n A``, the rows write one after another (against the
    dense sequential reference, float64 on the PyTorch path, float32 vs float64 under the Triton
    interpreter, gradients included); ``z`` passes through; a row written with ``beta = 1`` is
    read back exactly (the delta rule's defining property), and many writes leave ``A`` bounded
    (each one is a contraction along its unit key; PyTorch path)."""
    dtype = torch.float64 if backend == "torch" else torch.float32
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    x, A, z, km, v, beta = _inputs(dtype)
    kw = dict(normalize=True, rule="delta")
    got = associative_read(x, A, z, backend=backend, **kw)
    up = [t.detach().double().requires_grad_() for t in (x, A, z)]
    want = reference_read(*up, **kw)
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol)
    q = features(up[0].detach(), 3, True)
    torch.testing.assert_close(want, torch.einsum("blk,bkd->bld", q, up[1].detach()))
    cots, ga = _grads([got], (x, A))
    gr = torch.autograd.grad(want, up[:2], cots[0])
    for a, r in zip(ga, gr, strict=True):
        torch.testing.assert_close(a.double(), r, rtol=10 * tol, atol=10 * tol)

    ins = (km, v, beta, A, z)
    up = [t.detach().double().requires_grad_() for t in ins]
    got = associative_write(*ins, first=False, backend=backend, **kw)
    want = reference_write(*up, first=False, **kw)
    for a, r in zip(got, want, strict=True):
        torch.testing.assert_close(a.double(), r, rtol=tol, atol=tol)
    assert torch.equal(got[1], z)
    k = features(up[0].detach(), 3, True)
    A_seq = up[3].detach()
    for j in range(k.shape[1]):  # the rows one after another, written out
        prev = torch.einsum("bk,bkd->bd", k[:, j], A_seq)
        A_seq = A_seq + beta.detach().double()[:, j, None, None] * k[:, j, :, None] * (
            v.detach().double()[:, j] - prev)[:, None]
    torch.testing.assert_close(want[0].detach(), A_seq)
    cots, ga = _grads(list(got), ins)
    gr = torch.autograd.grad(want, up, cots)
    for a, r in zip(ga, gr, strict=True):
        torch.testing.assert_close(a.double(), r, rtol=10 * tol, atol=10 * tol)

    with torch.no_grad():
        ones = torch.ones_like(beta[:, :1])
        A1, _ = associative_write(km[:, :1], v[:, :1], ones, A, z, first=False, backend=backend, **kw)
        back = associative_read(km[:, :1], A1, z, backend=backend, **kw)
        torch.testing.assert_close(back, v[:, :1], rtol=10 * tol, atol=10 * tol)
        if backend == "triton":  # the same ops; 400 serial interpreter launches would take minutes
            return
        g = torch.Generator().manual_seed(5)
        A_run = torch.zeros_like(A)
        for _ in range(50):
            kk = torch.randn(km.shape, generator=g, dtype=torch.float64).to(dtype)
            vv = torch.randn(v.shape, generator=g, dtype=torch.float64).to(dtype).clamp(-1, 1)
            bb = torch.rand(beta.shape, generator=g, dtype=torch.float64).to(dtype)
            A_run, _ = associative_write(kk, vv, bb, A_run, z, first=False, backend=backend, **kw)
        # |k^T A| <= max |v| for every unit key k: A's rows stay in the values' range
        assert A_run.abs().max() < 5


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("rule,first,normalize", [("armt", False, False), ("armt", True, True),
                                                  ("delta", False, True)])
def test_state_decay(backend, rule, first, normalize):
    """``decay``: the write goes into ``alpha A``, ``alpha z``: against the float64 reference
    (whose decay is one line), against the undecayed write of the scaled state written out
    here, gradients included (``A`` and ``z`` get ``alpha`` times theirs); it changes the
    result, and 1 is no decay."""
    dtype = torch.float64 if backend == "torch" else torch.float32
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    alpha = 0.7
    _, A, z, km, v, beta = _inputs(dtype)
    if first:  # a fresh state is zero
        A, z = (A * 0).detach().requires_grad_(), (z * 0).detach().requires_grad_()
    ins = (km, v, beta, A, z)
    up = [t.detach().double().requires_grad_() for t in ins]
    kw = dict(first=first, normalize=normalize, rule=rule)
    got = associative_write(*ins, decay=alpha, backend=backend, **kw)
    want = reference_write(*up, decay=alpha, **kw)
    scaled = reference_write(*up[:3], up[3] * alpha, up[4] * alpha, **kw)
    for a, r, s_ in zip(got, want, scaled, strict=True):
        torch.testing.assert_close(a.double(), r, rtol=tol, atol=tol)
        torch.testing.assert_close(r, s_, rtol=1e-12, atol=1e-12)
    plain = reference_write(*up, **kw)
    if not first:
        assert (want[0] - plain[0]).abs().max() > 1e-3
    torch.testing.assert_close(associative_write(*ins, decay=1, backend=backend, **kw)[0].double(),
                               plain[0], rtol=tol, atol=tol)
    cots, ga = _grads(list(got), ins)
    gr = torch.autograd.grad(want, up, cots)
    for a, r in zip(ga, gr, strict=True):
        torch.testing.assert_close(a.double(), r, rtol=10 * tol, atol=10 * tol)
    if rule == "delta":  # dA' / dA = alpha (I - ...): at beta = 0 exactly alpha
        zero = torch.zeros_like(up[2])
        out = reference_write(up[0], up[1], zero, up[3], up[4], decay=alpha, **kw)[0]
        torch.testing.assert_close(out, alpha * up[3].detach(), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("rule,normalize", [("armt", False), ("delta", True)])
def test_state_decay_per_row(backend, rule, normalize):
    """``decay`` as a ``[B]`` tensor (the learnt decay): row ``b`` equals the write of that row
    alone with the float ``decay[b]`` (float64 reference), and the gradient reaches ``decay``
    and every input as the float64 reference's; ``torch.autograd.gradcheck`` of the torch
    backend in float64 checks the gradients by finite differences (without ARMT's correction,
    whose ``gamma`` is detached by design)."""
    dtype = torch.float64 if backend == "torch" else torch.float32
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    _, A, z, km, v, beta = _inputs(dtype)
    alpha = torch.tensor([0.3, 0.85], dtype=dtype, requires_grad=True)
    ins = (km, v, beta, A, z, alpha)
    up = [t.detach().double().requires_grad_() for t in ins]
    kw = dict(first=False, normalize=normalize, rule=rule)
    got = associative_write(*ins[:5], decay=alpha, backend=backend, **kw)
    for b in range(2):
        row = reference_write(*(t[b:b + 1] for t in up[:5]), decay=float(alpha[b].detach()), **kw)
        for a, r in zip(got, row, strict=True):
            torch.testing.assert_close(a[b:b + 1].double(), r, rtol=tol, atol=tol)
    want = reference_write(*up[:5], decay=up[5], **kw)
    cots, ga = _grads(list(got), ins)
    gr = torch.autograd.grad(want, up, cots)
    assert ga[5].abs().min() > 1e-6  # the decay's gradient is there
    for a, r in zip(ga, gr, strict=True):
        torch.testing.assert_close(a.double(), r, rtol=10 * tol, atol=10 * tol)
    if backend == "torch":
        small = [t.detach()[:, :2].clone().requires_grad_() if t.dim() > 1 and t.shape[1] == 4
                 else t.detach().clone().requires_grad_() for t in up]

        def write(km_, v_, beta_, A_, z_, alpha_):
            return associative_write(km_, v_, beta_, A_, z_, decay=alpha_, backend="torch",
                                     correction=False, **kw)

        assert torch.autograd.gradcheck(write, small)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_delta_rule_one_solve_for_many_rows(dtype, monkeypatch):
    """The delta write of M = 24 rows runs one read and one update (DeltaNet's UT form: a
    triangular solve between them), equal to the rows written one after another (float64
    reference) with gradients, with keys close to each other and gates near 1 (the solve's
    hard case), in float64 / float32 / bf16 (the solve in float32 for bf16)."""
    from rmt_fast.ops.associative_memory import function

    calls = []
    for name in ("assoc_read", "assoc_update"):
        real = getattr(function, name)
        monkeypatch.setattr(function, name, lambda *a, _r=real, _n=name: calls.append(_n) or _r(*a))
    x, A, z, km, v, beta = _inputs(torch.float64, m=24, seed=3)
    g = torch.Generator().manual_seed(4)
    km = (km.detach()[:, :1] + 0.3 * km.detach()).to(dtype).requires_grad_()  # similar keys
    beta = (0.7 + 0.3 * torch.rand(beta.shape, generator=g, dtype=torch.float64)).to(dtype)
    ins = [km, v.detach().to(dtype), beta, A.detach().to(dtype), z.detach().to(dtype)]
    ins = [t.requires_grad_() for t in ins]
    kw = dict(normalize=True, rule="delta")
    got = associative_write(*ins, first=False, backend="torch", **kw)
    assert calls == ["assoc_read", "assoc_update"]
    up = [t.detach().double().requires_grad_() for t in ins]
    want = reference_write(*up, first=False, **kw)
    tol = {torch.float64: 1e-10, torch.float32: 2e-5, torch.bfloat16: 3e-2}[dtype]
    scale = want[0].abs().max().item()
    torch.testing.assert_close(got[0].double(), want[0], rtol=tol, atol=tol * scale)
    cots, ga = _grads(list(got), ins)
    gr = torch.autograd.grad(want, up, cots)
    for a, r in zip(ga, gr, strict=True):
        gscale = r.abs().max().item()
        torch.testing.assert_close(a.double(), r, rtol=10 * tol, atol=10 * tol * gscale)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_torch_low_precision(dtype):
    _check_read("torch", dtype, False)
    _check_write("torch", dtype, True, first=False)


def test_dpfp_layout():
    """Block j of phi is x' * roll(x', j) with x' = [relu(x), relu(-x)] (hand-checked entries)."""
    x = torch.tensor([[1.0, -2.0]])
    xp = torch.tensor([[1.0, 0.0, 0.0, 2.0]])
    phi = dpfp(x, nu=3)
    assert phi.shape == (1, 12)
    # j=1: x' * [x'3, x'0, x'1, x'2] = [1*2, 0*1, 0*0, 2*0]
    assert phi[0, :4].tolist() == [2.0, 0.0, 0.0, 0.0]
    for j in (1, 2, 3):
        assert torch.equal(phi[:, 4 * (j - 1): 4 * j], xp * xp.roll(j, dims=-1))


# --- Triton under the interpreter ---------------------------------------------------------------
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [False, True])
def test_triton_read(dtype, normalize):
    """L=21, d=19, d_key=30 (ragged blocks of 16), d_mem=5 (masked d_mem tile)."""
    _check_read("triton", dtype, normalize)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("normalize", [False, True])
def test_triton_write(dtype, normalize):
    _check_write("triton", dtype, normalize, first=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("normalize", [False, True])
def test_triton_floor(dtype, normalize):
    """The read and the write with about half the rows floored (forward and backward)."""
    _check_read("triton", dtype, normalize, floor="split")
    _check_write("triton", dtype, normalize, first=False, floor="split")


def test_triton_write_first_no_correction_fp32():
    _check_write("triton", torch.float32, False, first=True)
    _check_write("triton", torch.float32, True, first=False, correction=False)


def test_triton_two_dmem_tiles_fp32():
    """d_mem=20 > the 16-wide d_mem tile of the interpreter config: two tiles in the grad kernel;
    d_mem=1: DPFP's shifts wrap around (2 nu > 2 d_mem)."""
    _check_read("triton", torch.float32, True, dm=20, length=17, d=16, b=1)
    _check_read("triton", torch.float32, False, dm=1, length=9, d=16, b=1)


def test_triton_matches_torch_path():
    x, A, z, *_ = _inputs(torch.float32)
    a = associative_read(x, A, z, backend="triton")
    b = associative_read(x, A, z, backend="torch")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_rows_first_tensor_equals_bool():
    """A per-row ``first`` gives, row by row, the bool results (fresh rows need a zero state)."""
    _, A, z, km, v, beta = _inputs(torch.float64, b=3)
    A, z = A.detach().clone(), z.detach().clone()
    A[1].zero_()
    z[1].zero_()
    first = torch.tensor([False, True, False])
    got = associative_write(km, v, beta, A, z, first=first, backend="torch")
    for row, f in enumerate(first.tolist()):
        want = associative_write(km[row:row + 1], v[row:row + 1], beta[row:row + 1],
                                 A[row:row + 1], z[row:row + 1], first=f, backend="torch")
        torch.testing.assert_close(got[0][row:row + 1], want[0], rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(got[1][row:row + 1], want[1], rtol=1e-13, atol=1e-13)


# --- custom ops, torch.compile ------------------------------------------------------------------
OPCHECKS = ("test_schema", "test_autograd_registration", "test_faketensor",
            "test_aot_dispatch_dynamic")


@pytest.mark.parametrize("normalize", [False, True])
def test_custom_ops_opcheck(normalize):
    x, A, z, km, v, beta = _inputs(torch.float32, length=7, d=8)
    for floor in ((), (_split_floor(x, z, normalize),)):
        res = torch.library.opcheck(torch.ops.rmt_fast.assoc_read.default,
                                    (x, A, z, 3, normalize, 1e-5, "torch", *floor),
                                    test_utils=OPCHECKS)
        assert res == {name: "SUCCESS" for name in OPCHECKS}
    gamma = torch.rand(2, 4)
    u = torch.randn(2, 4, 8, requires_grad=True)
    res = torch.library.opcheck(torch.ops.rmt_fast.assoc_update.default,
                                (km, u, gamma, A, z, 3, normalize, "torch"), test_utils=OPCHECKS)
    assert res == {name: "SUCCESS" for name in OPCHECKS}


@pytest.mark.parametrize("rule", RULES)
def test_torch_compile_traces_the_ops(rule):
    """One graph (fullgraph) with ARMT's rule and with the delta rule's UT form (its solve)."""
    from torch._dynamo.testing import CompileCounterWithBackend

    x, A, z, km, v, beta = _inputs(torch.float32, length=7, d=8)
    kw = dict(normalize=True, rule="delta") if rule == "delta" else {}

    def fn(x, A, z, km, v, beta):
        r = associative_read(x, A, z, backend="torch", **kw)
        A2, z2 = associative_write(km, v, beta, A, z, first=False, backend="torch", **kw)
        return r.sum() + A2.square().sum() + z2.sum()

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    got, want = compiled(x, A, z, km, v, beta), fn(x, A, z, km, v, beta)
    assert counter.frame_count == 1
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    ins = (x, A, z, km, v, beta)
    for a, b in zip(torch.autograd.grad(got, ins), torch.autograd.grad(want, ins), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_ops_return_statistics():
    """``assoc_read`` also returns ``den = phi.z + eps`` and ``nrm = |phi|`` (not differentiable)."""
    x, A, z, *_ = _inputs(torch.float64)
    r, den, nrm = assoc_read(x, A, z, 3, False, 1e-5, "torch")
    phi = dpfp(x.detach())
    torch.testing.assert_close(den, (phi * z.detach()[:, None]).sum(-1) + 1e-5)
    torch.testing.assert_close(nrm, phi.norm(dim=-1))
    assert not den.requires_grad and not nrm.requires_grad
    A2, z2 = assoc_update(x, torch.randn(2, 21, 19, dtype=torch.float64), torch.ones(2, 21,
                          dtype=torch.float64), A, z, 3, False, "torch")
    assert A2.shape == A.shape and z2.shape == z.shape


# --- bad input --------------------------------------------------------------------------------
def test_bad_inputs_raise_clear_errors():
    x, A, z, km, v, beta = _inputs(torch.float32)
    with pytest.raises(ValueError, match=r"A must be \[B=2, d_key=2\*nu\*d_mem=30"):
        associative_read(x, A[:, :20], z)
    with pytest.raises(ValueError, match=r"z must be \[B=2, d_key=30\]"):
        associative_read(x, A, z[:, :3])
    with pytest.raises(ValueError, match="x must be a 3-D tensor"):
        associative_read(x[0], A, z)
    with pytest.raises(ValueError, match="A must match x's dtype"):
        associative_read(x, A.double(), z)
    with pytest.raises(ValueError, match="nu must be an int >= 1"):
        associative_read(x, A, z, nu=0)
    with pytest.raises(ValueError, match="backend must be one of"):
        associative_read(x, A, z, backend="cuda")
    with pytest.raises(ValueError, match=r"v must be \[B, M, d\] = \[2, 4, 19\]"):
        associative_write(km, v[:, :, :3], beta, A, z, first=False)
    with pytest.raises(ValueError, match=r"beta must be \[B, M\]"):
        associative_write(km, v, beta[:, :2], A, z, first=False)
    with pytest.raises(ValueError, match=r"first must be a bool or a bool tensor \[B=2\]"):
        associative_write(km, v, beta, A, z, first=torch.ones(3, dtype=torch.bool))
    with pytest.raises(ValueError, match="rule must be one of"):
        associative_read(x, A, z, rule="deltanet")
    with pytest.raises(ValueError, match="rule='delta' needs normalize=True"):
        associative_write(km, v, beta, A, z, first=False, rule="delta")
    with pytest.raises(ValueError, match="floor applies to z"):
        associative_read(x, A, z, normalize=True, rule="delta", floor=1.0)
    with pytest.raises(ValueError, match="gate applies to z"):
        associative_write(km, v, beta, A, z, first=False, normalize=True, rule="delta", gate=True)
    for bad in (-0.5, float("inf"), float("nan"), True, "1"):
        with pytest.raises(ValueError, match="floor must be a finite float >= 0"):
            associative_read(x, A, z, floor=bad)
        with pytest.raises(ValueError, match="floor must be a finite float >= 0"):
            associative_write(km, v, beta, A, z, first=False, floor=bad)
    for bad in (0, -0.5, 1.5, float("nan"), True, "1"):
        with pytest.raises(ValueError, match=r"decay must be a float in \(0, 1\]"):
            associative_write(km, v, beta, A, z, first=False, decay=bad)
    for bad in (torch.ones(3), torch.ones(2, 1), torch.ones(2, dtype=torch.long)):
        with pytest.raises(ValueError, match=r"decay as a tensor must be floating point \[B=2\]"):
            associative_write(km, v, beta, A, z, first=False, decay=bad)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        associative_read(x.double(), A.double(), z.double(), backend="triton")


# --- ahead-of-time compile for sm_80 / sm_90 ----------------------------------------------------
def _aot(*args, timeout=600):
    """The aot module in a fresh process (the interpreter, set here, replaces @jit functions)."""
    env = {**os.environ, "PYTHONPATH": ROOT, "TRITON_DEFAULT_FP_FUSION": "1"}
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-m", "rmt_fast.ops.associative_memory.triton.aot",
                          "--json", *args], capture_output=True, text=True, env=env, cwd=ROOT,
                         timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_aot_bf16_dmem64_no_spills():
    rows = _aot("--caps", "80", "90", "--dtypes", "bf16", "--kernels", "matmul", "grad")
    assert len(rows) == 4
    for r in rows:
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert 0 < r["regs"] <= 255 and r["mma"], r
    assert any(r["wgmma"] for r in rows if r["target"] == "sm_90a")


def test_aot_fp32_ieee_no_tf32_no_spills():
    rows = _aot("--caps", "80", "--dtypes", "fp32", "--kernels", "outer", "grad")
    assert len(rows) == 2
    for r in rows:
        assert not r["tf32"], r
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r


@pytest.mark.slow
def test_aot_full_sweep():
    """Every kernel, dtype, d_mem 64 and 128, both targets, with and without normalisation."""
    rows = _aot("--d-mems", "64", "128") + _aot("--d-mems", "64", "128", "--no-normalize")
    assert len(rows) == 2 * 2 * 3 * 2 * 5  # 5 KERNELS (matmul with and without the floor)
    assert not any(r["spill_stores"] or r["spill_loads"] for r in rows), \
        [r for r in rows if r["spill_stores"] or r["spill_loads"]]
    assert not any(r["tf32"] for r in rows if r["dtype"] == "fp32")
