"""rmt_fast.train: exact resume, metrics, curriculum, pass-through options, CLI, and a fast
convergence check (copy across 2 segments needs memory)."""

from __future__ import annotations

import json
import os
import time

import pytest
import torch

from rmt_fast.tasks import make_task
from rmt_fast.train import build_model, latest_checkpoint, lr_factor, main, train

torch.set_num_threads(1)
SMALL = dict(train_size=300, valid_size=64, test_size=0)


def tiny(task, mem=2, seed=0, **kw):
    return build_model(task.vocab_size, task.segment_size, mem, layers=2, d_model=32, heads=4,
                       d_inner=64, seed=seed, **kw)


def _params(model):
    """Every weight and buffer (the state dict without its ``_extra_state`` metadata entry)."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if k != "_extra_state"}


def test_resume_is_exact(tmp_path):
    task = make_task("copy", 8, copies=1, **SMALL)
    kw = dict(segments=[1, 2], threshold=0.0, batch_size=8, lr=3e-3, warmup_steps=3,
              schedule="cosine", eval_every=3, eval_size=32, save_every=2, progress=False, seed=5)
    straight = tiny(task, dropout=0.1)
    res = train(straight, task, 10, output_dir=tmp_path / "a", **kw)
    assert res.step == 10 and res.stage_changes and res.stage_changes[0][:3] == (3, 1, 2)

    interrupted = tiny(task, dropout=0.1)
    part = train(interrupted, task, 10, output_dir=tmp_path / "b", stop_after=5, **kw)
    assert part.step == 5 and latest_checkpoint(tmp_path / "b").endswith("checkpoint-5")
    _as_legacy_checkpoint(tmp_path / "b" / "checkpoint-5", tmp_path / "legacy" / "checkpoint-5")
    resumed = tiny(task, seed=123, dropout=0.1)  # other init: everything must come from the checkpoint
    res_b = train(resumed, task, 10, output_dir=tmp_path / "b", **kw)
    assert res_b.step == 10
    a, b = _params(straight), _params(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    # a checkpoint written before FSDP support (optimizer state keyed by index) resumes too
    legacy = tiny(task, seed=123, dropout=0.1)
    train(legacy, task, 10, output_dir=tmp_path / "legacy", **kw)
    for k, v in _params(legacy).items():
        assert torch.equal(a[k], v), k
    # the metrics are the same records (wall times aside), each step once
    strip = lambda path: [{k: v for k, v in json.loads(line).items() if k != "wall_time"}
                          for line in open(path)]
    assert strip(tmp_path / "a" / "metrics.jsonl") == strip(tmp_path / "b" / "metrics.jsonl")
    # and an uninterrupted run differs from a run with another seed (the check can fail)
    other = tiny(task, dropout=0.1)
    train(other, task, 10, output_dir=tmp_path / "c", **{**kw, "seed": 6})
    assert any(not torch.equal(a[k], v) for k, v in _params(other).items())


def _as_legacy_checkpoint(src, dst) -> None:
    """Copy checkpoint ``src`` to ``dst`` with its optimizer state keyed by parameter index (as
    ``torch.optim.Optimizer.state_dict`` gives it, the format before FSDP support)."""
    import shutil

    shutil.copytree(src, dst)
    path = dst / "trainer_state.pt"
    state = torch.load(path, weights_only=True)
    opt = state.pop("optimizer")
    assert state.pop("optimizer_format") == "by_name"
    names = [n for g in opt["param_groups"] for n in g["params"]]
    index = {n: i for i, n in enumerate(names)}
    state["optimizer"] = {"state": {index[n]: v for n, v in opt["state"].items()},
                          "param_groups": [{**g, "params": [index[n] for n in g["params"]]}
                                           for g in opt["param_groups"]]}
    torch.save(state, path)


def test_metrics_file_and_checkpoints(tmp_path, capsys):
    from transformers.utils import logging as hf_logging

    task = make_task("needle", 16, **SMALL)
    model = tiny(task)
    hf_logging.enable_progress_bar()  # a CLI test before this one may have switched it off
    train(model, task, 6, segments=2, batch_size=4, eval_every=3, log_every=2, output_dir=tmp_path,
          save_every=3, keep_checkpoints=1, progress=False)
    assert "Writing" not in capsys.readouterr().err  # no bar from transformers' save either
    assert hf_logging.is_progress_bar_enabled()  # and the global switch is as it was
    records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert [r["step"] for r in records] == [2, 3, 4, 6]
    for r in records:
        assert {"step", "stage", "segments", "loss", "lr", "wall_time"} <= r.keys()
    assert 0.0 <= records[1]["valid_accuracy"] <= 1.0 and "valid_accuracy" in records[-1]
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("checkpoint")) == ["checkpoint-6"]
    ckpt = tmp_path / "checkpoint-6"
    assert (ckpt / "vocab.json").exists() and (ckpt / "trainer_state.pt").exists()
    reloaded = type(model).from_pretrained(ckpt)
    for k, v in model.state_dict().items():
        assert torch.equal(v, reloaded.state_dict()[k])


def test_curriculum_advances_on_threshold_and_budget():
    task = make_task("copy", 8, copies=1, **SMALL)
    # threshold 0: every evaluation passes, so each evaluation moves one stage on
    res = train(tiny(task), task, 20, segments=[1, 2, 3], threshold=0.0, batch_size=4, eval_every=2,
                eval_size=16, early_stop=True, progress=False)
    assert [c[:3] for c in res.stage_changes] == [(2, 1, 2), (4, 2, 3)]
    assert res.step == 6 and res.segments == 3  # early stop once the last stage passes
    assert [h["segments"] for h in res.history if h["step"] in (2, 4, 6)] == [1, 2, 3]
    # an unreachable threshold never advances; stage_steps does
    res = train(tiny(task), task, 8, segments=[1, 2], threshold=1.0, batch_size=4, eval_every=2,
                eval_size=16, progress=False)
    assert res.stage_changes == [] and res.segments == 1
    res = train(tiny(task), task, 20, segments=[1, 2], threshold=1.0, stage_steps=4, batch_size=4,
                eval_every=2, eval_size=16, progress=False)
    assert [c[3] for c in res.stage_changes] == ["budget"] and res.step == 8


def test_random_segments_per_batch():
    task = make_task("copy", 8, copies=1, **SMALL)
    res = train(tiny(task), task, 30, segments=[1, 2, 3], threshold=0.0, batch_size=2, eval_every=4,
                eval_size=8, log_every=1, random_segments=True, progress=False)
    late = {h["segments"] for h in res.history if h["stage"] == 2}
    assert late == {1, 2, 3}


def test_segment_checkpointing_and_bptt_pass_through():
    task = make_task("copy", 8, copies=1, **SMALL)
    plain, ckpt = tiny(task), tiny(task)
    kw = dict(segments=3, batch_size=4, eval_every=10, eval_size=8, progress=False)
    train(plain, task, 3, **kw)
    train(ckpt, task, 3, checkpoint_segments=True, **kw)
    assert ckpt.rmt_config.checkpoint_segments
    for k, v in _params(plain).items():
        torch.testing.assert_close(v, ckpt.state_dict()[k], rtol=1e-5, atol=1e-6)
    cut = tiny(task)
    train(cut, task, 3, bptt_depth=0, **kw)
    assert cut.rmt_config.bptt_depth == 0
    assert not torch.equal(cut.memory, plain.memory)  # no gradient reaches memory through segments


def test_bad_arguments():
    task = make_task("copy", 8, copies=1, **SMALL)
    model = tiny(task)
    with pytest.raises(ValueError, match="schedule"):
        train(model, task, 1, schedule="step", progress=False)
    with pytest.raises(ValueError, match="segment_size"):
        train(model, make_task("copy", 6, copies=1, **SMALL), 1, progress=False)
    with pytest.raises(ValueError, match="increase"):
        train(model, task, 1, segments=[2, 1], progress=False)
    with pytest.raises(ValueError, match="cannot make"):
        train(model, make_task("copy", 8, **SMALL), 1, progress=False)  # 8 tokens: not 3 * src_len
    with pytest.raises(ValueError, match="stop_after"):
        train(model, task, 1, stop_after=0, progress=False)
    with pytest.raises(ValueError, match="bptt_depth"):
        train(model, task, 1, bptt_depth=-3, progress=False)


def test_build_model_inits():
    """gpt2: N(0, 0.02), tied head; torch: N(0, 1) embeddings, U(+-1/sqrt(fan_in)) matrices,
    zero biases, untied head; the memory takes the embeddings' scale either way."""
    gpt2 = build_model(37, 3, 4, layers=2, d_model=64, heads=4, d_inner=128).base
    assert gpt2.lm_head.weight is gpt2.transformer.wte.weight
    assert abs(gpt2.transformer.wte.weight.std().item() - 0.02) < 0.003
    rmt = build_model(37, 3, 64, layers=2, d_model=64, heads=4, d_inner=128, init="torch")
    base = rmt.base
    assert base.lm_head.weight is not base.transformer.wte.weight
    for emb in (base.transformer.wte.weight, base.transformer.wpe.weight, rmt.memory):
        assert abs(emb.std().item() - 1.0) < 0.1
    for block in base.transformer.h:
        for conv, fan_in in ((block.attn.c_attn, 64), (block.mlp.c_fc, 64), (block.mlp.c_proj, 128)):
            bound = fan_in ** -0.5
            assert 0.95 * bound < conv.weight.abs().max().item() <= bound
            assert abs(conv.weight.std().item() - bound / 3 ** 0.5) < 0.1 * bound
            assert torch.count_nonzero(conv.bias) == 0
    assert base.lm_head.weight.abs().max().item() <= 64 ** -0.5
    with pytest.raises(ValueError, match="init must be one of"):
        build_model(37, 3, 2, init="xavier")
    with pytest.raises(ValueError, match=r"\['memory_update'\] are RMT options"):
        build_model(37, 3, 2, model="armt", memory_update="gated")
    with pytest.raises(ValueError, match=r"\['xl_positions'\] are RMT options"):
        build_model(37, 3, 2, model="armt", xl_positions="before_segment")
    with pytest.raises(ValueError, match=r"armt_correction=False is an ARMT option"):
        build_model(37, 3, 2, armt_correction=False)
    assert build_model(37, 3, 2, model="armt", d_mem=4).rmt_config.correction is True
    assert build_model(37, 3, 2, model="armt", d_mem=4, armt_correction=False).rmt_config.correction is False
    with pytest.raises(ValueError, match=r"armt_floor=1.0 is an ARMT option"):
        build_model(37, 3, 2, armt_floor=1.0)
    assert build_model(37, 3, 2, model="armt", d_mem=4, armt_floor=1.0).rmt_config.normaliser_floor == 1.0
    with pytest.raises(ValueError, match=r"armt_normaliser_gate is an ARMT option"):
        build_model(37, 3, 2, armt_normaliser_gate=True)
    assert build_model(37, 3, 2, model="armt", d_mem=4,
                       armt_normaliser_gate=True).rmt_config.normaliser_gate is True
    with pytest.raises(ValueError, match=r"armt_value_norm is an ARMT option"):
        build_model(37, 3, 2, armt_value_norm=True)
    assert build_model(37, 3, 2, model="armt", d_mem=4,
                       armt_value_norm=True).rmt_config.value_norm is True
    with pytest.raises(ValueError, match=r"armt_read_clip=0.1 is an ARMT option"):
        build_model(37, 3, 2, armt_read_clip=0.1)
    assert build_model(37, 3, 2, model="armt", d_mem=4,
                       armt_read_clip=0.1).rmt_config.read_clip == 0.1
    with pytest.raises(ValueError, match=r"armt_state_decay=0.5 is an ARMT option"):
        build_model(37, 3, 2, armt_state_decay=0.5)
    assert build_model(37, 3, 2, model="armt", d_mem=4,
                       armt_state_decay=0.5).rmt_config.state_decay == 0.5
    with pytest.raises(ValueError, match=r"armt_decay_gate is an ARMT option"):
        build_model(37, 3, 2, armt_decay_gate=True)
    gated = build_model(37, 3, 2, model="armt", d_mem=4, armt_state_decay=0.5, armt_decay_gate=True)
    assert gated.rmt_config.decay_gate and gated.assoc[0].W_ma is not None
    with pytest.raises(ValueError, match=r"armt_decay_max=0.5 is an ARMT option"):
        build_model(37, 3, 2, armt_decay_max=0.5)
    capped = build_model(37, 3, 2, model="armt", d_mem=4, armt_state_decay=0.25, armt_decay_gate=True,
                         armt_decay_max=0.5)
    assert capped.rmt_config.decay_max == 0.5 and capped.assoc[1].decay_max == 0.5
    with pytest.raises(ValueError, match=r"armt_rule='delta' is an ARMT option"):
        build_model(37, 3, 2, armt_rule="delta")
    assert build_model(37, 3, 2, model="armt", d_mem=4, armt_l2_norm=True,
                       armt_rule="delta").rmt_config.update_rule == "delta"
    llama = build_model(37, 3, 2, arch="llama", xl_cache=2, xl_positions="before_segment")
    assert llama.rmt_config.xl_positions == "before_segment"


