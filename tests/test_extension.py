"""rmt_fast._C: ops against their PyTorch equivalents, autograd, opcheck, MemoryStore, bad inputs.

The extension is required here (CI builds it): if ``rmt_fast._C`` does not import, these fail.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import rmt_fast._C  # noqa: F401  (fails the whole module if the extension is missing)
import torch
import torch.nn.functional as F

from rmt_fast import _extension as ext

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
OPS = torch.ops.rmt_fast


def _rand(*shape, dtype=torch.float32, requires_grad=False):
    return torch.randn(*shape, dtype=torch.float64).to(dtype).requires_grad_(requires_grad)


def test_extension_loaded():
    assert ext.HAS_EXTENSION, ext.EXTENSION_ERROR
    assert ext.MemoryStore().native


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("mr,s,mw", [(3, 7, 3), (0, 5, 2), (4, 1, 0), (2, 0, 2)])
def test_assemble_segment_matches_cat(dtype, mr, s, mw):
    torch.manual_seed(0)
    r, x, w = (_rand(2, n, 6, dtype=dtype) for n in (mr, s, mw))
    want = torch.cat([r, x, w], dim=1)
    assert torch.equal(ext.assemble_segment(r, x, w), want)
    out = torch.full_like(want, float("nan"))
    assert ext.assemble_segment(r, x, w, out=out) is out
    assert torch.equal(out, want)


@pytest.mark.parametrize("dtype", DTYPES)
def test_assemble_segment_non_contiguous_inputs(dtype):
    big = _rand(3, 9, 10, dtype=dtype)
    r = big[:, :2, ::2]  # strided
    x = _rand(5, 3, 5, dtype=dtype).transpose(0, 1)  # [3, 5, 5]
    w = _rand(1, 2, 5, dtype=dtype).expand(3, -1, -1)  # broadcast view (learned memory)
    assert torch.equal(ext.assemble_segment(r, x, w), torch.cat([r, x, w], dim=1))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("start,count", [(0, 3), (5, 3), (8, 0), (2, 6)])
def test_extract_memory_matches_slice(dtype, start, count):
    torch.manual_seed(0)
    h = _rand(3, 8, 5, dtype=dtype)
    want = h[:, start:start + count]
    got = ext.extract_memory(h, start, count)
    assert got.is_contiguous() and torch.equal(got, want)
    out = torch.full_like(want.contiguous(), float("nan"))
    assert ext.extract_memory(h, start, count, out=out) is out
    assert torch.equal(out, want)
    # strided input
    assert torch.equal(ext.extract_memory(h.transpose(0, 1), 1, 2), h.transpose(0, 1)[:, 1:3])


@pytest.mark.parametrize("dtype", [torch.bool, torch.int64, torch.int32, torch.float32,
                                   torch.float16, torch.bfloat16, torch.float64])
def test_assemble_mask(dtype):
    m = (torch.rand(3, 6) > 0.4).to(dtype)
    got = ext.assemble_mask(m, 2, 4)
    want = torch.cat([torch.ones(3, 2, dtype=dtype), m, torch.ones(3, 4, dtype=dtype)], dim=1)
    assert got.dtype == dtype and torch.equal(got, want)


def test_gradcheck_assemble_segment():
    args = [_rand(2, m, 3, dtype=torch.float64, requires_grad=True) for m in (2, 4, 3)]
    assert torch.autograd.gradcheck(ext.assemble_segment, args)
    assert torch.autograd.gradgradcheck(ext.assemble_segment, args)
    r, x, w = args
    y = ext.assemble_segment(r, x, w)
    weights = torch.randn_like(y)
    (y * weights).sum().backward()
    assert torch.equal(r.grad, weights[:, :2]) and torch.equal(x.grad, weights[:, 2:6])
    assert torch.equal(w.grad, weights[:, 6:])


def test_gradcheck_extract_memory():
    h = _rand(2, 7, 3, dtype=torch.float64, requires_grad=True)
    for start, count in ((0, 2), (4, 3), (2, 0)):
        fn = lambda t, s=start, c=count: ext.extract_memory(t, s, c)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (h,))
        assert torch.autograd.gradgradcheck(fn, (h,))


def test_opcheck_all_ops():
    r, x, w = (_rand(2, m, 4, dtype=torch.float64, requires_grad=True) for m in (2, 3, 2))
    h = _rand(2, 7, 4, dtype=torch.float64, requires_grad=True)
    cases = [
        (OPS.assemble_segment.default, (r, x, w)),
        (OPS.assemble_segment_out.default,
         (r.detach(), x.detach(), w.detach(), torch.empty(2, 7, 4, dtype=torch.float64))),
        (OPS.assemble_mask.default, (torch.rand(2, 3) > 0.5, 1, 2)),
        (OPS.extract_memory.default, (h, 5, 2)),
        (OPS.extract_memory_out.default,
         (h.detach(), 5, 2, torch.empty(2, 2, 4, dtype=torch.float64))),
    ]
    for op, args in cases:
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), (op, result)


# ------------------------------------------------------------------------------- gelu_tanh


def _gelu_inputs() -> torch.Tensor:
    x = torch.randn(3, 67, 1031) * 4  # odd sizes: vector tails
    special = torch.tensor([0.0, -0.0, 1e-30, -1e-30, 1e-4, -1e-3, 5.0, -5.0, 20.0, -20.0, 80.0,
                            -80.0, 200.0, -200.0, 3e38, -3e38])
    x.view(-1)[: special.numel()] = special
    return x


#: the kernel's code paths (csrc/cpu_isa.h); RMT_FAST_CPU_ISA caps the one it takes, so a CPU
#: without AVX-512 runs the portable loops' AVX2 build from "avx2" on (if it has AVX2)
GELU_ISAS = ["generic", "avx2", "avx512", "avx512_bf16", "amx"]


@pytest.mark.parametrize("isa", GELU_ISAS)
def test_gelu_tanh_matches_float64_reference(isa, monkeypatch):
    monkeypatch.setenv("RMT_FAST_CPU_ISA", isa)
    x = _gelu_inputs()
    ref = F.gelu(x.double(), approximate="tanh")
    out = torch.ops.rmt_fast.gelu_tanh(x)
    assert out.dtype == torch.float32 and out.shape == x.shape
    assert torch.isfinite(out).all()
    err = (out.double() - ref).abs()
    # within a few float32 ulps of |gelu(x)| (plus an absolute floor where gelu(x) ~ 0), as
    # ATen's own float32 kernel is
    tol = 4 * torch.finfo(torch.float32).eps * ref.abs() + 1e-7
    assert (err <= tol).all(), f"max error {err.max().item():.3g} at x={x.view(-1)[err.argmax()].item()}"
    aten = (F.gelu(x, approximate="tanh").double() - ref).abs()
    assert err.max() <= 2 * aten.max() + 1e-7


def test_gelu_tanh_layouts_dtypes_and_gradient():
    x = _gelu_inputs()[:, :, :64]
    xt = x.transpose(0, 2)  # non-contiguous
    assert torch.equal(torch.ops.rmt_fast.gelu_tanh(xt), torch.ops.rmt_fast.gelu_tanh(xt.contiguous()))
    for dtype in (torch.float64, torch.float16):  # the wrapper falls back to ATen
        xd = x.to(dtype)
        torch.testing.assert_close(ext.gelu_tanh(xd), F.gelu(xd, approximate="tanh"), rtol=0, atol=0,
                                   equal_nan=True)  # +-3e38 are +-inf in float16
    with pytest.raises(RuntimeError, match="x must be float32"):
        torch.ops.rmt_fast.gelu_tanh(x.double())
    a = x.clone().requires_grad_()
    g = torch.randn_like(x)
    ext.gelu_tanh(a).backward(g)
    assert torch.equal(a.grad, torch.ops.rmt_fast.gelu_tanh_backward(g, x))  # the extension's kernel
    # create_graph: ATen's differentiable gelu_backward, so a second derivative exists
    a = x.clone().requires_grad_()
    (da,) = torch.autograd.grad(ext.gelu_tanh(a), a, g, create_graph=True)
    (dda,) = torch.autograd.grad(da, a, torch.ones_like(da))
    xd = x.double().requires_grad_()
    (dd,) = torch.autograd.grad(F.gelu(xd, approximate="tanh"), xd, g.double(), create_graph=True)
    (ddd,) = torch.autograd.grad(dd, xd, torch.ones_like(dd))
    finite = torch.isfinite(dda)  # ATen's formula overflows at +-3e38
    assert finite.sum() >= x.numel() - 4
    torch.testing.assert_close(dda[finite].double(), ddd[finite], rtol=1e-4, atol=1e-4)
    for op, args in ((OPS.gelu_tanh.default, (torch.randn(2, 3, 37, requires_grad=True),)),
                     (OPS.gelu_tanh_backward.default, (torch.randn(2, 3, 37), torch.randn(2, 3, 37)))):
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), result


def _gelu_grad_reference(g: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(g * gelu_tanh'(x) in float64, the size of its two terms |g| (s + |x s (1 - s) 2u'|))."""
    xd = x.double().requires_grad_()
    (ref,) = torch.autograd.grad(F.gelu(xd, approximate="tanh"), xd, g.double())
    xc = x.double().clamp(-10, 10)  # beyond: 1 or 0 to float precision
    s = torch.sigmoid(1.5957691216057308 * xc * (1 + 0.044715 * xc ** 2))
    du2 = 1.5957691216057308 * (1 + 3 * 0.044715 * xc ** 2)
    return ref, g.double().abs() * (s + (xc * s * (1 - s) * du2).abs())


