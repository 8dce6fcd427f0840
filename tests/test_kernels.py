"""Triton kernels vs the float64 reference, run under the Triton interpreter (no GPU needed).

Tolerance (FlashAttention convention): the kernel's max error against the float64 reference
must be within 2x (3x for gradients) of the error of the same-dtype PyTorch reference, plus a
tiny absolute floor.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import json  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from rmt_fast import memory_attention  # noqa: E402
from rmt_fast.masks import AttentionLayout  # noqa: E402
from rmt_fast.ops.memory_attention.reference import reference_memory_attention  # noqa: E402
from rmt_fast.ops.memory_attention.triton import launch, triton_memory_attention  # noqa: E402
from rmt_fast.ops.memory_attention.triton.function import memory_attention_op  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOOR = {torch.float32: 1e-6, torch.float16: 1e-4, torch.bfloat16: 1e-3}


def _rand(*shape, dtype, grad=True):
    t = torch.randn(*shape, dtype=torch.float64).to(dtype)
    return t.requires_grad_(grad)


def _close(name, got, ref64, ref_lowp, mult, dtype):
    """``|got - ref64| <= mult * |ref_lowp - ref64| + floor`` (max norms), NaN-free."""
    assert got is not None, name
    assert not torch.isnan(got).any(), f"{name}: NaN (unwritten poisoned output?)"
    if got.numel() == 0:
        return
    err = (got.double() - ref64).abs().max().item()
    base = (ref_lowp.double() - ref64).abs().max().item()
    assert err <= mult * base + FLOOR[dtype], f"{name}: err {err:.3e} vs base {base:.3e}"


def _check(q, k, v, *, past_k=None, past_v=None, key_padding_mask=None, grads=True, via_api=False,
           lse_grad=True, **layout):
    """Run the kernel forward (+ backward) and compare out, lse and every gradient (of a loss
    on out and, with ``lse_grad``, on the lse too)."""
    dtype = q.dtype
    kw = dict(past_k=past_k, past_v=past_v, key_padding_mask=key_padding_mask, **layout)
    if via_api:
        out, lse = memory_attention(q, k, v, backend="triton", return_lse=True, **kw)
    else:
        out, lse = triton_memory_attention(q, k, v, **kw)
    assert out.dtype == dtype and lse.dtype == torch.float32
    ref_out, ref_lse = reference_memory_attention(q, k, v, upcast=True, **kw)
    low_out, low_lse = reference_memory_attention(q, k, v, upcast=False, **kw)
    _close("out", out, ref_out.double(), low_out, 2, dtype)
    # empty rows: exactly zero output and lse -inf, same rows as the reference
    empty = torch.isinf(ref_lse)
    assert torch.equal(torch.isinf(lse) & (lse < 0), empty)
    assert (out[empty] == 0).all()
    fin = ~empty
    _close("lse", lse[fin], ref_lse[fin].double(), low_lse[fin], 2, dtype)
    if not grads:
        return
    inputs = [t for t in (q, k, v, past_k, past_v) if t is not None and t.requires_grad]
    dout = torch.randn(out.shape, dtype=torch.float64)
    wl = torch.randn(lse.shape, dtype=torch.float64) if lse_grad else None

    def loss(o, lo):
        total = (o.double() * dout).sum()
        if wl is not None:  # empty rows (lse -inf) carry no lse term
            total = total + (lo.double().masked_fill(torch.isinf(lo), 0) * wl).sum()
        return total

    got = torch.autograd.grad(loss(out, lse), inputs)
    ref = torch.autograd.grad(loss(ref_out, ref_lse), inputs)
    low = torch.autograd.grad(loss(low_out, low_lse), inputs)
    for i, (g, r, lo) in enumerate(zip(got, ref, low, strict=True)):
        _close(f"grad[{i}]", g, r.double(), lo, 3, dtype)


MODES = ["causal", "rmt", "full", "bottleneck"]


@pytest.mark.parametrize("mask", MODES)
def test_memory_rows_no_past_fp32_gqa(mask):
    torch.manual_seed(0)
    b, hq, hkv, length, d = 2, 2, 1, 40, 16  # ragged L (40 = 2.5 blocks of 16)
    q, k, v = _rand(b, hq, length, d, dtype=torch.float32), *(
        _rand(b, hkv, length, d, dtype=torch.float32) for _ in range(2))
    _check(q, k, v, num_read=5, num_write=6, mask=mask, scale=d ** -0.5)


@pytest.mark.parametrize("mask", MODES)
def test_past_with_grad_padding_fp32(mask):
    """Past keys with grad, hidden from read rows, key padding with a fully padded batch row."""
    torch.manual_seed(1)
    b, hq, hkv, length, past, d = 2, 4, 2, 37, 19, 32
    dt = torch.float32
    q = _rand(b, hq, length, d, dtype=dt)
    k, v = _rand(b, hkv, length, d, dtype=dt), _rand(b, hkv, length, d, dtype=dt)
    pk, pv = _rand(b, hkv, past, d, dtype=dt), _rand(b, hkv, past, d, dtype=dt)
    kpm = torch.rand(b, past + length) > 0.3
    kpm[1] = False  # batch row 1 sees nothing at all
    _check(q, k, v, past_k=pk, past_v=pv, key_padding_mask=kpm, num_read=3, num_write=4,
           mask=mask, past_visible_to_read=False, scale=0.3)


@pytest.mark.parametrize("mask", MODES)
def test_past_no_grad_fp16(mask):
    """fp16, past without grad (no past dK/dV launch), past visible to read rows, big R and W."""
    torch.manual_seed(2)
    b, hq, hkv, length, past, d = 1, 2, 1, 50, 7, 16
    dt = torch.float16
    q = _rand(b, hq, length, d, dtype=dt)
    k, v = _rand(b, hkv, length, d, dtype=dt), _rand(b, hkv, length, d, dtype=dt)
    pk, pv = (_rand(b, hkv, past, d, dtype=dt, grad=False) for _ in range(2))
    _check(q, k, v, past_k=pk, past_v=pv, num_read=18, num_write=17, mask=mask,
           past_visible_to_read=True, scale=d ** -0.5)


def test_no_memory_rows_fp16_past_grad():
    torch.manual_seed(3)
    dt = torch.float16
    q = _rand(1, 2, 33, 32, dtype=dt)
    k, v = _rand(1, 2, 33, 32, dtype=dt), _rand(1, 2, 33, 32, dtype=dt)
    pk, pv = _rand(1, 2, 20, 32, dtype=dt), _rand(1, 2, 20, 32, dtype=dt)
    _check(q, k, v, past_k=pk, past_v=pv, num_read=0, num_write=0, mask="causal",
           scale=32 ** -0.5, lse_grad=False)


def test_bf16_end_to_end_via_api():
    """bf16 via rmt_fast.memory_attention(backend="triton"); fp32-cast dots when interpreted."""
    torch.manual_seed(4)
    dt = torch.bfloat16
    q = _rand(2, 2, 29, 16, dtype=dt)
    k, v = _rand(2, 1, 29, 16, dtype=dt), _rand(2, 1, 29, 16, dtype=dt)
    pk, pv = _rand(2, 1, 11, 16, dtype=dt), _rand(2, 1, 11, 16, dtype=dt)
    _check(q, k, v, past_k=pk, past_v=pv, num_read=4, num_write=4, mask="rmt",
           past_visible_to_read=False, scale=16 ** -0.5, via_api=True)


def test_head_dim_80_padded():
    """D=80 runs with BLOCK_D=128 and masked loads along D."""
    torch.manual_seed(5)
    dt = torch.float32
    q = _rand(1, 1, 20, 80, dtype=dt)
    k, v = _rand(1, 1, 20, 80, dtype=dt), _rand(1, 1, 20, 80, dtype=dt)
    _check(q, k, v, num_read=2, num_write=3, mask="bottleneck", scale=80 ** -0.5, lse_grad=False)


def test_every_read_row_blind():
    """All rows are read rows that may not see the past; past keys get zero gradient."""
    torch.manual_seed(6)
    dt = torch.float32
    q = _rand(1, 1, 18, 16, dtype=dt)
    k, v = _rand(1, 1, 18, 16, dtype=dt), _rand(1, 1, 18, 16, dtype=dt)
    pk, pv = _rand(1, 1, 21, 16, dtype=dt), _rand(1, 1, 21, 16, dtype=dt)
    kpm = torch.ones(1, 39, dtype=torch.bool)
    kpm[0, 21:] = False  # no current key either: every row is empty
    _check(q, k, v, past_k=pk, past_v=pv, key_padding_mask=kpm, num_read=18, num_write=0,
           mask="rmt", scale=0.25)


@pytest.mark.parametrize("mask", MODES)
def test_decode_matches_reference(mask):
    torch.manual_seed(7)
    dt = torch.float32
    b, hq, hkv, length, past, d = 2, 2, 1, 5, 70, 16
    q = _rand(b, hq, length, d, dtype=dt, grad=False)
    k, v = (_rand(b, hkv, length, d, dtype=dt, grad=False) for _ in range(2))
    pk, pv = (_rand(b, hkv, past, d, dtype=dt, grad=False) for _ in range(2))
    kpm = torch.rand(b, past + length) > 0.2
    kpm[1, :] = False
    layout = AttentionLayout(1, 2, mask, False, d ** -0.5)
    out, lse = launch.decode(*launch.prepare(q, k, v, pk, pv, kpm), layout, split_size=16)
    kw = dict(num_read=1, num_write=2, mask=mask, past_k=pk, past_v=pv, key_padding_mask=kpm,
              scale=d ** -0.5)
    ref_out, ref_lse = reference_memory_attention(q, k, v, upcast=True, **kw)
    low_out, low_lse = reference_memory_attention(q, k, v, upcast=False, **kw)
    _close("decode out", out, ref_out.double(), low_out, 2, dt)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    _close("decode lse", lse[fin], ref_lse[fin].double(), low_lse[fin], 2, dt)


def test_decode_dispatch_under_no_grad():
    """Few rows, many keys, no grad: the entry point takes the flash-decoding path."""
    torch.manual_seed(8)
    dt = torch.float32
    q = _rand(1, 2, 3, 16, dtype=dt, grad=False)
    k, v = (_rand(1, 2, 3, 16, dtype=dt, grad=False) for _ in range(2))
    pk, pv = (_rand(1, 2, 260, 16, dtype=dt, grad=False) for _ in range(2))
    calls = []
    orig = launch.decode

    def spy(*a, **kw):
        calls.append(1)
        return orig(*a, **kw)

    launch.decode = spy
    try:
        _check(q, k, v, past_k=pk, past_v=pv, mask="rmt", num_read=1, num_write=1,
               scale=0.25, grads=False)
    finally:
        launch.decode = orig
    assert calls == [1]


def test_poisoned_outputs_are_detected():
    """The launcher poisons outputs with NaN; a too-small grid would leave NaNs behind."""
    q = torch.randn(1, 1, 20, 16)
    out = torch.full_like(q, float("nan"))
    with pytest.raises(AssertionError, match="NaN"):
        _close("out", out, q.double(), q, 2, torch.float32)


def test_custom_op_matches_function():
    torch.manual_seed(9)
    dt = torch.float32
    q = _rand(1, 2, 21, 16, dtype=dt)
    k, v = _rand(1, 1, 21, 16, dtype=dt), _rand(1, 1, 21, 16, dtype=dt)
    pk, pv = _rand(1, 1, 9, 16, dtype=dt), _rand(1, 1, 9, 16, dtype=dt)
    args = dict(num_read=2, num_write=2, mask="rmt", past_visible_to_read=False, scale=0.25)
    out, lse = memory_attention_op(q, k, v, pk, pv, None, *args.values())
    ref_out, ref_lse = triton_memory_attention(q, k, v, past_k=pk, past_v=pv, **args)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=0)
    _assert_same_grads(out, ref_out, (q, k, v, pk, pv))


def _assert_same_grads(a: torch.Tensor, b: torch.Tensor, inputs: tuple) -> None:
    """The gradients of ``a`` and ``b`` w.r.t. ``inputs`` for one random upstream gradient are
    bitwise equal."""
    dout = torch.randn_like(a)
    for ga, gb in zip(torch.autograd.grad(a, inputs, dout), torch.autograd.grad(b, inputs, dout),
                      strict=True):
        torch.testing.assert_close(ga, gb, rtol=0, atol=0)


OPCHECKS = ("test_schema", "test_autograd_registration", "test_faketensor",
            "test_aot_dispatch_dynamic")


def _op_inputs(past_len):
    torch.manual_seed(10)
    q = _rand(1, 2, 9, 16, dtype=torch.float32)
    k, v = _rand(1, 1, 9, 16, dtype=torch.float32), _rand(1, 1, 9, 16, dtype=torch.float32)
    if past_len is None:
        return q, k, v, None, None
    return q, k, v, *(_rand(1, 1, past_len, 16, dtype=torch.float32) for _ in range(2))


@pytest.mark.parametrize("past_len", [None, 0, 5])
def test_custom_op_opcheck(past_len):
    """torch.library.opcheck on the forward op: schema, autograd registration, fake impl and
    the AOT-dispatch (dynamic shapes) forward + backward, all under the interpreter on CPU.
    ``past_len=0`` once returned 3 gradients for 5 inputs (an empty past lost its grads)."""
    q, k, v, pk, pv = _op_inputs(past_len)
    kpm = None if past_len is None else torch.rand(1, past_len + 9) > 0.2
    args = (q, k, v, pk, pv, kpm, 2, 2, "rmt", False, 0.25)
    res = torch.library.opcheck(torch.ops.rmt_fast.triton_memory_attention.default, args,
                                test_utils=OPCHECKS)
    assert res == {name: "SUCCESS" for name in OPCHECKS}


@pytest.mark.parametrize("with_grad_lse", [False, True])
def test_custom_bwd_op_opcheck(with_grad_lse):
    q, k, v, pk, pv = _op_inputs(5)
    out, lse = memory_attention_op(q, k, v, pk, pv, None, 2, 2, "bottleneck", True, 0.25)
    args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), pk.detach(), pv.detach(),
            None, out.detach(), lse.detach(), 2, 2, "bottleneck", True, 0.25, True,
            torch.randn_like(lse) if with_grad_lse else None)
    checks = OPCHECKS[:3]  # the backward op itself has no autograd formula to check
    res = torch.library.opcheck(torch.ops.rmt_fast.triton_memory_attention_bwd.default, args,
                                test_utils=checks)
    assert res == {name: "SUCCESS" for name in checks}


def test_torch_compile_traces_the_custom_op():
    """``torch.compile(backend="aot_eager", fullgraph=True)`` traces the op (fake tensors) into
    one graph, forward and backward, and gives the eager results bit for bit."""
    from torch._dynamo.testing import CompileCounterWithBackend

    q, k, v, pk, pv = _op_inputs(5)

    def fn(q, k, v, pk, pv):
        out, lse = torch.ops.rmt_fast.triton_memory_attention(q, k, v, pk, pv, None, 2, 2, "rmt",
                                                              False, 0.25)
        return out * 2.0 + lse[..., None]

    counter = CompileCounterWithBackend("aot_eager")
    compiled = torch.compile(fn, backend=counter, fullgraph=True)
    got = compiled(q, k, v, pk, pv)
    want = fn(q, k, v, pk, pv)
    assert counter.frame_count == 1 and counter.op_count >= 1
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    _assert_same_grads(got, want, (q, k, v, pk, pv))


def test_fp32_dots_use_ieee_precision():
    """fp32 inputs get ``input_precision="ieee"`` (TF32 would round to 10 mantissa bits on the
    GPU); fp16/bf16 keep Triton's default. The interpreter ignores the precision, so the
    compiled PTX is checked in the AOT tests."""
    assert launch.dot_precision(torch.float32) == "ieee"
    assert launch.dot_precision(torch.float16) == launch.dot_precision(torch.bfloat16) == "tf32"
    seen = []
    orig = launch.memory_attention_fwd_kernel

    class Spy:
        def __getitem__(self, grid):
            def run(*a, **kw):
                seen.append(kw["DOT_PREC"])
                return orig[grid](*a, **kw)
            return run

    launch.memory_attention_fwd_kernel = Spy()
    try:
        for dt in (torch.float32, torch.float16):
            x = torch.randn(1, 1, 4, 16, dtype=dt)
            launch.forward(x, x, x, None, None, None, AttentionLayout(scale=1.0))
    finally:
        launch.memory_attention_fwd_kernel = orig
    assert seen == ["ieee", "tf32"]


def test_cpu_without_interpreter_raises():
    code = ("import os; os.environ.pop('TRITON_INTERPRET', None); import triton, torch; "
            "from rmt_fast.ops.memory_attention.triton import triton_memory_attention as f; "
            "x = torch.randn(1, 1, 4, 16)\n"
            "try:\n    f(x, x, x)\nexcept RuntimeError as e:\n    print('RAISED', e)")
    env = {**os.environ, "PYTHONPATH": ROOT}
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=ROOT, timeout=120)
    assert "RAISED" in res.stdout and "TRITON_INTERPRET=1" in res.stdout, res.stderr[-2000:]


def _aot(*args, timeout=600):
    """Run the triton.aot module in a fresh process: triton.compile needs real @jit functions, and the
    interpreter (set in this process) replaces them."""
    env = {**os.environ, "PYTHONPATH": ROOT, "TRITON_DEFAULT_FP_FUSION": "1"}
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-m", "rmt_fast.ops.memory_attention.triton.aot", "--json",
                          *args],
                         capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_aot_fp16_d64_fwd_bwd_no_spills():
    rows = _aot("--caps", "80", "90", "--dtypes", "fp16", "--head-dims", "64", "--kernels",
                "fwd", "bwd_dkdv", "bwd_dq")
    assert len(rows) == 6
    for r in rows:
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert 0 < r["regs"] <= 255 and r["mma"], r
    assert all(r["wgmma"] for r in rows if r["target"] == "sm_90a")


def test_aot_fp32_ieee_no_tf32_no_spills():
    """fp32 forward and dQ on sm_80: no TF32 mma in the PTX, and still zero spills."""
    rows = _aot("--caps", "80", "--dtypes", "fp32", "--head-dims", "64", "--kernels", "fwd",
                "bwd_dq")
    assert len(rows) == 2
    for r in rows:
        assert not r["tf32"], r
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r


@pytest.mark.slow
def test_aot_full_sweep():
    rows = _aot()
    assert len(rows) == 2 * 3 * 2 * 6
    hopper_bf16_fwd = [r for r in rows if r["kernel"] == "fwd" and r["dtype"] == "bf16"
                       and r["target"] == "sm_90a"]
    assert hopper_bf16_fwd and all(r["wgmma"] for r in hopper_bf16_fwd)
    assert not any(r["tf32"] for r in rows if r["dtype"] == "fp32")
    assert not any(r["spill_stores"] or r["spill_loads"] for r in rows)
