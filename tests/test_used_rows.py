"""Reading computes the last block on the write rows only (rmt_fast.models.used_rows), and the
memory, cache and gradients stay those of the full computation."""

import pytest
import torch
import torch.nn.functional as F
from models import VOCAB, eager_copy, ids, tiny_gpt2, tiny_llama
from test_rmt_decoder import official_loop

from rmt_fast.integrations import transformers as backend
from rmt_fast.models import RMTForCausalLM, used_rows
from rmt_fast.models.memory_transformer import find_layers


def _record_rows(model, monkeypatch):
    """Rows entering the last block's row-wise modules and query rows of every attention call."""
    seen = {"row_wise": [], "queries": []}
    block = find_layers(model.lm)[-1]
    for mod in used_rows.row_wise_modules(block):
        mod.register_forward_hook(lambda m, a, o: seen["row_wise"].append(a[0].shape[1]))
    real = backend.memory_attention

    def spy(q, *a, **k):
        seen["queries"].append(q.shape[2])
        return real(q, *a, **k)

    monkeypatch.setattr(backend, "memory_attention", spy)
    return seen


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama])
@pytest.mark.parametrize("mask", ["causal", "rmt", "full", "bottleneck"])
def test_read_runs_the_last_block_on_write_rows_and_keeps_the_memory(make, mask, monkeypatch):
    base = make()
    ref = eager_copy(base)
    m, s = 3, 7
    model = RMTForCausalLM(base, num_mem_tokens=m, segment_size=s, mask=mask)
    assert model.training  # read() evaluates: the tail is used whatever the mode
    seen = _record_rows(model, monkeypatch)
    tokens = ids(2, 21)  # three full segments: L = 13 rows each
    with torch.no_grad():
        mem, _ = model.read(tokens)
        _, want = official_loop(ref, model.memory.expand(2, -1, -1), tokens, m, s, mask)
    torch.testing.assert_close(mem, want, atol=1e-5, rtol=0)
    assert len(used_rows.row_wise_modules(find_layers(model.lm)[-1])) == 2
    assert seen["row_wise"] == [m] * 6  # MLP and output projection, three segments
    assert seen["queries"] == [s + 2 * m, m] * 3  # layer 0 all rows, last layer the write rows

    seen["row_wise"].clear(), seen["queries"].clear()
    with torch.no_grad():
        out = model(tokens)  # logits: every row of every layer
    torch.testing.assert_close(out.memory, want, atol=1e-5, rtol=0)
    assert seen["row_wise"] == [s + 2 * m] * 6 and seen["queries"] == [s + 2 * m] * 6


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama])
def test_loss_on_the_last_segment_has_the_reference_gradients(make, monkeypatch):
    """``loss_over="last"``: the segments before the last are read (tail rows only) under
    autograd; the gradients of every weight and of the memory equal a hand-written loop."""
    base = make()
    ref = eager_copy(base)
    m, s = 2, 5
    model = RMTForCausalLM(base, num_mem_tokens=m, segment_size=s, loss_over="last",
                           bptt_depth=-1).eval()  # eval: no dropout, the tail is used
    seen = _record_rows(model, monkeypatch)
    tokens = ids(2, 15, seed=3)
    model(tokens, labels=tokens, return_logits=False).loss.backward()
    assert seen["row_wise"] == [m, m, m, m, s + 2 * m, s + 2 * m]

    memory = model.memory.detach().clone().requires_grad_()
    mem = memory.expand(2, -1, -1)
    for start in range(0, 15, s):
        x = torch.cat([mem, ref.get_input_embeddings()(tokens[:, start:start + s]), mem], dim=1)
        out = ref(inputs_embeds=x, output_hidden_states=True)
        mem = out.hidden_states[-1][:, -m:]
    logits = out.logits[:, m:m + s - 1]
    F.cross_entropy(logits.reshape(-1, VOCAB), tokens[:, 11:15].reshape(-1)).backward()
    torch.testing.assert_close(model.memory.grad, memory.grad, atol=1e-6, rtol=1e-4)
    grads = dict(ref.named_parameters())
    for name, p in model.base.named_parameters():
        want = grads[name].grad
        got = p.grad
        if want is None:
            assert got is None or torch.count_nonzero(got) == 0, name
            continue
        torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-4, msg=name)


def test_blocks_without_known_row_wise_modules_restrict_the_attention_only(monkeypatch):
    monkeypatch.setattr(used_rows, "ROW_WISE", ())
    base = tiny_gpt2()
    ref = eager_copy(base)
    model = RMTForCausalLM(base, num_mem_tokens=3, segment_size=6, mask="rmt")
    tokens = ids(2, 18)
    seen = _record_rows(model, monkeypatch)
    with torch.no_grad():
        mem, _ = model.read(tokens)
        _, want = official_loop(ref, model.memory.expand(2, -1, -1), tokens, 3, 6, "rmt")
    torch.testing.assert_close(mem, want, atol=1e-5, rtol=0)
    assert used_rows.install(find_layers(model.lm)[-1]) == 0
    assert seen["queries"] == [12, 3] * 3