@pytest.mark.parametrize("isa", GELU_ISAS)
def test_gelu_tanh_backward_matches_float64_reference(isa, monkeypatch):
    """float32: within a few float32 ulps of the size of the derivative's terms (the result
    itself crosses 0 near x = -0.75) plus an absolute floor, finite everywhere (ATen's
    gelu_backward gives NaN at +-3e38); bf16: float32 arithmetic rounded once, so within one bf16
    rounding of the exact gradient of the bf16 inputs, never worse than ATen's bf16 kernel."""
    monkeypatch.setenv("RMT_FAST_CPU_ISA", isa)
    x = _gelu_inputs()
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(3))
    ref, size = _gelu_grad_reference(g, x)
    out = torch.ops.rmt_fast.gelu_tanh_backward(g, x)
    assert out.dtype == torch.float32 and out.shape == x.shape and torch.isfinite(out).all()
    err = (out.double() - ref).abs()
    tol = 4 * torch.finfo(torch.float32).eps * size + 1e-7 * g.abs().double()
    assert (err <= tol).all(), f"max error {err.max().item():.3g} at x={x.view(-1)[err.argmax()].item()}"
    gt = g[:, :, :64].transpose(0, 2)  # non-contiguous
    xt = x[:, :, :64].transpose(0, 2)
    assert torch.equal(torch.ops.rmt_fast.gelu_tanh_backward(gt, xt),
                       torch.ops.rmt_fast.gelu_tanh_backward(gt.contiguous(), xt.contiguous()))
    xb, gb = x.to(torch.bfloat16), g.to(torch.bfloat16)
    refb, sizeb = _gelu_grad_reference(gb, xb)
    outb = torch.ops.rmt_fast.gelu_tanh_backward(gb, xb)
    assert outb.dtype == torch.bfloat16 and torch.isfinite(outb).all()
    errb = (outb.double() - refb).abs()
    tolb = 2.0 ** -8 * refb.abs() + 4 * torch.finfo(torch.float32).eps * sizeb + 1e-7
    assert (errb <= tolb).all(), f"max error {errb.max().item():.3g} at x={xb.view(-1)[errb.argmax()].item()}"
    aten = (torch.ops.aten.gelu_backward(gb, xb, approximate="tanh").double() - refb).abs()
    finite = torch.isfinite(aten)
    assert errb[finite].max() <= aten[finite].max() + 1e-7
    with pytest.raises(RuntimeError, match="grad must have x's dtype"):
        torch.ops.rmt_fast.gelu_tanh_backward(gb, x)
    with pytest.raises(RuntimeError, match="grad must have x's shape"):
        torch.ops.rmt_fast.gelu_tanh_backward(g[:1], x)
    with pytest.raises(RuntimeError, match="x must be float32 or bfloat16"):
        torch.ops.rmt_fast.gelu_tanh_backward(g.double(), x.double())


