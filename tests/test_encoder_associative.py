"""ARMT's associative memory on an encoder RMT (``RMTConfig(associative_d_mem=...)``): the loop
against a reference that reads and writes by hand with the float64 reference formulas, fresh rows
under padding, a new memory changing nothing, gradients, checkpointing, continuing from a
returned state, persistence and the errors."""

import copy
import json

import pytest
import torch
from helpers import load_script
from models import reference_clip_read, tiny_bert, tiny_gpt2
from transformers import BertForTokenClassification

from rmt_fast.models import (
    RMTEncoderForSequenceClassification,
    RMTEncoderForTokenClassification,
    RMTForCausalLM,
)
from rmt_fast.models.config import RMTConfig
from rmt_fast.models.segment_loop import Segment, SegmentState
from rmt_fast.ops.associative_memory import reference_read, reference_write

CLS, SEP = 1, 2
M, S, D_MEM = 4, 6, 8


def make(seed=0, randomize=True, **kw):
    model = RMTEncoderForSequenceClassification(tiny_bert(seed=seed), num_mem_tokens=M, segment_size=S,
                                                cls_token_id=CLS, sep_token_id=SEP,
                                                associative_d_mem=D_MEM, **kw)
    if randomize:  # a new memory's W_v is zero: it would neither write nor be read
        g = torch.Generator().manual_seed(seed + 7)
        with torch.no_grad():
            for p in model.assoc.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
    return model


def tokens(batch=2, length=16, seed=0):
    return torch.randint(3, 53, (batch, length), generator=torch.Generator().manual_seed(seed))


def reference_loop(model, x, bounds, update_rule="armt", use_l2_norm=False, correction=True,
                   normaliser_floor=0.0, normaliser_gate=False, value_norm=False, read_clip=0.0,
                   state_decay=1.0, decay_gate=False, decay_max=1.0):
    """The encoder RMT with an associative memory, by hand: an eager copy of the base model whose
    blocks read (``h + phi(W_q h) A / (phi(W_q h) . z + eps)``, from the second segment on) and
    write (the delta rule on the memory rows' outputs) through the float64 reference formulas,
    with the given ``ARMTConfig`` options (DeltaNet's rule reads from the first segment on).
    Returns (logits of the last segment, memory, per layer (A, z))."""
    ref = copy.deepcopy(model.base)
    ref.set_attn_implementation("eager")
    from rmt_fast.models.memory_transformer import find_layers

    layers, assoc = find_layers(ref), model.assoc
    n, batch = len(layers), x.shape[0]
    d_key, d = 6 * D_MEM, model.memory.shape[1]
    A = [torch.zeros(batch, d_key, d, dtype=torch.float64) for _ in range(n)]
    z = [torch.zeros(batch, d_key, dtype=torch.float64) for _ in range(n)]
    first = [True]
    opts = dict(nu=3, normalize=use_l2_norm, eps=1e-5, rule=update_rule, floor=normaliser_floor)

    def pre(i):
        def hook(module, args, kwargs):
            if first[0] and update_rule == "armt":
                return None
            h = args[0]
            q = (h.double() @ assoc[i].W_mq.weight.double().T)
            read = reference_read(q, A[i], z[i], **opts)
            if read_clip:
                read = reference_clip_read(read, h.double(), read_clip)
            return (h + read.float(), *args[1:]), kwargs
        return hook

    def post(i):
        def hook(module, args, kwargs, out):
            mem = (out[0] if isinstance(out, tuple) else out)[:, 1:1 + M].double()
            a = assoc[i]
            km = mem @ a.W_mk.weight.double().T
            if value_norm:  # RMS over the width, eps as torch's rms_norm in float32
                mem_v = mem * torch.rsqrt(mem.pow(2).mean(-1, keepdim=True)
                                          + torch.finfo(torch.float32).eps)
            else:
                mem_v = mem
            v = mem_v @ a.W_mv.weight.double().T
            beta = torch.sigmoid(mem @ a.W_mb.weight.double().T + a.W_mb.bias.double())[..., 0]
            alpha = torch.tensor(state_decay, dtype=torch.float64)  # the decay, then the write
            if decay_gate:  # learnt: ceiling * sigmoid(w . mean of the memory outputs + b) per row
                alpha = decay_max * torch.sigmoid(mem.mean(1) @ a.W_ma.weight.double()[0]
                                                  + a.W_ma.bias.double()[0])[:, None]
            A[i], z[i] = A[i] * alpha[..., None], z[i] * alpha
            A[i], z[i] = reference_write(km, v, beta, A[i], z[i], first=first[0],
                                         correction=correction, gate=normaliser_gate, **opts)
        return hook

    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(pre(i), with_kwargs=True)
        layer.register_forward_hook(post(i), with_kwargs=True)
    emb = ref.get_input_embeddings()
    with torch.no_grad():
        mem = model.memory.expand(batch, -1, -1)
        cls_, sep = emb(torch.tensor([[CLS]] * batch)), emb(torch.tensor([[SEP]] * batch))
        for start, end in bounds:
            o = ref(inputs_embeds=torch.cat([cls_, mem, sep, emb(x[:, start:end]), sep], 1),
                    output_hidden_states=True)
            mem = o.hidden_states[-1][:, 1:1 + M]
            first[0] = False
    return o.logits, mem, A, z


