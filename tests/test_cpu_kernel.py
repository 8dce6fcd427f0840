"""The extension's fused CPU memory-attention kernel against the float64 reference.

Tolerance as in test_kernels.py (FlashAttention's convention): the kernel's max error against the
float64 reference is within 2x (3x for gradients) of the error of the same-dtype PyTorch
reference, plus a small floor relative to the reference's largest value (float32: 1e-6, about 8
ulp; the recomputed probabilities of the backward pass go through the stored float32 LSE). Every
code path (AMX-BF16, AVX-512 BF16, AVX-512F, AVX2, portable C++) that this CPU has runs by
capping it with RMT_FAST_CPU_ISA.
"""

import pytest
import torch

from rmt_fast import memory_attention
from rmt_fast.masks import AttentionLayout
from rmt_fast.ops.memory_attention import cpu_kernel
from rmt_fast.ops.memory_attention.reference import reference_memory_attention

pytestmark = pytest.mark.skipif(not cpu_kernel.HAS_CPU_KERNEL,
                                reason="rmt_fast._C built without memory_attention_cpu")

MODES = ["causal", "rmt", "full", "bottleneck"]
ISAS = ["generic", "avx2", "avx512", "avx512_bf16", "amx"]
FLOOR = {torch.float32: 1e-6, torch.bfloat16: 1e-3}
OP = torch.ops.rmt_fast.memory_attention_cpu if cpu_kernel.HAS_CPU_KERNEL else None


def _rand(*shape, dtype, seed, grad=True):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(grad)


def _inputs(dtype, batch=2, hq=4, hkv=2, length=70, past=0, dim=24, pad=False, seed=0):
    """q, k, v (+ past keys, + padding with one batch row that sees nothing)."""
    inp = dict(q=_rand(batch, hq, length, dim, dtype=dtype, seed=seed),
               k=_rand(batch, hkv, length, dim, dtype=dtype, seed=seed + 1),
               v=_rand(batch, hkv, length, dim, dtype=dtype, seed=seed + 2))
    if past:
        inp["past_k"] = _rand(batch, hkv, past, dim, dtype=dtype, seed=seed + 3)
        inp["past_v"] = _rand(batch, hkv, past, dim, dtype=dtype, seed=seed + 4)
    if pad:
        kpm = torch.rand(batch, past + length, generator=torch.Generator().manual_seed(seed)) > 0.3
        kpm[-1] = False
        inp["key_padding_mask"] = kpm
    return inp


def _close(name, got, ref64, ref_lowp, mult, dtype):
    """``|got - ref64| <= mult * |ref_lowp - ref64| + floor * max(1, |ref64|)`` (max norms),
    NaN-free."""
    assert not torch.isnan(got).any(), f"{name}: NaN"
    if got.numel() == 0:
        return
    err = (got.double() - ref64).abs().max().item()
    base = (ref_lowp.double() - ref64).abs().max().item()
    floor = FLOOR[dtype] * max(1.0, ref64.abs().max().item())
    assert err <= mult * base + floor, f"{name}: err {err:.3e} vs base {base:.3e}"


