"""The gated memory update (``RMTConfig.memory_update="gated"``, ``MemoryGate``): its formula and
gradients against float64, the decoder and encoder loops against reference loops that apply the
gate by hand, reading/checkpointing/persistence with a gate, and the errors."""

import copy
import json

import pytest
import torch
from helpers import load_script
from models import eager_copy, ids, tiny_bert, tiny_gpt2

from rmt_fast.models import MemoryTransformer, RMTEncoderForSequenceClassification, RMTForCausalLM
from rmt_fast.models.base import MemoryGate
from rmt_fast.models.config import RMTConfig

CLS, SEP = 1, 2


def gate_ref(gate: MemoryGate, read, written):
    """The documented update in float64: z = sigmoid(W [written; read] + b), (1 - z) w + z r."""
    w, r = written.double(), read.double()
    z = torch.sigmoid(torch.cat([w, r], -1) @ gate.proj.weight.double().T + gate.proj.bias.double())
    return (1 - z) * w + z * r


def randomize(gate: MemoryGate, seed=0):
    """A gate that does something (a new one is close to the plain update by design)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        gate.proj.weight.copy_(torch.randn(gate.proj.weight.shape, generator=g) * 0.3)
        gate.proj.bias.copy_(torch.randn(gate.proj.bias.shape, generator=g))
    return gate


def test_gate_formula_gradients_and_new_gate_start():
    torch.manual_seed(0)
    gate = randomize(MemoryGate(8))
    read, written = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    out = gate(read, written)
    torch.testing.assert_close(out.double(), gate_ref(gate, read, written), atol=1e-6, rtol=0)
    g64 = copy.deepcopy(gate).double()
    r64 = read.double().requires_grad_()
    w64 = written.double().requires_grad_()
    # the gate's own W and b are inputs too: gradcheck perturbs them in place, the module reads them
    assert torch.autograd.gradcheck(lambda r, w, *params: g64(r, w), (r64, w64, *g64.parameters()))
    # a new gate: W = 0, z = sigmoid(-3) everywhere, close to the plain replacement
    new = MemoryGate(8)
    assert torch.count_nonzero(new.proj.weight) == 0
    z = torch.sigmoid(torch.tensor(MemoryGate.INIT_BIAS))
    torch.testing.assert_close(new(read, written), written + z * (read - written))
    assert 0.03 < z < 0.06


def gated_official_loop(ref, gate, memory, tokens, m, s):
    """The official decoder loop, cat([mem, seg, mem]) into the base model, with the gate applied
    to each segment's write outputs by hand."""
    logits, mem = [], memory
    for start in range(0, tokens.shape[1], s):
        seg = tokens[:, start:start + s]
        out = ref(inputs_embeds=torch.cat([mem, ref.get_input_embeddings()(seg), mem], 1),
                  output_hidden_states=True)
        logits.append(out.logits[:, m:m + seg.shape[1]])
        mem = gate_ref(gate, mem, out.hidden_states[-1][:, -m:]).float()
    return torch.cat(logits, 1), mem


def test_decoder_with_a_gate_equals_the_reference_loop():
    base = tiny_gpt2()
    ref = eager_copy(base)
    m, s = 3, 7
    model = RMTForCausalLM(base, num_mem_tokens=m, segment_size=s, memory_update="gated")
    randomize(model.memory_gate)
    tokens = ids(2, 25)
    out = model(tokens, labels=tokens)
    with torch.no_grad():
        start = model.memory.expand(2, -1, -1)
        logits, mem = gated_official_loop(ref, model.memory_gate, start, tokens, m, s)
    torch.testing.assert_close(out.logits, logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.memory, mem, atol=1e-5, rtol=0)
    # the gate matters: the plain update with the same weights gives another memory
    plain = RMTForCausalLM(eager_copy(base), num_mem_tokens=m, segment_size=s)
    plain.memory = model.memory
    with torch.no_grad():
        assert (plain(tokens).memory - out.memory).abs().max() > 1e-3
    out.loss.backward()
    for p in (model.memory, *model.memory_gate.parameters()):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_decoder_gate_reading_checkpointing_and_persistence(tmp_path):
    model = RMTForCausalLM(tiny_gpt2(), num_mem_tokens=3, segment_size=6, memory_update="gated").eval()
    randomize(model.memory_gate, seed=1)
    tokens = ids(2, 20)
    am = torch.ones(2, 20, dtype=torch.long)
    am[1, :8] = 0
    with torch.no_grad():
        full = model(tokens, attention_mask=am)
        read_mem, _ = model.read(tokens, attention_mask=am)  # the no-hidden reading path
    torch.testing.assert_close(read_mem, full.memory, atol=1e-5, rtol=0)
    # segment checkpointing recomputes the gate: identical gradients, the gate's included
    grads = []
    for ckpt in (False, True):
        m = copy.deepcopy(model).train()
        m.replace_config(checkpoint_segments=ckpt)
        m(tokens, labels=tokens).loss.backward()
        grads.append({n: p.grad.clone() for n, p in m.named_parameters() if p.grad is not None})
    assert "memory_gate.proj.weight" in grads[0] and grads[0].keys() == grads[1].keys()
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=0)
    model.save_pretrained(tmp_path / "gated")
    loaded = RMTForCausalLM.from_pretrained(tmp_path / "gated")
    assert loaded.rmt_config.memory_update == "gated"
    assert torch.equal(loaded.memory_gate.proj.weight, model.memory_gate.proj.weight)
    with torch.no_grad():
        assert torch.equal(loaded(tokens, attention_mask=am).logits, full.logits)


