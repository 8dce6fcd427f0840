"""bf16 where users get it: training under autocast (float32 master weights), evaluation, the
streaming reader and the demo; bf16 logits within bf16 tolerance of float32."""

from __future__ import annotations

import copy

import pytest
import torch
from models import ids, tiny_gpt2

import rmt_fast
from rmt_fast.tasks import make_task
from rmt_fast.train import TrainConfig, build_model, train


def test_bf16_logits_are_within_bf16_tolerance_of_float32():
    """The same RMT (memory carried over 6 segments) in bfloat16 vs float32: relative error of
    the logits at most 1e-2 (bf16 keeps 8 bits of mantissa: ~4e-3 per rounding)."""
    torch.manual_seed(0)
    model = rmt_fast.RMTForCausalLM(tiny_gpt2(layers=2), num_mem_tokens=4, segment_size=8).eval()
    x = ids(2, 48)
    ref = model(x).logits
    low = copy.deepcopy(model).to(torch.bfloat16)(x).logits.float()
    rel = ((low - ref).norm() / ref.norm()).item()
    assert rel <= 1e-2, rel
    assert rel > 0  # it did run in bf16


def test_train_in_bf16_keeps_float32_weights():
    task = make_task("copy", 8, copies=1, train_size=64, valid_size=16, test_size=0)
    model = build_model(task.vocab_size, 8, 2, layers=1, d_model=32, heads=4, d_inner=64)
    before = {k: v.clone() for k, v in model.named_parameters()}
    res = train(model, task, 3, segments=2, batch_size=4, eval_every=3, eval_size=8, progress=False,
                dtype="bfloat16", checkpoint_segments=True)
    assert res.step == 3 and all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(p, before[k]) for k, p in model.named_parameters())
    with pytest.raises(ValueError, match="dtype must be one of"):
        TrainConfig(dtype="half")
    assert TrainConfig().dtype == "float32"  # the Python API's default; the CLI's is auto


def test_cli_dtype_defaults_to_auto():
    from rmt_fast.train import parser, specs_from_arguments

    args = parser().parse_args(["--task", "copy", "--segments", "2"])
    assert specs_from_arguments(args)[2].dtype == "auto"


def test_streaming_reader_dtype_casts_the_model():
    model = rmt_fast.RMTForCausalLM(tiny_gpt2(), num_mem_tokens=2, segment_size=8).eval()
    reader = rmt_fast.StreamingReader(model, progress=False, dtype="bfloat16")
    assert model.memory.dtype == torch.bfloat16 and reader.memory.dtype == torch.bfloat16
    reader.feed(ids(1, 24)[0])
    assert reader.memory.dtype == torch.bfloat16 and torch.isfinite(reader.memory.float()).all()
    with pytest.raises(ValueError, match="dtype"):
        rmt_fast.StreamingReader(model, dtype="int8")


@pytest.mark.parametrize("backend", ["auto", "torch", "reference"])
def test_memory_attention_under_autocast_computes_in_the_autocast_dtype(backend):
    """As SDPA: under bf16 autocast mixed q/k (float32, after a rotary embedding) and v (bf16)
    are cast to bf16; the result equals the all-bf16 call. Outside autocast mixed dtypes are
    refused."""
    g = torch.Generator().manual_seed(0)
    q, k, v, pk, pv = (torch.randn(2, 4, n, 16, generator=g) for n in (12, 12, 12, 5, 5))
    kw = dict(num_read=2, num_write=2, mask="rmt", backend=backend)
    want = rmt_fast.memory_attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), past_k=pk.bfloat16(),
                                     past_v=pv.bfloat16(), **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = rmt_fast.memory_attention(q, k, v.bfloat16(), past_k=pk, past_v=pv.bfloat16(), **kw)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    with pytest.raises(ValueError, match="v must match q's dtype"):
        rmt_fast.memory_attention(q, k, v.bfloat16(), **kw)


def test_rotary_model_streams_under_bf16_autocast():
    """A Llama RMT (rotary: q and k leave the embedding in float32 under autocast) reads and
    scores segments under bf16 autocast; the memory is within bf16 tolerance of float32."""
    from models import tiny_llama

    from rmt_fast.models import RMTForCausalLM

    model = RMTForCausalLM(tiny_llama(), num_mem_tokens=3, segment_size=6).eval()
    tokens = ids(2, 18)
    with torch.no_grad():
        ref = model(tokens).memory
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(tokens)
            mem, _ = model.read(tokens)
    assert out.logits.dtype == torch.bfloat16
    for m in (out.memory, mem):
        err = (m.float() - ref).abs().max() / ref.abs().max()
        assert err < 5e-2, err


def test_armt_trains_under_bf16_autocast_with_a_float32_state():
    """ARMT under bf16 autocast: the projections arrive in bf16, the associative state stays
    float32 (the associative ops compute in its dtype); loss within bf16 tolerance of float32,
    gradients reach every associative weight."""
    from models import tiny_armt

    model = tiny_armt("llama").train()
    tokens = ids(2, 24)
    ref = model(tokens, labels=tokens).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tokens, labels=tokens)
    assert abs(out.loss.item() - ref.item()) < 2e-2 * abs(ref.item())
    out.loss.backward()
    for a in model.assoc:
        assert a.W_mv.weight.grad is not None and torch.isfinite(a.W_mv.weight.grad).all()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        state = model.eval().read(tokens)
    assert len(state.A) == len(model.assoc) and all(t.dtype == torch.float32 for t in state.A)
