"""``rmt-fast bench``: throughput, achieved GFLOP/s and peak memory versus sequence length.

Each point runs ``rmt_fast.bench.point`` in a fresh subprocess (peaks do not mix). The systems
of one length run back to back (``--rounds R`` repeats the whole plan ``R`` times, alternating,
and pools the timed runs), so their ratio is measured under the same machine load. The
machine's own ceilings (a large matrix product in each dtype, a memory copy:
:mod:`rmt_fast.bench.ceilings`) are measured in the same run, before and after the points, with
the same thread count; every point reports its achieved GFLOP/s
(:func:`rmt_fast.bench.systems.point_flops`) and the fraction of the best ceiling of its dtype.
A system that exceeds the time or memory budget at one length is not run at longer lengths.
Writes ``results.json`` (every number + the machine), ``results.md`` and ``results.png``
(tokens/s with min-max error bars, peak memory, fraction of the matrix-product ceiling).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import time

from tqdm.auto import tqdm

from rmt_fast.bench.memory import rss_mib
from rmt_fast.bench.plotting import pyplot, save, style_length_axes
from rmt_fast.bench.systems import INFER, SYSTEMS, TRAIN, unavailable

OURS = {INFER: "rmt_fast", TRAIN: "rmt_fast"}
LONG_POINT = 65_536  # beyond this many tokens a point warms up on 4,096 tokens only
QUICK_LENGTHS = (1024, 4096, 16384)
QUICK_MAX_TRAIN_LENGTH = 4096
DTYPE_CHOICES = ("auto", "float32", "bfloat16")


def lengths_doubling(start: int, stop: int) -> list[int]:
    out, n = [], start
    while n < stop:
        out.append(n)
        n *= 2
    return out + [stop]


def machine() -> dict:
    import torch
    import transformers

    from rmt_fast.dtypes import describe

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
            "dtype_auto": describe("cpu"),
            "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def run_subprocess(args: list[str], time_budget: float, mem_budget_mib: float,
                   module: str = "rmt_fast.bench.point") -> dict:
    """Run one point; kill it past the budgets. Returns its JSON row or a status row."""
    cmd = [sys.executable, "-m", module, *args]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    start, status = time.monotonic(), None
    while proc.poll() is None:
        if time.monotonic() - start > time_budget:
            status = f"over time budget ({time_budget:.0f} s)"
        elif rss_mib(proc.pid) > mem_budget_mib:
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


def measure_ceilings(threads: int, dtypes: list[str], size: int | None = None,
                     copy_mib: int | None = None, timeout: float = 300.0) -> dict | None:
    """:mod:`rmt_fast.bench.ceilings` in a fresh process (None if it failed)."""
    args = ["--threads", str(threads), "--dtypes", *dtypes]
    if size:
        args += ["--size", str(size)]
    if copy_mib:
        args += ["--copy-mib", str(copy_mib)]
    out = run_subprocess(args, timeout, float("inf"), module="rmt_fast.bench.ceilings")
    return None if "status" in out else out


def best_ceilings(measurements: list[dict | None]) -> dict:
    """``{"gflops": {dtype: best}, "copy_gbps": best}`` over the runs that succeeded."""
    gflops: dict[str, float] = {}
    copy = None
    for m in (m for m in measurements if m):
        for name, r in m["matmul"].items():
            gflops[name] = max(gflops.get(name, 0.0), r["gflops"])
        copy = max(copy or 0.0, m["copy"]["gbps"])
    return {"gflops": gflops, "copy_gbps": copy}


def sweep(systems: list[str], modes: list[str], lengths: list[int], batches: dict[str, int],
          repeats: int, time_budget: float, mem_budget_mib: float, config: str, threads: int,
          progress: bool = True, partial_path: str | None = None, dtypes: list[str] | None = None,
          official_rmt: str | None = None, rounds: int = 1, min_repeats: int = 1,
          max_lengths: dict[str, int] | None = None) -> list[dict]:
    """Lengths in the outer loop, (mode, system, dtype) inside: the systems of one length run
    back to back, so their ratio is measured under the same machine load; ``rounds`` > 1 runs
    the whole plan again and pools the timed runs of each point. ``dtypes``: resolved names
    (``float32``, ``bfloat16``). ``max_lengths``: per mode, longer points are left out.
    ``partial_path``: rewritten after every point, so an interrupted sweep keeps what it
    measured."""
    dtypes = dtypes or ["float32"]
    max_lengths = max_lengths or {}
    plan = [(mode, system, dtype) for mode in modes for system in systems for dtype in dtypes]
    stopped = {key: unavailable(key[1], official_rmt, key[0]) for key in plan}
    last_time: dict[tuple[str, str, str], float] = {}
    points = [(n, key) for n in lengths for key in plan if n <= max_lengths.get(key[0], n)]
    rows: dict[tuple, dict] = {}
    bar = tqdm(total=len(points) * rounds, desc="bench", unit="point", disable=not progress)
    for _ in range(rounds):
        for n, key in points:
            mode, system, dtype = key
            bar.set_postfix_str(f"{mode} {system} {dtype} {n:,}")
            row = rows.setdefault((n, key), {"system": system, "mode": mode, "dtype": dtype,
                                             "length": n, "batch": batches[mode]})
            if stopped[key]:
                if row.get("status") != "ok":
                    row["status"] = stopped[key]
            else:
                new = _run_point(system, mode, n, batches[mode], repeats, time_budget,
                                 mem_budget_mib, config, threads, last_time.get(key), dtype,
                                 official_rmt, min_repeats)
                if new["status"] != "ok":
                    stopped[key] = new["status"]
                    if row.get("status") != "ok":
                        row.update(new)
                else:
                    _merge(row, new)
                    last_time[key] = new["median_s"]
            bar.update()
            if partial_path:
                with open(partial_path, "w") as f:
                    json.dump(list(rows.values()), f, indent=1)
    bar.close()
    out = list(rows.values())
    _add_ratios(out)
    return out


def _merge(row: dict, new: dict) -> None:
    """Pool the timed runs of one point over rounds (peak memory: the largest)."""
    if row.get("status") != "ok":
        row.update(new, rounds=1)
    else:
        row["times_s"] = row["times_s"] + new["times_s"]
        row["peak_mib"] = max(row["peak_mib"], new["peak_mib"])
        row["rounds"] += 1
    times, tokens = row["times_s"], row["batch"] * row["length"]
    row["median_s"] = statistics.median(times)
    row["tokens_per_s"] = tokens / row["median_s"]
    row["tokens_per_s_min"], row["tokens_per_s_max"] = tokens / max(times), tokens / min(times)
    row["gflops"] = row["flops"] / row["median_s"] / 1e9


def _run_point(system, mode, n, batch, repeats, time_budget, mem_budget_mib, config, threads,
               last_time: float | None, dtype: str = "float32", official_rmt: str | None = None,
               min_repeats: int = 1) -> dict:
    reps, warm_len = repeats, (4096 if n > LONG_POINT else None)  # long points: short warm-up
    growth = 4 if system == "full" else 2  # full attention is quadratic in the doubling length
    if last_time is not None and last_time * growth * (repeats + 1) > time_budget:
        # projected over budget: fewer timed runs (never under min_repeats) and a short warm-up
        reps, warm_len = max(1, min(repeats, min_repeats)), min(n, 4096)
    args = ["--system", system, "--mode", mode, "--length", str(n), "--batch", str(batch),
            "--repeats", str(reps), "--config", config, "--threads", str(threads),
            "--dtype", dtype]
    if warm_len:
        args += ["--warmup-length", str(warm_len)]
    if official_rmt:
        args += ["--official-rmt", official_rmt]
    return run_subprocess(args, time_budget, mem_budget_mib)


def _add_ratios(rows: list[dict]) -> None:
    ok = [r for r in rows if r.get("status") == "ok"]
    ours = {(r["mode"], r["dtype"], r["length"]): r for r in ok if r["system"] == OURS[r["mode"]]}
    fp32 = {(r["mode"], r["system"], r["length"]): r for r in ok if r["dtype"] == "float32"}
    for r in ok:
        mine = ours.get((r["mode"], r["dtype"], r["length"]))
        if mine is not None:
            r["ours_speedup"] = mine["tokens_per_s"] / r["tokens_per_s"]
            r["ours_memory_ratio"] = mine["peak_mib"] / r["peak_mib"]
        base = fp32.get((r["mode"], r["system"], r["length"]))
        if base is not None and r["dtype"] != "float32":
            r["vs_float32"] = r["tokens_per_s"] / base["tokens_per_s"]


def add_ceiling_fractions(rows: list[dict], ceilings: dict) -> None:
    """``frac_ceiling``: achieved GFLOP/s over the best matrix-product rate of the row's dtype
    (bf16 training runs its products in bf16 under autocast: the bf16 ceiling)."""
    for r in rows:
        peak = ceilings.get("gflops", {}).get(r.get("dtype"))
        if r.get("status") == "ok" and peak:
            r["frac_ceiling"] = r["gflops"] / peak


def _fmt(x, spec=".2f", suffix="x"):
    return "" if x is None else f"{x:{spec}}{suffix}"


def ceilings_markdown(before: dict | None, after: dict | None, threads: int) -> str:
    def cell(m, get):
        try:
            return f"{get(m):,.0f}" if m else "failed"
        except KeyError:
            return "-"

    names = list(dict.fromkeys(n for m in (before, after) if m for n in m["matmul"]))
    lines = [f"### Machine ceilings ({threads} thread{'s' if threads > 1 else ''}; best of the "
             "timed runs, before / after the points)", "",
             "| measurement | before | after |", "|---|---|---|"]
    def libraries(m, n):  # "214 (onednn; aten 95)": the ceiling and every library's rate
        if not m:
            return "failed"
        r = m["matmul"].get(n)
        if r is None:
            return "-"
        others = "; ".join(f"{k} {v:,.0f}" for k, v in r.get("library_gflops", {}).items()
                           if k != r.get("library"))
        tag = r.get("library", "")
        return f"{r['gflops']:,.0f}" + (f" ({tag}{'; ' + others if others else ''})" if tag else "")

    for n in names:
        size = (before or after)["matmul"][n]["size"]
        lines.append(f"| {n} matrix product {size}^3, GFLOP/s | {libraries(before, n)} | "
                     f"{libraries(after, n)} |")
    lines.append(f"| memory copy, GB/s (read + write) | {cell(before, lambda m: m['copy']['gbps'])} | "
                 f"{cell(after, lambda m: m['copy']['gbps'])} |")
    return "\n".join(lines + [""])


def markdown(rows: list[dict]) -> str:
    lines = []
    multi_dtype = len({r.get("dtype") for r in rows}) > 1
    for mode in dict.fromkeys(r["mode"] for r in rows):
        for dtype in dict.fromkeys(r.get("dtype", "float32") for r in rows if r["mode"] == mode):
            sel = [r for r in rows if r["mode"] == mode and r.get("dtype", "float32") == dtype]
            batch = sel[0]["batch"]
            how = " (float32 weights, bf16 autocast)" if mode == TRAIN and dtype != "float32" else ""
            extra = " ours / system tokens/s | ours / system memory |" + (
                " vs float32 |" if multi_dtype and dtype != "float32" else "")
            lines += [f"### {mode}, {dtype}{how}, batch {batch}", "",
                      "| system | tokens | tokens/s (median) | min-max | runs | GFLOP/s | "
                      "% of ceiling | peak MiB |" + extra,
                      "|---|---|---|---|---|---|---|---|" + "---|" * extra.count("|")]
            for r in sel:
                if r.get("status") == "ok":
                    cells = [r["system"], f"{r['length']:,}", f"{r['tokens_per_s']:,.0f}",
                             f"{r['tokens_per_s_min']:,.0f}-{r['tokens_per_s_max']:,.0f}",
                             str(len(r["times_s"])), f"{r['gflops']:,.1f}",
                             _fmt(r.get("frac_ceiling") and 100 * r["frac_ceiling"], ".1f", "%"),
                             f"{r['peak_mib']:,.0f}", _fmt(r.get("ours_speedup")),
                             _fmt(r.get("ours_memory_ratio"))]
                    if multi_dtype and dtype != "float32":
                        cells.append(_fmt(r.get("vs_float32")))
                else:
                    cells = [r["system"], f"{r['length']:,}", r["status"]] + [""] * (
                        6 + extra.count("|") - 1)
                lines.append("| " + " | ".join(cells) + " |")
            lines.append("")
    return "\n".join(lines)


def plot(rows: list[dict], path: str) -> None:
    modes = list(dict.fromkeys(r["mode"] for r in rows))
    fig, axes = pyplot().subplots(len(modes), 3, figsize=(16, 4 * len(modes)), squeeze=False)
    for i, mode in enumerate(modes):
        keys = dict.fromkeys((r["system"], r.get("dtype", "float32")) for r in rows
                             if r["mode"] == mode)
        for system, dtype in keys:
            pts = [r for r in rows if r["mode"] == mode and r["system"] == system
                   and r.get("dtype", "float32") == dtype and r.get("status") == "ok"]
            if not pts:
                continue
            xs, label = [r["length"] for r in pts], f"{system} {dtype}"
            med = [r["tokens_per_s"] for r in pts]
            lo = [m - r.get("tokens_per_s_min", m) for m, r in zip(med, pts, strict=True)]
            hi = [r.get("tokens_per_s_max", m) - m for m, r in zip(med, pts, strict=True)]
            axes[i][0].errorbar(xs, med, yerr=[lo, hi], marker="o", capsize=3, label=label)
            axes[i][1].plot(xs, [r["peak_mib"] for r in pts], marker="o", label=label)
            fr = [(r["length"], 100 * r["frac_ceiling"]) for r in pts if "frac_ceiling" in r]
            if fr:
                axes[i][2].plot(*zip(*fr, strict=True), marker="o", label=label)
        for ax, ylabel in zip(axes[i], ["tokens/s (median, min-max)", "peak memory (MiB)",
                                        "% of the matrix-product ceiling"], strict=True):
            style_length_axes(ax, ylabel, f"{mode}: {ylabel}")
        axes[i][2].set_yscale("linear")
    save(fig, path)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line with ``--quick``, ``--dtype auto`` and ``--official-rmt`` resolved:
    ``lengths``, ``train_batch``, ``repeats``, ``min_repeats``, ``max_train_length``,
    ``time_budget``, ``dtypes`` (names), ``systems`` are final."""
    p = argparse.ArgumentParser(prog="rmt-fast bench", description=__doc__)
    p.add_argument("--quick", action="store_true",
                   help=f"lengths {', '.join(map(str, QUICK_LENGTHS))} (training up to "
                        f"{QUICK_MAX_TRAIN_LENGTH}, batch 1), 3 timed runs per point: about 3 "
                        "minutes on a quiet 2-core machine")
    p.add_argument("--systems", nargs="*", default=["rmt_fast", "full", "lucidrains"],
                   choices=SYSTEMS, help="'official' joins by itself when --official-rmt is given")
    p.add_argument("--modes", nargs="*", default=[INFER, TRAIN], choices=[INFER, TRAIN])
    p.add_argument("--dtype", nargs="+", default=["auto"], choices=DTYPE_CHOICES,
                   help="auto: bfloat16 where the CPU has native bf16 dot products (AVX512-BF16, "
                        "AMX), else float32 (rmt_fast.dtypes); several: each point in each dtype")
    p.add_argument("--official-rmt", default=None, metavar="PATH",
                   help="a copy of modeling_rmt/language_modeling.py of "
                        "booydar/recurrent-memory-transformer (not on PyPI, never shipped): adds "
                        "the official wrapper as system 'official'")
    p.add_argument("--min-length", type=int, default=1000)
    p.add_argument("--max-length", type=int, default=2_048_000)
    p.add_argument("--lengths", type=int, nargs="*", default=None, help="explicit lengths")
    p.add_argument("--max-train-length", type=int, default=None,
                   help="leave training points longer than this out")
    p.add_argument("--infer-batch", type=int, default=1)
    p.add_argument("--train-batch", type=int, default=None, help="default 4 (--quick: 1)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per point and round")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the whole plan this many times, alternating, pooling the timed runs")
    p.add_argument("--time-budget", type=float, default=600.0, help="seconds per point")
    p.add_argument("--mem-budget", type=float, default=16_000.0, help="MiB per point")
    p.add_argument("--config", default="default")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--ceiling-size", type=int, default=None,
                   help="matrix size of the ceiling measurement (default 2048, smaller "
                        "for a dtype whose product would take over 2 s: bench.ceilings.fit_size)")
    p.add_argument("--ceiling-copy-mib", type=int, default=None, help="default 256")
    p.add_argument("--out", default="bench/results")
    a = p.parse_args(argv)
    from rmt_fast.bench.systems import CONFIGS
    from rmt_fast.dtypes import dtype_name, resolve_dtype

    if a.config not in CONFIGS:
        p.error(f"--config must be one of {sorted(CONFIGS)}, got {a.config!r}")
    if a.repeats < 1 or a.rounds < 1:
        p.error("--repeats and --rounds must be >= 1")
    if a.official_rmt is not None:
        if not os.path.isfile(a.official_rmt):
            p.error(f"--official-rmt: no such file {a.official_rmt!r}")
        a.official_rmt = os.path.abspath(a.official_rmt)
        if "official" not in a.systems:
            a.systems = [*a.systems, "official"]
    a.min_repeats = 1
    if a.quick:
        a.repeats, a.min_repeats = max(a.repeats, 3), 3
        a.time_budget = min(a.time_budget, 90)
        a.lengths = a.lengths or list(QUICK_LENGTHS)
        a.max_train_length = a.max_train_length or QUICK_MAX_TRAIN_LENGTH
        a.train_batch = a.train_batch or 1
    a.train_batch = a.train_batch or 4
    a.dtypes = list(dict.fromkeys(dtype_name(resolve_dtype(d, "cpu")) for d in a.dtype))
    a.lengths = a.lengths or lengths_doubling(a.min_length, a.max_length)
    return a


