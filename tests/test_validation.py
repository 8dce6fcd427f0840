"""API-boundary validation (rmt_fast/validation.py): every bad input raises a ValueError naming
the argument (and the offending value / expected range), and leaves the model as it was."""

import warnings

import pytest
import torch
from models import VOCAB, ids, tiny_gpt2
from transformers import BertConfig, BertForSequenceClassification, BertForTokenClassification, BertModel

from rmt_fast import validation
from rmt_fast.models import (
    MemoryTransformer,
    RecurrentState,
    RMTEncoderForSequenceClassification,
    RMTEncoderForTokenClassification,
    RMTForCausalLM,
)

BERT_VOCAB = 53


def _bert(cls):
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=BERT_VOCAB, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, num_labels=3)
    return cls(cfg).eval()


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}, model.training


def _unchanged(model, snap):
    state, training = snap
    assert model.training == training
    now = model.state_dict()
    assert now.keys() == state.keys()
    assert all(torch.equal(now[k], v) for k, v in state.items())


@pytest.fixture(scope="module")
def lm():
    return RMTForCausalLM(tiny_gpt2(), num_mem_tokens=2, segment_size=4)


X = ids(2, 9)
MEM = torch.zeros(2, 2, 32)


@pytest.mark.parametrize("kwargs,match", [
    (dict(input_ids=X.float()), r"input_ids must hold integer ids of dtype torch\.int64 or "
                                r"torch\.int32, got dtype torch\.float32"),
    (dict(input_ids=X.to(torch.uint8)), r"input_ids .* got dtype torch\.uint8"),
    (dict(input_ids=X.bool()), r"input_ids .* got dtype torch\.bool"),
    (dict(input_ids=X.tolist()), r"input_ids must be \[B, T\] token ids .* got list"),
    (dict(input_ids=X[None]), r"input_ids must be \[B, T\] token ids .* shape \[1, 2, 9\]"),
    (dict(input_ids=X[:0]), r"input_ids has batch size 0"),
    (dict(input_ids=X[:, :0]), r"input_ids has length 0"),
    (dict(input_ids=X.clone().index_put_((torch.tensor([1]), torch.tensor([3])), torch.tensor(-5))),
     r"input_ids holds -5 at index \[1, 3\]: every value must be in \[0, 61\)"),
    (dict(input_ids=torch.full((2, 9), VOCAB)), r"input_ids holds 61 at index \[0, 0\]: .*\[0, 61\)"),
    (dict(input_ids=X.to("meta")), r"input_ids is on meta but the model is on cpu"),
    (dict(input_ids=X, attention_mask=torch.ones(2, 8)), r"attention_mask must have input_ids' shape"),
    (dict(input_ids=X, labels=X.int()), r"labels must hold integer ids of dtype torch\.int64"),
    (dict(input_ids=X, labels=X.float()), r"labels must hold integer ids"),
    (dict(input_ids=X, labels=torch.full((2, 9), -7)), r"labels holds -7 at index \[0, 0\]: .*-100"),
    (dict(input_ids=X, labels=torch.full((2, 9), VOCAB)), r"labels holds 61 .* output vocabulary"),
    (dict(input_ids=X, labels_mask=torch.ones(2, 9, dtype=torch.bool)),
     r"labels_mask was given without labels"),
    (dict(input_ids=X, labels=X, labels_mask=torch.ones(2, 3, dtype=torch.bool)),
     r"labels_mask must have input_ids' shape"),
    (dict(input_ids=X, memory=MEM.double()), r"memory must have the model's dtype torch\.float32, "
                                             r"got torch\.float64"),
    (dict(input_ids=X, memory=MEM.half()), r"memory must have the model's dtype"),
    (dict(input_ids=X, memory=MEM.to("meta")), r"memory is on meta but the model is on cpu"),
    (dict(input_ids=X, memory=MEM[:1]), r"memory must be \[B, M, d\] = \[2, 2, 32\]"),
    (dict(input_ids=X, memory=MEM.tolist()), r"memory must be \[B, M, d\] = \[2, 2, 32\], got list"),
])
def test_causal_lm_forward_rejects(lm, kwargs, match):
    snap = _snapshot(lm)
    with pytest.raises(ValueError, match=match):
        lm(**kwargs)
    _unchanged(lm, snap)