def _check(inp, layout_kw, grads=True, lse_grad=False):
    """Kernel (via the public API, backend="cpu") vs the float64 and same-dtype references."""
    dtype = inp["q"].dtype
    out, lse = memory_attention(**inp, backend="cpu", return_lse=True, **layout_kw)
    assert out.dtype == dtype and lse.dtype == torch.float32 and out.shape == inp["q"].shape
    exact = {n: (t.detach().double().requires_grad_(t.requires_grad) if t.is_floating_point()
                 else t) for n, t in inp.items()}
    ref_out, ref_lse = reference_memory_attention(**exact, **layout_kw)
    low_out, low_lse = reference_memory_attention(**inp, **layout_kw)
    _close("out", out, ref_out.detach(), low_out, 2, dtype)
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isneginf(lse), empty), "rows that see nothing: lse -inf, same rows"
    assert (out[empty] == 0).all()
    _close("lse", lse[~empty], ref_lse[~empty].double(), low_lse[~empty], 2, dtype)
    if not grads:
        return
    names = [n for n in ("q", "k", "v", "past_k", "past_v") if n in inp]
    g = torch.Generator().manual_seed(7)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    wl = torch.randn(lse.shape, generator=g, dtype=torch.float64) if lse_grad else None

    def loss(o, lo):
        total = (o.double() * dout).sum()
        if wl is not None:
            total = total + (lo.double().masked_fill(torch.isinf(lo), 0) * wl).sum()
        return total

    got = torch.autograd.grad(loss(out, lse), [inp[n] for n in names])
    ref = torch.autograd.grad(loss(ref_out, ref_lse), [exact[n] for n in names])
    low = torch.autograd.grad(loss(low_out, low_lse), [inp[n] for n in names])
    for n, a, r, lo in zip(names, got, ref, low, strict=True):
        assert a.dtype == dtype
        _close(f"grad {n}", a, r, lo, 3, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask", MODES)
@pytest.mark.parametrize("past,pvr,pad", [(0, False, False), (70, False, True), (9, True, False)])
def test_matches_reference(dtype, mask, past, pvr, pad):
    """Every mask, past keys (hidden from or seen by read rows), padding, GQA, ragged tiles
    (L = 70 rows: two row blocks; D = 24: padded head dim)."""
    inp = _inputs(dtype, past=past, pad=pad)
    _check(inp, dict(num_read=5, num_write=6, mask=mask, past_visible_to_read=pvr, scale=0.3))


def _capped(cap: str, top: str, dtype: torch.dtype) -> str:
    """The path RMT_FAST_CPU_ISA=cap gives inputs of dtype on a CPU whose best path is top:
    the cap, at most top; float32 never "amx" (tiles multiply bf16)."""
    path = ISAS[min(ISAS.index(cap), ISAS.index(top))]
    return "avx512_bf16" if path == "amx" and dtype == torch.float32 else path


@pytest.fixture
def top_isa(monkeypatch) -> str:
    """The CPU's best path (what a bfloat16 call capped at "amx" takes)."""
    monkeypatch.setenv("RMT_FAST_CPU_ISA", "amx")
    top = cpu_kernel.isa(torch.bfloat16)
    monkeypatch.delenv("RMT_FAST_CPU_ISA")
    return top


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask", ["rmt", "bottleneck"])
def test_every_code_path(isa, dtype, mask, monkeypatch, top_isa):
    """D = 64 (whole AMX K chunks) and L = 67, P = 66: ragged key tiles, so the AMX path runs
    tiles, leftover rows and leftover K pairs on vectors."""
    monkeypatch.setenv("RMT_FAST_CPU_ISA", isa)
    assert cpu_kernel.isa(dtype) == _capped(isa, top_isa, dtype)
    inp = _inputs(dtype, batch=2, hq=3, hkv=1, length=67, past=66, dim=64, pad=True, seed=3)
    _check(inp, dict(num_read=4, num_write=4, mask=mask, scale=0.125), lse_grad=True)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask", ["causal", "rmt", "full"])
def test_key_tile_groups(isa, dtype, mask, monkeypatch, top_isa):
    """The forward takes up to 8 key tiles per softmax step (kFwdGroup), with one value product
    over a run of consecutive whole tiles. P = 256 past keys (one whole run of 8 tiles) and 300
    current ones, padding hiding the whole tiles of keys 320-383 in batch row 0 (a group of
    whole tiles that are not consecutive); P = 290 (a partial tile inside a group, hidden tiles
    next to it); D = 64 and 80 (leftover AMX rows)."""
    monkeypatch.setenv("RMT_FAST_CPU_ISA", isa)
    assert cpu_kernel.isa(dtype) == _capped(isa, top_isa, dtype)
    for past, hidden, dim in ((256, (320, 384), 64), (290, (100, 200), 80)):
        inp = _inputs(dtype, batch=2, hq=2, hkv=1, length=300, past=past, dim=dim, pad=True,
                      seed=dim + past)
        inp["key_padding_mask"][0, hidden[0]:hidden[1]] = False
        _check(inp, dict(num_read=8, num_write=8, mask=mask, past_visible_to_read=True),
               grads=dim == 64)


@pytest.mark.parametrize("dim", [32, 80, 128])
@pytest.mark.parametrize("mask", MODES)
def test_amx_path_head_dims(dim, mask, monkeypatch, top_isa):
    """The AMX path (where the CPU has it; the best bf16 path elsewhere) at head dims of one,
    several and a partial 32-wide K chunk, every mask, past keys, padding, forward and backward."""
    monkeypatch.setenv("RMT_FAST_CPU_ISA", "amx")
    assert cpu_kernel.isa(torch.bfloat16) == top_isa
    inp = _inputs(torch.bfloat16, batch=2, hq=2, hkv=1, length=97, past=40, dim=dim, pad=True, seed=dim)
    _check(inp, dict(num_read=5, num_write=7, mask=mask, scale=dim ** -0.5), lse_grad=True)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("mask", ["causal", "rmt"])
def test_bf16_lse_is_float32_accurate(isa, mask, monkeypatch, top_isa):
    """bf16 inputs: the products and the softmax sum run in float32 (the probabilities are
    rounded to bf16 only for the value product), so the LSE matches the float64 LSE of the same
    bf16 values to float32-sized error. This pins the accuracy of the exponential on the paths
    where P is rounded to bf16 (exp512_bf16, about 7e-6 relative), which the output's bf16
    tolerance could not: a 1e-3 error in it passes _check."""
    monkeypatch.setenv("RMT_FAST_CPU_ISA", isa)
    inp = _inputs(torch.bfloat16, batch=2, hq=3, hkv=1, length=67, past=66, dim=64, pad=True,
                  seed=11)
    with torch.no_grad():
        layout = dict(num_read=4, num_write=4, mask=mask, scale=0.125)
        _, lse = memory_attention(**inp, backend="cpu", return_lse=True, **layout)
        exact = {n: t.double() if t.is_floating_point() else t for n, t in inp.items()}
        _, ref = reference_memory_attention(**exact, **layout)
    seen = ~torch.isinf(ref)
    assert torch.equal(torch.isneginf(lse), ~seen)
    err = (lse[seen].double() - ref[seen]).abs().max().item()
    assert err <= 2e-5, f"lse error {err:.3g}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask", MODES)
@pytest.mark.parametrize("length,memory", [(1, (0, 0)), (2, (0, 1)), (4, (1, 1)), (8, (2, 3)),
                                           (9, (2, 3))])
