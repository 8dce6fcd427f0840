"""The package's public face: top-level names, config objects, explicit side effects."""

from __future__ import annotations

import dataclasses
import subprocess
import sys

import pytest
import torch
from models import VOCAB, ids, tiny_gpt2
from transformers import BertConfig, BertForSequenceClassification

import rmt_fast
from rmt_fast.integrations.fused_activations import FastLayerNorm, TanhGELU


def test_top_level_exports():
    names = ["RMTForCausalLM", "RMTConfig", "RMTEncoderForSequenceClassification",
             "RMTEncoderForTokenClassification", "MemoryTransformer", "StreamingReader",
             "memory_attention", "MASK_MODES", "__version__", "AttentionLayout", "TrainConfig"]
    for name in names:
        assert hasattr(rmt_fast, name), name
        assert name in dir(rmt_fast) and name in rmt_fast.__all__
    assert rmt_fast.RMTForCausalLM is __import__("rmt_fast.models", fromlist=["x"]).RMTForCausalLM
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        rmt_fast.Nope  # noqa: B018


_IMPORT_EACH_FIRST = """
import importlib, pkgutil, sys, warnings
warnings.simplefilter("ignore")
import rmt_fast
names = sorted(m.name for m in pkgutil.walk_packages(rmt_fast.__path__, "rmt_fast."))
bad = []
for name in names:
    for key in [k for k in sys.modules if k == "rmt_fast" or k.startswith("rmt_fast.")]:
        del sys.modules[key]  # torch, transformers stay imported: each pass takes milliseconds
    try:
        importlib.import_module(name)
    except Exception as e:
        bad.append(f"{name}: {type(e).__name__}: {e}")
print(len(names))
print("\\n".join(bad))
"""


