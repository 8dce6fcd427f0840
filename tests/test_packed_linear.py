"""CPU inference through oneDNN with packed weights (rmt_fast/integrations/packed_linear.py):
outputs against a float64 reference, the fallbacks (autograd, dtypes, compile), the cache's
invalidation and that the model is left exactly as it was."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers.pytorch_utils import Conv1D

from rmt_fast.integrations import packed_linear as pl
from rmt_fast.integrations.packed_linear import PackedLinear, packed_linears

pytestmark = pytest.mark.skipif(not pl.available(), reason="torch built without oneDNN")


def _layers(seed=0):
    torch.manual_seed(seed)
    lin, conv = nn.Linear(48, 80), Conv1D(72, 80)
    for p in list(lin.parameters()) + list(conv.parameters()):
        nn.init.normal_(p)  # Conv1D's bias starts at zero: make every term count
    return nn.Sequential(lin, conv)


def _reference(model, x):
    lin, conv = model[0], model[1]
    y = F.linear(x.double(), lin.weight.double(), lin.bias.double())
    return y @ conv.weight.double() + conv.bias.double()


def _calls(fn):
    with torch.profiler.profile() as prof:
        out = fn()
    return out, "mkldnn::_linear_pointwise" in [e.key for e in prof.key_averages()]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_packed_path_matches_float64(dtype):
    if not pl.available(dtype):
        pytest.skip(f"oneDNN has no {dtype} here")
    model = _layers().to(dtype)
    x = torch.randn(3, 37, 48).to(dtype)
    ref = _reference(model, x)
    with torch.no_grad():
        own = model(x)
        with packed_linears(model) as swapped:
            assert swapped == 2 and type(model[0]) is PackedLinear
            out, packed = _calls(lambda: model(x))
    assert packed, "the packed op did not run"
    assert out.dtype == dtype and out.shape == (3, 37, 72)
    eps = torch.finfo(dtype).eps
    scale = ref.abs().max()
    # both products accumulate in float32 and round the output once
    assert (out.double() - ref).abs().max() <= 64 * eps * scale
    assert (out.double() - ref).abs().max() <= 4 * (own.double() - ref).abs().max() + 8 * eps * scale
    assert type(model[0]) is nn.Linear and type(model[1]) is Conv1D  # restored


def test_autocast_computes_in_the_autocast_dtype():
    if not pl.available(torch.bfloat16):
        pytest.skip("oneDNN has no bf16 here")
    model = _layers()
    x = torch.randn(2, 11, 48)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        own = model(x)
        with packed_linears(model):
            out, packed = _calls(lambda: model(x))
    assert packed and out.dtype == own.dtype == torch.bfloat16
    ref = _reference(model, x)
    assert (out.double() - ref).abs().max() <= 2 * (own.double() - ref).abs().max() + 1e-2 * ref.abs().max()


def test_autograd_and_other_dtypes_take_the_layers_own_forward():
    model = _layers()
    x = torch.randn(4, 48, requires_grad=True)
    with packed_linears(model):
        out, packed = _calls(lambda: model(x))
        assert not packed  # autograd records: the layer's own forward
        out.sum().backward()
        with torch.no_grad():
            _, packed64 = _calls(lambda: model.double()(x.detach().double()))
        assert not packed64  # float64: no packed path
        model.float()
    assert x.grad is not None and model[0].weight.grad is not None
    ref_grad = torch.autograd.grad(_reference(model, x).sum(), x)[0]
    torch.testing.assert_close(x.grad, ref_grad, rtol=1e-5, atol=1e-4)


def test_trainable_bias_alone_keeps_its_gradient():
    """Frozen weights with trainable biases (BitFit): autograd records through the bias, so the
    packed path (which does not record) must not run."""
    model = _layers()
    for layer in model:
        layer.weight.requires_grad_(False)
    x = torch.randn(4, 48)
    with packed_linears(model):
        out, packed = _calls(lambda: model(x))
        assert not packed
        out.sum().backward()
    ref = _reference(model, x)
    want = torch.autograd.grad(ref.sum(), [model[0].bias, model[1].bias], allow_unused=True)
    for layer, g in zip(model, want, strict=True):
        assert layer.bias.grad is not None
        torch.testing.assert_close(layer.bias.grad, g, rtol=1e-5, atol=1e-4)


def test_packed_weights_follow_weight_changes_and_model_is_restored():
    model = _layers()
    x = torch.randn(5, 48)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        with packed_linears(model):
            first = model(x)
        kept = pl._PACKED[model[0]][torch.float32][-1]
        assert list(model.state_dict()) == list(state)
        for k, v in model.state_dict().items():
            assert torch.equal(v, state[k])
        with packed_linears(model):  # unchanged weights: the packed ones are reused
            again = model(x)
        assert pl._PACKED[model[0]][torch.float32][-1] is kept and torch.equal(first, again)
        for change in (lambda w: w.mul_(-2.0),        # in place: bumps the version counter
                       lambda w: w.data.add_(0.5),    # through .data (peft's merge): does not
                       lambda w: w.data.copy_(torch.randn_like(w)),
                       lambda w: w.data[3, 7].add_(1e-3)):  # one element, a little
            change(model[0].weight)
            with packed_linears(model):
                out = model(x)
            torch.testing.assert_close(out, _reference(model, x).float(), rtol=1e-4, atol=1e-3)
            assert not torch.equal(out, first)
            first = out
    pl.clear(model)
    assert model[0] not in pl._PACKED


def test_nested_blocks_and_switch(monkeypatch):
    model = _layers()
    with packed_linears(model) as a:
        with packed_linears(model) as b:
            assert a == b == 2 and type(model[0]) is PackedLinear
        assert type(model[0]) is PackedLinear  # the outer block still holds it
    assert type(model[0]) is nn.Linear
    with packed_linears(model, enabled=False) as n:
        assert n == 0 and type(model[0]) is nn.Linear
    monkeypatch.setenv("RMT_FAST_PACKED_LINEAR", "0")
    with packed_linears(model) as n:
        assert n == 0 and type(model[0]) is nn.Linear


def test_streaming_reader_reads_the_same_with_and_without_packing(monkeypatch):
    from transformers import GPT2Config, GPT2LMHeadModel

    from rmt_fast.models import RMTForCausalLM
    from rmt_fast.streaming import StreamingReader

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=64, n_embd=32, n_layer=2,
                                      n_head=2))
    model = RMTForCausalLM(base, num_mem_tokens=4, segment_size=16)
    tokens = torch.randint(0, 50, (2, 70))
    memories = []
    for switch in ("1", "0"):
        monkeypatch.setenv("RMT_FAST_PACKED_LINEAR", switch)
        reader = StreamingReader(model, batch_size=2, progress=False)
        reader.feed(tokens)
        reader.flush()
        memories.append(reader.memory)
    packed = sum(any(k != "fingerprint" for k in pl._PACKED.get(m, {}))
                 for m in base.modules())  # not lm_head: no logits while reading
    assert packed == 8  # c_attn, c_proj, c_fc, c_proj x 2 layers
    torch.testing.assert_close(memories[0], memories[1], rtol=1e-4, atol=1e-5)
    assert type(base.transformer.h[0].attn.c_attn) is Conv1D


@pytest.mark.parametrize("dtype,shape,offset", [(torch.bfloat16, (16, 24), 0),
                                                (torch.bfloat16, (5, 7), 0),     # 70 bytes: elements
                                                (torch.float32, (9, 8), 1),      # offset 4 bytes
                                                (torch.float64, (6, 5), 3)])
def test_fingerprint_changes_with_any_one_element(dtype, shape, offset):
    """Word sums or element sums: flipping any single element (even its lowest bit) changes it."""
    g = torch.Generator().manual_seed(3)
    n = shape[0] * shape[1]
    storage = torch.randn(offset + n, generator=g).to(dtype)
    w = storage[offset:].view(shape)
    base = pl._fingerprint(w)
    assert pl._fingerprint(w) == base
    bits = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[w.element_size()]
    for i in torch.randperm(n, generator=g)[:12].tolist():
        for flip in (1, 1 << 5):
            changed = w.clone()
            flat = changed.view(-1).view(bits)
            flat[i] ^= flip
            fp = pl._fingerprint(changed)
            assert fp[2] != base[2], (i, flip)