def test_lr_schedule():
    assert lr_factor(0, 10, 100, "linear", 0.0) == pytest.approx(0.1)
    assert lr_factor(9, 10, 100, "linear", 0.0) == pytest.approx(1.0)
    assert lr_factor(55, 10, 100, "linear", 0.0) == pytest.approx(0.5)
    assert lr_factor(55, 10, 100, "cosine", 0.0) == pytest.approx(0.5)
    assert lr_factor(500, 10, 100, "cosine", 0.1) == pytest.approx(0.1)
    assert lr_factor(500, 10, 100, "constant", 0.1) == 1.0


def test_cli_runs_and_resumes(tmp_path, capsys):
    argv = ["--task", "reverse", "--segments", "2", "--segment-size", "4", "--mem", "2", "--layers", "1",
            "--d-model", "16", "--heads", "2", "--d-inner", "32", "--steps", "4", "--batch-size", "4",
            "--eval-every", "2", "--eval-size", "8", "--save-every", "2", "--train-size", "50",
            "--valid-size", "10", "--test-size", "12", "--out", str(tmp_path), "--no-progress",
            "--init", "torch", "--memory-noise", "0.25", "--memory-update", "gated"]
    res = main(argv)
    assert res.step == 4 and json.loads(capsys.readouterr().out.strip().splitlines()[-1])["step"] == 4
    assert latest_checkpoint(tmp_path).endswith("checkpoint-4")
    res = main([*argv[:argv.index("--steps") + 1], "6", *argv[argv.index("--steps") + 2:]])
    assert res.step == 6  # resumed from step 4
    steps = [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == 6
    # `rmt-fast evaluate RUN_DIR`: the latest checkpoint on the run's own test split
    from rmt_fast.cli import main as cli_main
    from rmt_fast.models import RMTForCausalLM
    from rmt_fast.train import evaluate

    capsys.readouterr()
    assert cli_main(["evaluate", str(tmp_path), "--split", "test"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["step"] == 6 and out["split"] == "test" and out["samples"] == 12 and out["segments"] == 2
    task = make_task("reverse", 4, seed=0, train_size=50, valid_size=10, test_size=12)
    model = RMTForCausalLM.from_pretrained(tmp_path / "checkpoint-6")
    assert model.rmt_config.memory_noise == 0.25 and not model.training
    assert model.rmt_config.memory_update == "gated" and model.memory_gate is not None
    assert model.base.lm_head.weight is not model.base.transformer.wte.weight  # --init torch
    assert out["accuracy"] == pytest.approx(evaluate(model, task.splits(2)["test"]))
    with pytest.raises(FileNotFoundError, match="train_args.json"):
        cli_main(["evaluate", str(tmp_path / "nothing")])


# --- the fast convergence check -------------------------------------------------------------------
CONVERGENCE = dict(batch_size=32, lr=1e-3, warmup_steps=50, schedule="linear", min_lr_ratio=0.1,
                   eval_every=50, eval_size=512, progress=False)


def convergence_run(mem: int, seed: int, steps: int = 500, threshold: float | None = 0.95):
    """Copy of 6 tokens (ids 2..9) once: ``src (6) | copy (6)`` = 2 segments of 6, so the copy
    segment sees the source only through memory. GPT-2 2 layers, d_model 128, 4 heads."""
    task = make_task("copy", 6, copies=1, seed=seed, train_size=10_000, valid_size=512, test_size=0)
    model = build_model(task.vocab_size, 6, mem, layers=2, d_model=128, heads=4, d_inner=256, seed=seed)
    return train(model, task, steps, segments=2, threshold=threshold, early_stop=threshold is not None,
                 seed=seed, **CONVERGENCE)


def test_copy_needs_memory_and_learns_fast():
    start = time.perf_counter()
    with_memory = convergence_run(mem=6, seed=0)
    mid = time.perf_counter()
    # without memory only the first copied token (predicted inside the source segment) is
    # learnable: the best possible accuracy is 1/6 + 5/6 * 1/8 = 0.27
    without = convergence_run(mem=0, seed=0, steps=300, threshold=None)
    end = time.perf_counter()
    print(f"\nconvergence: memory acc {with_memory.valid_accuracy:.3f} at step {with_memory.step} "
          f"({mid - start:.1f} s); no memory acc {without.valid_accuracy:.3f} at step {without.step} "
          f"({end - mid:.1f} s)")
    assert with_memory.valid_accuracy >= 0.95 and with_memory.step <= 500
    assert without.valid_accuracy < 0.3


def test_cli_is_derived_from_the_option_dataclasses(tmp_path):
    """Every field of TaskSpec / ModelSpec / TrainConfig (but the few Python-only ones) has a
    flag, parsed values land in the right object, and train_args.json round-trips."""
    import dataclasses

    from rmt_fast.train import (
        ModelSpec,
        TaskSpec,
        TrainConfig,
        load_run_args,
        parser,
        save_run_args,
        specs_from_arguments,
    )

    p = parser()
    dests = {a.dest for a in p._actions}
    for spec in (TaskSpec, ModelSpec, TrainConfig):
        for f in dataclasses.fields(spec):
            if f.name != "segments":  # --segments / --curriculum, handled by the CLI itself
                assert (f.name in dests) == f.metadata.get("cli", True), (spec.__name__, f.name)
    args = p.parse_args(["--task", "copy", "--segments", "3", "--curriculum", "1,3", "--mem", "5",
                         "--warmup", "7", "--no-resume", "--checkpoint-segments", "--out", str(tmp_path),
                         "--clip", "0.5"])
    task, model, cfg = specs_from_arguments(args)
    assert (task.task, task.segment_size, model.num_mem_tokens) == ("copy", 12, 5)
    assert (cfg.segments, cfg.warmup_steps, cfg.resume, cfg.checkpoint_segments) == ((1, 3), 7, False, True)
    assert (cfg.clip_grad, cfg.threshold, cfg.save_every, cfg.output_dir) == (0.5, 0.99, 500, str(tmp_path))
    save_run_args(str(tmp_path), task, model, cfg, world_size=1)
    assert load_run_args(str(tmp_path)) == (task, model, cfg)
    with pytest.raises(ValueError, match="curriculum segments must increase"):
        TrainConfig(segments=(3, 1))
    with pytest.raises(ValueError, match="grad_accum"):
        TrainConfig(grad_accum=0)


def test_resume_on_the_same_model_object(tmp_path):
    """Chunked training: a second call on the model that just trained (its .grad still set)
    resumes from the checkpoint and matches an uninterrupted run."""
    task = make_task("copy", 8, copies=1, **SMALL)
    kw = dict(segments=2, batch_size=4, eval_every=3, eval_size=16, save_every=2, progress=False)
    straight = tiny(task)
    train(straight, task, 6, output_dir=tmp_path / "a", **kw)
    chunked = tiny(task)
    train(chunked, task, 6, output_dir=tmp_path / "b", stop_after=3, **kw)
    assert any(p.grad is not None for p in chunked.parameters())
    train(chunked, task, 6, output_dir=tmp_path / "b", **kw)
    for k, v in _params(straight).items():
        assert torch.equal(v, chunked.state_dict()[k]), k


def _poison(model, where: str):
    """A NaN loss (the embeddings' output) or an infinite gradient (the embedding's) from now on."""
    emb = model.base.get_input_embeddings()
    if where == "loss":
        return emb.register_forward_hook(lambda m, i, out: out * float("nan"))
    return emb.weight.register_hook(lambda g: g * float("inf"))


@pytest.mark.parametrize("where", ["loss", "gradient"])
def test_a_non_finite_step_stops_before_the_weights_change(tmp_path, where):
    task = make_task("copy", 8, copies=1, **SMALL)
    kw = dict(segments=2, batch_size=4, eval_every=10, eval_size=16, save_every=2, progress=False)
    model = tiny(task)
    train(model, task, 2, output_dir=tmp_path, **kw)
    before = _params(model)
    files = sorted(os.listdir(tmp_path))
    ckpt = {p: p.read_bytes() for p in (tmp_path / "checkpoint-2").rglob("*") if p.is_file()}
    metrics = open(tmp_path / "metrics.jsonl").read()
    handle = _poison(model, where)
    what = "the loss is nan and the gradient norm is nan" if where == "loss" else \
        "the gradient norm is inf"
    message = rf"step 3 \(stage 0, 2 segments\): {what}; .*after step 2; the last checkpoint, " \
        r".*checkpoint-2, is intact"
    with pytest.raises(FloatingPointError, match=message):
        train(model, task, 6, output_dir=tmp_path, **kw)
    for k, v in _params(model).items():  # no optimizer step was taken
        assert torch.equal(v, before[k]), k
    assert sorted(os.listdir(tmp_path)) == files and open(tmp_path / "metrics.jsonl").read() == metrics
    assert {p: p.read_bytes() for p in (tmp_path / "checkpoint-2").rglob("*") if p.is_file()} == ckpt
    # without a run directory the message says there is no checkpoint; unclipped runs check too
    fresh = tiny(task)
    _poison(fresh, where)
    with pytest.raises(FloatingPointError, match=f"step 1 .*: {what}; .*no checkpoint was saved yet"):
        train(fresh, task, 2, **{**kw, "save_every": None, "clip_grad": None})
    # once the cause is gone the run resumes from its checkpoint and ends finite
    handle.remove()
    res = train(model, task, 4, output_dir=tmp_path, **kw)
    assert res.step == 4 and all(torch.isfinite(v).all() for v in _params(model).values())


# --- ARMT through the same loop and CLI (`--model armt`) ------------------------------------------
def test_armt_trains_resumes_exactly_and_uses_its_memory(tmp_path):
    task = make_task("copy", 8, copies=1, **SMALL)
    kw = dict(segments=[1, 2], threshold=0.0, batch_size=8, lr=3e-3, warmup_steps=3, eval_every=3,
              eval_size=32, save_every=2, progress=False, seed=5)
    straight = tiny(task, model="armt", d_mem=8)
    train(straight, task, 8, output_dir=tmp_path / "a", **kw)
    interrupted = tiny(task, model="armt", d_mem=8)
    assert train(interrupted, task, 8, output_dir=tmp_path / "b", stop_after=5, **kw).step == 5
    resumed = tiny(task, seed=123, model="armt", d_mem=8)
    assert train(resumed, task, 8, output_dir=tmp_path / "b", **kw).step == 8
    a, b = _params(straight), _params(resumed)
    assert a.keys() == b.keys() and any(k.startswith("assoc.") for k in a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    with pytest.raises(ValueError, match="RMT options"):
        tiny(task, model="armt", mask="rmt")
    # segment checkpointing through the shared loop: the same training, fewer saved activations
    plain, ckpt = tiny(task, model="armt", d_mem=8), tiny(task, model="armt", d_mem=8)
    kw2 = dict(segments=3, batch_size=4, eval_every=10, eval_size=8, progress=False)
    train(plain, task, 3, **kw2)
    train(ckpt, task, 3, checkpoint_segments=True, **kw2)
    assert ckpt.rmt_config.checkpoint_segments and not plain.rmt_config.checkpoint_segments
    for k, v in _params(plain).items():
        torch.testing.assert_close(v, ckpt.state_dict()[k], rtol=1e-5, atol=1e-6)


def test_armt_copies_across_segments_through_its_associative_memory():
    """Copy of 6 tokens over 2 segments of 6 (see convergence_run): without memory at most 0.27
    is learnable; ARMT (6 memory tokens, d_mem 32) passes 0.5 within 150 steps (0.71 at 150,
    0.81 at 600 steps when this test was written)."""
    task = make_task("copy", 6, copies=1, seed=0, train_size=10_000, valid_size=512, test_size=0)
    model = build_model(task.vocab_size, 6, 6, layers=2, d_model=128, heads=4, d_inner=256, seed=0,
                        model="armt", d_mem=32)
    res = train(model, task, 150, segments=2, seed=0, **CONVERGENCE)
    assert res.valid_accuracy >= 0.5, res.valid_accuracy


@pytest.mark.parametrize("l2", [False, True])
def test_cli_model_armt_runs_and_evaluates(tmp_path, capsys, l2):
    from rmt_fast.cli import main as cli_main
    from rmt_fast.models import ARMTForCausalLM
    from rmt_fast.models.auto import AutoRMT
    from rmt_fast.train import evaluate

    argv = ["--model", "armt", "--d-mem", "8", "--task", "reverse", "--segments", "2", "--segment-size",
            "4", "--mem", "2", "--layers", "1", "--d-model", "16", "--heads", "2", "--d-inner", "32",
            "--steps", "4", "--batch-size", "4", "--eval-every", "2", "--eval-size", "8", "--save-every",
            "2", "--train-size", "50", "--valid-size", "10", "--test-size", "12", "--out", str(tmp_path),
            "--no-progress", "--dtype", "float32"]
    argv += ["--armt-l2-norm", "--no-armt-correction"] if l2 else ["--armt-floor", "0.5"]
    assert main(argv).step == 4
    model = AutoRMT.from_pretrained(tmp_path / "checkpoint-4")
    assert isinstance(model, ARMTForCausalLM) and model.rmt_config.d_mem == 8
    assert model.rmt_config.use_l2_norm is l2 and model.rmt_config.correction is not l2
    assert model.rmt_config.normaliser_floor == (0.0 if l2 else 0.5)
    if l2:
        with pytest.raises(ValueError, match="armt_l2_norm is an ARMT option"):
            main(argv[2:] + ["--model", "rmt", "--out", str(tmp_path / "rmt")])
        assert not (tmp_path / "rmt").exists()
    capsys.readouterr()
    assert cli_main(["evaluate", str(tmp_path), "--dtype", "float32"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    task = make_task("reverse", 4, seed=0, train_size=50, valid_size=10, test_size=12)
    assert out["accuracy"] == pytest.approx(evaluate(model, task.splits(2)["test"]))


def test_cli_arch_llama_trains_an_rmt_around_a_llama(tmp_path):
    from transformers import LlamaForCausalLM

    from rmt_fast.models.auto import AutoRMT

    argv = ["--arch", "llama", "--task", "reverse", "--segments", "2", "--segment-size", "4", "--mem", "2",
            "--xl-cache", "3", "--layers", "1", "--d-model", "16", "--heads", "2", "--d-inner", "32",
            "--steps", "2", "--batch-size", "4", "--eval-every", "2", "--eval-size", "8", "--save-every",
            "2", "--train-size", "50", "--valid-size", "10", "--test-size", "12", "--out", str(tmp_path),
            "--no-progress", "--dtype", "float32"]
    assert main(argv).step == 2
    model = AutoRMT.from_pretrained(tmp_path / "checkpoint-2")
    assert isinstance(model.lm, LlamaForCausalLM) and model.rmt_config.xl_cache == 3
    with pytest.raises(ValueError, match=r"arch must be one of \('gpt2', 'llama'\), got 'bert'"):
        build_model(10, 4, 2, arch="bert")