@pytest.mark.parametrize("kwargs,match", [
    (dict(input_ids=torch.full((1, 5), 99)), r"input_ids holds 99"),
    (dict(input_ids=X.float()), r"input_ids must hold integer ids"),
    (dict(input_ids=X, memory=MEM.double()), r"memory must have the model's dtype"),
    (dict(input_ids=X[:, :0]), r"input_ids has length 0"),
])
def test_causal_lm_generate_rejects(lm, kwargs, match):
    snap = _snapshot(lm)
    with pytest.raises(ValueError, match=match):
        lm.generate(**kwargs, max_new_tokens=2, do_sample=False, pad_token_id=0)
    _unchanged(lm, snap)


def test_causal_lm_rejects_a_bad_xl_cache(lm):
    """``xl`` (forward, read, generate): a RecurrentState of this batch, only for a model with
    an XL cache; refused with the argument named, the model unchanged."""
    xl_lm = RMTForCausalLM(tiny_gpt2(), num_mem_tokens=2, segment_size=4, xl_cache=3)
    good = xl_lm(X).xl
    one_row = RecurrentState({i: (k[:1], v[:1]) for i, (k, v) in good.kv.items()}, good.padding)
    cases = [
        (lm, good, r"xl \(a Transformer-XL cache\) was given, but the model has xl_cache=0"),
        (xl_lm, {0: good.kv[0]}, r"xl must be the RecurrentState .* got dict"),
        (xl_lm, RecurrentState(good.kv, good.padding[:1]), r"xl\.padding must be a bool tensor "
                                                           r"\[B=2, P\]"),
        (xl_lm, RecurrentState(good.kv, good.padding.long()), r"xl\.padding must be a bool"),
        (xl_lm, one_row, r"xl's layer-0 keys must be \[B=2, Hkv, P=3, D\]"),
    ]
    for model, xl, match in cases:
        snap = _snapshot(model)
        for method, kw in ((model.forward, {}), (model.read, {}),
                           (model.generate, dict(max_new_tokens=2, do_sample=False,
                                                 pad_token_id=0))):
            with pytest.raises((ValueError, TypeError), match=match):
                method(X, xl=xl, **kw)
        _unchanged(model, snap)
    xl_lm(X, xl=good)  # the cache a forward returns goes back in


def test_valid_inputs_still_work(lm):
    """int32 ids, -100 labels, float and int 0/1 masks and a given memory all pass."""
    labels = X.clone()
    labels[:, :3] = -100
    out = lm(X.int(), labels=labels, attention_mask=torch.ones(2, 9),
             labels_mask=torch.ones(2, 9, dtype=torch.long), memory=torch.randn(2, 2, 32))
    assert torch.isfinite(out.loss)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = lm(X, memory=torch.randn(2, 2, 32))
        lm(X, memory=out.memory)  # the memory a forward returns goes back in
        with pytest.raises(ValueError, match="memory must have the model's dtype torch.float32"):
            lm(X, memory=torch.randn(2, 2, 32, dtype=torch.bfloat16))


def test_all_ignored_labels_warn_and_give_zero_loss(lm):
    """Decision: a warning naming the labels; the loss stays 0 without a gradient (the mean over no
    position), as documented in docs/validation.md."""
    with pytest.warns(RuntimeWarning, match="labels select no position"):
        out = lm(X, labels=torch.full((2, 9), -100))
    assert out.loss.item() == 0.0 and not out.loss.requires_grad
    with pytest.warns(RuntimeWarning, match="labels select no position"):
        lm(X, labels=X, labels_mask=torch.zeros(2, 9, dtype=torch.bool))
    # only the first label is real: position p predicts labels[p + 1], so nothing is predicted
    only_first = torch.full((2, 9), -100)
    only_first[:, 0] = 5
    with pytest.warns(RuntimeWarning, match="labels select no position"):
        lm(X, labels=only_first)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        lm(X, labels=X)  # real targets: no warning