@pytest.mark.parametrize("isa", GELU_ISAS)
def test_gelu_tanh_bf16_matches_float64_reference(isa, monkeypatch):
    """bf16: float32 arithmetic rounded once, so within one bf16 rounding (2^-8 relative) of the
    exact value, plus the float32 kernel's absolute floor where gelu(x) ~ 0 (x << 0: ATen's bf16
    kernel returns -0 there); never worse than ATen's own bf16 result."""
    monkeypatch.setenv("RMT_FAST_CPU_ISA", isa)
    x = _gelu_inputs().to(torch.bfloat16)
    assert torch.bfloat16 in ext.GELU_TANH_DTYPES
    ref = F.gelu(x.double(), approximate="tanh")
    out = torch.ops.rmt_fast.gelu_tanh(x)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert torch.isfinite(out).all()
    err = (out.double() - ref).abs()
    tol = 2.0 ** -8 * ref.abs() + 1e-7
    assert (err <= tol).all(), f"max error {err.max().item():.3g} at x={x.view(-1)[err.argmax()].item()}"
    aten = (F.gelu(x, approximate="tanh").double() - ref).abs()
    assert err.max() <= aten.max() + 1e-7
    # the wrapper routes bf16 to the kernel; layouts and the gradient (the extension's kernel)
    assert torch.equal(ext.gelu_tanh(x), out)
    xt = x[:, :, :64].transpose(0, 2)
    assert torch.equal(torch.ops.rmt_fast.gelu_tanh(xt), torch.ops.rmt_fast.gelu_tanh(xt.contiguous()))
    a = x[:, :, :64].clone().requires_grad_()
    g = torch.randn(a.shape).to(torch.bfloat16)
    ext.gelu_tanh(a).backward(g)
    assert torch.equal(a.grad, torch.ops.rmt_fast.gelu_tanh_backward(g, a.detach()))
    for op, args in ((OPS.gelu_tanh.default, (torch.randn(2, 3, 37).to(torch.bfloat16).requires_grad_(),)),
                     (OPS.gelu_tanh_backward.default,
                      (torch.randn(2, 3, 37).to(torch.bfloat16), torch.randn(2, 3, 37).to(torch.bfloat16)))):
        result = torch.library.opcheck(op, args)
        assert all(v == "SUCCESS" for v in result.values()), result


