"""Associative retrieval 4x3 (the NeurIPS-2022 row: 4 segments of 3 tokens, 3 memory tokens,
GPT-2 6 layers, d_model 64) through a curriculum over the *segment size*: the same 12-token
samples cut into 1 segment of 12, then 2 of 6, 3 of 4 and 4 of 3. Each stage starts from the
last one's weights and ends at 0.99 validation accuracy (or after ``--stage-steps``).

Usage: ``python scripts/train_retrieval.py OUT_DIR [--mask causal] [--train-size 100000]``;
prints one JSON line per stage with its test accuracy. See docs/results.md for the run.
"""

import argparse
import json
import os

import torch

from rmt_fast.tasks import make_task
from rmt_fast.train import build_model, evaluate, train

STAGES = ((12, 1), (6, 2), (4, 3), (3, 4))  # (segment size, segments): always 12 tokens


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("out")
    p.add_argument("--mask", default="causal")
    p.add_argument("--init", default="torch")
    p.add_argument("--train-size", type=int, default=100_000)
    p.add_argument("--stage-steps", type=int, default=6000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    torch.set_num_threads(1)
    model = build_model(37, 12, 3, layers=6, d_model=64, heads=4, d_inner=256, mask=args.mask,
                        seed=args.seed, init=args.init)
    for size, n in STAGES:
        model.replace_config(segment_size=size)
        # the same rows at every segment size (the task is 12 tokens long either way)
        task = make_task("retrieval", size, seed=args.seed, train_size=args.train_size)
        res = train(model, task, args.stage_steps, segments=n, batch_size=32, lr=1e-3,
                    warmup_steps=100, schedule="linear", min_lr_ratio=0.1, threshold=0.99,
                    early_stop=True, eval_every=100, eval_size=1000,
                    output_dir=os.path.join(args.out, f"seg{size}"), save_every=500,
                    seed=args.seed, progress=False)
        test = evaluate(model, task.splits(n)["test"])
        print(json.dumps({"segment_size": size, "segments": n, "steps": res.step,
                          "valid": res.valid_accuracy, "test": test,
                          "wall_time": round(res.wall_time, 1)}), flush=True)


if __name__ == "__main__":
    main()
