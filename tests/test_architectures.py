"""RMTForCausalLM around many transformers architectures, built from tiny configs (no downloads):
logits and memory equal the official loop on the eager model, reading gives the forward's memory,
and generation (XL cache, beams) runs; architectures without AttentionInterface are refused."""

import copy

import pytest
import torch
import transformers as T
from models import VOCAB, ids, official_loop

from rmt_fast.models import RMTForCausalLM

LLAMA_LIKE = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
ARCHS = {
    "gpt_neox": (T.GPTNeoXConfig, T.GPTNeoXForCausalLM, dict(LLAMA_LIKE)),
    "qwen2": (T.Qwen2Config, T.Qwen2ForCausalLM, dict(LLAMA_LIKE)),
    "qwen3": (T.Qwen3Config, T.Qwen3ForCausalLM, dict(LLAMA_LIKE, head_dim=8)),
    "phi": (T.PhiConfig, T.PhiForCausalLM, dict(LLAMA_LIKE)),
    "phi3": (T.Phi3Config, T.Phi3ForCausalLM, dict(LLAMA_LIKE, pad_token_id=0)),
    "stablelm": (T.StableLmConfig, T.StableLmForCausalLM, dict(LLAMA_LIKE)),
    "olmo2": (T.Olmo2Config, T.Olmo2ForCausalLM, dict(LLAMA_LIKE)),
    "gemma": (T.GemmaConfig, T.GemmaForCausalLM, dict(LLAMA_LIKE, head_dim=8)),
    "gemma3": (T.Gemma3TextConfig, T.Gemma3ForCausalLM,
               dict(LLAMA_LIKE, head_dim=8, sliding_window=64)),
    "gpt_bigcode": (T.GPTBigCodeConfig, T.GPTBigCodeForCausalLM,
                    dict(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64)),
    "opt": (T.OPTConfig, T.OPTForCausalLM,
            dict(vocab_size=VOCAB, hidden_size=32, ffn_dim=64, num_hidden_layers=2,
                 num_attention_heads=4, max_position_embeddings=64, word_embed_proj_dim=32)),
    # logits changed after the output embedding (rmt_fast.models.base.lm_logits)
    "cohere": (T.CohereConfig, T.CohereForCausalLM, dict(LLAMA_LIKE, logit_scale=0.3)),
    "granite": (T.GraniteConfig, T.GraniteForCausalLM, dict(LLAMA_LIKE, logits_scaling=4.0)),
    "hyperclovax": (T.HyperCLOVAXConfig, T.HyperCLOVAXForCausalLM,
                    dict(LLAMA_LIKE, logits_scaling=4.0)),
    "gemma2": (T.Gemma2Config, T.Gemma2ForCausalLM,
               dict(LLAMA_LIKE, head_dim=8, sliding_window=64, final_logit_softcapping=0.5)),
}
REFUSED = {
    "bloom": (T.BloomConfig, T.BloomForCausalLM, dict(vocab_size=VOCAB, hidden_size=32, n_layer=2,
                                                      n_head=4)),
    "gptj": (T.GPTJConfig, T.GPTJForCausalLM, dict(vocab_size=VOCAB, n_embd=32, n_layer=2,
                                                   n_head=4, n_positions=64, rotary_dim=4)),
}


def _base(spec):
    config_cls, model_cls, kw = spec
    torch.manual_seed(0)
    return model_cls(config_cls(**kw)).eval()


@pytest.mark.parametrize("name", list(ARCHS))
def test_architecture_equals_the_official_loop(name):
    base = _base(ARCHS[name])
    ref = copy.deepcopy(base)
    ref.set_attn_implementation("eager")
    m, s = 3, 7
    tokens = ids(2, 25)
    # the official loop hands OPT a 4-d mask, from which OPT would count its positions
    for mask in ("causal",) if name == "opt" else ("causal", "rmt"):
        model = RMTForCausalLM(copy.deepcopy(base), num_mem_tokens=m, segment_size=s,
                               mask=mask).eval()
        with torch.no_grad():
            out = model(tokens)
            logits, mem = official_loop(ref, model.memory.expand(2, -1, -1), tokens, m, s, mask)
            read, _ = model.read(tokens)
        torch.testing.assert_close(out.logits, logits, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out.memory, mem, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(read, out.memory, atol=1e-5, rtol=1e-5)
    xl = RMTForCausalLM(copy.deepcopy(base), num_mem_tokens=m, segment_size=s, xl_cache=4).eval()
    new = xl.generate(tokens, max_new_tokens=3, min_new_tokens=3, num_beams=2, do_sample=False,
                      pad_token_id=0)
    assert new.shape == (2, 3)


ROTARY = ["gpt_neox", "qwen2", "qwen3", "phi", "phi3", "stablelm", "olmo2", "gemma", "gemma3",
          "cohere", "granite", "hyperclovax", "gemma2"]


@pytest.mark.parametrize("name", ROTARY)
def test_rotary_xl_cache_equals_full_attention(name):
    """No memory, a cache of every earlier token: Transformer-XL over segments is causal
    attention over the whole input when the cached keys move to their true positions (each
    model's rotary frequencies, partial rotaries, Cohere's interleaved pairs)."""
    seg, n = 6, 3
    base = _base(ARCHS[name]).double()
    model = RMTForCausalLM(base, num_mem_tokens=0, segment_size=seg, xl_cache=(n - 1) * seg).eval()
    tokens = ids(2, seg * n)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens).logits, base(tokens).logits, atol=1e-6, rtol=0)