def test_fuse_activations_keeps_gpt2_outputs():
    from transformers import GPT2Config, GPT2LMHeadModel

    from rmt_fast.integrations.fused_activations import TanhGELU, fuse_activations

    torch.manual_seed(0)
    plain = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=50)).eval()
    fused = GPT2LMHeadModel(plain.config).eval()
    fused.load_state_dict(plain.state_dict())
    assert fuse_activations(fused) == 2
    assert sum(isinstance(m, TanhGELU) for m in fused.modules()) == 2
    ids = torch.randint(0, 50, (2, 33))
    torch.testing.assert_close(fused(ids).logits, plain(ids).logits, rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------ layer_norm

#: (x shape, normalized_shape): vector tails (37), one element, a 2-D normalized shape
LN_SHAPES = [((3, 5, 768), (768,)), ((7, 37), (37,)), ((4, 1), (1,)), ((2, 3, 4, 20), (4, 20))]


def _layer_norm_case(shape, norm, dtype, params, seed):
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 + 1.5).to(dtype)
    pdtype = {"none": None, "same": dtype, "float32": torch.float32}[params]
    w = b = None
    if pdtype is not None:
        w = torch.randn(norm, generator=g, dtype=torch.float64).to(pdtype)
        b = torch.randn(norm, generator=g, dtype=torch.float64).to(pdtype)
    return x, w, b