def test_loss_over_last_warns_when_only_earlier_segments_have_targets():
    model = RMTForCausalLM(tiny_gpt2(), num_mem_tokens=2, segment_size=4, loss_over="last")
    labels = torch.full((1, 9), -100)
    labels[0, 2] = 7  # predicted by position 1, in the first segment
    with pytest.warns(RuntimeWarning, match="labels select no position"):
        model(ids(1, 9), labels=labels)


def test_encoders_reject_bad_ids_labels_and_memory():
    seq = RMTEncoderForSequenceClassification(_bert(BertForSequenceClassification), num_mem_tokens=2,
                                              segment_size=6, cls_token_id=1, sep_token_id=2)
    tok = RMTEncoderForTokenClassification(_bert(BertForTokenClassification), num_mem_tokens=2,
                                           segment_size=6, cls_token_id=1, sep_token_id=2)
    x = torch.randint(3, BERT_VOCAB, (2, 10))
    for model in (seq, tok):
        snap = _snapshot(model)
        with pytest.raises(ValueError, match=r"input_ids holds 53 .*\[0, 53\)"):
            model(torch.full((2, 10), BERT_VOCAB))
        with pytest.raises(ValueError, match="input_ids must hold integer ids"):
            model(x.float())
        with pytest.raises(ValueError, match=r"memory must have the model's dtype"):
            model(x, memory=torch.zeros(2, 2, 32, dtype=torch.float64))
        with pytest.raises(ValueError, match="attention_mask must have input_ids' shape"):
            model(x, attention_mask=torch.ones(2, 3))
        _unchanged(model, snap)
    with pytest.raises(ValueError, match=r"labels holds 3 at index \[1\]: .*\[0, 3\)"):
        seq(x, labels=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"labels must be \[B\] = \[2\] class ids"):
        seq(x, labels=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match=r"labels must be a \[B\] = \[2\] tensor of class ids"):
        seq(x, labels=torch.zeros(2, 10, dtype=torch.long))
    with pytest.raises(ValueError, match=r"labels must have input_ids' shape"):
        tok(x, labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match=r"labels holds -2"):
        tok(x, labels=torch.full((2, 10), -2))
    with pytest.warns(RuntimeWarning, match="every label is -100"):
        out = tok(x, labels=torch.full((2, 10), -100))
    assert torch.isnan(out.loss)  # F.cross_entropy's mean over no position


def test_memory_transformer_rejects_bad_ids():
    model = MemoryTransformer(_bert(BertModel), num_mem_tokens=3)
    with pytest.raises(ValueError, match=r"input_ids holds -1"):
        model(torch.full((1, 4), -1))
    with pytest.raises(ValueError, match=r"input_ids must be \[B, T\] token ids"):
        model(torch.ones(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"input_ids has batch size 0"):
        model(torch.ones(0, 4, dtype=torch.long))


def test_check_token_ids_directly():
    validation.check_token_ids("tokens", torch.tensor([0, 5, 60]), 61, dims=(1, 2))
    with pytest.raises(ValueError, match=r"tokens must be \[n\] or \[B, n\] token ids"):
        validation.check_token_ids("tokens", torch.zeros(1, 1, 3, dtype=torch.long), 61, dims=(1, 2))
    with pytest.raises(ValueError, match=r"tokens is empty"):
        validation.check_token_ids("tokens", torch.zeros(0, dtype=torch.long), 61, dims=(1, 2))
    validation.check_token_ids("tokens", torch.zeros(0, dtype=torch.long), 61, dims=(1, 2),
                               allow_empty=True)
    with pytest.raises(ValueError, match=r"tokens holds 70000 at index \[2\]"):  # uint16 input
        validation.check_token_ids("tokens", torch.tensor([1, 2, 70000], dtype=torch.int32).to(
            torch.int64), 50000, dims=(1,))