def test_hooks_are_inactive_outside_a_tail_layout():
    """The hooked base model, called directly, computes every row (no layout is active)."""
    base = tiny_gpt2()
    model = RMTForCausalLM(base, num_mem_tokens=2, segment_size=4)
    with torch.no_grad():
        model.read(ids(1, 8))  # installs the hooks
        x = ids(2, 9)
        got = base(x).logits
    fresh = tiny_gpt2()  # same seed: same weights, never hooked
    with torch.no_grad():
        torch.testing.assert_close(got, fresh(x).logits, atol=1e-6, rtol=0)


def test_training_mode_reads_every_row(monkeypatch):
    """In training mode (dropout draws) segments without targets run in full, so that plain and
    checkpointed training draw the same random numbers."""
    model = RMTForCausalLM(tiny_gpt2(), num_mem_tokens=2, segment_size=5, loss_over="last").train()
    seen = _record_rows(model, monkeypatch)
    tokens = ids(2, 15)
    model(tokens, labels=tokens, return_logits=False).loss.backward()
    assert seen["row_wise"] == [9] * 6


def test_encoder_classifier_reads_cls_and_memory_rows_only(monkeypatch):
    """Encoder classifier in evaluation mode: the last block runs on [CLS] + memory rows only;
    logits and memory equal the full pass (every row), with and without key padding."""
    from models import tiny_bert
    from test_rmt_encoder import CLS, SEP, tokens

    from rmt_fast.models import RMTEncoderForSequenceClassification

    m = 4
    model = RMTEncoderForSequenceClassification(tiny_bert(), num_mem_tokens=m,
                                                segment_size=6, cls_token_id=CLS, sep_token_id=SEP).eval()
    block = find_layers(model.base)[-1]
    seen = []
    x = tokens(2, 16)
    am = torch.ones(2, 16, dtype=torch.long)
    am[1, 4:9] = 0  # padding inside the second segment of row 1
    with torch.no_grad():
        got = [model(x), model(x, attention_mask=am)]
        # the public one-segment call returns every row's hidden states: no rows skipped there
        out, _ = model.segment_forward(model.expand_memory(2), x[:, :6], None)
        hidden = out.hidden_states[-1]
    assert len(used_rows.row_wise_modules(block)) == 3  # attention.output, intermediate, output
    for mod in used_rows.row_wise_modules(block):
        mod.register_forward_hook(lambda mod, a, o: seen.append(a[0].shape[1]))
    with torch.no_grad():
        model(x)
    assert seen == [1 + m] * 9  # 3 modules x 3 segments
    monkeypatch.setattr(RMTEncoderForSequenceClassification, "_used_rows", lambda self, rows: None)
    with torch.no_grad():
        want = [model(x), model(x, attention_mask=am)]
        full, _ = model.segment_forward(model.expand_memory(2), x[:, :6], None)
    torch.testing.assert_close(hidden, full.hidden_states[-1], atol=1e-6, rtol=0)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g.logits, w.logits, atol=1e-5, rtol=0)
        torch.testing.assert_close(g.memory, w.memory, atol=1e-5, rtol=0)
    assert not torch.allclose(got[0].memory, got[1].memory)  # the padding mattered


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_armt_read_runs_the_last_block_on_memory_rows_and_keeps_the_state(kind):
    """ARMT reading (no hidden states): the last block's row-wise modules see the memory rows
    only; the associative state (every layer's A and z) equals the full pass's."""
    from models import tiny_armt

    model = tiny_armt(kind).eval()
    m = model.rmt_config.num_mem_tokens
    seen = []
    for mod in tail_modules(model.base):
        mod.register_forward_hook(lambda mod, a, o: seen.append(a[0].shape[1]))
    tokens = ids(2, 8)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[1, :3] = False
    with torch.no_grad():
        state = model.init_state(2)
        for mk in (None, mask):
            seen.clear()
            _, fast = model.segment_forward(state, tokens, mk, need_hidden=False)
            assert seen == [m, m]
            seen.clear()
            _, full = model.segment_forward(state, tokens, mk, need_hidden=True)
            assert seen == [8 + m, 8 + m]
            for a, b in zip(fast.A + fast.z, full.A + full.z, strict=True):
                torch.testing.assert_close(a, b, atol=1e-5, rtol=0)
            state = full  # the second round reads from a written state


def tail_modules(lm):
    return used_rows.row_wise_modules(find_layers(lm)[-1])
