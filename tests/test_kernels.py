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
import triton  # noqa: E402
import triton.language as tl  # noqa: E402

from rmt_fast import memory_attention  # noqa: E402
from rmt_fast.masks import AttentionLayout, layout_visibility  # noqa: E402
from rmt_fast.ops.memory_attention.reference import reference_memory_attention  # noqa: E402
from rmt_fast.ops.memory_attention.triton import launch, triton_memory_attention  # noqa: E402
from rmt_fast.ops.memory_attention.triton.common import tanh_f32  # noqa: E402
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


def _decode_inputs(d: int, b=2, hq=2, hkv=1, length=5, past=70):
    """float32 ``q, k, v, past_k, past_v`` (no grad) and a random padding mask, from the global
    generator: a few query rows over a long past."""
    q = _rand(b, hq, length, d, dtype=torch.float32, grad=False)
    k, v = (_rand(b, hkv, length, d, dtype=torch.float32, grad=False) for _ in range(2))
    pk, pv = (_rand(b, hkv, past, d, dtype=torch.float32, grad=False) for _ in range(2))
    return q, k, v, pk, pv, torch.rand(b, past + length) > 0.2


@pytest.mark.parametrize("mask", MODES)
def test_decode_matches_reference(mask):
    torch.manual_seed(7)
    dt, d = torch.float32, 16
    q, k, v, pk, pv, kpm = _decode_inputs(d)
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


def test_aot_window_variants_no_spills():
    """The kernels compiled with a sliding window (``HAS_WINDOW``): fp16 D=64 on both targets
    (wgmma on sm_90a), and on sm_80 the fp32 kernels that have their own window configs
    (with the plain configs ptxas spilled a few registers there)."""
    rows = _aot("--caps", "80", "90", "--dtypes", "fp16", "--head-dims", "64", "--kernels",
                "fwd_window", "bwd_dkdv_window", "bwd_dq_window", "decode_split_window")
    rows += _aot("--caps", "80", "--dtypes", "fp32", "--head-dims", "64", "128", "--kernels",
                 "fwd_window", "bwd_dkdv_window", "bwd_dq_window")
    assert len(rows) == 8 + 6
    for r in rows:
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert 0 < r["regs"] <= 255, r
        assert not (r["dtype"] == "fp32" and r["tf32"]), r
    assert all(r["wgmma"] for r in rows if r["target"] == "sm_90a" and r["kernel"] != "decode_split_window")


@pytest.mark.slow
def test_aot_full_sweep():
    rows = _aot()
    # 6 kernels + the 4 attention kernels with a window, with a soft-cap and with both
    assert len(rows) == 2 * 3 * 2 * 18
    hopper_bf16_fwd = [r for r in rows if r["kernel"] == "fwd" and r["dtype"] == "bf16"
                       and r["target"] == "sm_90a"]
    assert hopper_bf16_fwd and all(r["wgmma"] for r in hopper_bf16_fwd)
    assert not any(r["tf32"] for r in rows if r["dtype"] == "fp32")
    assert not any(r["spill_stores"] or r["spill_loads"] for r in rows)


# --- sliding window (AttentionLayout.window) --------------------------------------------------
# The interpreter runs 16 x 16 tiles (launch.INTERPRET_CONFIG): windows 1, 5 (< BLOCK_N), 16 and
# between, and >= P + L (no window) cover the loop-start shifts, tiles the window cuts and the
# interior tiles it does not.


def _inputs(b, hq, hkv, length, past, d, dt, past_grad=True):
    q = _rand(b, hq, length, d, dtype=dt)
    k, v = _rand(b, hkv, length, d, dtype=dt), _rand(b, hkv, length, d, dtype=dt)
    pk, pv = (_rand(b, hkv, past, d, dtype=dt, grad=past_grad) for _ in range(2))
    return q, k, v, pk, pv


