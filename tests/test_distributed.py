"""Data-parallel training on CPU with gloo, 2 processes on loopback (see tests/dist_worker.py).

The 2-process runs happen once per module (a fixture launches both ranks as torchrun would, with
a time limit); the single-process references are computed here, in this process."""

from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys

import dist_worker as dw
import pytest
import torch

from rmt_fast import distributed as rd
from rmt_fast.train import main as train_main
from rmt_fast.train import train

torch.set_num_threads(1)
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOL = 3e-6
TIMEOUT_S = 240


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env.update(PYTHONPATH=os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1",
               MASTER_ADDR="127.0.0.1", GLOO_SOCKET_IFNAME="lo", HF_HUB_OFFLINE="1",
               TRANSFORMERS_VERBOSITY="error", **extra)
    return env


def run_ranks(cmd: list[str], world: int = 2, timeout: float = TIMEOUT_S) -> None:
    """Start ``world`` processes of ``cmd`` with torchrun's variables; fail (killing them) on a
    non-zero exit or after ``timeout`` seconds (a hang)."""
    port = str(free_port())
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              env=child_env(RANK=str(r), WORLD_SIZE=str(world), LOCAL_RANK=str(r),
                                            MASTER_PORT=port))
             for r in range(world)]
    outputs = []
    try:
        for p in procs:
            outputs.append(p.communicate(timeout=timeout)[0])
    except subprocess.TimeoutExpired:
        for p in procs:
            p.kill()
        pytest.fail(f"distributed run did not finish in {timeout}s (hang?)")
    for r, (p, out) in enumerate(zip(procs, outputs, strict=True)):
        assert p.returncode == 0, f"rank {r} failed:\n{out[-4000:]}"


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    out = tmp_path_factory.mktemp("dist")
    run_ranks([sys.executable, os.path.join(ROOT, "tests", "dist_worker.py"), str(out)])
    return out, [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(2)]


# AdamW turns rounding-level gradient differences (a batch summed as two halves on two ranks
# instead of at once) into parameter differences proportional to lr, largest where a gradient is
# ~0 (e.g. attention key biases, whose exact gradient is 0); the runs use lr=5e-4 (TRAIN_KW) so
# float32 rounding stays below TOL after the few steps compared. Measured in one process (the
# same training as one micro-batch and as two, 2026-12-06): 3.1e-7 to 6.7e-7 over model seeds
# 0-4 with either GELU gradient (ATen's or the extension's), except one coordinate of
# h.1.ln_2.weight at seed 0 (the seed used here) with the extension's: 2.3e-6.


def _weights(state: dict) -> dict:
    """A state dict without its ``_extra_state`` metadata entry (it holds the run-time config,
    which differs between the runs compared)."""
    return {k: v for k, v in state.items() if k != "_extra_state"}


def assert_close(a: dict, b: dict, tol: float = TOL) -> None:
    a, b = _weights(a), _weights(b)
    assert a.keys() == b.keys()
    for k in a:
        diff = (a[k].double() - b[k].double()).abs().max().item()
        assert diff <= tol, f"{k}: max |diff| {diff:.3g} > {tol}"


def assert_differs(a: dict, b: dict, tol: float = 1e-4) -> None:
    a, b = _weights(a), _weights(b)
    assert max((a[k].double() - b[k].double()).abs().max().item() for k in a) > tol


