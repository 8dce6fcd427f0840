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
