"""Side-by-side throughput of several source trees / systems, alternating fresh processes.

Each *arm* is ``NAME=TREE:SYSTEM``: a fresh process with ``PYTHONPATH=TREE`` (e.g. a
``git worktree`` of an older commit) builds ``SYSTEM`` with that tree's
:func:`rmt_fast.bench.systems.build`, runs ``--warmup`` steps and times ``--repeats`` more, in
wall-clock and in CPU time of the process (``time.process_time``: on a machine shared with other
jobs the wall clock mostly measures the scheduler, the CPU time of a one-thread run the work).
Every round runs each arm once, the order rotating from round to round so that a change in
machine load hits every arm alike; the report gives each arm's median tokens/s and tokens per
CPU-second over the rounds, its peak RSS, and the ratios to the first arm.

``python -m rmt_fast.bench.ab --arm old=/tmp/old:rmt_fast --arm new=.:rmt_fast --mode train
--length 8192 --batch 2 --rounds 5``
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys

# run in each arm's process: only the tree's rmt_fast.bench.systems.build is used
SNIPPET = """
import json, resource, statistics, sys, time
import torch
from rmt_fast.bench.systems import CONFIGS, build
system, mode, config = sys.argv[1:4]
length, batch, repeats, warmup, threads = map(int, sys.argv[4:9])
torch.set_num_threads(threads)
cfg = CONFIGS[config]
step = build(system, mode, cfg, length)
tokens = torch.randint(1, cfg.vocab, (batch, length), generator=torch.Generator().manual_seed(0))
for _ in range(warmup):
    step(tokens)
wall, cpu = [], []
for _ in range(repeats):
    w, c = time.perf_counter(), time.process_time()
    step(tokens)
    wall.append(time.perf_counter() - w)
    cpu.append(time.process_time() - c)
n = batch * length
print(json.dumps({"status": "ok", "wall_s": wall, "cpu_s": cpu,
                  "tokens_per_s": n / statistics.median(wall),
                  "tokens_per_cpu_s": n / statistics.median(cpu),
                  "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""


def run_arm(tree: str, system: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree), OMP_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, "-c", SNIPPET, system, args.mode, args.config, str(args.length),
           str(args.batch), str(args.repeats), str(args.warmup), str(args.threads)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        return {"status": "failed", "error": proc.stderr[-2000:]}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arm", action="append", required=True, help="NAME=TREE:SYSTEM (repeatable)")
    p.add_argument("--mode", default="train", choices=("train", "infer"))
    p.add_argument("--length", type=int, default=8192)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--config", default="default")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--timeout", type=float, default=1800)
    p.add_argument("--out", default=None, help="write the JSON report here")
    args = p.parse_args(argv)
    arms = []
    for spec in args.arm:
        name, _, rest = spec.partition("=")
        tree, _, system = rest.rpartition(":")
        if not name or not tree or not system:
            p.error(f"--arm must be NAME=TREE:SYSTEM, got {spec!r}")
        arms.append((name, tree, system))
    runs: dict[str, list[dict]] = {name: [] for name, _, _ in arms}
    for r in range(args.rounds):
        order = arms[r % len(arms):] + arms[:r % len(arms)]
        for name, tree, system in order:
            row = run_arm(tree, system, args)
            runs[name].append(row)
            keys = ("status", "tokens_per_s", "tokens_per_cpu_s", "peak_mib")
            print(json.dumps({"round": r, "arm": name, **{k: row.get(k) for k in keys}}), flush=True)
    summary = {}
    for name, _, system in arms:
        ok = [row for row in runs[name] if row.get("status") == "ok"]
        summary[name] = {"system": system, "runs": len(ok)}
        for key in ("tokens_per_s", "tokens_per_cpu_s", "peak_mib"):
            values = [row[key] for row in ok]
            summary[name][f"median_{key}"] = statistics.median(values) if values else None
    for key in ("tokens_per_s", "tokens_per_cpu_s", "peak_mib"):
        first = summary[arms[0][0]][f"median_{key}"]
        for name in summary:
            med = summary[name][f"median_{key}"]
            summary[name][f"{key}_ratio_to_first"] = med / first if med and first else None
    report = {"args": vars(args), "summary": summary, "runs": runs}
    print(json.dumps(summary, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