@pytest.mark.parametrize("mask, window", [("causal", 1), ("rmt", 5), ("full", 31), ("bottleneck", 37)])
def test_window_past_gqa_fp32(mask, window):
    """fp32, GQA, past keys with grad hidden from read rows, no padding: interior tiles skip the
    element mask unless the window cuts them. Windows 31 (current keys) and 37 (past keys, P =
    22) cut some tiles by exactly one element: the last row of a block and the tile's first key."""
    torch.manual_seed(20)
    q, k, v, pk, pv = _inputs(1, 4, 2, 45, 22, 16, torch.float32)
    _check(q, k, v, past_k=pk, past_v=pv, num_read=3, num_write=4, mask=mask,
           past_visible_to_read=False, window=window, scale=16 ** -0.5)


@pytest.mark.parametrize("mask, window", [("causal", 16), ("rmt", 30), ("full", 2), ("bottleneck", 9)])
def test_window_past_to_read_padding_fp16(mask, window):
    """fp16, past visible to read rows, key padding, past keys with grad, D=32."""
    torch.manual_seed(21)
    q, k, v, pk, pv = _inputs(2, 2, 1, 50, 13, 32, torch.float16)
    kpm = torch.rand(2, 13 + 50) > 0.25
    _check(q, k, v, past_k=pk, past_v=pv, key_padding_mask=kpm, num_read=6, num_write=5,
           mask=mask, past_visible_to_read=True, window=window, scale=32 ** -0.5)


@pytest.mark.parametrize("mask, window", [("causal", 33), ("bottleneck", 12)])
def test_window_no_past_padding_fp32(mask, window):
    """No past buffer (``HAS_PAST=False``), L = 70 over five row blocks, key padding, GQA."""
    torch.manual_seed(27)
    dt = torch.float32
    q = _rand(2, 2, 70, 16, dtype=dt)
    k, v = _rand(2, 1, 70, 16, dtype=dt), _rand(2, 1, 70, 16, dtype=dt)
    kpm = torch.rand(2, 70) > 0.2
    _check(q, k, v, key_padding_mask=kpm, num_read=8, num_write=9, mask=mask, window=window,
           scale=16 ** -0.5)


def test_window_bf16():
    """bf16 (fp32-cast dots under the interpreter), GQA, past, padding."""
    torch.manual_seed(22)
    q, k, v, pk, pv = _inputs(1, 2, 1, 29, 11, 16, torch.bfloat16)
    kpm = torch.rand(1, 40) > 0.2
    _check(q, k, v, past_k=pk, past_v=pv, key_padding_mask=kpm, num_read=4, num_write=4,
           mask="rmt", window=7, scale=16 ** -0.5)


@pytest.mark.parametrize("case", ["window_only", "padding"])
def test_window_empty_row_blocks(case):
    """Whole row blocks that see no key: out 0, lse -inf, zero gradients (no NaN).

    ``window_only``: bottleneck without write rows, window 3: segment rows from 4 on see neither
    the read keys (too far back) nor the past. ``padding``: causal, window 4, current keys
    13..47 padded: rows 16..47 see only padded keys."""
    torch.manual_seed(23)
    q, k, v, pk, pv = _inputs(1, 2, 1, 60, 10, 16, torch.float32)
    if case == "window_only":
        kw = dict(num_read=2, num_write=0, mask="bottleneck", window=3)
    else:
        kpm = torch.ones(1, 70, dtype=torch.bool)
        kpm[0, 10 + 13:10 + 48] = False
        kw = dict(key_padding_mask=kpm, mask="causal", past_visible_to_read=True, window=4)
    _check(q, k, v, past_k=pk, past_v=pv, scale=0.25, **kw)
    ref_lse = reference_memory_attention(q, k, v, past_k=pk, past_v=pv, upcast=True, **kw)[1]
    assert torch.isinf(ref_lse[..., 16:48]).all()  # the case does empty two whole blocks
    out, lse = triton_memory_attention(q, k, v, past_k=pk, past_v=pv, scale=0.25, **kw)
    (gq,) = torch.autograd.grad((out * torch.randn_like(out)).sum(), (q,))
    assert (out[..., 16:48, :] == 0).all() and (gq[..., 16:48, :] == 0).all()
    assert (lse[..., 16:48] == float("-inf")).all()