@pytest.mark.parametrize("past,pvr,pad", [(0, False, False), (37, False, True), (40, True, False)])
def test_few_rows_path(dtype, mask, length, memory, past, pvr, pad):
    """Up to rows_max (2-12 by dtype and path) query rows the forward pass reads keys and values
    in place (forward_rows_t), above it packs tiles: one decoded token or a few rows over past
    keys (ragged 16-key chunks), every mask, padding (a batch row that sees nothing), GQA, both
    sides of every threshold; backward through the tiled path."""
    inp = _inputs(dtype, batch=2, hq=4, hkv=2, length=length, past=past, dim=40, pad=pad,
                  seed=length + past)
    _check(inp, dict(num_read=memory[0], num_write=memory[1], mask=mask, past_visible_to_read=pvr,
                     scale=0.2), lse_grad=True)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("length", [2, 12, 13])
def test_few_rows_path_strides_and_isas(monkeypatch, isa, length):
    """Non-contiguous inputs (a transposed view, a strided head dim) on every code path, on both
    sides of the bf16 AVX-512 BF16 path's threshold (12 rows)."""
    monkeypatch.setenv("RMT_FAST_CPU_ISA", isa)
    g = torch.Generator().manual_seed(5 + length)
    base = torch.randn(2, 3, 60 + length, 2, 32, generator=g, dtype=torch.float64)
    for dtype in (torch.float32, torch.bfloat16):
        q = base[:, :, :length, 0].to(dtype)  # [2, 3, length, 32], head-dim stride 2
        kv = torch.randn(2, 2 * length + 1, 3, 32, generator=g, dtype=torch.float64).to(dtype)
        kv = kv.transpose(1, 2)
        pk = base[:, :, length:, 1].to(dtype)[:, :, :50]
        _check(dict(q=q.requires_grad_(), k=kv[:, :, :length].requires_grad_(),
                    v=kv[:, :, length + 1:].requires_grad_(), past_k=pk.requires_grad_(),
                    past_v=pk.flip(2).detach().requires_grad_()),
               dict(num_read=0, num_write=1, mask="rmt"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_max_switch(monkeypatch, dtype):
    """RMT_FAST_CPU_ROWS_MAX forces the in-place rows path or the tiles on the same call: both
    match the reference (and each other); a bad value is an error naming the variable."""
    inp = _inputs(dtype, batch=2, hq=4, hkv=2, length=6, past=45, dim=24, pad=True, seed=21)
    outs = []
    for rows_max in ("0", "100"):
        monkeypatch.setenv("RMT_FAST_CPU_ROWS_MAX", rows_max)
        _check(inp, dict(num_read=1, num_write=2, mask="rmt"), lse_grad=True)
        outs.append(memory_attention(**inp, num_read=1, num_write=2, mask="rmt", backend="cpu"))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert (outs[0].float() - outs[1].float()).abs().max() < tol
    monkeypatch.setenv("RMT_FAST_CPU_ROWS_MAX", "-1")
    with pytest.raises(RuntimeError, match="RMT_FAST_CPU_ROWS_MAX must be a non-negative integer"):
        memory_attention(**inp, num_read=1, num_write=2, mask="rmt", backend="cpu")


def test_amx_path_interleaves_with_aten(monkeypatch):
    """Our kernel loads and releases the AMX tile configuration per call; ATen's bf16 SDPA and
    linear layers (AMX tiles through oneDNN where the CPU has them) run before and after it on
    the same threads and all three keep matching float32 references, forward and backward."""
    import torch.nn.functional as F

    monkeypatch.delenv("RMT_FAST_CPU_ISA", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        q, k, v = (_rand(2, 4, 150, 64, dtype=torch.bfloat16, seed=s, grad=False) for s in (1, 2, 3))
        x = _rand(300, 256, dtype=torch.bfloat16, seed=4, grad=False)
        w = _rand(512, 256, dtype=torch.bfloat16, seed=5, grad=False)
        kw = dict(num_read=16, num_write=16, mask="rmt", backend="cpu")
        f32 = [t.float().requires_grad_() for t in (q, k)]
        ref_sdpa = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), is_causal=True)
        ref_lin = x.float() @ w.float().T
        ref_mem = memory_attention(f32[0], f32[1], v.float(), **kw)
        ref_dq, ref_dk = torch.autograd.grad(ref_mem.pow(2).sum(), f32)
        for _ in range(3):
            qq, kk = q.clone().requires_grad_(), k.clone().requires_grad_()
            sdpa = F.scaled_dot_product_attention(qq, kk, v, is_causal=True)
            mem = memory_attention(qq, kk, v, **kw)
            lin = F.linear(x, w)
            dq, dk = torch.autograd.grad(mem.float().pow(2).sum(), [qq, kk])
            F.scaled_dot_product_attention(qq, kk, v, is_causal=True).float().sum().backward()
            assert (sdpa.float() - ref_sdpa).abs().max() < 3e-2
            assert (mem.float() - ref_mem).abs().max() < 3e-2
            assert (lin.float() - ref_lin).abs().max() < 1e-2 * ref_lin.abs().max()
            for got, ref in ((dq, ref_dq), (dk, ref_dk)):
                assert (got.float() - ref).abs().max() < 3e-2 * ref.abs().max()
    finally:
        torch.set_num_threads(threads)


def _cpu_flags() -> set[str]:
    from rmt_fast.dtypes import cpu_flags

    return set(cpu_flags() or ())


def test_bf16_path_on_amx_cpus(monkeypatch, top_isa):
    """Without RMT_FAST_CPU_ISA, bf16 inputs take the AMX path where the process may use the
    tiles (as ATen does: torch.cpu._is_amx_tile_supported), the AVX-512F path on a CPU with
    AMX-BF16 that it may not use (the dot products were measured slower there), the best path
    elsewhere; float32 inputs the best non-AMX path; the variable picks the path exactly (capped
    by the CPU; test_every_code_path checks each path's numbers)."""
    monkeypatch.delenv("RMT_FAST_CPU_ISA", raising=False)
    amx_hw = {"amx_bf16", "amx_tile"} <= _cpu_flags()
    if cpu_kernel.aten_amx():
        assert top_isa == "amx"
    if top_isa == "amx":
        assert amx_hw
    assert cpu_kernel.isa(torch.float32) == _capped(top_isa, top_isa, torch.float32)
    expected = "avx512" if amx_hw and top_isa == "avx512_bf16" else top_isa
    assert cpu_kernel.isa(torch.bfloat16) == expected
    for isa in ISAS:
        monkeypatch.setenv("RMT_FAST_CPU_ISA", isa)
        for dtype in (torch.float32, torch.bfloat16):
            assert cpu_kernel.isa(dtype) == _capped(isa, top_isa, dtype)


def test_bad_isa_env_is_an_error(monkeypatch):
    monkeypatch.setenv("RMT_FAST_CPU_ISA", "sse9")
    with pytest.raises(RuntimeError, match="RMT_FAST_CPU_ISA must be one of"):
        cpu_kernel.isa()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_gradient_through_lse(dtype):
    inp = _inputs(dtype, past=20, pad=True, seed=5)
    _check(inp, dict(num_read=3, num_write=2, mask="rmt", scale=0.2), lse_grad=True)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("hkv", [1, 3])
def test_both_schedules_agree(threads, hkv):
    """One (batch, kv head) per thread when there are enough, everything packed up front
    otherwise: same results as the reference either way."""
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        inp = _inputs(torch.float32, batch=1, hq=3, hkv=hkv, length=90, past=30, dim=32, seed=9)
        _check(inp, dict(num_read=8, num_write=8, mask="rmt", scale=0.18))
    finally:
        torch.set_num_threads(old)


def _strided(t: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """The same values as ``t`` [B, H, T, D] in a randomly laid out, non-contiguous buffer."""
    perm = torch.randperm(4, generator=g).tolist()
    big = torch.randn([2 * t.shape[p] for p in perm], generator=g, dtype=torch.float64).to(t.dtype)
    view = big[tuple(slice(None, None, 2) for _ in perm)]  # every other element: strides x2
    inverse = [perm.index(i) for i in range(4)]
    out = view.permute(*inverse)
    with torch.no_grad():
        out.copy_(t)
    return out.requires_grad_(t.requires_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_random_strides_match_contiguous(dtype):
    g = torch.Generator().manual_seed(11)
    inp = _inputs(dtype, batch=2, hq=4, hkv=2, length=50, past=17, dim=32, pad=True, seed=13)
    strided = {n: _strided(t.detach(), g).requires_grad_() if t.is_floating_point() else
               t.t().contiguous().t() for n, t in inp.items()}  # padding: column-major
    assert not any(t.is_contiguous() for n, t in strided.items() if n != "key_padding_mask")
    kw = dict(num_read=4, num_write=4, mask="bottleneck", scale=0.2)
    out, lse = memory_attention(**inp, backend="cpu", return_lse=True, **kw)
    out_s, lse_s = memory_attention(**strided, backend="cpu", return_lse=True, **kw)
    assert torch.equal(out, out_s) and torch.equal(lse, lse_s)
    dout = torch.randn(out.shape, generator=g).to(dtype)
    dout_s = _strided(dout, g)  # a non-contiguous incoming gradient too
    names = ["q", "k", "v", "past_k", "past_v"]
    a = torch.autograd.grad(out, [inp[n] for n in names], dout)
    b = torch.autograd.grad(out_s, [strided[n] for n in names], dout_s)
    for n, x, y in zip(names, a, b, strict=True):
        assert torch.equal(x, y), n
    _check(strided, kw)  # and against the reference


def test_rows_that_see_nothing_and_past_without_grad():
    """Read rows hidden from the past with every current key padded: zeros, lse -inf, zero
    gradients; past keys without requires_grad get none."""
    inp = _inputs(torch.float32, batch=1, hq=2, hkv=1, length=18, past=21, dim=16, seed=2)
    inp["past_k"].requires_grad_(False)
    inp["past_v"].requires_grad_(False)
    kpm = torch.ones(1, 39, dtype=torch.bool)
    kpm[0, 21:] = False
    inp["key_padding_mask"] = kpm
    out, lse = memory_attention(**inp, num_read=18, mask="rmt", backend="cpu", return_lse=True)
    assert (out == 0).all() and torch.isneginf(lse).all()
    grads = torch.autograd.grad(out.sum(), [inp["q"], inp["k"], inp["v"]])
    assert all((g == 0).all() for g in grads)


def test_length_one_and_long_past():
    inp = _inputs(torch.bfloat16, batch=2, hq=4, hkv=2, length=1, past=200, dim=64, seed=4)
    _check(inp, dict(mask="causal", scale=0.125))


def test_empty_inputs():
    q = torch.randn(2, 2, 0, 16)
    out, lse = memory_attention(q, q, q, backend="cpu", return_lse=True)
    assert out.shape == q.shape and lse.shape == (2, 2, 0)
    pk = torch.randn(2, 2, 5, 16)
    out = memory_attention(q, q, q, past_k=pk, past_v=pk, backend="cpu")
    assert out.shape == q.shape


def test_opcheck():
    inp = _inputs(torch.float32, batch=1, hq=2, hkv=1, length=20, past=6, dim=16, pad=True)
    args = (inp["q"], inp["k"], inp["v"], inp["past_k"], inp["past_v"], inp["key_padding_mask"],
            2, 3, "rmt", False, 0.25)
    torch.library.opcheck(OP, args)
    no_past = (inp["q"], inp["k"], inp["v"], None, None, None, 0, 0, "causal", False, 0.25)
    torch.library.opcheck(OP, no_past)


@pytest.mark.parametrize("length,threads,batch,hkv", [(1, 1, 2, 2), (70, 1, 2, 2), (70, 2, 1, 1)])
def test_output_lies_as_batch_length_heads(length, threads, batch, hkv):
    """out [B, Hq, L, D] is written as a [B, L, Hq, D] buffer on every forward schedule (few
    rows, one unit per thread, packed up front), so the attention layer's
    ``out.transpose(1, 2).contiguous()`` copies nothing; values as the reference (float64)."""
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        inp = _inputs(torch.float32, batch=batch, hq=4, hkv=hkv, length=length, past=9, dim=24)
        out = OP(inp["q"], inp["k"], inp["v"], inp["past_k"], inp["past_v"], None, 0, 0,
                 "causal", True, 0.3)[0]
    finally:
        torch.set_num_threads(before)
    assert out.shape == inp["q"].shape and out.transpose(1, 2).is_contiguous()
    exact = {n: t.detach().double() for n, t in inp.items()}
    ref = reference_memory_attention(**exact, mask="causal", past_visible_to_read=True,
                                     scale=0.3)[0]
    torch.testing.assert_close(out.double(), ref, rtol=0, atol=1e-5)


def test_bad_inputs_name_the_argument():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(RuntimeError, match="q must be float32 or bfloat16"):
        OP(q.half(), q.half(), q.half(), None, None, None, 0, 0, "causal", False, 0.25)
    with pytest.raises(RuntimeError, match=r"k must have shape \[1, 2, 8, 16\]"):
        OP(q, q[:, :, :4], q, None, None, None, 0, 0, "causal", False, 0.25)
    with pytest.raises(RuntimeError, match="mask must be one of"):
        OP(q, q, q, None, None, None, 0, 0, "diagonal", False, 0.25)
    with pytest.raises(RuntimeError, match="num_read \\+ num_write <= L"):
        OP(q, q, q, None, None, None, 5, 4, "rmt", False, 0.25)
    with pytest.raises(RuntimeError, match="key_padding_mask must be bool"):
        OP(q, q, q, None, None, torch.ones(1, 8), 0, 0, "causal", False, 0.25)
    with pytest.raises(RuntimeError, match="past_k and past_v must be given together"):
        OP(q, q, q, q, None, None, 0, 0, "causal", False, 0.25)
    with pytest.raises(ValueError, match="dropout_p > 0 is not supported by the cpu backend"):
        memory_attention(q, q, q, backend="cpu", dropout_p=0.1)


def test_other_dtypes_fall_back_to_cpu_flash():
    inp = _inputs(torch.float64, batch=1, hq=2, hkv=1, length=12, past=3, dim=8)
    out = memory_attention(**inp, mask="rmt", num_read=2, backend="cpu")
    ref, _ = reference_memory_attention(**inp, num_read=2, mask="rmt")
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)


def test_missing_op_falls_back(monkeypatch):
    """An extension built without the op: the cpu_flash path, same results."""
    monkeypatch.setattr(cpu_kernel, "HAS_CPU_KERNEL", False)
    called = []
    monkeypatch.setattr(torch.ops.rmt_fast, "memory_attention_cpu",
                        lambda *a: called.append(1), raising=False)
    inp = _inputs(torch.float32, batch=1, hq=2, hkv=1, length=12, past=3, dim=8)
    layout = AttentionLayout(2, 1, "rmt", False, 0.3)
    out, _ = cpu_kernel.cpu_kernel_memory_attention(inp["q"], inp["k"], inp["v"], inp["past_k"],
                                                    inp["past_v"], None, layout)
    ref, _ = reference_memory_attention(**inp, layout=layout)
    assert not called
    torch.testing.assert_close(out, ref, atol=2e-6, rtol=0)


def test_auto_uses_the_kernel_where_preferred(monkeypatch):
    calls = []
    real = cpu_kernel.cpu_kernel_memory_attention
    monkeypatch.setattr(cpu_kernel, "cpu_kernel_memory_attention",
                        lambda *a: calls.append(1) or real(*a))
    q = torch.randn(1, 2, 40, 16)
    memory_attention(q, q, q, mask="rmt", num_read=2)
    assert calls == ([1] if cpu_kernel.preferred(q) else [])
    calls.clear()
    memory_attention(q, q, q, mask="rmt", num_read=2, dropout_p=0.1)  # dropout: never the kernel
    assert calls == []


@pytest.mark.parametrize("mask,past,pad", [("causal", 0, False), ("causal", 5, False),
                                            ("causal", 0, True), ("rmt", 6, True), ("full", 0, False)])
def test_auto_runs_sdpa_for_bf16_inference_on_amx(monkeypatch, mask, past, pad):
    """On a CPU whose ATen runs bf16 products on AMX (patched), bf16 calls needing no gradient go
    to SDPA (neither the kernel nor the cpu_flash path), with the same attention as the float64
    reference; with a gradient, the log-sum-exp or float32 they do not."""
    monkeypatch.setattr(cpu_kernel, "sdpa_beats_kernel_bf16", lambda: True)
    calls = []
    real = cpu_kernel.cpu_kernel_memory_attention
    monkeypatch.setattr(cpu_kernel, "cpu_kernel_memory_attention",
                        lambda *a: calls.append("kernel") or real(*a))
    import rmt_fast.attention as attention_mod

    real_flash = attention_mod.cpu_flash_memory_attention
    monkeypatch.setattr(attention_mod, "cpu_flash_memory_attention",
                        lambda *a, **k: calls.append("flash") or real_flash(*a, **k))
    inp = _inputs(torch.bfloat16, length=40, past=past, dim=16, pad=pad, seed=11)
    kw = dict(num_read=3, num_write=2, mask=mask)
    with torch.no_grad():
        out = memory_attention(**inp, **kw)
    assert calls == []
    ref, _ = reference_memory_attention(**{k: v.double() if v.is_floating_point() else v
                                           for k, v in inp.items()},
                                        layout=AttentionLayout(3, 2, mask))
    assert (out.double() - ref).abs().max() <= 2e-2 * max(1.0, ref.abs().max().item())
    monkeypatch.setattr(cpu_kernel, "SDPA_MASK_MAX_ELEMENTS", 0)  # a mask too large to build
    with torch.no_grad():
        memory_attention(**inp, **kw)
    plain = mask == "causal" and not past and not pad  # SDPA's own causal mask: nothing built
    assert calls == ([] if plain else ["kernel" if cpu_kernel.preferred(inp["q"]) else "flash"])
    calls.clear()
    with torch.no_grad():
        memory_attention(**inp, **kw, return_lse=True)  # the log-sum-exp: not SDPA
    assert calls and all(c in ("kernel", "flash") for c in calls)
    calls.clear()
    q = inp["q"].clone().requires_grad_()
    memory_attention(**{**inp, "q": q}, **kw).sum().backward()  # a gradient: not SDPA
    assert calls == ["kernel" if cpu_kernel.preferred(q) else "flash"]
    calls.clear()
    with torch.no_grad():
        memory_attention(**{k: v.float() if v.is_floating_point() else v for k, v in inp.items()}, **kw)
    assert calls == ["kernel" if cpu_kernel.preferred(inp["q"].float()) else "flash"]


def test_auto_path_rule(monkeypatch):
    q32, q16 = torch.randn(1, 2, 8, 16), torch.randn(1, 2, 8, 16).bfloat16()
    kernel = "cpu" if cpu_kernel.preferred(q16) else "torch"
    for amx in (False, True):
        monkeypatch.setattr(cpu_kernel, "sdpa_beats_kernel_bf16", lambda amx=amx: amx)
        assert cpu_kernel.auto_path(q16, needs_grad=False) == ("sdpa" if amx else kernel)
        assert cpu_kernel.auto_path(q16, needs_grad=True) == kernel
        assert cpu_kernel.auto_path(q16, needs_grad=False, return_lse=True) == kernel
        big = cpu_kernel.SDPA_MASK_MAX_ELEMENTS
        assert cpu_kernel.auto_path(q16, needs_grad=False, mask_elements=big) == ("sdpa" if amx else kernel)
        assert cpu_kernel.auto_path(q16, needs_grad=False, mask_elements=big + 1) == kernel
        fp32 = "cpu" if cpu_kernel.preferred(q32) else "torch"
        assert cpu_kernel.auto_path(q32, needs_grad=False) == fp32


@pytest.mark.parametrize("path,kernel", [("amx", False), ("avx512_bf16", True),
                                         ("avx512", True), ("avx2", True), ("generic", False),
                                         (None, False)])
def test_auto_takes_the_kernel_on_its_vector_paths(monkeypatch, path, kernel):
    """backend="auto" on CPU: the kernel where its float32 path is AVX-512 or AVX2 (measured
    faster than cpu_flash, bench/README.md), cpu_flash on the portable path (0.3-0.5x)."""
    monkeypatch.setattr(cpu_kernel, "_auto_isa", lambda dtype=torch.float32: path)
    q = torch.randn(1, 2, 8, 16)
    assert cpu_kernel.preferred(q) == kernel
    assert cpu_kernel.auto_path(q, needs_grad=True) == ("cpu" if kernel else "torch")
    assert not cpu_kernel.preferred(q.double())


@pytest.mark.parametrize("aten,path,sdpa", [(False, "amx", False), (False, "avx512", False),
                                             (True, "avx512", True), (True, "avx512_bf16", True),
                                             (True, "amx", False), (True, None, True)])
def test_sdpa_only_where_the_kernel_has_no_amx_path(monkeypatch, aten, path, sdpa):
    """ATen on AMX beat the kernel's vector paths on bf16 inference, not its AMX path."""
    monkeypatch.setattr(cpu_kernel, "aten_amx", lambda: aten)
    monkeypatch.setattr(cpu_kernel, "_auto_isa", lambda dtype=torch.float32: path)
    assert cpu_kernel.sdpa_beats_kernel_bf16() == sdpa


def test_bench_systems_agree_and_restore_the_isa(monkeypatch):
    """rmt_fast.bench.cpu_attention on a tiny case: every system (and ISA variant) computes the
    same attention, forward and backward; the ISA cap is put back afterwards."""
    import os

    from rmt_fast.bench import cpu_attention as bench

    monkeypatch.delenv("RMT_FAST_CPU_ISA", raising=False)
    case = bench.Case("tiny", 2, 2, 12, memory=2, past=5, mask="rmt", head_dim=16)
    systems = bench.SYSTEMS + bench.ISA_VARIANTS + bench.ROWS_SYSTEMS
    for mode in ("fwd", "fwd+bwd"):
        rows = bench.run_case(case, torch.float32, mode, systems, rounds=1, min_sample_s=0.0)
        assert [r["system"] for r in rows] == list(systems)
        assert all(r["max_diff"] < 1e-5 and r["gflops"] > 0 for r in rows), rows
    assert "RMT_FAST_CPU_ISA" not in os.environ and "RMT_FAST_CPU_ROWS_MAX" not in os.environ
    decode = bench.Case("decode", 1, 2, 1, memory=0, past=20, head_dim=16)
    rows = bench.run_case(decode, torch.float32, "fwd", bench.ROWS_SYSTEMS, rounds=1, min_sample_s=0.0)
    assert all(r["max_diff"] < 1e-5 for r in rows), rows
    assert "RMT_FAST_CPU_ROWS_MAX" not in os.environ


def test_profile_read_restores_the_switches():
    from rmt_fast import _extension
    from rmt_fast.bench import profile_read

    gelu, auto_path = _extension.GELU_TANH_DTYPES, cpu_kernel.auto_path
    rule = cpu_kernel.sdpa_beats_kernel_bf16
    for dtype in ("float32", "bfloat16"):
        rates = profile_read.main(["--config", "tiny", "--dtype", dtype, "--tokens", "64",
                                   "--rounds", "1", "--rows", "3"])
        assert set(rates) == set(profile_read.VARIANTS) and all(r > 0 for r in rates.values())
        assert _extension.GELU_TANH_DTYPES == gelu and cpu_kernel.auto_path is auto_path
        assert cpu_kernel.sdpa_beats_kernel_bf16 is rule
        assert _extension.HAS_LAYER_NORM


def test_train_paths_runs_every_path_and_restores_the_env(monkeypatch):
    import os

    from rmt_fast import _extension
    from rmt_fast.bench import train_paths

    monkeypatch.setenv("RMT_FAST_CPU_ISA", "generic")
    fast_gelu = _extension.HAS_GELU_TANH_BACKWARD
    rates = train_paths.main(["--config", "tiny", "--length", "32", "--batch", "1", "--rounds", "1"])
    assert os.environ["RMT_FAST_CPU_ISA"] == "generic"
    assert _extension.HAS_GELU_TANH_BACKWARD == fast_gelu
    monkeypatch.setenv("RMT_FAST_CPU_ISA", "amx")
    top = cpu_kernel.isa(torch.bfloat16)
    monkeypatch.delenv("RMT_FAST_CPU_ISA")
    paths = train_paths.PATHS[train_paths.PATHS.index(top):]
    assert set(rates) == {"float32", f"bf16 picked ({cpu_kernel.isa(torch.bfloat16)})",
                          *(f"bf16 {p}" for p in paths), train_paths.ATEN_GELU_ARM}
    assert all(best > 0 and med > 0 for best, med in rates.values())


# --- sliding window --------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask", MODES)
@pytest.mark.parametrize("window,past,pvr,pad", [(1, 0, False, False), (5, 37, False, True),
                                                 (40, 70, True, True), (70, 9, False, False),
                                                 (106, 37, True, False)])
def test_window_matches_reference(dtype, mask, window, past, pvr, pad):
    """A sliding window on the tiled path (L = 70: two row blocks; the window cuts past and
    current tiles, some whole, some in part), every mask, past keys, padding, GQA; window 1 (each
    causal row sees itself), windows shorter than a tile, one longer than the past, one that
    cuts only the first past key (106 = P + L - 1)."""
    inp = _inputs(dtype, past=past, pad=pad, seed=window + past)
    _check(inp, dict(num_read=5, num_write=6, mask=mask, past_visible_to_read=pvr, scale=0.3,
                     window=window), lse_grad=True)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", [1, 6, 300])
def test_window_every_code_path(isa, dtype, length, monkeypatch, top_isa):
    """Every code path with a window: one decoded token and a few rows over a long past (the
    in-place rows path) and 300 rows (tiles skipped before the window, whole visible tiles,
    tiles the window cuts), causal as the sliding-window layers of Mistral or gpt-oss."""
    monkeypatch.setenv("RMT_FAST_CPU_ISA", isa)
    inp = _inputs(dtype, batch=2, hq=4, hkv=2, length=length, past=150, dim=64, pad=True,
                  seed=length)
    _check(inp, dict(mask="causal", window=128), grads=length > 1, lse_grad=True)


def test_window_rows_outside_see_nothing():
    """Rows whose whole window is padding: zeros, lse -inf, zero gradients (and no NaN)."""
    inp = _inputs(torch.float32, batch=1, hq=2, hkv=1, length=40, past=0, dim=16, seed=3)
    kpm = torch.ones(1, 40, dtype=torch.bool)
    kpm[0, 10:30] = False  # rows 13-29 see only padded keys in their window of 4
    inp["key_padding_mask"] = kpm
    out, lse = memory_attention(**inp, mask="causal", window=4, backend="cpu", return_lse=True)
    ref_out, ref_lse = reference_memory_attention(**inp, mask="causal", window=4)
    empty = torch.isinf(ref_lse)
    assert empty[..., 13:30].all() and not empty[..., :13].any() and not empty[..., 30:].any()
    assert torch.equal(torch.isneginf(lse), empty) and (out[empty] == 0).all()
    grads = torch.autograd.grad(out.sum(), [inp["q"], inp["k"], inp["v"]])
    assert all(torch.isfinite(g).all() for g in grads)
    assert (grads[0][:, :, 13:30] == 0).all()
    _check(inp, dict(mask="causal", window=4))


def test_window_opcheck_and_bad_value():
    inp = _inputs(torch.float32, batch=1, hq=2, hkv=1, length=20, past=6, dim=16, pad=True)
    args = (inp["q"], inp["k"], inp["v"], inp["past_k"], inp["past_v"], inp["key_padding_mask"],
            2, 3, "rmt", False, 0.25, 7)
    torch.library.opcheck(OP, args)
    with pytest.raises(RuntimeError, match="window must be >= 0"):
        OP(*args[:-1], -1)
    for bad in (0, -3, 2.5, True):
        with pytest.raises(ValueError, match="window must be a positive int"):
            memory_attention(inp["q"], inp["k"], inp["v"], window=bad, backend="cpu")


# --- logit soft-capping (Gemma 2) ------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask", MODES)
@pytest.mark.parametrize("cap,window,past,pvr,pad", [(1.5, None, 0, False, False),
                                                     (3.0, None, 37, False, True),
                                                     (0.7, 40, 70, True, True),
                                                     (50.0, 5, 9, False, False)])
def test_softcap_matches_reference(dtype, mask, cap, window, past, pvr, pad):
    """Soft-capped scores on the tiled path (L = 70: two row blocks, mixed and whole tiles),
    every mask, past keys, padding, GQA, with and without a window; scale 1 makes the scores
    (std about 5) bite into caps of 0.7-3 (and Gemma 2's 50 barely), lse gradients included."""
    inp = _inputs(dtype, past=past, pad=pad, seed=past + int(cap * 10))
    _check(inp, dict(num_read=5, num_write=6, mask=mask, past_visible_to_read=pvr, scale=1.0,
                     window=window, softcap=cap), lse_grad=True)


@pytest.mark.parametrize("isa", ISAS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("length", [1, 6, 300])
def test_softcap_every_code_path(isa, dtype, length, monkeypatch, top_isa):
    """Every code path with a cap: one decoded token and a few rows over a long past (the
    in-place rows path) and 300 rows (tiles), causal with padding as a Gemma 2 layer."""
    monkeypatch.setenv("RMT_FAST_CPU_ISA", isa)
    inp = _inputs(dtype, batch=2, hq=4, hkv=2, length=length, past=150, dim=64, pad=True,
                  seed=length + 11)
    _check(inp, dict(mask="causal", scale=0.5, softcap=2.0), grads=length > 1, lse_grad=True)


def test_softcap_bites():
    """The inputs of the tests above are capped for real: the capped result is far from the
    uncapped one (so a kernel that ignored the cap would fail them)."""
    inp = _inputs(torch.float64, past=37, pad=True, seed=37 + 30)
    kw = dict(num_read=5, num_write=6, mask="rmt", scale=1.0)
    capped, _ = reference_memory_attention(**inp, **kw, softcap=3.0)
    plain, _ = reference_memory_attention(**inp, **kw)
    assert (capped - plain).abs().max() > 0.3


def test_softcap_opcheck_and_bad_value():
    inp = _inputs(torch.float32, batch=1, hq=2, hkv=1, length=20, past=6, dim=16, pad=True)
    args = (inp["q"], inp["k"], inp["v"], inp["past_k"], inp["past_v"], inp["key_padding_mask"],
            2, 3, "rmt", False, 0.25, 0, 1.5)
    torch.library.opcheck(OP, args)
    torch.library.opcheck(OP, args[:-2] + (7, 0.5))
    for bad in (-1.0, float("nan"), float("inf")):
        with pytest.raises(RuntimeError, match="softcap must be finite and >= 0"):
            OP(*args[:-1], bad)
    for bad in (0, -2.0, float("inf"), float("nan"), True, "1"):
        with pytest.raises(ValueError, match="softcap must be a positive finite float"):
            memory_attention(inp["q"], inp["k"], inp["v"], softcap=bad, backend="cpu")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_softcap_backends_agree(dtype):
    """``auto`` (the kernel for float32/bf16), ``"torch"`` (dense scores in float32) and
    ``"cpu"`` with float16 (the float64 reference fallback) all cap, within their dtype's error
    of the float64 reference, gradients included."""
    inp = _inputs(dtype, past=9, pad=True, seed=5)
    kw = dict(num_read=3, num_write=4, mask="rmt", scale=1.0, softcap=2.5)
    exact = {n: t.detach().double() if t.is_floating_point() else t for n, t in inp.items()}
    ref, _ = reference_memory_attention(**exact, **kw)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for backend in ("auto", "torch", "cpu"):
        out = memory_attention(**inp, **kw, backend=backend)
        assert out.dtype == dtype
        torch.testing.assert_close(out.double(), ref, atol=tol, rtol=0, msg=backend)
        grads = torch.autograd.grad(out.float().square().sum(), [inp["q"], inp["k"]])
        assert all(torch.isfinite(g).all() and g.abs().max() > 0 for g in grads)
