"""``transformers.Trainer`` on an RMT under ``accelerate launch`` with 2 CPU processes (gloo,
data-parallel) equals one process with the global batch."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKER = os.path.join(ROOT, "tests", "accelerate_worker.py")


def _run(cmd, cwd) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    res = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]


@pytest.mark.parametrize("checkpoint_segments", [False, True])
def test_accelerate_two_processes_equal_one_with_the_global_batch(tmp_path, checkpoint_segments):
    accelerate = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    if accelerate is None:
        pytest.skip("accelerate is not installed")
    flag = "1" if checkpoint_segments else "0"
    _run([sys.executable, WORKER, str(tmp_path / "one"), "8", flag], tmp_path)
    # no GPU: --multi_gpu starts torchrun-style ranks; Trainer(use_cpu=True) joins them over gloo
    _run([accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
          "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", "0", WORKER,
          str(tmp_path / "two"), "4", flag], tmp_path)
    one, two = (json.load(open(tmp_path / d / "result.json")) for d in ("one", "two"))
    assert (one["world_size"], two["world_size"]) == (1, 2)
    assert two["losses"] == pytest.approx(one["losses"], abs=1e-5)
    a, b = (torch.load(tmp_path / d / "final.pt") for d in ("one", "two"))
    assert a.keys() == b.keys()
    for k in a:
        assert (a[k] - b[k]).abs().max().item() <= 1e-6, k
    assert one["losses"][-1] < one["losses"][0] or len(set(one["losses"])) > 1