@pytest.mark.parametrize("name", list(REFUSED))
def test_architecture_without_attention_interface_is_refused(name):
    with pytest.raises(TypeError, match="ignores attn_implementation"):
        RMTForCausalLM(_base(REFUSED[name]), num_mem_tokens=2, segment_size=4)


def test_unknown_logit_scaling_is_refused():
    """A model whose config has ``logits_scaling`` of an unknown family: its forward may scale
    the logits either way, so the wrapper refuses rather than guess."""
    config = T.LlamaConfig(**LLAMA_LIKE)
    config.logits_scaling = 2.0
    with pytest.raises(TypeError, match="logits_scaling, which rmt_fast does not know"):
        RMTForCausalLM(T.LlamaForCausalLM(config), num_mem_tokens=2, segment_size=4)


# --- encoders ------------------------------------------------------------------------------------
CLS, SEP = 1, 2
BERT_LIKE = dict(vocab_size=53, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                 intermediate_size=64, num_labels=3, hidden_dropout_prob=0.0,
                 attention_probs_dropout_prob=0.0, max_position_embeddings=64)
ENCODERS = {
    # RoBERTa-style embeddings number tokens from padding_idx + 1 (here 2)
    "roberta": (T.RobertaConfig, T.RobertaForSequenceClassification, dict(BERT_LIKE, pad_token_id=1)),
    "xlm_roberta": (T.XLMRobertaConfig, T.XLMRobertaForSequenceClassification,
                    dict(BERT_LIKE, pad_token_id=1)),
    "electra": (T.ElectraConfig, T.ElectraForSequenceClassification,
                dict(BERT_LIKE, embedding_size=32)),
    "distilbert": (T.DistilBertConfig, T.DistilBertForSequenceClassification,
                   dict(vocab_size=53, dim=32, n_layers=2, n_heads=4, hidden_dim=64, num_labels=3,
                        dropout=0.0, attention_dropout=0.0, max_position_embeddings=64,
                        seq_classif_dropout=0.0)),
    "modernbert": (T.ModernBertConfig, T.ModernBertForSequenceClassification,
                   dict(vocab_size=53, hidden_size=32, num_hidden_layers=3, num_attention_heads=4,
                        intermediate_size=64, num_labels=3, max_position_embeddings=64,
                        local_attention=32, pad_token_id=0, cls_token_id=CLS, sep_token_id=SEP)),
}


def _encoder(spec, **config):
    config_cls, model_cls, kw = spec
    torch.manual_seed(0)
    return model_cls(config_cls(**{**kw, **config})).eval()


@pytest.mark.parametrize("name", list(ENCODERS))
def test_encoder_architecture_equals_the_official_loop(name):
    """``[CLS] memory [SEP] segment [SEP]`` per segment through the eager model, memory from the
    hidden states at 1..M (the official encoder wrapper); positions as the model numbers a
    sequence given as embeddings."""
    from rmt_fast.models import RMTEncoderForSequenceClassification

    base = _encoder(ENCODERS[name])
    ref = copy.deepcopy(base)
    ref.set_attn_implementation("eager")
    m = 4
    model = RMTEncoderForSequenceClassification(base, num_mem_tokens=m, segment_size=6,
                                                cls_token_id=CLS, sep_token_id=SEP).eval()
    x = torch.randint(3, 53, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x)
        emb = ref.get_input_embeddings()
        mem = model.memory.expand(2, -1, -1)
        cls, sep = emb(torch.tensor([[CLS]] * 2)), emb(torch.tensor([[SEP]] * 2))
        for start, end in [(0, 4), (4, 10), (10, 16)]:  # right alignment: the first is short
            o = ref(inputs_embeds=torch.cat([cls, mem, sep, emb(x[:, start:end]), sep], 1),
                    output_hidden_states=True)
            mem = o.hidden_states[-1][:, 1:1 + m]
    torch.testing.assert_close(out.logits, o.logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.memory, mem, atol=1e-5, rtol=1e-5)


def test_embeddings_narrower_than_hidden_states_are_refused():
    """ALBERT's factorised embeddings and OPT-350m's projected ones: memory written from hidden
    states cannot be read back as input embeddings."""
    from rmt_fast.models import RMTEncoderForSequenceClassification

    albert = _encoder((T.AlbertConfig, T.AlbertForSequenceClassification,
                       dict(BERT_LIKE, embedding_size=16)))
    with pytest.raises(TypeError, match="input embeddings are 16 wide but its hidden states 32"):
        RMTEncoderForSequenceClassification(albert, num_mem_tokens=2, segment_size=4,
                                            cls_token_id=CLS, sep_token_id=SEP)
    opt = _base((T.OPTConfig, T.OPTForCausalLM,
                 dict(ARCHS["opt"][2], word_embed_proj_dim=16)))
    with pytest.raises(TypeError, match="input embeddings are 16 wide but its hidden states 32"):
        RMTForCausalLM(opt, num_mem_tokens=2, segment_size=4)


def test_encoder_local_attention_shorter_than_a_segment_is_refused():
    from rmt_fast.models import RMTEncoderForSequenceClassification

    base = _encoder(ENCODERS["modernbert"], local_attention=8)
    model = RMTEncoderForSequenceClassification(base, num_mem_tokens=4, segment_size=6,
                                                cls_token_id=CLS, sep_token_id=SEP)
    with pytest.raises(ValueError, match="sliding window of 5 keys, shorter than the 11 keys"):
        model(torch.randint(3, 53, (2, 16)))