def test_window_covering_all_keys_is_no_window():
    """A window of >= P + L keys hides nothing: the launcher runs the kernels without a window
    (bitwise the same results and gradients); P + L - 1 is the largest window that cuts."""
    torch.manual_seed(24)
    q, k, v, pk, pv = _inputs(1, 2, 1, 37, 19, 16, torch.float32)
    assert launch.layout_args(AttentionLayout(window=56), 19, 37)[:2] == (False, 0)
    assert launch.layout_args(AttentionLayout(window=55), 19, 37)[:2] == (True, 55)
    kw = dict(past_k=pk, past_v=pv, num_read=3, num_write=2, mask="rmt", scale=0.25)
    for window in (56, 1000):
        out, lse = triton_memory_attention(q, k, v, **kw)
        out_w, lse_w = triton_memory_attention(q, k, v, window=window, **kw)
        torch.testing.assert_close(out_w, out, rtol=0, atol=0)
        torch.testing.assert_close(lse_w, lse, rtol=0, atol=0)
        _assert_same_grads(out_w, out, (q, k, v, pk, pv))
    _check(q, k, v, window=55, **kw)


class _TileSpy:
    """Records the tiles the kernels visit: patches the ``@triton.jit`` tile helpers that the
    interpreted kernels look up in their modules' globals."""

    def __init__(self):
        import inspect

        from rmt_fast.ops.memory_attention.triton import bwd, fwd
        self.targets = [(fwd, "_fwd_tile", "fwd"), (bwd, "_dq_tile", "dq"),
                        (bwd, "_dkdv_tile", "dkdv")]
        self.sigs = {name: inspect.signature(getattr(mod, name).fn) for mod, name, _ in self.targets}
        self.tiles = []

    def _spy(self, mod, name, kind):
        orig = getattr(mod, name)

        def spy(*a, **kw):
            args = self.sigs[name].bind(*a, **kw).arguments
            m0 = args["m0"] if kind == "dkdv" else int(args["offs_m"].handle.data[0])
            self.tiles.append(dict(kind=kind, m0=int(m0), n0=int(args["n0"]),
                                   past=bool(args["IS_PAST"]), n_len=int(args["n_len"].handle.data[0])
                                   if hasattr(args["n_len"], "handle") else int(args["n_len"]),
                                   need_mask=bool(args["need_mask"].handle.data.item())
                                   if hasattr(args["need_mask"], "handle") else bool(args["need_mask"])))
            return orig(*a, **kw)
        return spy

    def __enter__(self):
        self.saved = [(mod, name, getattr(mod, name)) for mod, name, _ in self.targets]
        for mod, name, kind in self.targets:
            setattr(mod, name, self._spy(mod, name, kind))
        return self

    def __exit__(self, *exc):
        for mod, name, orig in self.saved:
            setattr(mod, name, orig)


@pytest.mark.parametrize("mask, window", [("full", 31), ("causal", 23)])
def test_window_skips_key_blocks(mask, window):
    """Block skipping, read off the tiles the forward, dQ and dK/dV kernels visit: with a window
    they visit a subset of the tiles without one, none that lies wholly outside the window of
    every row of its block, every tile where some row sees some key, and every tile the window
    cuts for some row is masked (31 and 23 cut some current and past tiles by one element)."""
    torch.manual_seed(25)
    dt = torch.float32
    length, past, bm = 64, 40, launch.INTERPRET_CONFIG.block_m
    q, k, v, pk, pv = (t.detach() for t in _inputs(1, 1, 1, length, past, 16, dt))
    visited = {}
    for w in (None, window):
        layout = AttentionLayout(num_read=3, mask=mask, window=w, scale=0.25)
        with _TileSpy() as spy:
            out, lse = launch.forward(q, k, v, pk, pv, None, layout)
            launch.backward(torch.randn_like(out), q, k, v, pk, pv, None, out, lse, layout, True)
        visited[w] = spy.tiles
    vis = layout_visibility(AttentionLayout(num_read=3, mask=mask, window=window), length, past)
    for kind in ("fwd", "dq", "dkdv"):
        tiles = [t for t in visited[window] if t["kind"] == kind]
        keys = {(t["m0"], t["n0"], t["past"]) for t in tiles}
        assert keys <= {(t["m0"], t["n0"], t["past"]) for t in visited[None] if t["kind"] == kind}
        assert len(tiles) < len([t for t in visited[None] if t["kind"] == kind]), kind
        for t in tiles:
            c0 = t["n0"] - (past if t["past"] else 0)  # keys in the rows' frame
            c_last = min(t["n0"] + bm, t["n_len"]) - 1 - (past if t["past"] else 0)
            assert t["m0"] - c_last < window, (kind, t)  # some row's window reaches the tile
            if min(t["m0"] + bm, length) - 1 - c0 >= window:  # the window cuts it for a row
                assert t["need_mask"], (kind, t)
        needed = [(m0, n0, True) for m0 in range(0, length, bm) for n0 in range(0, past, bm)
                  if vis[m0:m0 + bm, n0:min(n0 + bm, past)].any()]
        needed += [(m0, n0, False) for m0 in range(0, length, bm) for n0 in range(0, length, bm)
                   if vis[m0:m0 + bm, past + n0:past + min(n0 + bm, length)].any()]
        assert set(needed) <= keys, (kind, set(needed) - keys)