@pytest.mark.parametrize("isa", GELU_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("params", ["none", "same", "float32"])
def test_layer_norm_matches_float64_reference(isa, dtype, params, monkeypatch):
    """Output within a few float32 ulps of the float64 LayerNorm (bf16: one bf16 rounding of it,
    never worse than ATen's own bf16 result); mean and rstd of ATen's dtype and shape, close to
    ATen's; every code path."""
    monkeypatch.setenv("RMT_FAST_CPU_ISA", isa)
    for i, (shape, norm) in enumerate(LN_SHAPES):
        x, w, b = _layer_norm_case(shape, norm, dtype, params, seed=i)
        y, mean, rstd = OPS.layer_norm(x, list(norm), w, b, 1e-5)
        ref = F.layer_norm(x.double(), norm, None if w is None else w.double(),
                           None if b is None else b.double(), 1e-5)
        ay, amean, arstd = torch.native_layer_norm(x, norm, w, b, 1e-5)
        assert y.dtype == dtype and y.shape == x.shape
        assert (mean.dtype, mean.shape, rstd.dtype, rstd.shape) == \
            (amean.dtype, amean.shape, arstd.dtype, arstd.shape)
        err = (y.double() - ref).abs()
        if dtype == torch.float32:
            size = ref.abs() + (b.double().abs() if b is not None else 0) + 1
            tol = 8 * torch.finfo(torch.float32).eps * size
        else:
            tol = 2.0 ** -8 * ref.abs() + 1e-6
        assert (err <= tol).all(), (shape, err.max().item())
        assert err.max() <= (ay.double() - ref).abs().max() + 1e-6
        rel = 2.0 ** -7 if mean.dtype == torch.bfloat16 else 1e-5
        torch.testing.assert_close(mean.double(), amean.double(), rtol=rel, atol=1e-6)
        torch.testing.assert_close(rstd.double(), arstd.double(), rtol=rel, atol=1e-6)


@pytest.mark.parametrize("isa,kernel", [("generic", {}), ("avx2", {torch.bfloat16}),
                                        ("avx512", {torch.float32, torch.bfloat16}),
                                        ("avx512_bf16", {torch.float32, torch.bfloat16}),
                                        (None, {})])
def test_layer_norm_takes_the_kernel_where_it_beat_aten(monkeypatch, isa, kernel):
    """float32 on the AVX-512 paths, bf16 from AVX2 on (measured, bench/README.md); F.layer_norm
    elsewhere, and for other dtypes."""
    monkeypatch.setattr(ext, "first_cpu_isa", lambda dtype=torch.float32: isa)
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        assert ext.layer_norm_uses_kernel(dtype) == (dtype in kernel)
    calls = []
    monkeypatch.setattr(ext.F, "layer_norm", lambda *a, **k: calls.append(1) or a[0])
    x = torch.randn(2, 8)
    ext.layer_norm(x, 8)
    assert calls == ([] if torch.float32 in kernel else [1])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_layer_norm_gradients_layouts_and_fallbacks(dtype, monkeypatch):
    # the kernel whatever this CPU's rule (test_layer_norm_takes_the_kernel_where_it_beat_aten)
    monkeypatch.setattr(ext, "LAYER_NORM_ISAS", {dtype: (ext.first_cpu_isa(),)})
    x, w, b = _layer_norm_case((4, 9, 40), (40,), dtype, "same", seed=11)
    x, w, b = (t.requires_grad_() for t in (x, w, b))
    g = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(dtype)
    got = torch.autograd.grad(ext.layer_norm(x, 40, w, b), (x, w, b), g)
    xd, wd, bd = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = torch.autograd.grad(F.layer_norm(xd, (40,), wd, bd), (xd, wd, bd), g.double())
    aten = torch.autograd.grad(F.layer_norm(x, (40,), w, b), (x, w, b), g)
    for a, r, at in zip(got, ref, aten, strict=True):
        assert a.dtype == dtype
        assert (a.double() - r).abs().max() <= 2 * (at.double() - r).abs().max() + 1e-5
    # only some inputs need a gradient; second derivative (ATen's differentiable backward)
    (dw,) = torch.autograd.grad(ext.layer_norm(x.detach(), 40, w, None), w, g)
    torch.testing.assert_close(dw, torch.autograd.grad(F.layer_norm(x.detach(), (40,), w), w, g)[0])
    x64 = torch.randn(3, 6, dtype=torch.float64)
    w32 = torch.randn(6, requires_grad=True)
    xs = x64.float().requires_grad_()
    (dx,) = torch.autograd.grad(ext.layer_norm(xs, 6, w32).pow(2).sum(), xs, create_graph=True)
    (ddw,) = torch.autograd.grad(dx.sum(), w32)
    xr = x64.float().requires_grad_()
    w2 = w32.detach().clone().requires_grad_()
    (dxr,) = torch.autograd.grad(F.layer_norm(xr, (6,), w2).pow(2).sum(), xr, create_graph=True)
    torch.testing.assert_close(ddw, torch.autograd.grad(dxr.sum(), w2)[0], rtol=1e-4, atol=1e-5)
    # non-contiguous input; float64 / float16 fall back to F.layer_norm
    xt = x.detach().transpose(0, 1)
    torch.testing.assert_close(ext.layer_norm(xt, 40, w, b), ext.layer_norm(xt.contiguous(), 40, w, b),
                               rtol=0, atol=0)
    for other in (torch.float64, torch.float16):
        xo = x.detach().to(other)
        torch.testing.assert_close(ext.layer_norm(xo, 40, w.detach().to(other), b.detach().to(other)),
                                   F.layer_norm(xo, (40,), w.detach().to(other), b.detach().to(other)),
                                   rtol=0, atol=0)
    ops_args = (torch.randn(2, 3, 37, requires_grad=True), [37], torch.randn(37, requires_grad=True),
                torch.randn(37, requires_grad=True), 1e-5)
    result = torch.library.opcheck(OPS.layer_norm.default, ops_args)
    assert all(v == "SUCCESS" for v in result.values()), result


def test_layer_norm_bad_inputs():
    x = torch.randn(2, 3, 8)
    with pytest.raises(RuntimeError, match="x must be float32 or bfloat16"):
        OPS.layer_norm(x.double(), [8], None, None, 1e-5)
    with pytest.raises(RuntimeError, match="must be the trailing dimensions of x"):
        OPS.layer_norm(x, [3], None, None, 1e-5)
    with pytest.raises(RuntimeError, match="weight must have shape normalized_shape"):
        OPS.layer_norm(x, [8], torch.ones(7), None, 1e-5)
    with pytest.raises(RuntimeError, match="bias must be float32 or x's dtype"):
        OPS.layer_norm(x, [8], None, torch.ones(8, dtype=torch.float64), 1e-5)
    with pytest.raises(RuntimeError, match="weight and bias must have one dtype"):
        OPS.layer_norm(x.bfloat16(), [8], torch.ones(8), torch.ones(8, dtype=torch.bfloat16), 1e-5)


def _ce_inputs(dtype, n=45, v=1003, seed=0):
    """Logits with a spread of scales (rows up to |x| ~ 30) and targets with ignored rows."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, v, generator=g, dtype=torch.float64) * torch.linspace(0.1, 10, n)[:, None]
    t = torch.randint(0, v, (n,), generator=g)
    t[[3 % n, 17 % n]] = -100
    return x.to(dtype), t


@pytest.mark.parametrize("isa", GELU_ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("v", [1, 7, 16, 1003])
def test_cross_entropy_matches_float64_reference(isa, dtype, v, monkeypatch):
    """Loss (sum over the counted rows), the rows' LSE and the gradient vs float64 on the same
    values: loss and LSE to float32 accuracy; gradient to float32 accuracy, bf16: within one
    bf16 rounding of the float64 value (g = 1: entries in [-1, 1])."""
    monkeypatch.setenv("RMT_FAST_CPU_ISA", isa)
    x, t = _ce_inputs(dtype, v=v)
    x.requires_grad_(True)
    loss, lse = OPS.cross_entropy(x, t, -100)
    assert loss.dtype == lse.dtype == torch.float32 and loss.shape == () and lse.shape == (45,)
    xd = x.detach().double().requires_grad_(True)
    ref = F.cross_entropy(xd, t, ignore_index=-100, reduction="sum")
    keep = t != -100
    assert abs(loss.item() - ref.item()) <= 1e-5 * ref.abs().item() + 1e-5
    ref_lse = torch.logsumexp(xd.detach(), 1)
    torch.testing.assert_close(lse[keep].double(), ref_lse[keep], rtol=2e-6, atol=2e-6)
    assert (lse[~keep] == 0).all()
    (grad,) = torch.autograd.grad(loss * 0.5, x)
    (grad_ref,) = torch.autograd.grad(ref * 0.5, xd)
    assert grad.dtype == dtype and torch.isfinite(grad).all()
    err = (grad.double() - grad_ref).abs()
    if dtype == torch.float32:
        assert err.max() <= 1e-6, err.max()
    else:
        assert (err <= 2.0 ** -8 * grad_ref.abs() + 1e-7).all(), err.max()
    assert (grad[~keep] == 0).all()


def test_cross_entropy_sum_wrapper_threads_and_fallbacks():
    """The wrapper: the kernel for float32/bf16 CPU logits (the same loss on 1 and 2 threads,
    bitwise), F.cross_entropy for float64; every row ignored gives 0 and a zero gradient;
    double backward (ATen's formula) matches float64; opcheck."""
    x, t = _ce_inputs(torch.float32, n=300, v=257, seed=1)
    before = torch.get_num_threads()
    losses = []
    for threads in (1, 2):
        torch.set_num_threads(threads)
        try:
            losses.append(ext.cross_entropy_sum(x, t))
        finally:
            torch.set_num_threads(before)
    assert torch.equal(losses[0], losses[1])
    ref = F.cross_entropy(x.double(), t, ignore_index=-100, reduction="sum")
    assert ext.cross_entropy_sum(x.double(), t).dtype == torch.float64
    torch.testing.assert_close(ext.cross_entropy_sum(x.double(), t), ref)
    none = torch.full_like(t, -100)
    xg = x.clone().requires_grad_(True)
    loss = ext.cross_entropy_sum(xg, none)
    loss.backward()
    assert loss.item() == 0.0 and (xg.grad == 0).all()
    # double backward: d/dx of <grad, w> through ATen's formula under create_graph
    xs, ts = _ce_inputs(torch.float32, n=6, v=9, seed=2)
    w = torch.randn(6, 9, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    xa, xd = xs.clone().requires_grad_(True), xs.double().requires_grad_(True)
    ga = torch.autograd.grad(ext.cross_entropy_sum(xa, ts), xa, create_graph=True)[0]
    gd = torch.autograd.grad(F.cross_entropy(xd, ts, ignore_index=-100, reduction="sum"), xd,
                             create_graph=True)[0]
    dda = torch.autograd.grad((ga.double() * w).sum(), xa)[0]
    ddd = torch.autograd.grad((gd * w).sum(), xd)[0]
    torch.testing.assert_close(dda.double(), ddd, rtol=1e-5, atol=1e-6)
    for dtype in (torch.float32, torch.bfloat16):
        xo, to = _ce_inputs(dtype, n=5, v=11, seed=4)
        result = torch.library.opcheck(OPS.cross_entropy, (xo.requires_grad_(True), to, -100))
        assert all(v == "SUCCESS" for v in result.values()), result


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmt_training_loss_through_the_kernel(dtype, monkeypatch):
    """An RMT decoder's loss and gradients (segment checkpointing; bf16: autocast over float32
    weights) with the fused cross-entropy match the F.cross_entropy path."""
    from rmt_fast.bench.systems import CONFIGS, _rmt

    torch.manual_seed(0)
    model = _rmt(CONFIGS["tiny"], checkpoint=True)
    tokens = torch.randint(0, 100, (2, 100), generator=torch.Generator().manual_seed(1))
    labels = tokens.clone()
    labels[0, 40:60] = -100

    def run():
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            loss = model(tokens, labels=labels, return_logits=False).loss
        loss.backward()
        return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        loss, grads = run()
    names = {e.key for e in prof.key_averages()}
    assert {"rmt_fast::cross_entropy", "rmt_fast::cross_entropy_backward"} <= names
    assert "aten::nll_loss_forward" not in names
    monkeypatch.setattr(ext, "HAS_CROSS_ENTROPY", False)
    ref_loss, ref_grads = run()
    tol = dict(rtol=1e-5, atol=1e-6) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(loss, ref_loss, **tol)
    for n, g in grads.items():
        torch.testing.assert_close(g, ref_grads[n], **tol, msg=lambda m, n=n: f"{n}: {m}")


def test_cross_entropy_bad_inputs():
    x, t = _ce_inputs(torch.float32, n=4, v=5)
    with pytest.raises(RuntimeError, match="logits must be float32 or bfloat16"):
        OPS.cross_entropy(x.double(), t, -100)
    with pytest.raises(RuntimeError, match=r"logits must be \[N, V\]"):
        OPS.cross_entropy(x[None], t, -100)
    with pytest.raises(RuntimeError, match="targets must be int64"):
        OPS.cross_entropy(x, t.int(), -100)
    with pytest.raises(RuntimeError, match=r"targets must be \[N\] = \[4\]"):
        OPS.cross_entropy(x, t[:3], -100)
    for bad in (5, -1):
        tb = t.clone()
        tb[2] = bad
        with pytest.raises(RuntimeError, match=rf"targets must be in \[0, 5\) or ignore_index "
                                                rf"\(-100\), got {bad} at row 2"):
            OPS.cross_entropy(x, tb, -100)
    _, lse = OPS.cross_entropy(x, t, -100)
    with pytest.raises(RuntimeError, match="grad must be a scalar"):
        OPS.cross_entropy_backward(torch.ones(2), x, t, lse, -100)
    with pytest.raises(RuntimeError, match=r"lse must be float32 \[N\]"):
        OPS.cross_entropy_backward(torch.ones(()), x, t, lse[:2], -100)


def test_fuse_layer_norms_keeps_gpt2_outputs_and_parameters():
    from transformers import GPT2Config, GPT2LMHeadModel

    from rmt_fast.integrations.fused_activations import FastLayerNorm, fuse_layer_norms

    torch.manual_seed(0)
    plain = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=64, n_head=4, vocab_size=50)).eval()
    fused = GPT2LMHeadModel(plain.config).eval()
    fused.load_state_dict(plain.state_dict())
    assert fuse_layer_norms(fused) == 5  # ln_1, ln_2 per block and ln_f
    lns = [m for m in fused.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(lns) == 5 and all(type(m) is FastLayerNorm for m in lns)
    assert list(fused.state_dict()) == list(plain.state_dict())
    ids = torch.randint(0, 50, (2, 33))
    for dtype in (torch.float32, torch.bfloat16):
        plain.to(dtype)
        fused.to(dtype)
        with torch.no_grad():
            torch.testing.assert_close(fused(ids).logits, plain(ids).logits,
                                       rtol=1e-5 if dtype == torch.float32 else 2e-2,
                                       atol=1e-5 if dtype == torch.float32 else 2e-2)
    fused.float()
    plain.float()
    fused.train()
    fused(ids, labels=ids).loss.backward()  # gradients reach the LayerNorm parameters
    assert all(m.weight.grad is not None and m.bias.grad is not None for m in lns)


def test_out_variant_rejects_autograd():
    r, x, w = (_rand(2, m, 4, requires_grad=True) for m in (2, 3, 2))
    with pytest.raises(RuntimeError, match="does not support autograd"):
        ext.assemble_segment(r, x, w, out=torch.empty(2, 7, 4))
    with torch.no_grad():
        out = ext.assemble_segment(r, x, w, out=torch.empty(2, 7, 4))
    assert torch.equal(out, torch.cat([r, x, w], 1).detach())


# ------------------------------------------------------------------------------------ bad inputs

def _poisoned(*shape, dtype=torch.float32):
    return torch.full(shape, float("nan"), dtype=dtype)


@pytest.mark.parametrize("args,pattern", [
    (((2, 3, 4), (2, 5), (2, 2, 4)),
     r"seg_emb must be a 3-D tensor \[B, S, d\], got shape \[2, 5\]"),
    (((2, 3, 4), (2, 5, 4), (3, 2, 4)), r"write_mem must be \[B=2, M_w, d=4\]"),
    (((2, 3, 5), (2, 5, 4), (2, 2, 4)), r"read_mem must be \[B=2, M_r, d=4\]"),
    (((2, 3), (2, 5, 4), (2, 2, 4)), r"read_mem must be .* got shape \[2, 3\]"),
])
def test_assemble_bad_shapes(args, pattern):
    r, x, w = (torch.randn(*s) for s in args)
    out = _poisoned(2, 10, 4)
    for fn in (lambda: ext.assemble_segment(r, x, w),
               lambda: ext.assemble_segment(r, x, w, out=out)):
        with pytest.raises(RuntimeError, match=pattern):
            fn()
    assert out.isnan().all()


def test_assemble_bad_dtypes_and_out():
    r, x, w = torch.randn(2, 3, 4), torch.randn(2, 5, 4), torch.randn(2, 2, 4)
    with pytest.raises(RuntimeError, match="must have the same dtype"):
        ext.assemble_segment(r.double(), x, w)
    with pytest.raises(RuntimeError, match="dtype must be float32, float16, bfloat16 or float64"):
        ext.assemble_segment(r.long(), x.long(), w.long())
    bad_outs = [
        (_poisoned(2, 9, 4), r"out must have shape \[2, 10, 4\], got shape \[2, 9, 4\]"),
        (_poisoned(2, 10, 4, dtype=torch.float64), "out must have dtype Float, got Double"),
        (_poisoned(2, 4, 10).transpose(1, 2), "out must be contiguous"),
    ]
    for out, pattern in bad_outs:
        with pytest.raises(RuntimeError, match=pattern):
            ext.assemble_segment(r, x, w, out=out)
        assert out.isnan().all()
    # a dtype mismatch is caught before the out buffer is touched, too
    out = _poisoned(2, 10, 4)
    with pytest.raises(RuntimeError, match="same dtype"):
        ext.assemble_segment(r, x.double(), w, out=out)
    assert out.isnan().all()


def test_extract_bad_inputs():
    h = torch.randn(2, 8, 4)
    out = _poisoned(2, 3, 4)
    with pytest.raises(RuntimeError, match=r"rows \[start, start \+ count\) = \[6, 9\) must lie "
                                           r"inside hidden's L = 8"):
        ext.extract_memory(h, 6, 3, out=out)
    with pytest.raises(RuntimeError, match=r"hidden must be a 3-D tensor \[B, L, d\]"):
        ext.extract_memory(h[0], 0, 3, out=out)
    with pytest.raises(RuntimeError,
                       match=r"out must have shape \[2, 2, 4\], got shape \[2, 3, 4\]"):
        ext.extract_memory(h, 0, 2, out=out)
    with pytest.raises(RuntimeError, match="must lie inside"):
        ext.extract_memory(h, -1, 2)
    assert out.isnan().all()
    with pytest.raises(RuntimeError, match=r"seg_mask must be a 2-D tensor \[B, S\]"):
        ext.assemble_mask(torch.ones(2, 3, 1), 1, 1)
    with pytest.raises(RuntimeError, match="num_read and num_write must be >= 0"):
        ext.assemble_mask(torch.ones(2, 3), -1, 1)


# ----------------------------------------------------------------------------------- MemoryStore

@pytest.mark.parametrize("offload", [False, True])
def test_memory_store_roundtrip(offload):
    store = ext.MemoryStore(offload=offload)
    assert store.native and store.offload == offload and store.size() == 0
    states = {t: torch.randn(2, 3, 4) for t in (0, 1, 5)}
    for t, s in states.items():
        store.put(t, s)
    assert store.size() == 3 and len(store) == 3 and store.segments() == [0, 1, 5]
    assert store.has(5) and 5 in store and not store.has(2)
    assert store.nbytes() == 3 * 2 * 3 * 4 * 4
    for t, s in states.items():
        assert torch.equal(store.get(t), s)
    store.prefetch(1)  # CPU: no-op
    # offload keeps a copy; without offload the store aliases the (detached) state
    states[0].add_(1)
    assert torch.equal(store.get(0), states[0]) != offload
    assert torch.equal(store.pop(1), states[1]) and store.segments() == [0, 5]
    store.put(5, torch.zeros(1))  # replace
    assert store.get(5).shape == (1,) and store.size() == 2
    store.clear()
    assert store.size() == 0 and store.segments() == []


def test_memory_store_detaches():
    store = ext.MemoryStore()
    x = torch.randn(2, 3, requires_grad=True)
    store.put(0, x * 2)
    assert not store.get(0).requires_grad


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("method", ["get", "pop", "prefetch"])
def test_memory_store_missing_segment(method, native):
    store = ext.MemoryStore()
    if not native:  # the dict store used without the extension
        store._impl = ext._PyMemoryStore()
    store.put(0, torch.ones(1))
    store.put(3, torch.ones(2))
    with pytest.raises(RuntimeError, match=rf"MemoryStore\.{method}: no memory state stored for "
                                           r"segment 7; stored segments: \[0, 3\] \(2 states\)"):
        getattr(store, method)(7)
    assert store.segments() == [0, 3]
    assert torch.equal(store.get(3), torch.ones(2))


@pytest.mark.skipif(not ext.HAS_EXTENSION, reason="the C++ class needs the extension")
def test_memory_store_missing_segment_cpp_check():
    """The C++ class checks too (the wrapper checks first, see MemoryStore._require)."""
    raw = torch.classes.rmt_fast.MemoryStore(False)
    raw.put(2, torch.ones(3))
    with pytest.raises(RuntimeError, match=r"MemoryStore\.pop: no memory state stored for "
                                           r"segment 5; stored segments: \[2\]"):
        raw.pop(5)
    assert raw.segments() == [2]


def test_memory_store_put_needs_a_tensor():
    store = ext.MemoryStore()
    store.put(0, torch.ones(2))
    with pytest.raises(TypeError, match=r"MemoryStore\.put: segment 1: state must be a tensor "
                                        r"\[B, M, d\], got NoneType"):
        store.put(1, None)
    assert store.segments() == [0]


# -------------------------------------------------------------------------------------- fallback

def test_fallback_without_extension_warns_once_and_matches():
    """With rmt_fast._C blocked, the wrappers fall back to PyTorch after one RuntimeWarning."""
    code = textwrap.dedent("""
        import sys, warnings
        sys.modules["rmt_fast._C"] = None  # makes `import rmt_fast._C` raise ImportError
        import torch
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            from rmt_fast import _extension as ext
            assert not ext.HAS_EXTENSION
            r, x, w = torch.randn(2, 1, 3), torch.randn(2, 4, 3), torch.randn(2, 2, 3)
            assert torch.equal(ext.assemble_segment(r, x, w), torch.cat([r, x, w], 1))
            h = torch.randn(2, 6, 3)
            assert torch.equal(ext.extract_memory(h, 4, 2), h[:, 4:])
            g = torch.randn(5, 7)
            assert not ext.HAS_GELU_TANH
            assert torch.equal(ext.gelu_tanh(g), torch.nn.functional.gelu(g, approximate="tanh"))
            m = torch.tensor([[1, 0], [1, 1]])
            assert ext.assemble_mask(m, 1, 1).tolist() == [[1, 1, 0, 1], [1, 1, 1, 1]]
            store = ext.MemoryStore()
            assert not store.native
            store.put(2, h)
            assert torch.equal(store.get(2), h) and store.segments() == [2]
            try:
                store.get(0)
                raise AssertionError("no error")
            except RuntimeError as e:
                assert "no memory state stored for segment 0; stored segments: [2]" in str(e)
        msgs = [str(c.message) for c in caught if issubclass(c.category, RuntimeWarning)]
        assert len(msgs) == 1 and "could not be loaded" in msgs[0], msgs
        print("OK")
    """)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, cwd=root, env=env)
    assert proc.returncode == 0 and "OK" in proc.stdout, proc.stderr