def test_encoder_with_an_associative_memory_equals_the_reference_loop():
    model = make()
    x = tokens()
    out = model(x, labels=torch.tensor([0, 2]))
    logits, mem, A, z = reference_loop(model, x, [(0, 4), (4, 10), (10, 16)])  # right-aligned
    torch.testing.assert_close(out.logits, logits, atol=1e-4, rtol=0)
    torch.testing.assert_close(out.memory, mem, atol=1e-4, rtol=0)
    for i in range(2):
        torch.testing.assert_close(out.state.extra[f"A.{i}"].double(), A[i], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.state.extra[f"z.{i}"].double(), z[i], atol=1e-4, rtol=1e-4)
    # the reference can tell the associative memory apart: without it the logits differ
    plain = RMTEncoderForSequenceClassification(tiny_bert(), num_mem_tokens=M, segment_size=S,
                                                cls_token_id=CLS, sep_token_id=SEP)
    with torch.no_grad():
        plain.memory.copy_(model.memory)
        assert (plain(x).logits - logits).abs().max() > 1e-3
    out.loss.backward()
    for name, p in model.assoc.named_parameters():  # every associative weight learns
        assert p.grad is not None and p.grad.abs().sum() > 0, name


OPTIONS = [dict(update_rule="delta", use_l2_norm=True),
           dict(use_l2_norm=True, normaliser_floor=1.0),
           dict(correction=False, normaliser_gate=True),
           dict(update_rule="delta", use_l2_norm=True, value_norm=True),
           dict(update_rule="delta", use_l2_norm=True, read_clip=0.05),
           dict(update_rule="delta", use_l2_norm=True, state_decay=0.5)]


@pytest.mark.parametrize("options", OPTIONS, ids=["delta", "l2-floor", "nocorr-gate",
                                                  "delta-vnorm", "delta-clip", "delta-decay"])
def test_associative_options_equal_the_reference_loop(options):
    """``RMTConfig.associative_<field>`` reach every layer: the model equals the reference loop
    run with the same options, and differs from the model with ARMT's defaults; the options
    survive save/load; ``replace_config`` switches them."""
    model = make(**{f"associative_{k}": v for k, v in options.items()})
    assert model.rmt_config.associative_config().update_rule == options.get("update_rule", "armt")
    if options.get("value_norm"):  # BERT's blocks end in a LayerNorm (RMS about 1): scale it
        with torch.no_grad():
            for m in model.base.modules():
                if isinstance(m, torch.nn.LayerNorm):
                    m.weight.mul_(3.0)
    x = tokens(seed=7)
    bounds = [(0, 4), (4, 10), (10, 16)]
    out = model(x, labels=torch.tensor([0, 2]))
    logits, mem, A, z = reference_loop(model, x, bounds, **options)
    if options.get("value_norm"):  # and the norm matters there
        unnormed = reference_loop(model, x, bounds, **{**options, "value_norm": False})[0]
        assert (unnormed - logits).abs().max() > 1e-3
    if options.get("read_clip"):  # the clip bites
        unclipped = reference_loop(model, x, bounds, **{**options, "read_clip": 0.0})[0]
        assert (unclipped - logits).abs().max() > 1e-3
    if options.get("state_decay"):  # and the decay
        undecayed = reference_loop(model, x, bounds, **{**options, "state_decay": 1.0})[0]
        assert (undecayed - logits).abs().max() > 1e-3
    torch.testing.assert_close(out.logits, logits, atol=1e-4, rtol=0)
    for i in range(2):
        torch.testing.assert_close(out.state.extra[f"A.{i}"].double(), A[i], atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out.state.extra[f"z.{i}"].double(), z[i], atol=1e-4, rtol=1e-4)
    default_logits = reference_loop(model, x, bounds)[0]
    assert (default_logits - logits).abs().max() > 1e-3  # the options change the result
    out.loss.backward()
    for name, p in model.assoc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    with torch.no_grad():
        before = model.eval()(x).logits
        torch.testing.assert_close(before, logits, atol=1e-4, rtol=0)
        defaults = {f"associative_{k}": RMTConfig.__dataclass_fields__[f"associative_{k}"].default
                    for k in options}
        model.replace_config(**defaults)  # back to ARMT's rule and options
        torch.testing.assert_close(model(x).logits, reference_loop(model, x, bounds)[0],
                                   atol=1e-4, rtol=0)


