"""Side-by-side throughput of several source trees / systems, alternating fresh processes.

Each *arm* is ``NAME=TREE:SYSTEM``: :mod:`rmt_fast.bench.point` runs ``SYSTEM`` (see
:mod:`rmt_fast.bench.systems`) with ``PYTHONPATH=TREE`` (e.g. a ``git worktree`` of an older
commit). Every round runs each arm once, in a fresh process, the order rotating from round to
round so that a change in machine load hits every arm alike; the report gives each arm's median
tokens/s over the rounds and its ratio to the first arm's.

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


def run_arm(tree: str, system: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree), OMP_NUM_THREADS=str(args.threads))
    cmd = [sys.executable, "-m", "rmt_fast.bench.point", "--system", system, "--mode", args.mode,
           "--length", str(args.length), "--batch", str(args.batch), "--repeats", str(args.repeats),
           "--warmup", str(args.warmup), "--config", args.config, "--threads", str(args.threads)]
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
            print(json.dumps({"round": r, "arm": name, **{k: row.get(k) for k in
                                                           ("status", "tokens_per_s", "peak_mib")}}),
                  flush=True)
    summary = {}
    for name, _, system in arms:
        ok = [row["tokens_per_s"] for row in runs[name] if row.get("status") == "ok"]
        peaks = [row["peak_mib"] for row in runs[name] if row.get("status") == "ok"]
        summary[name] = {"system": system, "tokens_per_s": ok,
                         "median_tokens_per_s": statistics.median(ok) if ok else None,
                         "median_peak_mib": statistics.median(peaks) if peaks else None}
    first = summary[arms[0][0]]["median_tokens_per_s"]
    for name in summary:
        med = summary[name]["median_tokens_per_s"]
        summary[name]["ratio_to_first"] = med / first if med and first else None
    report = {"args": vars(args), "summary": summary, "runs": runs}
    print(json.dumps(summary, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=1)
    return report


if __name__ == "__main__":
    main()
