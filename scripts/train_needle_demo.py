"""Reproduce the shipped demo checkpoint (``rmt_fast/checkpoints/needle``), in five stages.

1. ``rmt-fast train`` curriculum 1 -> 2 -> 4 -> 8 segments of 32 tokens (stopped at step 600);
2. fine-tuning on a random mix of 4, 8 and 16 segments (600 steps);
3. 64-segment stories with truncated BPTT over the last 8 segments (200 steps);
4. and 5. twice 400 steps on a random mix of 8, 16 and 32 segments with ``memory_noise=0.2``
   (training-only noise on the memory each segment reads; BPTT still truncated at 8 segments):
   this is what makes the answer survive 1,000,000-token haystacks.

Usage: ``python scripts/train_needle_demo.py OUT_DIR`` (about 45 minutes on one CPU thread).
"""

import os
import sys

import torch

from rmt_fast.models import RMTForCausalLM
from rmt_fast.tasks import make_task
from rmt_fast.train import main as train_cli
from rmt_fast.train import train


def latest(directory: str) -> str:
    steps = [int(d.split("-")[1]) for d in os.listdir(directory) if d.startswith("checkpoint-")]
    return os.path.join(directory, f"checkpoint-{max(steps)}")


def run(out: str) -> str:
    torch.set_num_threads(1)
    stage1, stage2, stage3, stage4, stage5 = (os.path.join(out, s) for s in (
        "curriculum", "mixed", "tbptt64", "noise", "noise2"))
    train_cli(["--task", "needle", "--segments", "8", "--segment-size", "32", "--curriculum", "1,2,4,8",
               "--threshold", "0.98", "--mem", "8", "--layers", "2", "--d-model", "128", "--heads", "4",
               "--d-inner", "256", "--steps", "600", "--batch-size", "32", "--lr", "1e-3", "--warmup",
               "100", "--schedule", "linear", "--min-lr-ratio", "0.1", "--stage-steps", "2000",
               "--eval-every", "100", "--eval-size", "256", "--save-every", "200", "--threads", "1",
               "--seed", "0", "--no-progress", "--mask", "rmt", "--out", stage1])
    model = RMTForCausalLM.from_pretrained(latest(stage1))
    train(model, make_task("needle", 32, seed=1), 600, segments=[4, 8, 16], random_segments=True,
          batch_size=16, lr=3e-4, warmup_steps=20, min_lr_ratio=0.1, threshold=0.99, stage_steps=600,
          eval_every=50, eval_size=128, output_dir=stage2, save_every=100, seed=1, progress=False)
    model = RMTForCausalLM.from_pretrained(latest(stage2))
    task = make_task("needle", 32, seed=2, train_size=4000, valid_size=256, test_size=256)
    train(model, task, 200, segments=[64], batch_size=8, lr=1e-4, warmup_steps=10, min_lr_ratio=0.2,
          eval_every=50, eval_size=64, output_dir=stage3, save_every=50, seed=2, progress=False,
          bptt_depth=8)
    task = make_task("needle", 32, seed=3, train_size=4000, valid_size=256, test_size=256)
    previous = stage3
    for stage in (stage4, stage5):
        model = RMTForCausalLM.from_pretrained(latest(previous))
        model.replace_config(memory_noise=0.2)
        train(model, task, 400, segments=[8, 16, 32], random_segments=True, batch_size=16, lr=3e-4,
              warmup_steps=20, min_lr_ratio=0.1, threshold=0.99, eval_every=50, eval_size=128,
              output_dir=stage, save_every=50, seed=3, progress=False)
        previous = stage
    return latest(stage5)


if __name__ == "__main__":
    print(run(sys.argv[1]))