@pytest.mark.parametrize("ceiling", [1.0, 0.7])
def test_a_learnt_decay_equals_the_reference_loop(tmp_path, ceiling):
    """``associative_decay_gate``: each layer's decay is learnt from its memory outputs (per row,
    under ``associative_decay_max``), as in the reference loop; every associative weight
    (``W_ma`` too) gets gradients; it survives save/load; the gate, its starting decay and its
    ceiling cannot change after construction."""
    options = dict(update_rule="delta", use_l2_norm=True, state_decay=0.5, decay_gate=True,
                   decay_max=ceiling)
    model = make(**{f"associative_{k}": v for k, v in options.items()})
    with torch.no_grad():  # W_ma starts at zero (the fixed decay): make it depend on the data
        for a in model.assoc:
            a.W_ma.weight.normal_(0, 1.0)
    x = tokens(seed=7)
    bounds = [(0, 4), (4, 10), (10, 16)]
    out = model(x, labels=torch.tensor([0, 2]))
    logits, mem, A, z = reference_loop(model, x, bounds, **options)
    fixed = reference_loop(model, x, bounds, **{**options, "decay_gate": False})[0]
    assert (fixed - logits).abs().max() > 1e-3  # the learnt decay is not the fixed one
    torch.testing.assert_close(out.logits, logits, atol=1e-4, rtol=0)
    for i in range(2):
        torch.testing.assert_close(out.state.extra[f"A.{i}"].double(), A[i], atol=1e-4, rtol=1e-4)
    out.loss.backward()
    for name, p in model.assoc.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    model.eval().save_pretrained(tmp_path / "m")
    loaded = RMTEncoderForSequenceClassification.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)
    for change in (dict(associative_decay_gate=False), dict(associative_state_decay=0.4),
                   dict(associative_decay_max=0.8)):
        with pytest.raises(ValueError, match="cannot change after construction"):
            model.replace_config(**change)


def test_associative_options_persist(tmp_path):
    model = make(seed=8, associative_update_rule="delta", associative_use_l2_norm=True).eval()
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "rmt_config.json").read_text())
    assert saved["associative_update_rule"] == "delta" and saved["associative_use_l2_norm"]
    loaded = RMTEncoderForSequenceClassification.from_pretrained(tmp_path / "m")
    assert loaded.rmt_config.associative_options() == model.rmt_config.associative_options()
    x = tokens(seed=9)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


@pytest.mark.parametrize("options", [{}, dict(associative_update_rule="delta",
                                              associative_use_l2_norm=True)], ids=["armt", "delta"])
def test_a_new_associative_memory_changes_nothing_until_it_learns(options):
    """W_v = 0: nothing is written, so the outputs are the plain RMT's exactly; W_v's gradient is
    not zero (the way in), the other associative weights' gradients are. Under DeltaNet's rule
    ``z`` stays zero, so it cannot mark a written state: every segment reads (were the reads
    skipped while ``z`` is zero, W_v would never get a gradient)."""
    model = make(randomize=False, **options)
    plain = RMTEncoderForSequenceClassification(tiny_bert(), num_mem_tokens=M, segment_size=S,
                                                cls_token_id=CLS, sep_token_id=SEP)
    with torch.no_grad():
        plain.memory.copy_(model.memory)
    x = tokens(seed=1)
    out = model(x, labels=torch.tensor([1, 0]))
    assert torch.equal(out.logits, plain(x).logits)
    assert out.state.extra["z.0"].any() == (not options)
    out.loss.backward()
    assert model.assoc[0].W_mv.weight.grad.abs().sum() > 0
    assert model.assoc[0].W_mq.weight.grad.abs().sum() == 0