def test_a_config_file_without_the_field_loads_as_replace(tmp_path):
    RMTConfig(num_mem_tokens=2, segment_size=4).save(tmp_path)
    path = tmp_path / "rmt_config.json"
    data = json.loads(path.read_text())
    del data["memory_update"]  # as written before the gate existed
    path.write_text(json.dumps(data))
    assert RMTConfig.load(tmp_path).memory_update == "replace"


def test_encoder_with_a_gate_equals_the_reference_loop():
    base = tiny_bert()
    ref = copy.deepcopy(base)
    ref.set_attn_implementation("eager")
    m, s = 4, 6
    model = RMTEncoderForSequenceClassification(base, num_mem_tokens=m, segment_size=s, cls_token_id=CLS,
                                                sep_token_id=SEP, memory_update="gated")
    randomize(model.memory_gate, seed=2)
    x = torch.randint(3, 53, (2, 16), generator=torch.Generator().manual_seed(0))
    out = model(x, labels=torch.tensor([0, 2]))
    emb = ref.get_input_embeddings()
    with torch.no_grad():
        mem = model.memory.expand(2, -1, -1)
        cls_, sep = emb(torch.tensor([[CLS]] * 2)), emb(torch.tensor([[SEP]] * 2))
        for start, end in [(0, 4), (4, 10), (10, 16)]:  # right alignment: the first segment is short
            o = ref(inputs_embeds=torch.cat([cls_, mem, sep, emb(x[:, start:end]), sep], 1),
                    output_hidden_states=True)
            mem = gate_ref(model.memory_gate, mem, o.hidden_states[-1][:, 1:1 + m]).float()
    torch.testing.assert_close(out.logits, o.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.memory, mem, atol=1e-5, rtol=0)
    out.loss.backward()
    assert model.memory_gate.proj.weight.grad.abs().sum() > 0


def test_gate_openness_script():
    """scripts/memory_stats.py (gate): one row per segment; a new gate keeps sigmoid(-3) of every
    channel of every slot; a trained-looking gate's rows match z computed by hand."""
    stats = load_script("memory_stats")
    kw = dict(num_mem_tokens=4, segment_size=6, cls_token_id=CLS, sep_token_id=SEP)
    model = RMTEncoderForSequenceClassification(tiny_bert(), memory_update="gated", **kw).eval()
    x = torch.randint(3, 53, (2, 18), generator=torch.Generator().manual_seed(1))
    rows = stats.gate_openness(model, x)
    z0 = torch.sigmoid(torch.tensor(MemoryGate.INIT_BIAS)).item()
    assert [r["segment"] for r in rows] == [0, 1, 2]
    assert all(abs(r["mean"] - z0) < 1e-6 and r["over_0.5"] == 0 and r["slot_spread"] < 1e-6 for r in rows)
    randomize(model.memory_gate, seed=3)
    rows = stats.gate_openness(model, x)
    with torch.no_grad():  # the first segment's z by hand
        cls_, sep = (model.base.get_input_embeddings()(torch.tensor([[t]] * 2)) for t in (CLS, SEP))
        mem = model.memory.expand(2, -1, -1)
        emb = model.base.get_input_embeddings()(x[:, :6])
        o = model.base(inputs_embeds=torch.cat([cls_, mem, sep, emb, sep], 1), output_hidden_states=True)
        z = model.memory_gate.keep(mem, o.hidden_states[-1][:, 1:5])
    assert rows[0]["mean"] == pytest.approx(z.mean().item(), abs=1e-5)
    assert rows[0]["over_0.5"] == pytest.approx((z > 0.5).float().mean().item(), abs=1e-6)
    assert 0 < rows[0]["over_0.5"] < 1 and rows[0]["slot_spread"] > 0
    with pytest.raises(ValueError, match="not gated"):
        stats.gate_openness(RMTEncoderForSequenceClassification(tiny_bert(), **kw), x)


def test_gate_errors():
    with pytest.raises(ValueError, match="memory_update must be one of"):
        RMTForCausalLM(tiny_gpt2(), num_mem_tokens=2, segment_size=4, memory_update="blend")
    with pytest.raises(ValueError, match="Memory Transformer has no recurrent memory"):
        MemoryTransformer(tiny_bert(), num_mem_tokens=2, memory_update="gated")
    model = RMTForCausalLM(tiny_gpt2(), num_mem_tokens=2, segment_size=4)
    with pytest.raises(ValueError, match="memory_update"):
        model.replace_config(memory_update="gated")  # it adds parameters: fixed at construction
    assert model.memory_gate is None and model.rmt_config.memory_update == "replace"
    assert not any("gate" in k for k in model.state_dict())