@pytest.mark.parametrize("ckpt", [False, True])
@pytest.mark.parametrize("parallel", ["dp", "fsdp", "fsdp-blocks"])
def test_two_processes_match_one_with_the_global_batch(two_ranks, parallel, ckpt):
    """DistributedDataParallel (dp), FSDP2 with the model as one unit (fsdp) and per block
    (fsdp-blocks), each with and without segment checkpointing: the parameters of one process
    with the global batch after 3 steps."""
    _, ranks = two_ranks
    task = dw.make_copy_task()
    single = dw.tiny_model(task)
    train(single, task, 3, segments=2, batch_size=2 * dw.PER_RANK_BATCH, eval_every=100,
          checkpoint_segments=ckpt, **dw.TRAIN_KW)
    key = f"{parallel}_plain_ckpt{int(ckpt)}"
    assert_close(ranks[0][key], ranks[1][key], tol=0.0)  # replicas stay bitwise identical
    assert_close(ranks[0][key], dw.params(single))
    # the check can fail: half the global batch on one process gives other parameters
    half = dw.tiny_model(task)
    train(half, task, 3, segments=2, batch_size=dw.PER_RANK_BATCH, eval_every=100,
          checkpoint_segments=ckpt, **dw.TRAIN_KW)
    assert_differs(ranks[0][key], dw.params(half))


@pytest.mark.parametrize("parallel,ckpt", [("dp", False), ("fsdp-blocks", True)])
def test_armt_two_processes_match_one(two_ranks, parallel, ckpt):
    """ARMT through the same distributed paths: DDP, and FSDP2 per block with segment
    checkpointing, match one process with the global batch after 3 steps."""
    _, ranks = two_ranks
    task = dw.make_copy_task()
    single = dw.tiny_model(task, model="armt", d_mem=8)
    train(single, task, 3, segments=2, batch_size=2 * dw.PER_RANK_BATCH, eval_every=100,
          checkpoint_segments=ckpt, **dw.TRAIN_KW)
    key = f"armt_{parallel}_ckpt{int(ckpt)}"
    assert any(k.startswith("assoc.") for k in ranks[0][key])
    assert_close(ranks[0][key], ranks[1][key], tol=0.0)
    assert_close(ranks[0][key], dw.params(single))
    half = dw.tiny_model(task, model="armt", d_mem=8)
    train(half, task, 3, segments=2, batch_size=dw.PER_RANK_BATCH, eval_every=100,
          checkpoint_segments=ckpt, **dw.TRAIN_KW)
    assert_differs(ranks[0][key], dw.params(half))


def var_reference(task, ckpt):
    """One process: both ranks' batches of the variable-segments scenario, each loss weighted by
    its share of the target count; the accumulated gradients and the summed loss."""
    model = dw.tiny_model(task, checkpoint_segments=ckpt)
    batches = [dw.var_batch(task, r) for r in range(2)]
    counts = [model.num_targets(ids, ids, mask) for ids, mask in batches]
    assert counts[0] != counts[1]  # the ranks really hold different amounts of work
    loss_ref = 0.0
    for (ids, mask), n in zip(batches, counts, strict=True):
        loss = model(ids, labels=ids, labels_mask=mask, return_logits=False).loss * (n / sum(counts))
        loss.backward()
        loss_ref += loss.item()
    return {n: p.grad for n, p in model.named_parameters()}, loss_ref


@pytest.mark.parametrize("ckpt", [False, True])
def test_ranks_with_different_segment_counts(two_ranks, ckpt):
    """DDP, rank 0 runs 1 segment, rank 1 runs 3: no hang; all-reduces: the target count, one
    per gradient bucket (DDP's reducer, in the backward), the loss; and the gradient is the mean
    over every target token of both ranks' batches."""
    _, ranks = two_ranks
    task = dw.make_copy_task()
    ref, loss_ref = var_reference(task, ckpt)
    key = f"ckpt{int(ckpt)}"
    assert_close(ranks[0][f"var_grads_{key}"], ranks[1][f"var_grads_{key}"], tol=0.0)
    assert_close(ranks[0][f"var_grads_{key}"], ref)
    assert math.isclose(ranks[0][f"var_loss_{key}"], loss_ref, rel_tol=1e-6)
    for r in range(2):
        assert ranks[r]["num_buckets"] >= 1
        assert ranks[r][f"var_allreduce_{key}"] == 2 + ranks[r]["num_buckets"]
    # a plain average of the two ranks' mean losses would be another gradient
    naive = {}
    for ids, mask in (dw.var_batch(task, r) for r in range(2)):
        m = dw.tiny_model(task, checkpoint_segments=ckpt)
        (m(ids, labels=ids, labels_mask=mask, return_logits=False).loss / 2).backward()
        for n, p in m.named_parameters():
            naive[n] = naive.get(n, 0) + p.grad
    assert_differs(ranks[0][f"var_grads_{key}"], naive, tol=1e-6)
    assert dw.VAR_SEGMENTS[0] != dw.VAR_SEGMENTS[1]