@pytest.mark.parametrize("mask, window, to_read", [("causal", 1, False), ("causal", 3, False),
                                                   ("rmt", 20, True), ("full", 40, False),
                                                   ("bottleneck", 74, True)])
def test_decode_window(mask, window, to_read):
    """Flash-decoding with a window: past splits before the window are not launched (window 3:
    row 1, the first to see the past, sees just its last key; window 1: no row sees it)."""
    torch.manual_seed(26)
    dt, d = torch.float32, 16
    q, k, v, pk, pv, kpm = _decode_inputs(d)
    past = pk.shape[2]
    layout = AttentionLayout(1, 2, mask, to_read, d ** -0.5, window)
    grids = []
    orig = launch.decode_split_kernel

    class Spy:
        def __getitem__(self, grid):
            grids.append(grid)
            return orig[grid]

    launch.decode_split_kernel = Spy()
    try:
        out, lse = launch.decode(*launch.prepare(q, k, v, pk, pv, kpm), layout, split_size=16)
    finally:
        launch.decode_split_kernel = orig
    kw = dict(num_read=1, num_write=2, mask=mask, past_k=pk, past_v=pv, key_padding_mask=kpm,
              past_visible_to_read=to_read, scale=d ** -0.5, window=window)
    ref_out, ref_lse = reference_memory_attention(q, k, v, upcast=True, **kw)
    low_out, low_lse = reference_memory_attention(q, k, v, upcast=False, **kw)
    _close("decode out", out, ref_out.double(), low_out, 2, dt)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    assert (out[~fin] == 0).all()
    _close("decode lse", lse[fin], ref_lse[fin].double(), low_lse[fin], 2, dt)
    # the first row that sees the past sits at P + first; it sees past keys > P + first - window
    # (none when first + 1 >= window); 16-key splits start at the block of the first such key
    first = 0 if to_read else 1
    visible = [a for a in range(past) if past + first - a < window]
    n_past = -(-(past - visible[0] // 16 * 16) // 16) if visible else 0
    assert grids[0][0] == n_past + 1  # + one split of the 5 current keys


def test_window_through_custom_op_and_opcheck():
    """The window travels through the custom op (forward and backward) and its schema."""
    q, k, v, pk, pv = _op_inputs(5)
    args = (q, k, v, pk, pv, None, 2, 2, "rmt", False, 0.25)
    out, lse = memory_attention_op(*args, 3)
    ref_out, ref_lse = triton_memory_attention(q, k, v, past_k=pk, past_v=pv, num_read=2,
                                               num_write=2, mask="rmt", scale=0.25, window=3)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    _assert_same_grads(out, ref_out, (q, k, v, pk, pv))
    no_window = memory_attention_op(*args)[0]
    assert not torch.equal(no_window, out)
    res = torch.library.opcheck(torch.ops.rmt_fast.triton_memory_attention.default, (*args, 3),
                                test_utils=OPCHECKS)
    assert res == {name: "SUCCESS" for name in OPCHECKS}


def test_unknown_layout_field_is_refused():
    """A layout field the kernels do not implement raises instead of being dropped."""
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Extended(AttentionLayout):
        extra: int = 0

    x = torch.randn(1, 1, 4, 16)
    launch.check_layout(Extended(scale=1.0))  # at its default: nothing to drop
    with pytest.raises(NotImplementedError, match="extra"):
        launch.forward(x, x, x, None, None, None, Extended(scale=1.0, extra=1))
    with pytest.raises(NotImplementedError):
        triton_memory_attention(x, x, x, Extended(extra=1))


# --- logit soft-capping (AttentionLayout.softcap) ---------------------------------------------
# Gemma 2 caps at 50, above most of its scores; here the caps are small and q is scaled up so
# that most scores are several caps large: a kernel that drops the cap, caps the masked -inf
# scores or leaves out the cap's derivative in the backward is far off (_check_softcap makes
# sure of the first).


def _capped_inputs(b, hq, hkv, length, past, d, dt, q_mult=6.0, past_grad=True):
    """q ``[b, hq, length, d]`` scaled by ``q_mult`` (scores of several caps), k, v and the
    past (``[b, hkv, past, d]``, None when ``past`` is 0) standard normal."""
    q = (torch.randn(b, hq, length, d, dtype=torch.float64) * q_mult).to(dt).requires_grad_()
    k, v = _rand(b, hkv, length, d, dtype=dt), _rand(b, hkv, length, d, dtype=dt)
    if not past:
        return q, k, v, None, None
    pk, pv = (_rand(b, hkv, past, d, dtype=dt, grad=past_grad) for _ in range(2))
    return q, k, v, pk, pv


def _check_softcap(q, k, v, **kw):
    """:func:`_check` with ``kw["softcap"]``, after checking that the cap bites: without it the
    float64 reference's output moves by far more than any tolerance."""
    plain_kw = {key: val for key, val in kw.items() if key not in ("softcap", "via_api")}
    with torch.no_grad():
        plain = reference_memory_attention(q, k, v, upcast=True, **plain_kw)[0]
        capped = reference_memory_attention(q, k, v, upcast=True, softcap=kw["softcap"],
                                            **plain_kw)[0]
    assert (capped - plain).abs().max() > 0.2
    _check(q, k, v, **kw)


@pytest.mark.parametrize("window", [None, 9])
@pytest.mark.parametrize("mask", MODES)
def test_softcap_past_padding_gqa_fp32(mask, window):
    """fp32, cap 2.5, GQA 4:2, past keys with grad hidden from read rows, key padding (batch
    row 1 with its current keys all padded), with and without a window that cuts (P = 22,
    L = 45); loss on out and lse."""
    torch.manual_seed(40)
    q, k, v, pk, pv = _capped_inputs(2, 4, 2, 45, 22, 16, torch.float32)
    kpm = torch.rand(2, 22 + 45) > 0.25
    kpm[1, 22:] = False
    _check_softcap(q, k, v, past_k=pk, past_v=pv, key_padding_mask=kpm, num_read=3, num_write=4,
                   mask=mask, past_visible_to_read=False, window=window, softcap=2.5, scale=0.25)


@pytest.mark.parametrize("mask, window", [("causal", 16), ("rmt", None), ("full", 30),
                                          ("bottleneck", None)])
def test_softcap_past_to_read_padding_fp16(mask, window):
    """fp16, cap 4, past visible to read rows, key padding, past keys with grad, D=32."""
    torch.manual_seed(41)
    q, k, v, pk, pv = _capped_inputs(2, 2, 1, 50, 13, 32, torch.float16, q_mult=5.0)
    kpm = torch.rand(2, 13 + 50) > 0.25
    _check_softcap(q, k, v, past_k=pk, past_v=pv, key_padding_mask=kpm, num_read=6, num_write=5,
                   mask=mask, past_visible_to_read=True, window=window, softcap=4.0,
                   scale=32 ** -0.5)


def test_softcap_no_past_bf16_via_api():
    """bf16 through ``memory_attention(backend="triton", softcap=...)``: no past buffer
    (``HAS_PAST=False``), GQA, a window."""
    torch.manual_seed(42)
    q, k, v, _, _ = _capped_inputs(2, 2, 1, 37, 0, 16, torch.bfloat16)
    _check_softcap(q, k, v, num_read=4, num_write=4, mask="rmt", window=20, softcap=3.0,
                   scale=0.25, via_api=True)


def test_softcap_past_without_grad_fp32():
    """Past keys without grad (no past dK/dV launch), no GQA, cap 2."""
    torch.manual_seed(45)
    q, k, v, pk, pv = _capped_inputs(1, 2, 2, 29, 17, 16, torch.float32, past_grad=False)
    _check_softcap(q, k, v, past_k=pk, past_v=pv, num_read=2, num_write=3, mask="bottleneck",
                   softcap=2.0, scale=0.25)


def test_softcap_lse_only_loss():
    """A loss on the lse alone (``dout`` zeros): its gradient carries the cap's derivative too."""
    torch.manual_seed(43)
    q, k, v, pk, pv = _capped_inputs(1, 2, 1, 33, 9, 16, torch.float32)
    kw = dict(past_k=pk, past_v=pv, num_read=2, num_write=2, mask="rmt", scale=0.25, softcap=2.0)
    lse = triton_memory_attention(q, k, v, **kw)[1]
    ref_lse = reference_memory_attention(q, k, v, upcast=True, **kw)[1]
    low_lse = reference_memory_attention(q, k, v, upcast=False, **kw)[1]
    w = torch.randn(lse.shape, dtype=torch.float64)
    inputs = (q, k, pk)  # the lse does not depend on the values
    got = torch.autograd.grad((lse.double() * w).sum(), inputs)
    ref = torch.autograd.grad((ref_lse.double() * w).sum(), inputs)
    low = torch.autograd.grad((low_lse.double() * w).sum(), inputs)
    for i, (g, r, lo) in enumerate(zip(got, ref, low, strict=True)):
        _close(f"grad[{i}]", g, r.double(), lo, 3, torch.float32)
        assert r.abs().max() > 0.05  # every input gets a gradient worth checking


@pytest.mark.parametrize("mask, window, to_read", [("causal", None, False), ("rmt", 20, True),
                                                   ("full", None, True), ("bottleneck", 40, False)])
def test_decode_softcap(mask, window, to_read):
    """Flash-decoding (5 rows over 70 past keys, 16-key splits) with cap 2: the partial lse are
    of the capped scores, so the merge weights are too; batch row 1 sees only some keys."""
    torch.manual_seed(44)
    d = 16
    q, k, v, pk, pv, kpm = _decode_inputs(d)
    q = q * 6.0
    layout = AttentionLayout(1, 2, mask, to_read, d ** -0.5, window, 2.0)
    out, lse = launch.decode(*launch.prepare(q, k, v, pk, pv, kpm), layout, split_size=16)
    kw = dict(num_read=1, num_write=2, mask=mask, past_k=pk, past_v=pv, key_padding_mask=kpm,
              past_visible_to_read=to_read, scale=d ** -0.5, window=window)
    ref_out, ref_lse = reference_memory_attention(q, k, v, upcast=True, softcap=2.0, **kw)
    low_out, low_lse = reference_memory_attention(q, k, v, upcast=False, softcap=2.0, **kw)
    plain_out = reference_memory_attention(q, k, v, upcast=True, **kw)[0]
    assert (ref_out - plain_out).abs().max() > 0.2  # the cap bites
    _close("decode out", out, ref_out.double(), low_out, 2, torch.float32)
    fin = torch.isfinite(ref_lse)
    assert torch.equal(torch.isfinite(lse), fin)
    _close("decode lse", lse[fin], ref_lse[fin].double(), low_lse[fin], 2, torch.float32)


def test_softcap_through_custom_ops_and_opcheck():
    """The soft-cap travels through the custom op (forward and backward, after the window) and
    both ops' schemas; the backward op's opcheck with it and a gradient on the lse."""
    q, k, v, pk, pv = _op_inputs(5)
    q = (q.detach() * 6.0).requires_grad_()
    args = (q, k, v, pk, pv, None, 2, 2, "rmt", False, 0.25)
    out, lse = memory_attention_op(*args, 4, 2.0)
    ref_out, ref_lse = triton_memory_attention(q, k, v, past_k=pk, past_v=pv, num_read=2,
                                               num_write=2, mask="rmt", scale=0.25, window=4,
                                               softcap=2.0)
    torch.testing.assert_close(out, ref_out, rtol=0, atol=0)
    torch.testing.assert_close(lse, ref_lse, rtol=0, atol=0)
    _assert_same_grads(out + lse[..., None], ref_out + ref_lse[..., None], (q, k, v, pk, pv))
    assert not torch.equal(memory_attention_op(*args, 4)[0], out)
    res = torch.library.opcheck(torch.ops.rmt_fast.triton_memory_attention.default,
                                (*args, None, 2.0), test_utils=OPCHECKS)
    assert res == {name: "SUCCESS" for name in OPCHECKS}
    bwd_args = (torch.randn_like(out), q.detach(), k.detach(), v.detach(), pk.detach(),
                pv.detach(), None, out.detach(), lse.detach(), 2, 2, "rmt", False, 0.25, True,
                torch.randn_like(lse), 4, 2.0)
    res = torch.library.opcheck(torch.ops.rmt_fast.triton_memory_attention_bwd.default, bwd_args,
                                test_utils=OPCHECKS[:3])
    assert res == {name: "SUCCESS" for name in OPCHECKS[:3]}


@triton.jit
def _tanh_kernel(X, Y, n, BLOCK: tl.constexpr):
    """``Y = tanh_f32(X)``, float32 ``[n]``."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(Y + offs, tanh_f32(tl.load(X + offs, mask=offs < n, other=0.0)), mask=offs < n)


def test_tanh_f32_accuracy():
    """The kernels' ``tanh`` (written out; the interpreter has none in some Triton versions):
    relative error below 2e-7 from 1e-8 to 20 and both signs, 1 beyond, no NaN/overflow."""
    mag = torch.cat([torch.logspace(-8, 1.3, 20000, dtype=torch.float64),
                     torch.linspace(0.5, 0.75, 5001, dtype=torch.float64)])  # the branch switch
    x = torch.cat([mag, -mag, torch.tensor([0.0, 9.4, -9.6, 60.0, -1e4, 3e38])]).float()
    y = torch.empty_like(x)
    _tanh_kernel[(triton.cdiv(x.numel(), 1024),)](x, y, x.numel(), BLOCK=1024)
    ref = torch.tanh(x.double())
    rel = ((y.double() - ref).abs() / ref.abs().clamp_min(1e-300))[ref != 0]
    assert rel.max() < 2e-7, rel.max()
    assert y[-6:].tolist() == [0.0, 1.0, -1.0, 1.0, -1.0, 1.0]


def test_aot_softcap_variants_no_spills():
    """The kernels compiled with logit soft-capping (``HAS_SOFTCAP``), alone and with a window:
    fp16 D=64 on both targets, and the fp32 kernels that have their own soft-cap configs on
    both (with the plain and window configs ptxas spilled there), all spill-free. wgmma on
    sm_90a for the fp16 forward and dQ; the fp16 dK/dV soft-cap config's 32-key tile has none
    (and fp32 dots are IEEE FMA)."""
    kernels = [f"{k}{s}" for s in ("_softcap", "_window_softcap")
               for k in ("fwd", "bwd_dkdv", "bwd_dq", "decode_split")]
    rows = _aot("--caps", "80", "90", "--dtypes", "fp16", "--head-dims", "64", "--kernels",
                *kernels)
    rows += _aot("--caps", "80", "90", "--dtypes", "fp32", "--head-dims", "64", "128",
                 "--kernels", "bwd_dkdv_softcap", "bwd_dkdv_window_softcap", "bwd_dq_window_softcap")
    assert len(rows) == 16 + 12
    for r in rows:
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert 0 < r["regs"] <= 255, r
        assert not (r["dtype"] == "fp32" and r["tf32"]), r
    assert all(r["wgmma"] for r in rows if r["target"] == "sm_90a" and r["dtype"] == "fp16"
               and r["kernel"].startswith(("fwd", "bwd_dq")))