def test_padded_rows_stay_fresh_and_checkpointing_gives_the_same_gradients():
    model = make(seed=1)
    x = tokens(seed=2)
    am = torch.ones_like(x)
    am[1, :4] = 0  # row 1: its first (right-aligned, short) segment is all padding
    with torch.no_grad():
        both = model(x, attention_mask=am)
        alone = model(x[1:, 4:])  # the same row without the padding: segments (4,10), (10,16)
    torch.testing.assert_close(both.logits[1:], alone.logits, atol=1e-5, rtol=0)
    for k in alone.state.extra:
        torch.testing.assert_close(both.state.extra[k][1:], alone.state.extra[k], atol=1e-5, rtol=1e-5)
    grads = []
    for ckpt in (False, True):
        m = copy.deepcopy(model).train()
        m.replace_config(checkpoint_segments=ckpt)
        m(x, attention_mask=am, labels=torch.tensor([0, 1])).loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert any(n.startswith("assoc.") for n in grads[0]) and grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=0)


def test_continuing_from_a_returned_state_and_reading_segments():
    model = make(seed=2, segment_alignment="left").eval()
    x = tokens(length=18, seed=3)
    with torch.no_grad():
        whole = model(x)
        half = model(x[:, :12])
        rest = model(x[:, 12:], memory=half.state)  # the whole state continues
        fresh = model(x[:, 12:], memory=half.memory)  # a memory tensor: a new associative state
        segs = [Segment(s, s + S, x[:, s:s + S]) for s in range(0, 18, S)]
        state, last = model.classify_segments(model.init_state(2), iter(segs))
        mem_only, _ = model.classify_segments(model.expand_memory(2), iter(segs))
    torch.testing.assert_close(rest.logits, whole.logits, atol=1e-5, rtol=0)
    assert (fresh.logits - whole.logits).abs().max() > 1e-4
    assert isinstance(state, SegmentState) and isinstance(mem_only, torch.Tensor)
    torch.testing.assert_close(last, whole.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(mem_only, whole.memory, atol=1e-5, rtol=0)
    _, seg_state = model.segment_forward(model.init_state(2), x[:, :S], None)
    assert isinstance(seg_state, SegmentState) and set(seg_state.extra) == set(whole.state.extra)


def test_token_classification_and_persistence(tmp_path):
    model = RMTEncoderForTokenClassification(
        tiny_bert(cls=BertForTokenClassification), num_mem_tokens=M,
        segment_size=S, cls_token_id=CLS, sep_token_id=SEP, associative_d_mem=D_MEM)
    x = tokens(seed=4)
    out = model(x, labels=torch.randint(0, 3, x.shape))
    assert out.logits.shape == (2, 16, 3) and set(out.state.extra) == {"A.0", "z.0", "A.1", "z.1"}
    out.loss.backward()
    assert model.assoc[1].W_mv.weight.grad.abs().sum() > 0
    seq = make(seed=3).eval()
    seq.save_pretrained(tmp_path / "m")
    assert json.loads((tmp_path / "m" / "rmt_config.json").read_text())["associative_d_mem"] == D_MEM
    loaded = RMTEncoderForSequenceClassification.from_pretrained(tmp_path / "m")
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, seq(x).logits)