def test_all_reduce_count_per_step(two_ranks):
    """DDP with checkpointed segments (recomputed in backward), truncated BPTT, a curriculum
    with random segments and 2 micro-batches: per optimizer step exactly 1 (target count) +
    buckets (last micro-batch only: no_sync before) + 1 (loss) all-reduces, plus 1 per
    evaluation; and the same parameters as one process."""
    _, ranks = two_ranks
    steps, evals = 4, 2
    for r in ranks:
        assert r["count_calls"] == steps * (2 + r["num_buckets"]) + evals
    assert ranks[0]["count_stage_changes"] == [(2, 1, 3, "threshold")]
    task = dw.make_copy_task()
    single = dw.tiny_model(task)
    res = train(single, task, 4, segments=[1, 3], random_segments=True, threshold=0.0,
                batch_size=dw.PER_RANK_BATCH, grad_accum=2, eval_every=2, checkpoint_segments=True,
                bptt_depth=1, **dw.TRAIN_KW)
    assert [tuple(c) for c in res.stage_changes] == ranks[0]["count_stage_changes"]
    assert_close(ranks[0]["count_params"], dw.params(single))
    for a, b in zip(ranks[0]["count_history"], res.history, strict=True):
        assert a["segments"] == b["segments"] and math.isclose(a["loss"], b["loss"], abs_tol=2e-6)
        if "valid_accuracy" in b:
            assert math.isclose(a["valid_accuracy"], b["valid_accuracy"], abs_tol=1e-9)


