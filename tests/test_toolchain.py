"""rmt_fast inside the tools researchers train with: peft (LoRA), transformers.Trainer, AutoRMT,
ModelOutput outputs."""

from __future__ import annotations

import os

import pytest
import torch
from models import VOCAB, ids, tiny_gpt2
from transformers import BertConfig, BertForSequenceClassification

import rmt_fast
from rmt_fast.data import RMTDataCollator

peft = pytest.importorskip("peft")


def _bert_cls(seed=0, labels=3):
    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=VOCAB, hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=128, max_position_embeddings=64, num_labels=labels)
    return BertForSequenceClassification(cfg).eval()


def _dir_bytes(path) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(path) for f in fs)


def _train_steps(model, batches, steps=4, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for i in range(steps):
        out = model(**batches[i % len(batches)])
        opt.zero_grad()
        out.loss.backward()
        opt.step()
    return model.eval()


def test_outputs_are_model_outputs():
    model = rmt_fast.RMTForCausalLM(tiny_gpt2(), num_mem_tokens=2, segment_size=8)
    x = ids(2, 20)
    out = model(x, labels=x)
    assert out["loss"] is out.loss is out[0] and out[1] is out.logits
    assert list(out.keys()) == ["loss", "logits", "memory"]  # None fields are left out, as in HF
    no_loss = model(x)
    assert no_loss[0] is no_loss.logits


def test_lora_decoder_trains_only_adapter_and_memory_and_round_trips(tmp_path):
    base = tiny_gpt2(layers=2)
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    lora = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["c_attn"], fan_in_fan_out=True))
    model = rmt_fast.RMTForCausalLM(lora, num_mem_tokens=2, segment_size=8)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "memory" in trainable and all("lora_" in n for n in trainable - {"memory"}) and len(trainable) > 1
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = ids(4, 24, seed=1)
    _train_steps(model, [dict(input_ids=x, labels=x)])
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable  # the adapter and the memory moved, nothing else
    model.save_pretrained(tmp_path)
    assert _dir_bytes(tmp_path) < 0.2 * base_bytes  # a 2-layer d32 toy; the 5% check is below
    loaded = rmt_fast.RMTForCausalLM.from_pretrained(tmp_path, base_model=tiny_gpt2(layers=2))
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)
    assert rmt_fast.AutoRMT.from_pretrained(tmp_path, base_model=tiny_gpt2(layers=2)).is_peft
    with pytest.raises(ValueError, match="pass base_model="):
        rmt_fast.RMTForCausalLM.from_pretrained(tmp_path)  # built from a config: no path to find it


def test_lora_part_is_small_next_to_a_real_base(tmp_path):
    """The saved RMT + adapter part of a GPT-2 of 12 layers x 256 is under 5% of its base."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(vocab_size=1000, n_positions=64, n_embd=256, n_layer=12, n_head=4))
    base_bytes = sum(p.numel() * p.element_size() for p in base.parameters())
    lora = peft.get_peft_model(base, peft.LoraConfig(r=8, target_modules=["c_attn"], fan_in_fan_out=True))
    model = rmt_fast.RMTForCausalLM(lora, num_mem_tokens=8, segment_size=32)
    model.save_pretrained(tmp_path)
    assert _dir_bytes(tmp_path) < 0.05 * base_bytes


def test_lora_encoder_trains_adapter_memory_and_head(tmp_path):
    class Tok:
        cls_token_id, sep_token_id = 1, 2

    lora = peft.get_peft_model(_bert_cls(), peft.LoraConfig(task_type="SEQ_CLS", r=4,
                                                            target_modules=["query", "value"]))
    model = rmt_fast.RMTEncoderForSequenceClassification(lora, num_mem_tokens=3, segment_size=8,
                                                         tokenizer=Tok())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert "memory" in trainable and any("classifier" in n for n in trainable)
    assert all("lora_" in n or "classifier" in n for n in trainable - {"memory"})
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x = ids(4, 20, seed=2)
    _train_steps(model, [dict(input_ids=x, labels=torch.tensor([0, 1, 2, 1]))])
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == trainable
    model.save_pretrained(tmp_path)
    loaded = rmt_fast.AutoRMT.from_pretrained(tmp_path, base_model=_bert_cls())
    assert isinstance(loaded, rmt_fast.RMTEncoderForSequenceClassification)
    torch.testing.assert_close(loaded(x).logits, model(x).logits, rtol=0, atol=0)


def _lm_examples(n, length, seed):
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        half = torch.randint(3, VOCAB, (length // 2,), generator=g)
        seq = torch.cat([half, half])  # the second half repeats the first: learnable via memory
        mask = torch.zeros(length, dtype=torch.bool)
        mask[length // 2 - 1: -1] = True
        out.append({"input_ids": seq.tolist(), "labels": seq.tolist(), "labels_mask": mask.tolist()})
    return out


def _trainer(model, out_dir, steps, **args):
    from transformers import Trainer, TrainingArguments

    targs = TrainingArguments(output_dir=str(out_dir), max_steps=steps, per_device_train_batch_size=4,
                              gradient_accumulation_steps=2, learning_rate=3e-3, save_steps=6,
                              logging_steps=1, report_to=[], use_cpu=True, disable_tqdm=True, seed=0,
                              data_seed=0, eval_strategy="no", **args)
    return Trainer(model=model, args=targs, train_dataset=_lm_examples(64, 16, 0),
                   eval_dataset=_lm_examples(8, 16, 1), data_collator=RMTDataCollator.for_model(model))


@pytest.mark.parametrize("checkpoint_segments", [False, True])
def test_trainer_trains_evaluates_saves_and_resumes(tmp_path, checkpoint_segments):
    def fresh():
        return rmt_fast.RMTForCausalLM(tiny_gpt2(seed=0), num_mem_tokens=2, segment_size=8,
                                       checkpoint_segments=checkpoint_segments)

    straight = fresh()
    trainer = _trainer(straight, tmp_path / "a", 12)
    result = trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 12 and sum(losses[-4:]) / 4 < sum(losses[:4]) / 4  # it learns
    metrics = trainer.evaluate()
    assert torch.isfinite(torch.tensor(metrics["eval_loss"]))
    assert result.global_step == 12 and (tmp_path / "a" / "checkpoint-6").is_dir()
    # the checkpoint loads back through our loaders (Trainer writes a plain state dict)
    ckpt = rmt_fast.AutoRMT.from_pretrained(tmp_path / "a" / "checkpoint-12")
    assert isinstance(ckpt, rmt_fast.RMTForCausalLM) and ckpt.rmt_config == straight.rmt_config
    x = ids(2, 16)
    torch.testing.assert_close(ckpt(x).logits, straight.eval()(x).logits, rtol=0, atol=0)
    # interrupted at 6, resumed: the same parameters as the straight run
    from transformers import TrainerCallback

    class Interrupt(TrainerCallback):  # stops at step 6; the schedule still spans 12 steps
        def on_step_end(self, args, state, control, **kwargs):
            control.should_training_stop = state.global_step >= 6

    part = _trainer(fresh(), tmp_path / "b", 12)
    part.add_callback(Interrupt())
    part.train()
    resumed_model = fresh()
    resumed = _trainer(resumed_model, tmp_path / "b", 12)
    resumed.train(resume_from_checkpoint=str(tmp_path / "b" / "checkpoint-6"))
    for (n, p), q in zip(straight.named_parameters(), resumed_model.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7, msg=n)
