"""Tiny transformers models built from configs (no downloads) for the wrapper tests."""

from __future__ import annotations

import copy

import torch
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

from rmt_fast import dense_visibility

VOCAB = 61


def tiny_gpt2(seed=0, n_positions=64, dropout=0.0, layers=2):
    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_positions=n_positions, n_embd=32, n_layer=layers, n_head=4,
                     attn_pdrop=dropout, resid_pdrop=dropout, embd_pdrop=dropout,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def tiny_llama(seed=0):
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                      bos_token_id=0, eos_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def tiny_bert(cls=BertForSequenceClassification, seed=0, layers=2, dropout=0.0):
    """A 2-layer d32 BERT of class ``cls`` (vocabulary 53, 3 labels), in eval mode."""
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=53, hidden_size=32, num_hidden_layers=layers, num_attention_heads=4,
                     intermediate_size=64, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                     max_position_embeddings=64, num_labels=3)
    return cls(cfg).eval()


def eager_copy(model):
    """A deep copy running transformers' own eager attention: the independent reference."""
    ref = copy.deepcopy(model)
    ref.set_attn_implementation("eager")
    return ref


def ids(batch, length, seed=0):
    return torch.randint(1, VOCAB, (batch, length), generator=torch.Generator().manual_seed(seed))


def tiny_armt(kind="gpt2", seed=0, mv_std=0.3, **kw):
    """A tiny ARMT (GPT-2 or Llama base) with every associative weight random (W_mv starts at
    zero otherwise); ``kw`` go to ARMTForCausalLM."""
    from rmt_fast.models.armt import ARMTForCausalLM

    kw = {"num_mem_tokens": 3, "d_mem": 4, "segment_size": 8, **kw}
    base = {"gpt2": tiny_gpt2, "llama": tiny_llama}[kind](seed=seed)
    return random_mv(ARMTForCausalLM(base, **kw).eval(), seed + 100, mv_std)


def random_mv(model, seed, std):
    """``model`` (an ARMT) with every ``W_mv`` drawn from N(0, std) (it starts at zero, which
    would make the associative write a no-op); returns the model."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for a in model.assoc:
            a.W_mv.weight.copy_(torch.randn(a.W_mv.weight.shape, generator=g, dtype=a.W_mv.weight.dtype)
                                * std)
    return model


def check_repeated_rows(model, tokens):
    """``model.generate`` with the rows that transformers repeats (``num_return_sequences``,
    beams): sampling two sequences per row equals sampling from the rows repeated by hand
    (same seed), and beam search on the batch equals each row searched alone."""
    kw = dict(max_new_tokens=4, min_new_tokens=4, pad_token_id=0)  # no early EOS: full length
    torch.manual_seed(3)
    two = model.generate(tokens, do_sample=True, num_return_sequences=2, **kw)
    torch.manual_seed(3)
    by_hand = model.generate(tokens.repeat_interleave(2, 0), do_sample=True, **kw)
    assert two.shape == (2 * tokens.shape[0], 4) and torch.equal(two, by_hand)
    kw.update(num_beams=3, do_sample=False, output_scores=True, return_dict_in_generate=True)
    beams = model.generate(tokens, **kw)
    for row in range(tokens.shape[0]):
        alone = model.generate(tokens[row:row + 1], **kw)
        assert torch.equal(beams.sequences[row], alone.sequences[0])
        torch.testing.assert_close(beams.sequences_scores[row], alone.sequences_scores[0])


def tiny_scored(kind: str, impl: str, window: int = 4):
    """Tiny models whose scores carry more than ``q k^T``: Gemma 2 (logit softcapping, q scaled
    up so that it binds), gpt-oss (a sink logit per head, set non-zero), T5 (relative bias)."""
    from transformers import (
        Gemma2Config,
        Gemma2ForCausalLM,
        GptOssConfig,
        GptOssForCausalLM,
        T5Config,
        T5ForConditionalGeneration,
    )

    heads = dict(num_attention_heads=4, num_key_value_heads=2, head_dim=8, hidden_size=32,
                 intermediate_size=64, num_hidden_layers=2, max_position_embeddings=64,
                 bos_token_id=0, eos_token_id=0, pad_token_id=0, vocab_size=97)
    cls, cfg = {
        "gemma2": lambda: (Gemma2ForCausalLM, Gemma2Config(
            sliding_window=window, attn_logit_softcapping=5.0, query_pre_attn_scalar=8, **heads)),
        "gpt_oss": lambda: (GptOssForCausalLM, GptOssConfig(
            num_local_experts=2, num_experts_per_tok=1, sliding_window=window,
            layer_types=["sliding_attention", "full_attention"], **heads)),
        "t5": lambda: (T5ForConditionalGeneration, T5Config(
            d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, dropout_rate=0.0,
            decoder_start_token_id=0, pad_token_id=0, eos_token_id=1, vocab_size=97)),
    }[kind]()
    torch.manual_seed(0)
    model = cls._from_config(cfg, attn_implementation=impl).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("sinks"):
                p.normal_(0, 2)
            if name.endswith("q_proj.weight"):
                p.mul_(30)
    return model


def official_loop(ref, memory, tokens, m, s, mask="causal"):
    """The official wrapper's forward, spelled out: cat([mem, seg, mem]) into the base model."""
    logits, mem = [], memory
    for start in range(0, tokens.shape[1], s):
        seg = tokens[:, start:start + s]
        x = torch.cat([mem, ref.get_input_embeddings()(seg), mem], dim=1)
        kw = {}
        if mask != "causal":
            vis = dense_visibility(x.shape[1], num_read=m, num_write=m, mask=mask)
            bias = torch.zeros(vis.shape).masked_fill(~vis, torch.finfo(torch.float32).min)
            kw["attention_mask"] = bias[None, None].expand(x.shape[0], 1, -1, -1)  # eager adds it
        out = ref(inputs_embeds=x, output_hidden_states=True, **kw)
        logits.append(out.logits[:, m:m + seg.shape[1]])
        mem = out.hidden_states[-1][:, -m:]
    return torch.cat(logits, dim=1), mem


def reference_clip_read(read, h, clip):
    """ARMT's ``read_clip`` from its definition, for the reference loops: each token's ``read``
    scaled to at most ``clip`` times the RMS of ``h`` (mean squares compared, so a zero read
    takes no square root, whose gradient would be NaN)."""
    ms, bound = read.pow(2).mean(-1, keepdim=True), clip ** 2 * h.pow(2).mean(-1, keepdim=True)
    return read * torch.where(ms > bound, (bound / ms.clamp_min(1e-300)).sqrt(), 1.0)