def test_associative_errors(tmp_path):
    with pytest.raises(ValueError, match="associative memory is for encoder RMTs"):
        RMTForCausalLM(tiny_gpt2(), num_mem_tokens=2, segment_size=4,
                       associative_d_mem=8)
    with pytest.raises(ValueError, match="associative_d_mem must be an int >= 0"):
        RMTConfig(kind="encoder", cls_token_id=1, sep_token_id=2, associative_d_mem=-1)
    model = make(seed=4)
    with pytest.raises(ValueError, match="associative_d_mem"):
        model.replace_config(associative_d_mem=16)  # it shapes parameters
    x = tokens(seed=5)
    bad = model.init_state(2)
    bad.extra.pop("z.1")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ValueError, match="memory: a state of this model has extra"):
        model(x, memory=bad)
    plain = RMTEncoderForSequenceClassification(tiny_bert(), num_mem_tokens=M, segment_size=S,
                                                cls_token_id=CLS, sep_token_id=SEP)
    with pytest.raises(ValueError, match="a state of this model has extra"):
        plain(x, memory=model.init_state(2))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    # older config files (before the field existed) load without an associative memory
    RMTConfig(kind="encoder", cls_token_id=1, sep_token_id=2).save(tmp_path)
    data = json.loads((tmp_path / "rmt_config.json").read_text())
    del data["associative_d_mem"]
    (tmp_path / "rmt_config.json").write_text(json.dumps(data))
    assert RMTConfig.load(tmp_path).associative_d_mem == 0
    # ... and files from before the options existed, with ARMT's defaults
    RMTConfig(kind="encoder", cls_token_id=1, sep_token_id=2, associative_d_mem=8).save(tmp_path)
    data = json.loads((tmp_path / "rmt_config.json").read_text())
    for k in list(data):
        if k.startswith("associative_") and k != "associative_d_mem":
            del data[k]
    (tmp_path / "rmt_config.json").write_text(json.dumps(data))
    assert RMTConfig.load(tmp_path).associative_config() == \
        RMTConfig(kind="encoder", cls_token_id=1, sep_token_id=2, associative_d_mem=8).associative_config()
    enc = dict(kind="encoder", cls_token_id=1, sep_token_id=2)
    with pytest.raises(ValueError, match="associative_update_rule: options of the associative memory, "
                                         "which needs associative_d_mem > 0"):
        RMTConfig(**enc, associative_update_rule="delta")
    with pytest.raises(ValueError, match=r"associative memory options \(RMTConfig.associative_<field>\): "
                                         r"update_rule='delta' needs use_l2_norm=True"):
        RMTConfig(**enc, associative_d_mem=8, associative_update_rule="delta")
    with pytest.raises(ValueError, match="normaliser_floor must be a finite float"):
        RMTConfig(**enc, associative_d_mem=8, associative_normaliser_floor=-1.0)
    cfg = model.rmt_config
    with pytest.raises(ValueError, match="update_rule must be one of"):
        model.replace_config(associative_update_rule="hebb")
    assert model.rmt_config is cfg  # unchanged after the refusal


def test_read_share_script():
    """scripts/memory_stats.py (associative): nothing read in the first segment, nothing by a new
    memory; layer 0's share in segment 2 matches the read computed by hand from segment 1's state."""
    stats = load_script("memory_stats")
    x = tokens(length=2 * S, seed=6)
    model = make(seed=5, segment_alignment="left").eval()
    shares = stats.read_share(model, x)
    assert len(shares) == 2 and shares[0] == [0.0, 0.0] and min(shares[1]) > 0
    with torch.no_grad():
        state = model(x[:, :S]).state
        emb = model.base.get_input_embeddings()
        cls_, sep = emb(torch.tensor([[CLS]] * 2)), emb(torch.tensor([[SEP]] * 2))
        seq = torch.cat([cls_, state.memory, sep, emb(x[:, S:]), sep], 1)
        h0 = model.base.bert.embeddings(inputs_embeds=seq, position_ids=torch.arange(seq.shape[1])[None])
        q = h0.double() @ model.assoc[0].W_mq.weight.double().T
        read = reference_read(q, state.extra["A.0"].double(), state.extra["z.0"].double(), nu=3, eps=1e-5)
    want = read.pow(2).mean().sqrt() / h0.double().pow(2).mean().sqrt()
    assert shares[1][0] == pytest.approx(want.item(), rel=1e-4)
    assert all(s == 0 for row in stats.read_share(make(seed=5, randomize=False), x) for s in row)
    with pytest.raises(ValueError, match="no associative memory"):
        stats.read_share(RMTEncoderForSequenceClassification(tiny_bert(), num_mem_tokens=M, segment_size=S,
                                                             cls_token_id=CLS, sep_token_id=SEP), x)