def test_resume_on_one_process_after_two(two_ranks, tmp_path):
    out, ranks = two_ranks
    run_dir = tmp_path / "run"
    shutil.copytree(out / "saved-checkpoint-2", run_dir / "checkpoint-2")
    state = torch.load(run_dir / "checkpoint-2" / "trainer_state.pt", weights_only=True)
    assert state["world_size"] == 2 and state["global_batch_size"] == 2 * dw.PER_RANK_BATCH
    task = dw.make_copy_task()
    resumed = dw.tiny_model(task)
    for p in resumed.parameters():  # everything must come from the checkpoint
        torch.nn.init.normal_(p)
    res = train(resumed, task, 4, segments=2, batch_size=2 * dw.PER_RANK_BATCH, eval_every=2,
                save_every=2, checkpoint_segments=True, output_dir=run_dir, **dw.TRAIN_KW)
    assert res.step == 4
    assert_close(ranks[0]["resume_params"], dw.params(resumed))
    assert_close(ranks[0]["resume_params"], ranks[1]["resume_params"], tol=0.0)
    # rank 0 alone wrote the checkpoints and metrics: each step's record once
    run2 = out / "resume_run"
    saved = sorted(n for n in os.listdir(run2) if n.startswith("checkpoint"))
    assert saved == ["checkpoint-2", "checkpoint-4"]
    steps = [json.loads(line)["step"] for line in open(run2 / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == 4


def test_bf16_autocast_on_cpu(two_ranks):
    _, ranks = two_ranks
    hist = ranks[0]["amp_history"]
    assert hist and all(math.isfinite(h["loss"]) for h in hist)
    assert_close(ranks[0]["amp_params"], ranks[1]["amp_params"], tol=0.0)
    task = dw.make_copy_task()
    fp32 = dw.tiny_model(task)
    train(fp32, task, 2, segments=2, batch_size=2 * dw.PER_RANK_BATCH, eval_every=100,
          checkpoint_segments=True, **dw.TRAIN_KW)
    # bf16 really ran (other numbers than float32) but stayed near them
    a, b = ranks[0]["amp_params"], dw.params(fp32)
    assert_differs(a, b, tol=1e-7)
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 0.05


@pytest.mark.parametrize("ckpt", [False, True])
@pytest.mark.parametrize("parallel", ["fsdp", "fsdp-blocks"])
def test_fsdp_ranks_with_different_segment_counts(two_ranks, parallel, ckpt):
    """Rank 0 runs 1 segment, rank 1 runs 3, the model sharded by fully_shard: no hang, the
    single-process gradient. As one unit: one all-gather and one reduce-scatter whatever the
    segment count. Per block (collectives per segment): rank 0's batch is padded to 3 segments
    (one more all-reduce, MAX), so both ranks issue the same all-gathers and reduce-scatters."""
    _, ranks = two_ranks
    task = dw.make_copy_task()
    ref, loss_ref = var_reference(task, ckpt)
    key = f"{parallel}_var_{{}}_ckpt{int(ckpt)}"
    assert_close(ranks[0][key.format("grads")], ref)
    assert_close(ranks[0][key.format("grads")], ranks[1][key.format("grads")], tol=0.0)
    assert math.isclose(ranks[0][key.format("loss")], loss_ref, rel_tol=1e-6)
    counts = [ranks[r][key.format("counts")] for r in range(2)]
    assert counts[0] == counts[1]
    if parallel == "fsdp":  # target count + loss all-reduces, one all-gather, one reduce-scatter
        assert counts[0] == {"all_reduce": 2, "all_gather_single": 1, "reduce_scatter_single": 1}
    else:  # + the segment-count MAX; per segment and block
        assert counts[0]["all_reduce"] == 3 and counts[0]["reduce_scatter_single"] >= 3


@pytest.mark.parametrize("parallel", ["fsdp", "fsdp-blocks"])
def test_fsdp_curriculum_with_checkpointing(two_ranks, parallel):
    """Curriculum with random segments, 2 micro-batches, checkpointed segments, truncated BPTT
    under FSDP (as one unit: one reduce-scatter per optimizer step, one all-gather per
    micro-batch and per evaluation): the single-process parameters and losses."""
    _, ranks = two_ranks
    steps, accum, evals = 4, 2, 2
    if parallel == "fsdp":
        for r in ranks:
            assert r["fsdp_count"]["reduce_scatter_single"] == steps
            assert r["fsdp_count"]["all_gather_single"] == steps * accum + evals
    assert ranks[0][f"{parallel}_count"] == ranks[1][f"{parallel}_count"]
    task = dw.make_copy_task()
    single = dw.tiny_model(task)
    res = train(single, task, 4, segments=[1, 3], random_segments=True, threshold=0.0,
                batch_size=dw.PER_RANK_BATCH, grad_accum=2, eval_every=2, checkpoint_segments=True,
                bptt_depth=1, **dw.TRAIN_KW)
    assert_close(ranks[0][f"{parallel}_count_params"], dw.params(single))
    for a, b in zip(ranks[0][f"{parallel}_count_history"], res.history, strict=True):
        assert a["segments"] == b["segments"] and math.isclose(a["loss"], b["loss"], abs_tol=2e-6)


@pytest.mark.parametrize("saved,final", [("fsdp-checkpoint-2", "fsdp_resume_params"),
                                         ("blocks-checkpoint-2", "blocks_resume_params")])
def test_fsdp_checkpoint_resumes_on_one_process(two_ranks, tmp_path, saved, final):
    """An FSDP checkpoint (model as one unit, or per block) written after 2 of 4 steps on 2
    processes, continued on one process (batch doubled), ends where the 2-process run ended."""
    out, ranks = two_ranks
    task = dw.make_copy_task()
    run_dir = tmp_path / "run"
    shutil.copytree(out / saved, run_dir / "checkpoint-2")
    resumed = dw.tiny_model(task)
    for p in resumed.parameters():
        torch.nn.init.normal_(p)
    train(resumed, task, 4, segments=2, batch_size=2 * dw.PER_RANK_BATCH, eval_every=2,
          save_every=2, checkpoint_segments=True, output_dir=run_dir, **dw.TRAIN_KW)
    assert_close(ranks[0][final], dw.params(resumed))
    assert_close(ranks[0][final], ranks[1][final], tol=0.0)


def test_fsdp_per_block_units(two_ranks):
    """``parallel="fsdp-blocks"``: one FSDP unit per GPT-2 block plus the model; block 0's weights
    are sharded again while block 1 runs (with the model as one unit they stay whole)."""
    _, ranks = two_ranks
    assert ranks[0]["blocks_units"] == 3  # 2 blocks + the wrapper
    assert ranks[0]["blocks_sharded_during_compute"] and not ranks[0]["fsdp_sharded_during_compute"]


@pytest.mark.parametrize("parallel", ["dp", "fsdp", "fsdp-blocks"])
def test_torchrun_cli_matches_single_process(tmp_path, parallel):
    """``python -m torch.distributed.run --nproc_per_node 2 -m rmt_fast.train ...`` (loopback)."""
    args = ["--parallel", parallel, "--task", "copy", "--segments", "2", "--segment-size", "8",
            "--mem", "2", "--layers", "2",
            "--d-model", "32", "--heads", "4", "--d-inner", "64", "--steps", "3", "--warmup", "1",
            # lr 1e-4: AdamW scales float32 rounding in small, cancelling gradient entries
            # (two half-batch sums vs one) up to ~lr per step; see the note above assert_close
            "--lr", "1e-4", "--eval-every", "3", "--eval-size", "16", "--save-every", "3",
            "--train-size", "100",
            "--valid-size", "16", "--test-size", "0", "--copies", "1", "--no-progress",
            "--threads", "1", "--checkpoint-segments", "--dtype", "float32"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), "-m", "rmt_fast.train",
           *args, "--batch-size", "3", "--out", str(tmp_path / "dist")]
    proc = subprocess.run(cmd, cwd=ROOT, env=child_env(), capture_output=True, text=True,
                          timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    summary = [json.loads(line) for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(summary) == 1 and summary[0]["world_size"] == 2 and summary[0]["step"] == 3
    single = train_main([*args, "--batch-size", "6", "--out", str(tmp_path / "single")])
    assert single.step == 3
    load = lambda d: torch.load(d / "checkpoint-3" / "trainer_state.pt", weights_only=True)
    assert load(tmp_path / "dist")["world_size"] == 2 and load(tmp_path / "single")["world_size"] == 1
    from rmt_fast.models import RMTForCausalLM

    a = RMTForCausalLM.from_pretrained(tmp_path / "dist" / "checkpoint-3").state_dict()
    b = RMTForCausalLM.from_pretrained(tmp_path / "single" / "checkpoint-3").state_dict()
    assert_close(a, b)
    losses = lambda d: [json.loads(line)["loss"] for line in open(d / "metrics.jsonl")]
    assert losses(tmp_path / "dist") == pytest.approx(losses(tmp_path / "single"), abs=2e-6)


def test_env_parsing_and_sharding():
    assert rd.env_from_environ({}) is None
    assert rd.env_from_environ({"RANK": "1", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == rd.DistEnv(1, 4, 1)
    with pytest.raises(ValueError, match="incomplete"):
        rd.env_from_environ({"LOCAL_RANK": "0"})
    with pytest.raises(ValueError, match="invalid"):
        rd.env_from_environ({"RANK": "4", "WORLD_SIZE": "4"})
    idx = torch.arange(24)
    parts = [rd.shard(idx, r, 3, j, 2) for j in range(2) for r in range(3)]
    assert torch.equal(torch.cat(parts), idx)  # disjoint, and their union is the global batch
    with pytest.raises(ValueError, match="does not split"):
        rd.shard(torch.arange(10), 0, 3)
    assert [rd.split_evenly(10, 3, i) for i in range(3)] == [(0, 4), (4, 7), (7, 10)]