def test_every_module_imports_first():
    """Each submodule imports as the first rmt_fast module of a process: no import cycle that
    only the usual order (``rmt_fast.models`` before ``rmt_fast.checkpoint``, say) hides."""
    out = subprocess.run([sys.executable, "-c", _IMPORT_EACH_FIRST], capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    assert int(lines[0]) > 40, lines[0]  # the walk found the package
    assert lines[1:] == [], "\n".join(lines[1:])


def test_import_is_lazy():
    """``import rmt_fast`` does not import the models, the trainer or the streaming reader."""
    code = ("import sys, rmt_fast; mods = [m for m in ('rmt_fast.models.decoder', 'rmt_fast.train', "
            "'rmt_fast.streaming') if m in sys.modules]; print(mods)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


def test_config_object_and_keywords_agree():
    cfg = rmt_fast.RMTConfig(num_mem_tokens=3, segment_size=8, mask="rmt", bptt_depth=2)
    a = rmt_fast.RMTForCausalLM(tiny_gpt2(), config=cfg)
    b = rmt_fast.RMTForCausalLM(tiny_gpt2(), num_mem_tokens=3, segment_size=8, mask="rmt",
                                bptt_depth=2)
    assert a.rmt_config == b.rmt_config == cfg
    c = rmt_fast.RMTForCausalLM(tiny_gpt2(), config=cfg, bptt_depth=1)  # keywords override
    assert c.rmt_config.bptt_depth == 1 and cfg.bptt_depth == 2  # the given config is untouched
    b.load_state_dict(a.state_dict())
    x = ids(2, 20)
    torch.testing.assert_close(a(x).logits, b(x).logits, rtol=0, atol=0)


def test_config_is_frozen_and_replace_config_validates():
    model = rmt_fast.RMTForCausalLM(tiny_gpt2(), num_mem_tokens=2, segment_size=8)
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.rmt_config.bptt_depth = 3
    old = model.rmt_config
    new = model.replace_config(bptt_depth=3, checkpoint_segments=True)
    assert model.rmt_config is new and new.bptt_depth == 3 and old.bptt_depth == -1
    with pytest.raises(ValueError, match="num_mem_tokens"):
        model.replace_config(num_mem_tokens=4)
    with pytest.raises(ValueError, match="exceeds the base model's 64 positions"):
        model.replace_config(segment_size=100)
    with pytest.raises(ValueError, match="bptt_depth"):
        model.replace_config(bptt_depth=-5)
    assert model.rmt_config is new  # a refused change leaves the config as it was


def test_bad_constructor_arguments_are_named():
    with pytest.raises(TypeError, match=r"unexpected argument\(s\) \['num_memory'\]"):
        rmt_fast.RMTForCausalLM(tiny_gpt2(), num_memory=4)
    with pytest.raises(TypeError, match="config must be an RMTConfig"):
        rmt_fast.RMTForCausalLM(tiny_gpt2(), config={"num_mem_tokens": 2})
    enc_cfg = rmt_fast.RMTConfig(kind="encoder", cls_token_id=1, sep_token_id=2)
    with pytest.raises(ValueError, match="kind 'decoder'"):
        rmt_fast.RMTForCausalLM(tiny_gpt2(), config=enc_cfg)
    with pytest.raises(ValueError, match="num_mem_tokens must be an int"):
        rmt_fast.RMTConfig(num_mem_tokens=True)


def test_fused_activations_are_an_explicit_switch():
    fused = rmt_fast.RMTForCausalLM(tiny_gpt2(), num_mem_tokens=2, segment_size=8)
    plain = rmt_fast.RMTForCausalLM(tiny_gpt2(), num_mem_tokens=2, segment_size=8,
                                    fuse_activations=False)
    assert any(isinstance(m, TanhGELU) for m in fused.modules())
    assert not any(isinstance(m, TanhGELU) for m in plain.modules())
    assert any(type(m) is FastLayerNorm for m in fused.modules())
    assert not any(type(m) is FastLayerNorm for m in plain.modules())
    plain.load_state_dict(fused.state_dict())
    x = ids(1, 20)
    torch.testing.assert_close(fused(x).logits, plain(x).logits, rtol=1e-5, atol=1e-5)
    base = tiny_gpt2()
    assert rmt_fast.fuse_activations(base) == 2  # one per block; the function is public too


def test_encoder_defaults_and_tokenizer_ids():
    bert = BertForSequenceClassification(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=64,
                                                    max_position_embeddings=64, num_labels=3))

    class Tok:
        cls_token_id, sep_token_id = 1, 2

    model = rmt_fast.RMTEncoderForSequenceClassification(bert, tokenizer=Tok(), segment_size=16)
    cfg = model.rmt_config
    assert (cfg.kind, cfg.num_mem_tokens, cfg.mask, cfg.segment_alignment, cfg.loss_over) == (
        "encoder", 10, "full", "right", "last")
    assert (cfg.cls_token_id, cfg.sep_token_id) == (1, 2)


@pytest.mark.parametrize("variant", ["ctrl", "bottleneck"])
def test_memory_transformer_variant_survives_save_and_load(tmp_path, variant):
    """The wrapped blocks are saved under the base model's own names (a fresh base loads them)
    and MemCtrl's controller copies with the wrapper's weights."""
    bert = BertForSequenceClassification(BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=1,
                                                    num_attention_heads=2, intermediate_size=64,
                                                    max_position_embeddings=64))
    model = rmt_fast.MemoryTransformer(bert.bert, num_mem_tokens=3, variant=variant).eval()
    model.save_pretrained(tmp_path)
    loaded = rmt_fast.MemoryTransformer.from_pretrained(tmp_path)
    assert loaded.variant == variant and loaded.rmt_config == model.rmt_config
    x = ids(2, 9)
    torch.testing.assert_close(loaded(x).hidden, model(x).hidden)


@pytest.mark.parametrize("kind", ["encoder", "decoder", "armt"])
def test_segment_forward_takes_an_attention_mask_of_zeros_and_ones(kind):
    """segment_forward reads a 0/1 integer mask (as ``attention_mask``) as the bool mask: the
    same outputs and state, the padded row included."""
    from models import tiny_armt, tiny_bert

    from rmt_fast.models import RMTEncoderForSequenceClassification, RMTForCausalLM

    x = ids(2, 6, seed=3)
    if kind == "encoder":
        x = x % 50 + 3
    mask = torch.ones(2, 6, dtype=torch.bool)
    mask[1, :4] = False
    if kind == "encoder":
        model = RMTEncoderForSequenceClassification(tiny_bert(), num_mem_tokens=2, segment_size=6,
                                                    cls_token_id=1, sep_token_id=2)
        start = model.init_state(2)
    elif kind == "decoder":
        model = RMTForCausalLM(tiny_gpt2(), num_mem_tokens=2, segment_size=6)
        start = model.expand_memory(2)
    else:
        model = tiny_armt(segment_size=6)
        start = model.init_state(2)
    with torch.no_grad():
        outs = [model.segment_forward(start, x, m) for m in (mask, mask.long())]
    flat = [[t for t in torch.utils._pytree.tree_leaves(o) if isinstance(t, torch.Tensor)] for o in outs]
    assert len(flat[0]) == len(flat[1]) > 1
    for a, b in zip(*flat, strict=True):
        assert torch.equal(a, b)