def main(argv: list[str] | None = None) -> list[dict]:
    from rmt_fast.bench.systems import CONFIGS

    a = parse_args(argv)
    dtypes = a.dtypes
    os.makedirs(a.out, exist_ok=True)
    ceiling_dtypes = list(dict.fromkeys(["float32", "bfloat16", *dtypes]))
    before = measure_ceilings(a.threads, ceiling_dtypes, a.ceiling_size, a.ceiling_copy_mib)
    rows = sweep(a.systems, a.modes, a.lengths, {INFER: a.infer_batch, TRAIN: a.train_batch},
                 a.repeats, a.time_budget, a.mem_budget, a.config, a.threads,
                 partial_path=os.path.join(a.out, "results.partial.json"), dtypes=dtypes,
                 official_rmt=a.official_rmt, rounds=a.rounds, min_repeats=a.min_repeats,
                 max_lengths={TRAIN: a.max_train_length} if a.max_train_length else None)
    after = measure_ceilings(a.threads, ceiling_dtypes, a.ceiling_size, a.ceiling_copy_mib)
    ceilings = best_ceilings([before, after])
    add_ceiling_fractions(rows, ceilings)
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump({"command": " ".join(["rmt-fast", "bench", *(argv or sys.argv[1:])]),
                   "machine": machine(), "config": a.config, "config_sizes":
                   CONFIGS[a.config].as_dict(), "dtypes": dtypes, "threads": a.threads,
                   "ceilings": {"before": before, "after": after, **ceilings}, "rows": rows},
                  f, indent=1)
    table = ceilings_markdown(before, after, a.threads) + "\n" + markdown(rows)
    with open(os.path.join(a.out, "results.md"), "w") as f:
        f.write(table)
    plot(rows, os.path.join(a.out, "results.png"))
    print(table)
    return rows


if __name__ == "__main__":
    main()
