"""``rmt-fast bench``: throughput and peak memory versus sequence length, one process per point.

Each point runs ``rmt_fast.bench.point`` in a fresh subprocess (peaks do not mix). A system that
exceeds the time or memory budget at one length is not run at longer lengths; the table says so.
Writes ``results.json`` (every number + the machine), ``results.md`` and ``results.png``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time

from tqdm.auto import tqdm

from rmt_fast.bench.plotting import pyplot, save, style_length_axes
from rmt_fast.bench.systems import INFER, SYSTEMS, TRAIN, available

OURS = {INFER: "rmt_fast", TRAIN: "rmt_fast"}
LONG_POINT = 65_536  # beyond this many tokens a point warms up on 4,096 tokens only


def lengths_doubling(start: int, stop: int) -> list[int]:
    out, n = [], start
    while n < stop:
        out.append(n)
        n *= 2
    return out + [stop]


def machine() -> dict:
    import torch
    import transformers

    cpu = platform.processor()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    return {"platform": platform.platform(), "cpu": cpu, "cores": os.cpu_count(),
            "python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__,
            "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _rss_mib(pid: int) -> float:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


def run_subprocess(args: list[str], time_budget: float, mem_budget_mib: float) -> dict:
    """Run one point; kill it past the budgets. Returns its JSON row or a status row."""
    cmd = [sys.executable, "-m", "rmt_fast.bench.point", *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    start, status = time.monotonic(), None
    while proc.poll() is None:
        if time.monotonic() - start > time_budget:
            status = f"over time budget ({time_budget:.0f} s)"
        elif _rss_mib(proc.pid) > mem_budget_mib:
            status = f"over memory budget ({mem_budget_mib:,.0f} MiB)"
        if status:
            proc.kill()
            proc.wait()
            return {"status": status}
        time.sleep(0.1)
    out, err = proc.communicate()
    if proc.returncode != 0:
        tail = err.strip().splitlines()[-1] if err.strip() else f"exit {proc.returncode}"
        return {"status": f"failed: {tail}"}
    return json.loads(out.strip().splitlines()[-1])


def sweep(systems: list[str], modes: list[str], lengths: list[int], batches: dict[str, int],
          repeats: int, time_budget: float, mem_budget_mib: float, config: str, threads: int,
          progress: bool = True, partial_path: str | None = None) -> list[dict]:
    """Lengths in the outer loop, systems inside: the systems of one length run back to back, so
    their ratio is measured under the same machine load. ``partial_path``: rewritten after every
    point, so an interrupted sweep keeps what it measured."""
    plan = [(mode, system) for mode in modes for system in systems]
    stopped = {key: None if available(key[1]) else "not installed" for key in plan}
    last_time: dict[tuple[str, str], float] = {}
    rows = []
    bar = tqdm(total=len(plan) * len(lengths), desc="bench", unit="point", disable=not progress)
    for n in lengths:
        for mode, system in plan:
            bar.set_postfix_str(f"{mode} {system} {n:,}")
            row = {"system": system, "mode": mode, "length": n, "batch": batches[mode]}
            if stopped[(mode, system)]:
                row["status"] = stopped[(mode, system)]
            else:
                row.update(_run_point(system, mode, n, batches[mode], repeats, time_budget,
                                      mem_budget_mib, config, threads, last_time.get((mode, system))))
                if row["status"] != "ok":
                    stopped[(mode, system)] = row["status"]
                else:
                    last_time[(mode, system)] = row["median_s"]
            rows.append(row)
            bar.update()
            if partial_path:
                with open(partial_path, "w") as f:
                    json.dump(rows, f, indent=1)
    bar.close()
    _add_ratios(rows)
    return rows


def _run_point(system, mode, n, batch, repeats, time_budget, mem_budget_mib, config, threads,
               last_time: float | None) -> dict:
    reps, warm_len = repeats, (4096 if n > LONG_POINT else None)  # long points: short warm-up
    growth = 4 if system == "full" else 2  # full attention is quadratic in the doubling length
    if last_time is not None and last_time * growth * (repeats + 1) > time_budget:
        reps, warm_len = 1, min(n, 4096)  # projected over budget: one timed run
    args = ["--system", system, "--mode", mode, "--length", str(n), "--batch", str(batch),
            "--repeats", str(reps), "--config", config, "--threads", str(threads)]
    if warm_len:
        args += ["--warmup-length", str(warm_len)]
    return run_subprocess(args, time_budget, mem_budget_mib)


def _add_ratios(rows: list[dict]) -> None:
    ours = {(r["mode"], r["length"]): r for r in rows
            if r["system"] == OURS[r["mode"]] and r.get("status") == "ok"}
    for r in rows:
        mine = ours.get((r["mode"], r["length"]))
        if r.get("status") == "ok" and mine is not None:
            r["ours_speedup"] = mine["tokens_per_s"] / r["tokens_per_s"]
            r["ours_memory_ratio"] = mine["peak_mib"] / r["peak_mib"]


def markdown(rows: list[dict]) -> str:
    lines = []
    for mode in dict.fromkeys(r["mode"] for r in rows):
        batch = next(r["batch"] for r in rows if r["mode"] == mode)
        lines += [f"### {mode} (batch {batch})", "",
                  "| system | tokens | tokens/s | peak MiB | ours / system tokens/s | ours / system memory |",
                  "|---|---|---|---|---|---|"]
        for r in (r for r in rows if r["mode"] == mode):
            if r.get("status") == "ok":
                lines.append(f"| {r['system']} | {r['length']:,} | {r['tokens_per_s']:,.0f} | "
                             f"{r['peak_mib']:,.0f} | {_fmt(r.get('ours_speedup'))} | "
                             f"{_fmt(r.get('ours_memory_ratio'))} |")
            else:
                lines.append(f"| {r['system']} | {r['length']:,} | {r['status']} | | | |")
        lines.append("")
    return "\n".join(lines)


def _fmt(x):
    return "" if x is None else f"{x:.2f}x"


def plot(rows: list[dict], path: str) -> None:
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, axes = pyplot().subplots(len(modes), 2, figsize=(11, 4 * len(modes)), squeeze=False)
    for i, mode in enumerate(modes):
        for system in dict.fromkeys(r["system"] for r in rows if r["mode"] == mode):
            pts = [r for r in rows if r["mode"] == mode and r["system"] == system
                   and r.get("status") == "ok"]
            if pts:
                xs = [r["length"] for r in pts]
                axes[i][0].plot(xs, [r["tokens_per_s"] for r in pts], marker="o", label=system)
                axes[i][1].plot(xs, [r["peak_mib"] for r in pts], marker="o", label=system)
        for ax, ylabel in zip(axes[i], ["tokens/s", "peak memory (MiB)"], strict=True):
            style_length_axes(ax, ylabel, f"{mode}: {ylabel}")
    save(fig, path)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="rmt-fast bench", description=__doc__)
    p.add_argument("--quick", action="store_true", help="1K-16K tokens, one repeat: a few minutes")
    p.add_argument("--systems", nargs="*", default=["rmt_fast", "full", "lucidrains"],
                   choices=SYSTEMS)
    p.add_argument("--modes", nargs="*", default=[INFER, TRAIN], choices=[INFER, TRAIN])
    p.add_argument("--min-length", type=int, default=1000)
    p.add_argument("--max-length", type=int, default=2_048_000)
    p.add_argument("--lengths", type=int, nargs="*", default=None, help="explicit lengths")
    p.add_argument("--infer-batch", type=int, default=1)
    p.add_argument("--train-batch", type=int, default=4)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--time-budget", type=float, default=600.0, help="seconds per point")
    p.add_argument("--mem-budget", type=float, default=16_000.0, help="MiB per point")
    p.add_argument("--config", default="default")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default="bench/results")
    a = p.parse_args(argv)
    if a.quick:
        a.max_length, a.repeats, a.time_budget = min(a.max_length, 16_000), 1, min(a.time_budget, 60)
    lengths = a.lengths or lengths_doubling(a.min_length, a.max_length)
    os.makedirs(a.out, exist_ok=True)
    rows = sweep(a.systems, a.modes, lengths, {INFER: a.infer_batch, TRAIN: a.train_batch},
                 a.repeats, a.time_budget, a.mem_budget, a.config, a.threads,
                 partial_path=os.path.join(a.out, "results.partial.json"))
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({"command": " ".join(["rmt-fast", "bench", *(argv or sys.argv[1:])]),
                   "machine": machine(), "config": a.config, "rows": rows}, f, indent=1)
    table = markdown(rows)
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write(table)
    plot(rows, os.path.join(a.out, "results.png"))
    print(table)
    return rows


if __name__ == "__main__":
    main()
