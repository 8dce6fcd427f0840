"""memory_attention: the fused CPU path against the dense float64 reference."""

import itertools

import pytest
import torch
from helpers import attention_inputs, grads

from rmt_fast import memory_attention
from rmt_fast.masks import AttentionLayout, block_plan, dense_plan, dense_visibility
from rmt_fast.ops.memory_attention import cpu_flash

MODES = ["causal", "rmt", "full", "bottleneck"]


def _run(backend, inp, **kw):
    return memory_attention(**inp, backend=backend, return_lse=True, **kw)


@pytest.fixture(params=["blocks", "dense"])
def cpu_plan(request, monkeypatch):
    """Run the CPU path both ways: split into mask blocks, and one call with a small dense mask."""
    monkeypatch.setattr(cpu_flash, "DENSE_MAX_ELEMENTS", 0 if request.param == "blocks" else 10**9)
    return request.param


@pytest.mark.parametrize("mask", MODES)
@pytest.mark.parametrize("rw", [(0, 0), (3, 2), (4, 0), (0, 3)])
@pytest.mark.parametrize("past,pvr", [(0, False), (5, False), (5, True)])
@pytest.mark.parametrize("pad", [False, True])
def test_cpu_path_matches_reference_float64(mask, rw, past, pvr, pad, cpu_plan):
    inp = attention_inputs(past=past, pad=pad, length=13)
    kw = dict(num_read=rw[0], num_write=rw[1], mask=mask, past_visible_to_read=pvr)
    out, lse = _run("torch", inp, **kw)
    ref, ref_lse = _run("reference", inp, **kw)
    assert not torch.isnan(out).any()
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)
    assert torch.equal(torch.isinf(lse), torch.isinf(ref_lse))
    finite = torch.isfinite(ref_lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], atol=1e-6, rtol=0)
    tensors = [t for n, t in inp.items() if n != "key_padding_mask"]
    for a, b in zip(grads(out, tensors), grads(ref, tensors), strict=True):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=0)


@pytest.mark.parametrize("hq,hkv", [(4, 4), (4, 1), (6, 2)])
@pytest.mark.parametrize("length", [1, 7, 33])
def test_gqa_and_ragged_lengths(hq, hkv, length, cpu_plan):
    inp = attention_inputs(hq=hq, hkv=hkv, length=length, past=3)
    kw = dict(num_read=min(2, length), mask="rmt")
    out, _ = _run("torch", inp, **kw)
    ref, _ = _run("reference", inp, **kw)
    torch.testing.assert_close(out, ref, atol=1e-12, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mask", MODES)
def test_low_precision_error_bounded_by_pytorch_error(dtype, mask, cpu_plan):
    """FlashAttention's convention: our error vs float64 <= 2x the same-dtype reference's."""
    inp = attention_inputs(dtype=dtype, length=40, dim=16, past=6, pad=True)
    kw = dict(num_read=4, num_write=4, mask=mask)
    out = memory_attention(**inp, backend="torch", **kw)
    exact = memory_attention(**{n: (t.double() if t.is_floating_point() else t)
                                for n, t in inp.items()}, backend="reference", **kw)
    same_dtype = memory_attention(**inp, backend="reference", **kw)
    assert out.dtype == dtype
    err = (out.double() - exact).abs().max()
    budget = (same_dtype.double() - exact).abs().max()
    assert err <= 2 * budget + 1e-6, (err, budget)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mask", MODES)
def test_low_precision_gradients_with_lse(dtype, mask, cpu_plan):
    """Gradients of a loss on out and lse: error vs float64 <= 3x the same-dtype reference's."""
    inp = attention_inputs(dtype=dtype, length=40, dim=16, past=6, pad=True)
    assert not inp["key_padding_mask"][-1].any()  # the last batch row sees nothing: lse -inf
    kw = dict(num_read=4, num_write=4, mask=mask)
    exact_inp = {n: (t.detach().double().requires_grad_() if t.is_floating_point() else t)
                 for n, t in inp.items()}
    g = torch.Generator().manual_seed(3)
    dout = torch.randn(inp["q"].shape, generator=g, dtype=torch.float64)
    wl = torch.randn(inp["q"].shape[:3], generator=g, dtype=torch.float64)
    names = ["q", "k", "v", "past_k", "past_v"]

    def grads_of(tensors, backend):
        out, lse = memory_attention(**tensors, backend=backend, return_lse=True, **kw)
        loss = (out.double() * dout).sum() + (lse.double().masked_fill(torch.isinf(lse), 0)
                                              * wl).sum()
        return torch.autograd.grad(loss, [tensors[n] for n in names])

    got, exact, same = (grads_of(inp, "torch"), grads_of(exact_inp, "reference"),
                        grads_of(inp, "reference"))
    for n, a, e, s in zip(names, got, exact, same, strict=True):
        assert a.dtype == dtype and torch.isfinite(a).all() and a[0].abs().max() > 0, n
        err = (a.double() - e).abs().max()
        budget = (s.double() - e).abs().max()
        assert err <= 3 * budget + 1e-5, (n, err, budget)


@pytest.mark.parametrize("mask", MODES)
def test_gradcheck_small(mask, cpu_plan):
    inp = attention_inputs(batch=1, hq=2, hkv=1, length=6, dim=4, past=2, pad=True)
    names = ["q", "k", "v", "past_k", "past_v"]
    kpm = inp["key_padding_mask"]
    kpm[-1, 1:] = True  # keep some visible keys so the check is not all zeros

    def f(*ts):
        return memory_attention(**dict(zip(names, ts, strict=True)), key_padding_mask=kpm,
                                num_read=2, num_write=1, mask=mask, backend="torch")

    assert torch.autograd.gradcheck(f, [inp[n] for n in names])


def test_fully_masked_rows_are_zero_not_nan():
    inp = attention_inputs(pad=True, length=9)
    inp["key_padding_mask"][0] = False
    out, lse = _run("torch", inp, mask="causal")
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert torch.isneginf(lse[0]).all()
    g = grads(out, [inp["q"], inp["k"], inp["v"]])
    assert all(torch.isfinite(t).all() for t in g)


def test_dropout_path_runs_and_is_identity_at_zero():
    inp = attention_inputs(length=10, requires_grad=False)
    torch.manual_seed(0)
    a = memory_attention(**inp, mask="rmt", num_read=2, num_write=2, dropout_p=0.5)
    b = memory_attention(**inp, mask="rmt", num_read=2, num_write=2)
    assert a.shape == b.shape and not torch.allclose(a, b)


def test_block_plan_covers_dense_mask_exactly():
    for mask, (r, w), p, pvr in itertools.product(MODES, [(0, 0), (2, 3), (5, 0)], [0, 4],
                                                  [False, True]):
        length = 11
        dense = dense_visibility(length, p, num_read=r, num_write=w, mask=mask,
                                 past_visible_to_read=pvr)
        rebuilt = torch.zeros_like(dense)
        for g in block_plan(length, p, AttentionLayout(r, w, mask, pvr)):
            for b in g.blocks:
                off = 0 if b.source == "past" else p
                for i in range(g.start, g.end):
                    if b.kind == "full":
                        rebuilt[i, off + b.start: off + b.end] = True
                    else:
                        rebuilt[i, off + b.start: off + b.start + i - g.start + 1] = True
        assert torch.equal(rebuilt, dense), (mask, r, w, p, pvr)


def test_dense_plan_keeps_past_separate_and_hidden_from_read_rows():
    plan = dense_plan(10, 4, AttentionLayout(num_read=2))
    assert [(g.start, g.end, [b.source for b in g.blocks]) for g in plan] == [
        (0, 2, ["cur"]), (2, 10, ["past", "cur"])]
    assert len(dense_plan(10, 4, AttentionLayout(num_read=2, past_visible_to_read=True))) == 1
    assert len(dense_plan(10, 0, AttentionLayout(num_read=2))) == 1


def test_mask_semantics_by_hand():
    """The rmt mask of the NeurIPS-2022 code for R=2, S=3, W=2, spelled out."""
    vis = dense_visibility(7, num_read=2, num_write=2, mask="rmt").int().tolist()
    assert vis == [
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 1, 1],
        [1, 1, 1, 1, 1, 1, 1],
    ]
    bott = dense_visibility(5, num_read=1, num_write=1, mask="bottleneck").int().tolist()
    assert bott == [[1] * 5, [1, 0, 0, 0, 1], [1, 0, 0, 0, 1], [1, 0, 0, 0, 1], [1] * 5]


def test_output_follows_input_dtype_and_device():
    inp = attention_inputs(dtype=torch.float16, requires_grad=False)
    out, lse = _run("torch", inp, mask="full")
    assert out.dtype == torch.float16 and lse.dtype == torch.float32
    assert out.device == inp["q"].device


def test_empty_inputs_do_not_crash():
    q = torch.randn(2, 2, 0, 4)
    out, lse = memory_attention(q, q, q, return_lse=True)
    assert out.shape == (2, 2, 0, 4) and lse.shape == (2, 2, 0)
    q = torch.randn(0, 2, 5, 4)
    assert memory_attention(q, q, q, mask="rmt", num_read=1).shape == (0, 2, 5, 4)


def test_unused_lse_gives_the_backward_no_lse_term(monkeypatch, cpu_plan):
    """When no loss uses the lse its backward gets None, not materialized zeros: the extra
    head-dim column that carries an lse gradient through ATen's flash backward (copies of q, k,
    v, out and dout) is built only when there is one."""
    seen = []
    real = cpu_flash._CPUFlashMemoryAttention.backward

    def spy(ctx, grad_out, grad_lse):
        seen.append((grad_out is None, grad_lse is None))
        return real(ctx, grad_out, grad_lse)

    monkeypatch.setattr(cpu_flash._CPUFlashMemoryAttention, "backward", staticmethod(spy))
    inp = attention_inputs(length=12, past=3)
    out, lse = _run("torch", inp, num_read=2, num_write=2, mask="rmt")
    grads(out, [inp["q"]])
    out, lse = _run("torch", inp, num_read=2, num_write=2, mask="rmt")
    torch.autograd.grad(lse.sum(), [inp["q"]])
    assert seen == [(False, True), (True, False)]
