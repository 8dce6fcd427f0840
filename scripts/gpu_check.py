#!/usr/bin/env python3
"""One-shot GPU check of rmt_fast (``make gpu-check``): build, install, check, time, report.

Meant for a fresh CUDA machine (H100/H200) that has torch and triton but nothing of ours:

  environment        versions, GPU, nvcc (no rmt_fast import)
  install            ``pip install --no-build-isolation --no-deps --no-index .`` with the CUDA
                     extension (``RMT_FAST_BUILD_CUDA=1``, ``RMT_FAST_REQUIRE_EXT=1``,
                     ``TORCH_CUDA_ARCH_LIST`` of the present GPU); full log in ``install.log``
  ceilings           measured bf16/fp16/fp32 matrix-product and copy rates vs the datasheet
  extension_ops      rmt_fast._C ops on the GPU vs torch.cat/slicing, out= variants, gradcheck,
                     opcheck, CUDA dispatch registered
  memory_store       MemoryStore offload (pinned host copies, prefetch on a side stream) under
                     concurrent streams; segment_bptt with offload vs without: same gradients
  triton_correctness Triton kernels vs the float64 reference for every mask, bf16/fp16/fp32,
                     GQA, past keys, key padding, decode; forward and backward
  train_step         GPT-2-small RMT training step, segment checkpointing, bf16 autocast:
                     tokens/s, allocator peak vs the uncheckpointed step, same loss
  streaming_1m       StreamingReader over 1,000,000 tokens (bf16): tokens/s, allocator peak
  armt               ARMT's associative read/write kernels vs float64 (forward and backward,
                     fp32/bf16; a normaliser floor; the delta rule's UT-form write);
                     GPT-2-small ARMT read: diagonal executor vs sequential order
  kernel_timing      Triton vs SDPA vs FlexAttention (same mask) vs FlashAttention (when
                     installed): TFLOP/s and fraction of peak (rmt_fast/bench/roofline.py);
                     plain masks, then Gemma 2's soft-capped and windowed layers
  tuning             last, in the time left: candidate Triton tile configs timed (backward
                     kernels first), each checked against the shipped one: what to put in
                     launch.GPU_CONFIGS

Triton and Inductor compile on the CPU, one kernel after another in a process; the machine has
many cores. So triton_correctness splits its cases among worker processes, and kernel_timing
and tuning first run each case once in parallel workers ("warm"), filling the on-disk compile
caches, and then time the cases one after another.

Each stage runs in its own process with its own time budget under a global deadline (default
470 s), so a failure, a hang or a crash in one does not hide the rest. Results go to
``$OUT`` when set, else ``gpu_check_out/``: ``gpu_check.json``, ``gpu_check.md``,
``gpu_check.log`` (every stage's output) and ``install.log``; they are rewritten after every
stage. Without CUDA (or with ``--dry-run``) every stage runs at tiny sizes on the CPU where it
can (Triton under its interpreter) and the GPU-only parts say ``skipped``: that checks the
script's plumbing, not the GPU.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime
import glob
import json
import os
import shlex
import signal
import subprocess
import sys
import sysconfig
import tempfile
import time
import traceback
import zlib
from collections.abc import Callable

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.abspath(__file__)
DEFAULT_DEADLINE_S = 470.0
#: seconds: kept back at the end for writing the report
RESERVE_S = 5.0


# ============================================================== orchestration (no torch here)


@dataclasses.dataclass
class Stage:
    """One stage: ``cmd`` runs in its own process and writes its result JSON to ``result``."""

    name: str
    budget_s: float
    cmd: list[str]
    result: str
    env: dict[str, str] | None = None


def arch_list(capability: tuple[int, int] | list[int]) -> str:
    """``TORCH_CUDA_ARCH_LIST`` for a device capability: ``(9, 0)`` -> ``"9.0"``."""
    major, minor = capability
    return f"{major}.{minor}"


def install_env(base: dict[str, str], capability, cpus: int | None = None) -> dict[str, str]:
    """Environment of the pip build: CUDA extension forced and required, this GPU's arch."""
    env = dict(base)
    env["RMT_FAST_BUILD_CUDA"] = "1"
    env["RMT_FAST_REQUIRE_EXT"] = "1"
    if capability is not None and not env.get("TORCH_CUDA_ARCH_LIST"):
        env["TORCH_CUDA_ARCH_LIST"] = arch_list(capability)
    env.setdefault("MAX_JOBS", str(max(1, min(cpus or os.cpu_count() or 1, 16))))
    if not env.get("CUDA_HOME") and os.path.exists("/usr/local/cuda/bin/nvcc"):
        env["CUDA_HOME"] = "/usr/local/cuda"
    # headers of the pip CUDA libraries (cuBLAS, cuSPARSE, ...) that torch's headers include,
    # for toolkits installed without them; CPATH comes after -I, so a full toolkit still wins
    extra = [d for d in glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "*",
                                               "include")) if os.path.isdir(d)]
    if extra:
        env["CPATH"] = os.pathsep.join([p for p in [env.get("CPATH", "")] if p] + sorted(extra))
    return env


def install_command(python: str, repo: str) -> list[str]:
    """No dependency resolution and no index: the machine may be offline; torch, triton,
    transformers, safetensors, tqdm and numpy must already be there (checked afterwards)."""
    return [python, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index",
            "--force-reinstall", "--no-cache-dir", repo]


def run_stage(stage: Stage, timeout: float, log) -> dict:
    """Run one stage process with ``timeout``; never raises. Returns its result dict."""
    start = time.monotonic()
    log.write(f"\n===== stage {stage.name} (timeout {timeout:.0f} s) =====\n")
    log.flush()
    status, proc = None, None
    try:
        # its own process group: on timeout the stage goes with everything it started (Triton
        # workers, compilers); not a new session, so nothing outlives this script
        proc = subprocess.Popen(stage.cmd, stdout=log, stderr=subprocess.STDOUT, env=stage.env,
                                cwd=tempfile.gettempdir(), preexec_fn=os.setpgrp)
        code = proc.wait(timeout=timeout)
        if code != 0:
            status = f"crashed: exit code {code} (see gpu_check.log)"
    except subprocess.TimeoutExpired:
        status = f"timeout: over its {timeout:.0f} s budget"
    except OSError as e:
        status = f"error: {e}"
    finally:
        if proc is not None and proc.poll() is None:
            _kill_group(proc)
    seconds = time.monotonic() - start
    result = read_result(stage.result) if os.path.exists(stage.result) else {}
    if status is not None:  # keep what it wrote before it died
        result["status"] = status
    result.setdefault("status", "error: no result written")
    result["seconds"] = round(seconds, 1)
    result["budget_s"] = round(timeout, 1)
    log.write(f"===== stage {stage.name}: {result['status']} in {seconds:.1f} s =====\n")
    log.flush()
    return result


def read_result(path: str) -> dict:
    """The JSON a stage or worker process wrote to ``path``, or ``{"status": "error: unreadable
    result (...)"}`` where it is missing or cut short (a process killed mid-write)."""
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError) as e:
        return {"status": f"error: unreadable result ({e})"}


def _kill_group(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        proc.kill()
    proc.wait()


def orchestrate(stages: list[Stage], out_dir: str, deadline_s: float, header: dict,
                on_result: Callable[[str, dict, dict], None] | None = None,
                t0: float | None = None) -> dict:
    """Run ``stages`` in order under a global deadline (``deadline_s`` after ``t0``, a
    ``time.monotonic()`` reading; default now); write the report after each stage.

    ``on_result(name, result, report)`` may adjust later stages (e.g. after the install).
    """
    os.makedirs(out_dir, exist_ok=True)
    t0 = time.monotonic() if t0 is None else t0
    report = {**header, "deadline_s": deadline_s, "stages": {}}
    with open(os.path.join(out_dir, "gpu_check.log"), "a") as log:
        for stage in stages:
            left = deadline_s - (time.monotonic() - t0) - RESERVE_S
            if left < 3:
                result = {"status": "skipped: global deadline reached", "seconds": 0.0}
            else:
                result = run_stage(stage, min(stage.budget_s, left), log)
            report["stages"][stage.name] = result
            if on_result is not None:
                on_result(stage.name, result, report)
            report["elapsed_s"] = round(time.monotonic() - t0, 1)
            write_report(report, out_dir)
    return report


def _cell(x) -> str:
    if x is None:
        return "-"
    if isinstance(x, float):
        return f"{x:.3g}" if abs(x) < 1e4 else f"{x:,.0f}"
    return str(x).replace("|", "/").replace("\n", " ")


def _table(rows: list[dict], columns: list[str] | None = None) -> list[str]:
    if not rows:
        return []
    columns = columns or list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(_cell(r.get(c)) for c in columns) + " |" for r in rows]
    return lines + [""]


def markdown(report: dict) -> str:
    lines = [f"# rmt_fast GPU check ({report.get('mode', '?')})", ""]
    env = report.get("stages", {}).get("environment", {}).get("metrics", {})
    for key in ("gpu", "torch", "triton", "transformers", "nvcc", "python"):
        if key in env:
            lines.append(f"- {key}: {env[key]}")
    lines += [f"- date: {report.get('date')}, elapsed {report.get('elapsed_s', 0)} s of a "
              f"{report.get('deadline_s')} s deadline", "", "| stage | status | seconds | checks |",
              "|---|---|---|---|"]
    for name, res in report.get("stages", {}).items():
        checks = res.get("checks", []) + [r for r in res.get("rows", []) if "status" in r]
        counts = {}
        for c in checks:
            key = c["status"].split(":")[0]
            counts[key] = counts.get(key, 0) + 1
        summary = ", ".join(f"{v} {k}" for k, v in sorted(counts.items())) or "-"
        lines.append(f"| {name} | {_cell(res.get('status'))} | {res.get('seconds', '-')} | "
                     f"{summary} |")
    lines.append("")
    for name, res in report.get("stages", {}).items():
        body = []
        if res.get("metrics"):
            body += _table([{"metric": k, "value": v} for k, v in res["metrics"].items()])
        if res.get("checks"):
            body += _table(res["checks"], ["name", "status", "detail", "seconds"])
        if res.get("rows"):
            body += _table(res["rows"], res.get("columns"))
        if res.get("error"):
            body += ["```", res["error"][-2000:], "```", ""]
        if body:
            lines += [f"## {name}", ""] + body
    return "\n".join(lines)


def write_report(report: dict, out_dir: str) -> None:
    with open(os.path.join(out_dir, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=1, default=str)
    with open(os.path.join(out_dir, "gpu_check.md"), "w") as f:
        f.write(markdown(report))


# ===================================================================== stage side (torch)


class Recorder:
    """Collects one stage's checks, metrics and table rows; rewrites its result file after
    every check, so a stage killed at its budget still reports what it did."""

    def __init__(self, path: str, columns: list[str] | None = None):
        self.path = path
        self.data: dict = {"status": "running", "checks": [], "metrics": {}, "rows": []}
        if columns:
            self.data["columns"] = columns
        self.flush()

    def flush(self) -> None:
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.data, f, indent=1, default=str)
        os.replace(tmp, self.path)

    def check(self, name: str, fn: Callable[[], object] | None = None, skip: str | None = None):
        """Run ``fn``: ``ok`` (its return value, if a str, is the detail), ``FAIL`` on an
        AssertionError, ``error`` on any other exception, ``skipped`` when ``skip`` is given."""
        row = {"name": name}
        start = time.perf_counter()
        if skip is not None:
            row.update(status="skipped", detail=skip)
        else:
            try:
                detail = fn()
                row.update(status="ok", detail=detail if isinstance(detail, str) else "")
            except AssertionError as e:
                row.update(status="FAIL", detail=str(e)[:300])
            except Exception as e:  # one failing check must not hide the others
                row.update(status="error", detail=f"{type(e).__name__}: {str(e)[:300]}")
                traceback.print_exc()
        row["seconds"] = round(time.perf_counter() - start, 2)
        print(f"[{row['status']}] {name}: {row.get('detail', '')}", flush=True)
        self.data["checks"].append(row)
        self.flush()
        return row

    def metric(self, **kw) -> None:
        self.data["metrics"].update(kw)
        self.flush()

    def row(self, **kw) -> None:
        self.data["rows"].append(kw)
        self.flush()

    def finish(self) -> None:
        bad = [c for c in self.data["checks"] if c["status"] in ("FAIL", "error")]
        bad += [r for r in self.data["rows"] if str(r.get("status", "ok")).startswith(("FAIL",
                                                                                         "error"))]
        self.data["status"] = "ok" if not bad else f"failed: {len(bad)} check(s)"
        self.flush()


@dataclasses.dataclass
class Ctx:
    """What a stage needs: where it runs and how big."""

    device: str      # "cuda" or "cpu"
    tiny: bool       # dry run: tiny sizes
    budget_s: float  # this stage's budget (stages stop adding work near it)
    context: dict    # the report so far (earlier stages' results)

    @property
    def cuda(self) -> bool:
        return self.device == "cuda"

    @property
    def no_cuda(self) -> str | None:
        return None if self.cuda else "no CUDA device (dry run)"


def _sync(ctx: Ctx) -> None:
    import torch

    if ctx.cuda:
        torch.cuda.synchronize()


def _gpt2_rmt(ctx: Ctx, checkpoint: bool):
    """GPT-2-small (12x768, vocab 50257) RMT, segment 512, 16 memory tokens; tiny on a dry run."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    import rmt_fast

    if ctx.tiny:
        layers, d, heads, vocab, seg, mem = 2, 64, 2, 100, 32, 4
    else:
        layers, d, heads, vocab, seg, mem = 12, 768, 12, 50257, 512, 16
    torch.manual_seed(0)
    base = GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=d, n_head=heads, vocab_size=vocab,
                                      n_positions=seg + 2 * mem, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0, bos_token_id=0, eos_token_id=0))
    model = rmt_fast.RMTForCausalLM(base, num_mem_tokens=mem, segment_size=seg,
                                    checkpoint_segments=checkpoint)
    return model.to(ctx.device), dict(layers=layers, d_model=d, heads=heads, vocab=vocab,
                                      segment=seg, memory=mem)


# ---------------------------------------------------------------------------- stages


def stage_environment(ctx: Ctx, rec: Recorder) -> None:
    import platform
    import shutil

    import torch

    m = {"python": platform.python_version(), "torch": torch.__version__,
         "torch_cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available()}
    for name in ("triton", "transformers", "flash_attn", "safetensors", "tqdm", "numpy",
                 "setuptools", "ninja"):
        try:
            m[name] = __import__(name).__version__
        except Exception as e:
            m[name] = f"missing ({type(e).__name__})"
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        m.update(gpu=torch.cuda.get_device_name(0), capability=list(torch.cuda.get_device_capability(0)),
                 sm_count=p.multi_processor_count, gpu_memory_gib=round(p.total_memory / 2**30, 1))
    nvcc = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc"
                                    if os.path.exists("/usr/local/cuda/bin/nvcc") else None)
    if nvcc:
        out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
        m["nvcc"] = out.strip().splitlines()[-1] if out.strip() else nvcc
    else:
        m["nvcc"] = "not found"
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.sm,clocks.mem,"
                            "temperature.gpu,power.draw", "--format=csv,noheader"],
                           capture_output=True, text=True)
        m["nvidia_smi"] = q.stdout.strip()
    m["cpus"] = os.cpu_count()
    rec.metric(**m)
    rec.check("torch sees a CUDA device", lambda: _assert(torch.cuda.is_available(), "no CUDA"),
              skip=ctx.no_cuda)


def _assert(cond: bool, msg: str) -> str:
    assert cond, msg
    return ""


def stage_verify_install(ctx: Ctx, rec: Recorder) -> None:
    """Runs after pip: where rmt_fast was imported from, and whether its extension loaded."""
    import torch

    import rmt_fast
    from rmt_fast import _extension as ext

    rec.metric(rmt_fast_file=rmt_fast.__file__, version=rmt_fast.__version__,
               extension=ext.HAS_EXTENSION, extension_error=ext.EXTENSION_ERROR)
    rec.check("rmt_fast._C loaded", lambda: _assert(ext.HAS_EXTENSION, str(ext.EXTENSION_ERROR)))

    def cuda_kernels():
        missing = [op for op in ("assemble_segment", "assemble_segment_out", "assemble_mask",
                                 "extract_memory", "extract_memory_out")
                   if not torch._C._dispatch_has_kernel_for_dispatch_key(f"rmt_fast::{op}",
                                                                          "CUDA")]
        assert not missing, f"no CUDA kernel registered for {missing}"
        return "all 5 ops have CUDA kernels"

    rec.check("CUDA kernels registered", cuda_kernels, skip=ctx.no_cuda)
    rec.check("C++ errors reach Python", lambda: _exception_probe(rec))


# A TORCH_CHECK that fails inside an extension: RuntimeError, or (seen on the H200 image,
# 2026-12-04: torch 2.11.0+cu130, Ubuntu g++ 13.3) a segfault of the whole process, for any
# extension built there (a minimal load_inline one too), while torch's own errors were fine.
_THROW_OURS = ("import torch, rmt_fast._extension\n"
               "try:\n    torch.ops.rmt_fast.assemble_segment(torch.randn(2, 3, 4), "
               "torch.randn(2, 5, 8), torch.randn(2, 3, 4))\n"
               "except RuntimeError:\n    print('raised')\n")
_THROW_INLINE = ("import torch, sys\nfrom torch.utils.cpp_extension import load_inline\n"
                 "src = '#include <torch/extension.h>\\nat::Tensor boom(at::Tensor x) "
                 "{ TORCH_CHECK(x.dim() == 5, \"boom\"); return x; }\\n'\n"
                 "m = load_inline(name='boom_' + sys.argv[1], cpp_sources=src, functions=['boom'], "
                 "extra_ldflags=sys.argv[2:])\n"
                 "try:\n    m.boom(torch.ones(2))\nexcept RuntimeError:\n    print('raised')\n")


def _throws_cleanly(code: str, *args: str, timeout: float = 150) -> str:
    """Run ``code`` in a fresh process: "raised", or how it ended (exit code, signal)."""
    try:
        out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True,
                             timeout=timeout, cwd=tempfile.gettempdir())
    except subprocess.TimeoutExpired:
        return "timeout"
    if out.returncode == 0 and out.stdout.strip().endswith("raised"):
        return "raised"
    return f"exit code {out.returncode}: {(out.stderr or out.stdout).strip()[-200:]}"


def _link_facts() -> dict:
    """Which libraries the extension needs, and which torch libraries define the C++ runtime's
    throw/unwind entry points (a copy of libstdc++/libgcc inside torch is the usual suspect)."""
    import torch

    from rmt_fast import _extension as ext

    facts = {}
    so = getattr(getattr(ext, "_C", None), "__file__", None) or next(iter(glob.glob(
        os.path.join(os.path.dirname(ext.__file__), "_C*.so"))), None)
    try:
        dyn = subprocess.run(["readelf", "-d", so], capture_output=True, text=True).stdout
        facts["needed"] = [ln.split("[")[-1].rstrip("]") for ln in dyn.splitlines() if "NEEDED" in ln]
    except Exception as e:  # readelf missing
        facts["needed"] = f"{type(e).__name__}: {e}"
    defs = {}
    for lib in sorted(glob.glob(os.path.join(os.path.dirname(torch.__file__), "lib", "*.so*"))):
        try:
            nm = subprocess.run(["nm", "-D", "--defined-only", lib], capture_output=True,
                                text=True, timeout=60).stdout
        except Exception:
            continue
        hit = [sym for sym in ("__cxa_throw", "__gxx_personality_v0", "_Unwind_Resume", "_Znwm")
               if any(ln.endswith(" " + sym) for ln in nm.splitlines())]
        if hit:
            defs[os.path.basename(lib)] = hit
    facts["torch_libs_defining_runtime"] = defs
    return facts


def _exception_probe(rec: Recorder) -> str:
    ours = _throws_cleanly(_THROW_OURS, timeout=60)
    if ours == "raised":
        return "a failing TORCH_CHECK in rmt_fast._C raised RuntimeError"
    facts = _link_facts()
    # the same throw from minimal extensions built here: default link, libstdc++ linked first
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        runs = pool.map(lambda a: _throws_cleanly(_THROW_INLINE, *a),
                        [("default",), ("stdcxx", "-lstdc++")])
        variants = dict(zip(("default", "lstdcxx_first"), runs, strict=True))
    rec.metric(exception_probe=dict(ours=ours, inline=variants, **facts))
    raise AssertionError(f"a failing TORCH_CHECK in rmt_fast._C ended the process ({ours}); "
                         f"minimal load_inline extensions: {variants}; link facts in metrics")


def stage_ceilings(ctx: Ctx, rec: Recorder) -> None:
    import torch

    from rmt_fast.bench.ceilings import measure
    from rmt_fast.bench.roofline import device_peak

    size, copy_mib = (256, 16) if ctx.tiny else (8192, 2048)
    res = measure(("bfloat16", "float16", "float32"), ctx.device, size=size, copy_mib=copy_mib)
    peak = device_peak(torch.cuda.get_device_name()) if ctx.cuda else None
    unit, scale = ("TFLOP/s", 1e3) if ctx.cuda else ("GFLOP/s", 1.0)
    for name, r in res["matmul"].items():
        rec.row(measurement=f"{name} matmul {size}^3", value=f"{r['gflops'] / scale:.1f} {unit}",
                median=f"{r['median_gflops'] / scale:.1f} {unit}",
                datasheet=f"{peak.tflops(name):.0f} TFLOP/s" if peak else "-")
    rec.row(measurement=f"copy {copy_mib} MiB (read + write)", value=f"{res['copy']['gbps']:.0f} GB/s",
            median=f"{res['copy']['median_gbps']:.0f} GB/s",
            datasheet=f"{peak.hbm_gbps:.0f} GB/s" if peak else "-")
    rec.metric(**{f"{n}_tflops": r["gflops"] / 1e3 for n, r in res["matmul"].items()},
               copy_gbps=res["copy"]["gbps"], datasheet=peak.name if peak else None)


def stage_extension_ops(ctx: Ctx, rec: Recorder) -> None:
    import torch

    from rmt_fast import _extension as ext

    dev = ctx.device
    gen = torch.Generator(device="cpu").manual_seed(0)

    def rnd(*shape, dtype):
        return torch.randn(*shape, generator=gen).to(device=dev, dtype=dtype)

    for dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        def ops(dtype=dtype):
            for mr, s, mw in ((4, 7, 4), (0, 9, 3), (5, 1, 0), (16, 512, 16)):
                r, x, w = rnd(3, mr, 40, dtype=dtype), rnd(3, s, 40, dtype=dtype), rnd(3, mw, 40, dtype=dtype)
                got = ext.assemble_segment(r, x, w)
                assert torch.equal(got, torch.cat([r, x, w], 1)), f"assemble {mr},{s},{mw}"
                out = torch.full((3, mr + s + mw, 40), float("nan"), device=dev, dtype=dtype)
                ext.assemble_segment(r, x, w, out=out)
                assert torch.equal(out, torch.cat([r, x, w], 1)), "assemble out="
                xt = rnd(40, s, 3, dtype=dtype).permute(2, 1, 0)  # non-contiguous
                assert torch.equal(ext.assemble_segment(r, xt, w), torch.cat([r, xt, w], 1))
                h = rnd(3, mr + s + mw, 40, dtype=dtype)
                assert torch.equal(ext.extract_memory(h, mr + s, mw), h[:, mr + s:]), "extract"
                o = torch.full((3, mw, 40), float("nan"), device=dev, dtype=dtype)
                ext.extract_memory(h, mr + s, mw, out=o)
                assert torch.equal(o, h[:, mr + s:]), "extract out="
            return ""
        rec.check(f"assemble/extract {str(dtype)[6:]} == cat/slice", ops)

    def mask():
        for mdt in (torch.bool, torch.int64, torch.float32):
            m = (torch.rand(3, 11, generator=gen) > 0.3).to(device=dev, dtype=mdt)
            got = ext.assemble_mask(m, 4, 2)
            want = torch.cat([torch.ones(3, 4, dtype=mdt, device=dev), m,
                              torch.ones(3, 2, dtype=mdt, device=dev)], 1)
            assert torch.equal(got, want), f"assemble_mask {mdt}"
        return ""
    rec.check("assemble_mask", mask)

    def grads():
        r = rnd(2, 3, 5, dtype=torch.float64).requires_grad_()
        x = rnd(2, 4, 5, dtype=torch.float64).requires_grad_()
        w = rnd(2, 3, 5, dtype=torch.float64).requires_grad_()
        assert torch.autograd.gradcheck(ext.assemble_segment, (r, x, w))
        h = rnd(2, 10, 5, dtype=torch.float64).requires_grad_()
        assert torch.autograd.gradcheck(lambda t: ext.extract_memory(t, 7, 3), (h,))
        return ""
    rec.check("gradcheck (float64)", grads)

    def opcheck():
        if not ext.HAS_EXTENSION:
            raise RuntimeError(f"extension not loaded: {ext.EXTENSION_ERROR}")
        r, x, w = (rnd(2, n, 8, dtype=torch.float32).requires_grad_() for n in (3, 5, 3))
        torch.library.opcheck(torch.ops.rmt_fast.assemble_segment.default, (r, x, w))
        h = rnd(2, 11, 8, dtype=torch.float32).requires_grad_()
        torch.library.opcheck(torch.ops.rmt_fast.extract_memory.default, (h, 8, 3))
        m = torch.ones(2, 5, dtype=torch.bool, device=dev)
        torch.library.opcheck(torch.ops.rmt_fast.assemble_mask.default, (m, 3, 3))
        return ""
    rec.check("torch.library.opcheck", opcheck)

    def bandwidth():
        b, s, m, d = (2, 32, 4, 64) if ctx.tiny else (8, 512, 16, 768)
        r, x = rnd(b, m, d, dtype=torch.bfloat16), rnd(b, s, d, dtype=torch.bfloat16)
        out = torch.empty(b, 2 * m + s, d, device=dev, dtype=torch.bfloat16)
        res = {}
        for name, fn in (("extension", lambda: ext.assemble_segment(r, x, r, out=out)),
                         ("torch.cat", lambda: torch.cat([r, x, r], 1, out=out))):
            fn()
            _sync(ctx)
            t = time.perf_counter()
            for _ in range(100):
                fn()
            _sync(ctx)
            res[name] = (time.perf_counter() - t) / 100
        moved = 2 * out.numel() * 2
        return ", ".join(f"{k} {v * 1e6:.1f} us ({moved / v / 1e9:.0f} GB/s)" for k, v in res.items())
    rec.check("assemble_segment vs torch.cat, GPT-2-small segment, bf16", bandwidth)


def stage_memory_store(ctx: Ctx, rec: Recorder) -> None:
    import torch
    import torch.nn.functional as F

    from rmt_fast._extension import MemoryStore
    from rmt_fast.checkpoint import segment_bptt

    dev = ctx.device
    rec.check("native C++ store", lambda: _assert(MemoryStore(offload=True).native,
                                                  "fell back to the Python dict store"))

    def offload_streams():
        n, shape = (64, (4, 16, 768)) if not ctx.tiny else (8, (2, 4, 16))
        store = MemoryStore(offload=True)
        side = torch.cuda.Stream()
        states = []
        with torch.cuda.stream(side):  # produced and stored on a non-default stream
            for i in range(n):
                s = torch.randn(*shape, device=dev, dtype=torch.bfloat16)
                states.append(s.clone())
                store.put(i, s)
                s.add_(1.0)  # same stream, after put: the stored copy must not see it
        torch.cuda.current_stream().wait_stream(side)  # states[] are read on this stream
        assert store.size() == n and store.segments() == list(range(n))
        assert store.nbytes() >= n * states[0].nbytes
        work = torch.randn(2048, 2048, device=dev)
        store.prefetch(0)
        for i in range(n):  # prefetch the next while computing on the current stream
            if i + 1 < n:
                store.prefetch(i + 1)
            work = work @ work.T / 2048
            got = store.pop(i)
            assert got.device.type == "cuda", f"segment {i} came back on {got.device}"
            assert torch.equal(got, states[i]), f"segment {i} differs after offload/prefetch"
        assert store.size() == 0
        torch.cuda.synchronize()
        return f"{n} states of {list(shape)} bf16 through pinned host memory"
    rec.check("offload + prefetch on a side stream", offload_streams, skip=ctx.no_cuda)

    def roundtrip():  # get without a prefetch: the copy back runs on the current stream
        store = MemoryStore(offload=True)
        s = torch.randn(2, 4, 8, device=dev)
        store.put(3, s)
        want = s.clone()
        s.zero_()
        assert torch.equal(store.get(3), want)
        return ""
    rec.check("put/get without prefetch", roundtrip)

    def missing():
        store = MemoryStore(offload=True)
        store.put(3, torch.randn(2, 4, 8, device=dev))
        try:
            store.get(4)
        except RuntimeError as e:
            assert "segment 4" in str(e), str(e)
        else:
            raise AssertionError("get of a missing segment did not raise")
        return ""
    rec.check("get of a missing segment raises", missing)

    def bptt_offload():
        model, cfg = _gpt2_rmt(Ctx(ctx.device, True, ctx.budget_s, {}), checkpoint=False)
        model.float()
        ids = torch.randint(1, cfg["vocab"], (2, 4 * cfg["segment"]),
                            generator=torch.Generator().manual_seed(1)).to(dev)
        segs = list(ids.split(cfg["segment"], dim=1))

        def step(mem, seg, _t):
            hidden, new_mem, _ = model.segment_forward(mem, seg, None)
            logits = model.logits(hidden)[:, :-1].float()
            return F.cross_entropy(logits.flatten(0, 1), seg[:, 1:].flatten()), new_mem, None

        grads = {}
        for name, kw in (("plain", dict(checkpoint=False)), ("checkpoint", dict(checkpoint=True)),
                         ("checkpoint+offload", dict(checkpoint=True, offload=ctx.cuda))):
            model.zero_grad(set_to_none=True)
            res = segment_bptt(step, model.expand_memory(2), segs, **kw)
            res.loss.backward()
            grads[name] = torch.cat([p.grad.flatten() for p in model.parameters()
                                     if p.grad is not None])
        ref = grads["plain"]
        errs = {k: ((g - ref).norm() / ref.norm()).item() for k, g in grads.items() if k != "plain"}
        assert all(e < 1e-5 for e in errs.values()), f"relative gradient errors {errs}"
        return ", ".join(f"{k}: {e:.1e}" for k, e in errs.items())
    rec.check("segment_bptt: checkpoint(+offload) grads == plain BPTT", bptt_offload)


# --- Triton correctness


TOL_FLOOR = {"float32": 1e-6, "float16": 1e-4, "bfloat16": 1e-3}


def correctness_cases(tiny: bool) -> list[dict]:
    """Layouts: every mask with GQA + past keys; plain causal D=128; key padding with past
    visible to read memory; decode (few rows, long past); sliding windows; logit soft-capping
    (Gemma 2's cap 50, where the float32 tanh's accuracy shows, and a cap of 1 that bends most
    N(0, 1) scores). Forward + backward unless decode."""
    masks = ("causal", "rmt", "full", "bottleneck")
    if tiny:
        return [dict(name=f"{m} gqa past", mask=m, B=1, Hq=2, Hkv=1, L=24, P=8, D=16, R=4, W=4)
                for m in ("causal", "rmt")] + [
            dict(name="causal window 5 past", mask="causal", B=1, Hq=2, Hkv=1, L=24, P=8, D=16,
                 R=0, W=0, window=5),
            dict(name="rmt softcap 1 window 7 past kpm", mask="rmt", B=1, Hq=2, Hkv=1, L=24, P=8,
                 D=16, R=4, W=4, kpm=True, window=7, softcap=1.0)]
    cases = [dict(name=f"{m} gqa4:1 past", mask=m, B=2, Hq=8, Hkv=2, L=300, P=64, D=64, R=16, W=16)
             for m in masks]
    cases += [dict(name="causal D128", mask="causal", B=2, Hq=4, Hkv=4, L=1024, P=0, D=128, R=0, W=0),
              dict(name="rmt kpm past_to_read D128", mask="rmt", B=2, Hq=4, Hkv=2, L=257, P=96,
                   D=128, R=16, W=16, kpm=True, pvr=True),
              dict(name="bottleneck gqa past D128", mask="bottleneck", B=1, Hq=4, Hkv=1, L=544,
                   P=128, D=128, R=16, W=16),
              dict(name="decode L=4 P=1024", mask="rmt", B=2, Hq=8, Hkv=2, L=4, P=1024, D=64, R=0,
                   W=0, grad=False),
              dict(name="decode L=1 P=4096 D128", mask="causal", B=1, Hq=4, Hkv=4, L=1, P=4096,
                   D=128, R=0, W=0, grad=False),
              # sliding windows (Mistral, gpt-oss): tiles skipped and cut, past keys, padding
              dict(name="causal window 128 gqa past kpm", mask="causal", B=2, Hq=8, Hkv=2, L=1024,
                   P=200, D=64, R=0, W=0, kpm=True, window=128),
              dict(name="rmt window 100 past", mask="rmt", B=1, Hq=4, Hkv=2, L=300, P=64, D=128,
                   R=16, W=16, window=100),
              dict(name="decode window 512 P=4096", mask="causal", B=2, Hq=8, Hkv=2, L=1, P=4096,
                   D=64, R=0, W=0, grad=False, window=512),
              # logit soft-capping: Gemma 2 (cap 50, local layers' window 4096, GQA 2:1), a cap
              # that bites with past keys and padding, and decode
              dict(name="causal softcap 50 window 4096 gqa past", mask="causal", B=1, Hq=8, Hkv=4,
                   L=1024, P=3584, D=128, R=0, W=0, window=4096, softcap=50.0),
              dict(name="bottleneck softcap 1 gqa past kpm", mask="bottleneck", B=2, Hq=8, Hkv=2,
                   L=300, P=64, D=64, R=16, W=16, kpm=True, softcap=1.0),
              dict(name="decode softcap 1 P=2048", mask="rmt", B=2, Hq=8, Hkv=2, L=4, P=2048, D=64,
                   R=0, W=0, grad=False, softcap=1.0)]
    return cases


def check_case(case: dict, dtype_name: str, device: str, backend: str = "triton") -> dict:
    """Kernel vs the float64 reference: ``|err| <= mult * |same-dtype torch ref err| + floor``
    (mult 2 for out/lse, 3 for gradients; FlashAttention's convention, as in tests/)."""
    import torch

    from rmt_fast import memory_attention
    from rmt_fast.ops.memory_attention.reference import reference_memory_attention

    dtype = getattr(torch, dtype_name)
    gen = torch.Generator().manual_seed(zlib.crc32(f"{case['name']} {dtype_name}".encode()))
    grad = case.get("grad", True)

    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype
                                                                         ).requires_grad_(grad)

    B, Hq, Hkv, L, P, D = (case[k] for k in ("B", "Hq", "Hkv", "L", "P", "D"))
    q, k, v = rnd(B, Hq, L, D), rnd(B, Hkv, L, D), rnd(B, Hkv, L, D)
    pk, pv = (rnd(B, Hkv, P, D), rnd(B, Hkv, P, D)) if P else (None, None)
    kpm = None
    if case.get("kpm"):
        kpm = torch.rand(B, P + L, generator=gen) > 0.2
        kpm[:, P + L - case["W"]:] = True  # the write rows stay real
        kpm = kpm.to(device)
    kw = dict(num_read=case["R"], num_write=case["W"], mask=case["mask"], past_k=pk, past_v=pv,
              key_padding_mask=kpm, past_visible_to_read=case.get("pvr", False),
              window=case.get("window"), softcap=case.get("softcap"))
    out, lse = memory_attention(q, k, v, backend=backend, return_lse=True, **kw)
    ref_out, ref_lse = reference_memory_attention(q, k, v, upcast=True, **kw)
    low_out, low_lse = reference_memory_attention(q, k, v, upcast=False, **kw)
    floor = TOL_FLOOR[dtype_name]
    row = {"dtype": dtype_name, "case": case["name"], "L": L, "P": P, "D": D}
    worst = 0.0

    def compare(name, got, ref, low, mult):
        nonlocal worst
        assert not torch.isnan(got).any(), f"{name}: NaN (unwritten output?)"
        err = (got.double() - ref.double()).abs().max().item()
        base = (low.double() - ref.double()).abs().max().item()
        rel = ((got.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()
        worst = max(worst, err / (mult * base + floor))
        row[f"{name}_err"] = err
        row[f"{name}_rel"] = rel
        return err <= mult * base + floor

    ok = compare("out", out, ref_out, low_out, 2)
    fin = ~torch.isinf(ref_lse)
    ok &= bool(torch.equal(torch.isinf(lse), ~fin))
    ok &= compare("lse", lse[fin], ref_lse[fin], low_lse[fin], 2)
    if grad:
        inputs = [t for t in (q, k, v, pk, pv) if t is not None]
        dout = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(device)
        dlse = torch.randn(lse.shape, generator=gen, dtype=torch.float64).to(device)

        def loss(o, lo):  # out and lse both used: the lse's gradient reaches the inputs too
            return (o.double() * dout).sum() + (lo.double().masked_fill(~fin, 0) * dlse).sum()

        got = torch.autograd.grad(loss(out, lse), inputs)
        ref = torch.autograd.grad(loss(ref_out, ref_lse), inputs)
        low = torch.autograd.grad(loss(low_out, low_lse), inputs)
        names = ["dq", "dk", "dv", "dpast_k", "dpast_v"]
        for n, g, r, lo in zip(names, got, ref, low, strict=False):
            ok &= compare(n, g, r, lo, 3)
    row["worst_err/bound"] = worst
    row["status"] = "ok" if ok else "FAIL"
    return row


def worker_count(groups: int = 1, cap: int = 4) -> int:
    """Worker processes per group for a compile-bound fan-out: the cores this process may use,
    one kept for the parent, shared among ``groups``, at most ``cap`` each, at least 1."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, min(cap, ((cpus or 1) - 1) // max(1, groups)))


def shard(items: list, index: int, count: int) -> list:
    """Worker ``index`` of ``count``'s share of ``items`` (every ``count``-th, from ``index``)."""
    return items[index::count]


def fan_out(ctx: Ctx, rec: Recorder, worker: str, argsets: list[list[str]], wait_s: float,
            env: dict | None = None) -> list[tuple[list[str], dict, int | None]]:
    """Run ``--stage worker`` once per entry of ``argsets`` (its extra arguments), all at once,
    on the same device; wait at most ``wait_s`` for them, then kill the rest. Triton and
    Inductor compile on the CPU and cache what they compile on disk, so processes in parallel
    overlap the compiles that one process would do one after another.

    Returns, per worker: its arguments, its result dict (:func:`read_result`: a status and no
    rows if it wrote none) and its exit code (None if it was killed)."""
    env = dict(os.environ if env is None else env)
    if not ctx.cuda:
        env["TRITON_INTERPRET"] = "1"
    procs = []
    for i, extra in enumerate(argsets):
        path = f"{rec.path}.{worker}.{i}.json"
        cmd = [sys.executable, SCRIPT, "--stage", worker, "--result", path, "--budget",
               str(max(1.0, wait_s - 5))] + extra + (["--dry-run"] if ctx.tiny else [])
        procs.append((extra, path, subprocess.Popen(cmd, env=env)))
    deadline = time.monotonic() + wait_s
    out = []
    for extra, path, p in procs:
        try:
            code = p.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
            code = None
        out.append((extra, read_result(path), code))
    return out


def stage_triton_worker(ctx: Ctx, rec: Recorder, dtype_name: str, index: int = 0,
                        count: int = 1) -> None:
    """Its share (``shard(cases, index, count)``) of the correctness cases in one dtype."""
    os.environ.setdefault("RMT_FAST_POISON", "1")  # outputs start as NaN: unwritten shows up
    deadline = time.monotonic() + ctx.budget_s - 5
    for case in shard(correctness_cases(ctx.tiny), index, count):
        if time.monotonic() > deadline:
            rec.row(dtype=dtype_name, case=case["name"], status="skipped: stage budget")
            continue
        try:
            rec.row(**check_case(case, dtype_name, ctx.device))
        except Exception as e:
            traceback.print_exc()
            rec.row(dtype=dtype_name, case=case["name"], status=f"error: {type(e).__name__}: {e}"[:300])
        print(rec.data["rows"][-1], flush=True)


def stage_triton_correctness(ctx: Ctx, rec: Recorder) -> None:
    """Per dtype, ``worker_count(3)`` worker processes, each with its share of the cases, all
    in parallel (their Triton compiles overlap); the rows in case order."""
    dtypes = ["float32"] if ctx.tiny else ["bfloat16", "float16", "float32"]
    count = worker_count(len(dtypes))
    argsets = [["--dtype", name, "--shard", f"{i}/{count}"] for name in dtypes
               for i in range(count)]
    done = fan_out(ctx, rec, "triton_worker", argsets, ctx.budget_s - 5,
                   dict(os.environ, RMT_FAST_POISON="1"))
    order = {c["name"]: i for i, c in enumerate(correctness_cases(ctx.tiny))}
    rows = []
    for extra, part, code in done:
        rows += part.get("rows", [])
        if code != 0 or "rows" not in part:
            rows.append({"dtype": extra[1], "case": f"(worker {extra[3]})",
                         "status": "error: worker killed at the stage budget" if code is None
                         else f"error: worker exit {code}" if code != 0
                         else part.get("status", "error: no rows written")})
    rows.sort(key=lambda r: (dtypes.index(r["dtype"]), order.get(r["case"], len(order))))
    rec.data["rows"].extend(rows)
    rec.metric(workers_per_dtype=count)
    rec.data["columns"] = ["dtype", "case", "L", "P", "D", "out_err", "out_rel", "dq_err",
                           "dk_err", "dv_err", "dpast_k_err", "worst_err/bound", "status"]


# --- model-level stages


def stage_train_step(ctx: Ctx, rec: Recorder) -> None:
    import torch

    from rmt_fast.dtypes import autocast, dtype_name, resolve_dtype

    dev = ctx.device
    dtype = resolve_dtype("auto", dev)
    batch, segments = (2, 3) if ctx.tiny else (4, 8)
    results = {}
    for name, ckpt in (("checkpoint_segments", True), ("plain BPTT", False)):
        def run(name=name, ckpt=ckpt):
            model, cfg = _gpt2_rmt(ctx, checkpoint=ckpt)
            n = segments * cfg["segment"]
            ids = torch.randint(1, cfg["vocab"], (batch, n),
                                generator=torch.Generator().manual_seed(2)).to(dev)
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4)

            def step():
                opt.zero_grad(set_to_none=True)
                with autocast(dtype, dev):
                    loss = model(ids, labels=ids).loss
                loss.backward()
                return loss

            if ctx.cuda:
                torch.cuda.reset_peak_memory_stats()
            with autocast(dtype, dev):  # first: loss + gradients from the initial weights
                loss0 = model(ids, labels=ids).loss
            loss0.backward()
            g0 = torch.cat([p.grad.float().flatten() for p in model.parameters() if p.grad is not None])
            results[name] = (loss0.item(), g0)
            opt.step()
            _sync(ctx)
            times = []
            for _ in range(1 if ctx.tiny else 3):
                t = time.perf_counter()
                loss = step()
                opt.step()
                _sync(ctx)
                times.append(time.perf_counter() - t)
            assert torch.isfinite(loss), f"loss {loss.item()}"
            peak = torch.cuda.max_memory_allocated() / 2**20 if ctx.cuda else None
            tps = batch * n / min(times)
            rec.row(variant=name, dtype=dtype_name(dtype), tokens=batch * n,
                    step_s=min(times), tokens_per_s=tps, peak_alloc_mib=peak,
                    loss=loss.item(), status="ok")
            return f"{tps:,.0f} tokens/s" + (f", allocator peak {peak:,.0f} MiB" if peak else "")
        rec.check(f"train step, {name}, {dtype_name(dtype)} autocast", run)
        if ctx.cuda:  # the model of run() is gone: give its memory back before the next
            torch.cuda.empty_cache()

    def same():
        (l1, g1), (l2, g2) = results["checkpoint_segments"], results["plain BPTT"]
        rel = abs(l1 - l2) / abs(l2)
        cos = torch.nn.functional.cosine_similarity(g1, g2, dim=0).item()
        tol = 1e-2 if dtype != torch.float32 else 1e-5
        assert rel < tol and cos > 0.99, f"loss rel diff {rel:.2e}, grad cosine {cos:.5f}"
        return f"loss rel diff {rel:.1e}, gradient cosine {cos:.6f}"
    rec.check("checkpointed step == plain step (loss, gradients)", same)


def stage_streaming(ctx: Ctx, rec: Recorder) -> None:
    import torch

    import rmt_fast
    from rmt_fast.dtypes import dtype_name, resolve_dtype

    dev = ctx.device
    total = 4_096 if ctx.tiny else 1_000_000
    chunk = 1_024 if ctx.tiny else 65_536
    deadline = time.monotonic() + ctx.budget_s - 10

    def read():
        model, cfg = _gpt2_rmt(ctx, checkpoint=False)
        dtype = resolve_dtype("auto", dev)
        model = model.to(dtype).eval()
        warm = rmt_fast.StreamingReader(model, progress=False)
        warm.feed(torch.randint(1, cfg["vocab"], (2 * cfg["segment"],)))  # compiles kernels
        warm.flush()
        _sync(ctx)
        del warm
        if ctx.cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated() / 2**20
        reader = rmt_fast.StreamingReader(model, progress=False)
        gen = torch.Generator().manual_seed(3)
        t, fed = time.perf_counter(), 0
        while fed < total and time.monotonic() < deadline:
            n = min(chunk, total - fed)
            reader.feed(torch.randint(1, cfg["vocab"], (n,), generator=gen))
            fed += n
        reader.flush()
        _sync(ctx)
        seconds = time.perf_counter() - t
        peak = torch.cuda.max_memory_allocated() / 2**20 if ctx.cuda else None
        read_tokens = reader.tokens_read
        assert torch.isfinite(reader.memory.float()).all(), "memory went non-finite"
        answer = reader.generate(torch.randint(1, cfg["vocab"], (1, 8), generator=gen).to(dev),
                                 max_new_tokens=4, do_sample=False)
        assert answer.shape[-1] == 4, f"generate returned {tuple(answer.shape)}"
        rec.metric(tokens_read=read_tokens, seconds=seconds, tokens_per_s=read_tokens / seconds,
                   dtype=dtype_name(dtype), peak_alloc_mib=peak,
                   model_alloc_mib=base if ctx.cuda else None,
                   memory_norm=reader.memory.float().norm().item())
        assert read_tokens == total, f"read {read_tokens:,} of {total:,} tokens within the budget"
        return (f"{read_tokens:,} tokens in {seconds:.1f} s ({read_tokens / seconds:,.0f} tokens/s)"
                + (f", allocator peak {peak:,.0f} MiB ({base:,.0f} MiB model)" if peak else ""))
    rec.check(f"StreamingReader over {total:,} tokens", read)


def stage_armt(ctx: Ctx, rec: Recorder) -> None:
    """ARMT on the device: the associative read/write kernels against the float64 reference
    (forward and backward), then a GPT-2-small ARMT read in the sequential order against the
    diagonal executor (same logits; time of each)."""
    import torch

    from rmt_fast.ops.associative_memory import associative_read, associative_write, features

    dev = ctx.device
    backend = "triton" if ctx.cuda else "torch"  # a dry run has no Triton interpreter set up
    b, length, m, dm, d = (2, 528, 16, 64, 768) if not ctx.tiny else (2, 40, 4, 8, 32)
    k = 6 * dm  # nu = 3

    def split_floor(x, z):
        """A normaliser floor that about half the rows of ``x`` take, in the middle of the
        widest gap between their ratios ``phi . z / |phi|^2`` (no row near a tie)."""
        q = features(x, 3, False)
        r = ((q * z[:, None]).sum(-1) / q.square().sum(-1)).flatten().sort().values
        lo, hi = len(r) // 4, 3 * len(r) // 4
        i = lo + int((r[lo + 1:hi] - r[lo:hi - 1]).argmax())
        return float((r[i] + r[i + 1]) / 2)

    def op_case(dtype_name: str, floored: bool = False, rule: str = "armt"):
        dtype = getattr(torch, dtype_name)
        gen = torch.Generator().manual_seed(zlib.crc32(dtype_name.encode()))

        def rnd(*shape, scale=1.0):
            return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale).to(dev)

        base = dict(x=rnd(b, length, dm), A=rnd(b, k, d, scale=0.1), z=rnd(b, k).abs() + 1.0,
                    km=rnd(b, m, dm), v=rnd(b, m, d), beta=torch.sigmoid(rnd(b, m)))
        grad_out = rnd(b, length, d)
        floor = split_floor(base["x"], base["z"]) if floored else 0.0
        kw = dict(floor=floor) if rule == "armt" else dict(rule=rule, normalize=True)

        def run(which: str, dt):
            t = {n: x.to(dt).requires_grad_(n != "beta") for n, x in base.items()}
            out = associative_read(t["x"], t["A"], t["z"], backend=which, **kw)
            A2, z2 = associative_write(t["km"], t["v"], t["beta"], t["A"], t["z"], first=False,
                                       backend=which, **kw)
            loss = (out * grad_out.to(dt)).sum() + A2.float().square().sum() + z2.float().sum()
            grads = torch.autograd.grad(loss, [t[n] for n in ("x", "A", "z", "km", "v")])
            return [out, A2, z2, *grads]

        ref = run("reference", torch.float64)
        same = run("reference", dtype)  # the same math in the same dtype: the error floor
        got = run(backend, dtype)
        names = ["read", "A'", "z'", "dx", "dA", "dz", "dkm", "dv"]
        worst = 0.0
        for name, r, s_, g in zip(names, ref, same, got, strict=True):
            err = (g.double() - r).abs().max().item()
            bound = 3 * (s_.double() - r).abs().max().item() + TOL_FLOOR[dtype_name] * (
                1 + r.abs().max().item())
            worst = max(worst, err / bound)
            assert err <= bound, f"{dtype_name} {name}: error {err:.3g} > bound {bound:.3g}"
        return f"{backend} vs float64: worst error / bound {worst:.2f} (8 outputs and gradients)"

    for name in ("float32", "bfloat16"):
        rec.check(f"associative read + write, {name}", lambda n=name: op_case(n))
    # float32 only: in bf16 the rounding of x moves rows across the floor, where the
    # gradient jumps
    rec.check("associative read + write, float32, normaliser floor on about half the rows",
              lambda: op_case("float32", floored=True))
    for name in ("float32", "bfloat16"):  # the UT form: one read, a solve, one update
        rec.check(f"delta rule read + write, {name}", lambda n=name: op_case(n, rule="delta"))

    def diagonal():
        from transformers import GPT2Config, GPT2LMHeadModel

        from rmt_fast.models.armt import ARMTForCausalLM

        layers, dmod, heads, vocab, seg, mem, segs = (12, 768, 12, 50257, 512, 16, 16) \
            if not ctx.tiny else (2, 64, 2, 100, 16, 4, 4)
        torch.manual_seed(0)
        base = GPT2LMHeadModel(GPT2Config(n_layer=layers, n_embd=dmod, n_head=heads,
                                          vocab_size=vocab, n_positions=seg + mem,
                                          bos_token_id=0, eos_token_id=0))
        dtype = torch.bfloat16 if ctx.cuda else torch.float32
        model = ARMTForCausalLM(base, num_mem_tokens=mem, d_mem=64 if not ctx.tiny else 8,
                                segment_size=seg).to(dev, dtype).eval()
        with torch.no_grad():
            for a in model.assoc:
                a.W_mv.weight.normal_(0, 0.02)  # a non-zero write: the state matters
        ids = torch.randint(1, vocab, (1, seg * segs), generator=torch.Generator().manual_seed(5))
        ids = ids.to(dev)
        ex = model.diagonal(grouped=True)
        with torch.no_grad():
            seq = model(ids).logits.float()
            dia = ex(ids).logits.float()
            rel = ((dia - seq).norm() / seq.norm()).item()
            times = {}
            for _ in range(3):
                for name, fn in (("sequential", lambda: model(ids, return_logits=True)),
                                 ("diagonal", lambda: ex(ids))):
                    _sync(ctx)
                    t = time.perf_counter()
                    fn()
                    _sync(ctx)
                    times.setdefault(name, []).append(time.perf_counter() - t)
        tps = {n: ids.numel() / sorted(v)[1] for n, v in times.items()}
        rec.metric(armt_tokens=ids.numel(), armt_dtype=str(dtype).split(".")[-1],
                   armt_logits_rel_diff=rel, armt_sequential_tokens_per_s=tps["sequential"],
                   armt_diagonal_tokens_per_s=tps["diagonal"])
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-5
        assert rel <= tol, f"diagonal vs sequential logits: relative difference {rel:.3g} > {tol}"
        return (f"{layers} layers x {segs} segments, {ids.numel():,} tokens, "
                f"{str(dtype).split('.')[-1]}: logits rel diff {rel:.1e}; sequential "
                f"{tps['sequential']:,.0f} tokens/s, diagonal {tps['diagonal']:,.0f} "
                f"({tps['diagonal'] / tps['sequential']:.2f}x)")

    rec.check("ARMT GPT-2-small read: diagonal executor vs sequential", diagonal)


#: candidate Triton tile configs (block_m, block_n, num_warps, num_stages) timed by the
#: ``tuning`` stage; the first of each list is what ``launch.GPU_CONFIGS`` ships today
TUNING_CANDIDATES = {
    "fwd": [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4)],
    "bwd_dkdv": [(16, 64, 4, 1), (32, 64, 4, 2), (64, 64, 4, 2), (64, 64, 8, 2), (32, 128, 8, 2),
                 (64, 128, 8, 2), (128, 64, 8, 2)],
    "bwd_dq": [(64, 32, 4, 2), (64, 64, 4, 2), (128, 64, 8, 2), (128, 32, 8, 2), (64, 128, 8, 2)],
}
#: the same for kernels compiled with a logit soft-cap (Gemma 2's 50), after the plain ones:
#: only dK/dV, the one bf16 kernel whose soft-capped config differs (the shipped config, from
#: ``launch.gpu_config``, is timed first whatever this list says)
TUNING_SOFTCAP_CANDIDATES = {
    "bwd_dkdv": [(16, 32, 4, 1), (16, 64, 4, 1), (32, 32, 4, 2), (32, 64, 4, 2), (32, 64, 8, 2)],
}
TUNING_VARIANTS = (("plain", None, TUNING_CANDIDATES),
                   ("softcap", 50.0, TUNING_SOFTCAP_CANDIDATES))


#: the order the tuning stage takes its kernels in, so that a short budget times what matters
#: most: the backward kernels ran at 22-25% of the ceiling in the first GPU run, the forward at
#: 44-52%
TUNING_ORDER = ("bwd_dkdv", "bwd_dq", "fwd")


def tuning_sizes(cuda: bool) -> tuple[int, tuple[int, ...], int, int]:
    """(length, head dims, batch, heads x head dim) of the tuning stage's cases."""
    return (8192, (64, 128), 2, 2048) if cuda else (32, (64,), 1, 64)


def tuning_plan(cuda: bool) -> list[tuple[str, float | None, str, int, list[tuple]]]:
    """``(variant, softcap, kernel, head_dim, candidates)`` in the order timed: per variant of
    :data:`TUNING_VARIANTS`, the kernels in :data:`TUNING_ORDER`, each head dim; the
    candidates start with the shipped config (``launch.gpu_config``); two of them off CUDA."""
    from rmt_fast.ops.memory_attention.triton import launch

    plan = []
    for variant, softcap, candidates in TUNING_VARIANTS:
        for kernel in sorted(candidates, key=TUNING_ORDER.index):
            for hd in tuning_sizes(cuda)[1]:
                first = dataclasses.astuple(launch.gpu_config(kernel, hd, "bf16",
                                                              softcap=softcap is not None))
                cands = [first] + [c for c in candidates[kernel] if tuple(c) != first]
                plan.append((variant, softcap, kernel, hd, cands if cuda else cands[:2]))
    return plan


@contextlib.contextmanager
def tile_config(kernel: str, head_dim: int, softcap: bool, config: tuple):
    """``launch.GPU_CONFIGS`` gives ``config`` to this bf16 kernel inside the block (under its
    most specific key, the one read first); restored after."""
    from rmt_fast.ops.memory_attention.triton import launch

    key = launch.config_keys(kernel, head_dim, "bf16", softcap=softcap)[0]
    had, shipped = key in launch.GPU_CONFIGS, launch.GPU_CONFIGS.get(key)
    launch.GPU_CONFIGS[key] = launch.Config(*config)
    try:
        yield
    finally:
        if had:
            launch.GPU_CONFIGS[key] = shipped
        else:
            launch.GPU_CONFIGS.pop(key, None)


def tuning_case(kernel: str, head_dim: int, softcap: float | None, cuda: bool):
    """The case a kernel's candidates are timed on: causal, fwd for the forward kernel, fwd+bwd
    for the backward ones."""
    from rmt_fast.bench import kernels as kb

    length, _, batch, width = tuning_sizes(cuda)
    return kb.Case("causal", length, head_dim, "fwd" if kernel == "fwd" else "fwd+bwd",
                   batch=batch, heads=width // head_dim, softcap=softcap)


def tuning_run(case, device: str) -> tuple[float, list]:
    """Seconds of one ``case`` with the Triton backend in bf16, and its output (fwd) or the
    gradients of q, k, v (fwd+bwd), to compare candidates with."""
    import torch

    from rmt_fast import memory_attention
    from rmt_fast.bench import kernels as kb

    dev, dtype = torch.device(device), torch.bfloat16
    q, k, v, _, _ = kb._inputs(case, dev, dtype, case.mode == "fwd+bwd")
    leaves = [q, k, v]

    def fn():  # kb.build refuses Triton off CUDA; the interpreter runs it here
        return memory_attention(q, k, v, mask=case.mask, softcap=case.softcap, backend="triton")
    if case.mode == "fwd":
        with torch.no_grad():
            out = fn()
        timed = lambda: fn()  # noqa: E731
        timed_ctx = torch.no_grad
        results = [out.float()]
    else:
        dout = torch.randn(fn().shape, generator=torch.Generator().manual_seed(1)).to(dev, dtype)

        def timed():
            for t in leaves:
                t.grad = None
            fn().backward(dout)

        timed_ctx = torch.enable_grad
        with timed_ctx():
            timed()
        results = [t.grad.float() for t in leaves]
    with timed_ctx():
        seconds = kb.time_fn(timed, dev, 3, 1)
    return seconds, results


def stage_tuning(ctx: Ctx, rec: Recorder) -> None:
    """Last in the default run, with the time left (or alone: ``--stages tuning``): times the
    Triton kernels' candidate tile configs (:func:`tuning_plan`: one kernel varied at a time,
    the others as shipped) at L 8,192, bf16, causal, D 64 and 128, fwd (fwd kernel) or fwd+bwd
    (backward kernels), with each candidate's output and gradients checked against the shipped
    config's. Every candidate is first run once in parallel worker processes
    (:func:`warm`), so that the timing loop finds its kernels compiled."""
    import torch

    from rmt_fast.bench import kernels as kb
    from rmt_fast.bench.roofline import device_peak, roofline

    if not ctx.cuda and os.environ.get("TRITON_INTERPRET") != "1":
        rec.check("tile configs timed", skip="needs CUDA (or TRITON_INTERPRET=1: plumbing only, "
                                             "the interpreter ignores tile configs)")
        return
    peak = device_peak(torch.cuda.get_device_name()) if ctx.cuda else None
    deadline = time.monotonic() + ctx.budget_s - 10
    warm(ctx, rec, "tuning", 0.4 * ctx.budget_s)
    rec.data["columns"] = ["variant", "kernel", "head_dim", "config", "mode", "ms", "TFLOP/s",
                           "max_rel_diff", "status"]
    best = {}
    for variant, softcap, kernel, hd, cands in tuning_plan(ctx.cuda):
        case = tuning_case(kernel, hd, softcap, ctx.cuda)
        ref = None
        for cand in cands:
            where = dict(variant=variant, kernel=kernel, head_dim=hd, config=str(cand),
                         mode=case.mode)
            if time.monotonic() > deadline:
                rec.row(**where, status="skipped: stage budget")
                continue
            try:
                with tile_config(kernel, hd, softcap is not None, cand):
                    seconds, results = tuning_run(case, ctx.device)
            except Exception as e:  # e.g. out of shared memory: the row says so
                rec.row(**where, status=kb.error_status(e))
                continue
            if ref is None:
                ref = results
            rel = max(((r - g).abs().max() / g.abs().max().clamp_min(1e-30)).item()
                      for r, g in zip(results, ref, strict=True))
            tflops = roofline(case.shape(torch.bfloat16), seconds, case.mode, peak)["tflops"]
            status = "ok" if rel < 2e-2 else "FAIL: differs from the shipped config"
            rec.row(**where, ms=seconds * 1e3, **{"TFLOP/s": tflops}, max_rel_diff=rel,
                    status=status)
            bkey = (variant, kernel, hd)
            if status == "ok" and (bkey not in best or seconds < best[bkey][1]):
                best[bkey] = (cand, seconds)
        if ctx.cuda:
            torch.cuda.empty_cache()
    rec.metric(best={f"{v}_{k}_{d}": list(c) for (v, k, d), (c, _) in best.items()})

    def summary():
        rows = rec.data["rows"]
        wrong = [(r["variant"], r["kernel"], r["head_dim"], r["config"])
                 for r in rows if str(r["status"]).startswith("FAIL")]
        assert not wrong, f"configs whose output or gradients differ from the shipped one: {wrong}"
        want = {(v, k, d) for v, _, k, d, _ in tuning_plan(ctx.cuda)}
        cut = {(r["variant"], r["kernel"], r["head_dim"]) for r in rows
               if str(r["status"]).startswith("skipped")}
        missing = want - set(best)
        assert not missing - cut, f"no working config for {sorted(missing - cut)}"
        detail = ", ".join(f"{v} {k} D{d}: {c} {s * 1e3:.2f} ms"
                           for (v, k, d), (c, s) in best.items())
        if cut:
            detail += f"; cut short by the stage budget: {sorted(cut)}"
        return detail

    rec.check("tile configs timed", summary)


#: extra ``kernel_timing`` cases after the plain ones (CUDA sizes): Gemma 2's global layers
#: (logit soft-cap 50) and its local ones (the cap and a 4,096-key sliding window), D 128
SCORED_TIMING_CASES = [dict(softcap=50.0), dict(softcap=50.0, window=4096)]


def kernel_timing_cases(cuda: bool, tiny: bool) -> list[dict]:
    """``kernel_timing``'s cases in order: ``Case`` keywords without ``mode``, ``batch``,
    ``heads`` (the plain masks at every head dim, then :data:`SCORED_TIMING_CASES`)."""
    length, head_dims = (8192, [64, 128]) if cuda else (32, [16])
    cases = []
    for mask in ("causal", "rmt"):
        for hd in head_dims:
            mem = 0 if mask == "causal" else (4 if tiny else 16)
            cases.append(dict(mask=mask, length=length, head_dim=hd, num_read=mem, num_write=mem))
    for extra in SCORED_TIMING_CASES:
        extra = dict(extra)
        if not cuda and "window" in extra:
            extra["window"] = length // 2
        cases.append(dict(mask="causal", length=length, head_dim=head_dims[-1], **extra))
    return cases


#: the systems :func:`warm` runs once before ``kernel_timing`` times them: those that compile
#: (Triton; FlexAttention through Inductor); off CUDA the PyTorch path, to run the plumbing
WARM_SYSTEMS = {"cuda": ("triton", "flex"), "cpu": ("torch",)}


def kernel_timing_plan(ctx: Ctx):
    """``(dtype, systems, cases)`` of ``kernel_timing``: every case of
    :func:`kernel_timing_cases` in fwd and fwd+bwd, 16,384 tokens of width 2,048 on CUDA."""
    import torch

    from rmt_fast.bench import kernels as kb

    if ctx.cuda:
        dtype, systems, tokens, model_dim = torch.bfloat16, list(kb.GPU_SYSTEMS), 16384, 2048
    else:
        dtype, systems, tokens, model_dim = torch.float32, list(kb.CPU_SYSTEMS), 64, 32
    cases = [kb.Case(mode=mode, batch=max(1, tokens // spec["length"]),
                     heads=max(1, model_dim // spec["head_dim"]), **spec)
             for spec in kernel_timing_cases(ctx.cuda, ctx.tiny) for mode in ("fwd", "fwd+bwd")]
    return dtype, systems, cases


def warm_items(ctx: Ctx, which: str) -> list[tuple[dict, Callable[[], object]]]:
    """What :func:`warm` runs for stage ``which``: ``(where, run once)`` pairs."""
    import torch

    from rmt_fast.bench import kernels as kb

    items = []
    if which == "tuning":
        for variant, softcap, kernel, hd, cands in tuning_plan(ctx.cuda):
            case = tuning_case(kernel, hd, softcap, ctx.cuda)
            for cand in cands:
                def once(kernel=kernel, hd=hd, capped=softcap is not None, cand=cand, case=case):
                    with tile_config(kernel, hd, capped, cand):
                        tuning_run(case, ctx.device)
                items.append((dict(variant=variant, kernel=kernel, head_dim=hd,
                                   config=str(cand)), once))
    elif which == "kernel_timing":
        dtype, systems, cases = kernel_timing_plan(ctx)
        dev = torch.device(ctx.device)
        for case in cases:
            for system in WARM_SYSTEMS[ctx.device]:
                def once(system=system, case=case):
                    row, _ = kb.run_case(system, case, dev, dtype, 1, 0, None, None)
                    assert not row["status"].startswith("error"), row["status"]
                items.append((dict(system=system, mask=case.mask, window=case.window,
                                   softcap=case.softcap, head_dim=case.head_dim,
                                   mode=case.mode), once))
    else:
        raise ValueError(f"warm: no items for stage {which!r}")
    return items


def stage_warm_worker(ctx: Ctx, rec: Recorder, which: str, index: int, count: int) -> None:
    """Its share of :func:`warm_items`, each run once, untimed: what they compile lands in the
    on-disk caches (Triton's, Inductor's) that the timing stage then reads."""
    import torch

    from rmt_fast.bench import kernels as kb

    deadline = time.monotonic() + ctx.budget_s
    for where, once in shard(warm_items(ctx, which), index, count):
        if time.monotonic() > deadline:
            break
        start = time.perf_counter()
        try:
            once()
            status = "ok"
        except Exception as e:  # the timing stage meets it again and reports it
            status = kb.error_status(e)
        rec.row(**where, seconds=round(time.perf_counter() - start, 2), status=status)
        if ctx.cuda:
            torch.cuda.empty_cache()


def warm(ctx: Ctx, rec: Recorder, which: str, wait_s: float) -> None:
    """Run :func:`warm_items` of stage ``which`` once in ``worker_count(1, 12)`` processes at
    once (at most ``wait_s``), so that the stage's timing loop, one case after another, finds
    its kernels compiled instead of compiling each on one core. Best effort: a failure here
    only costs the time; the stage's metric ``warm`` says what happened."""
    count = worker_count(1, cap=12)
    if ctx.cuda and count < 2:
        rec.metric(warm="skipped: one core, nothing to overlap")
        return
    start = time.monotonic()
    # Inductor would give each worker a pool of compile processes as large as the machine
    env = dict(os.environ, TORCHINDUCTOR_COMPILE_THREADS="1")
    done = fan_out(ctx, rec, "warm_worker",
                   [["--warm", which, "--shard", f"{i}/{count}"] for i in range(count)], wait_s,
                   env)
    rows = [r for _, part, _ in done for r in part.get("rows", [])]
    rec.metric(warm=dict(workers=count, items=len(rows),
                         errors=sum(not str(r.get("status")).startswith("ok") for r in rows),
                         killed=sum(code is None for _, _, code in done),
                         seconds=round(time.monotonic() - start, 1)))


def stage_kernel_timing(ctx: Ctx, rec: Recorder) -> None:
    """Every system of :func:`kernel_timing_plan` on every case, one after another, after
    :func:`warm` has compiled what compiles."""
    import torch

    from rmt_fast.bench import kernels as kb
    from rmt_fast.bench.roofline import device_peak

    dev = torch.device(ctx.device)
    ceil = ctx.context.get("stages", {}).get("ceilings", {}).get("metrics", {})
    dtype, systems, cases = kernel_timing_plan(ctx)
    peak = device_peak(torch.cuda.get_device_name()) if ctx.cuda else None
    measured = ceil.get(f"{str(dtype)[6:]}_tflops")
    deadline = time.monotonic() + ctx.budget_s - 10
    warm(ctx, rec, "kernel_timing", 0.4 * ctx.budget_s)
    rec.data["columns"] = ["system", "mask", "window", "softcap", "length", "head_dim", "batch",
                           "heads", "mode", "ms", "TFLOP/s", "% datasheet", "% measured", "GB/s",
                           "max_diff", "status"]
    for case in cases:
        where = dict(mask=case.mask, window=case.window, softcap=case.softcap,
                     length=case.length, head_dim=case.head_dim, mode=case.mode)
        ref = None
        for system in systems:
            if time.monotonic() > deadline:
                rec.row(system=system, **where, status="skipped: stage budget")
                continue
            row, out = kb.run_case(system, case, dev, dtype, 3, 1, ref, peak)
            if ref is None and out is not None:
                ref, row["max_diff"] = out, 0.0
            sec = row.get("seconds")
            rec.row(system=system, **where, batch=case.batch, heads=case.heads,
                    ms=sec and sec * 1e3, **{"TFLOP/s": row.get("tflops")},
                    **{"% datasheet": row.get("frac_peak_flops") and
                       100 * row["frac_peak_flops"],
                       "% measured": (row.get("tflops") and measured and
                                      100 * row["tflops"] / measured)},
                    **{"GB/s": row.get("gbps")}, max_diff=row.get("max_diff"),
                    status=row["status"])
        del ref
        if ctx.cuda:
            torch.cuda.empty_cache()
    rec.metric(dtype=str(dtype)[6:], datasheet=peak.name if peak else None,
               measured_matmul_tflops=measured)


STAGES = {
    "environment": (stage_environment, 60),
    "verify_install": (stage_verify_install, 60),
    "ceilings": (stage_ceilings, 40),
    "extension_ops": (stage_extension_ops, 60),
    "memory_store": (stage_memory_store, 60),
    "triton_correctness": (stage_triton_correctness, 170),  # 45 cases (softcap: +9)
    "train_step": (stage_train_step, 75),
    "streaming_1m": (stage_streaming, 90),
    "armt": (stage_armt, 60),
    "kernel_timing": (stage_kernel_timing, 200),  # 12 cases (Gemma 2's layers: +4)
    "tuning": (stage_tuning, 240),  # the default run gives it what is left
}
INSTALL_BUDGET_S = 240


def child_main(a) -> int:
    """``--stage NAME``: run one stage in this process and write its result."""
    import faulthandler

    faulthandler.enable()  # a crash in native code still names the Python line in the log
    import torch

    device = "cuda" if torch.cuda.is_available() and not a.dry_run else "cpu"
    if device == "cpu":  # dry run: one thread (a shared CPU makes OpenMP threads wait on each other)
        torch.set_num_threads(1)
    context = {}
    if a.context and os.path.exists(a.context):
        with open(a.context) as f:
            context = json.load(f)
    ctx = Ctx(device, a.dry_run or device == "cpu", a.budget, context)
    rec = Recorder(a.result)
    try:
        index, count = (int(x) for x in a.shard.split("/"))
        if a.stage == "triton_worker":
            stage_triton_worker(ctx, rec, a.dtype, index, count)
        elif a.stage == "warm_worker":
            stage_warm_worker(ctx, rec, a.warm, index, count)
        else:
            STAGES[a.stage][0](ctx, rec)
        rec.finish()
    except Exception:
        rec.data["status"] = "error: stage raised (traceback in gpu_check.log)"
        rec.data["error"] = traceback.format_exc()
        rec.flush()
        traceback.print_exc()
    return 0


def _probe(python: str, env: dict) -> dict:
    """CUDA availability and capability, from a throwaway process (the parent imports no torch)."""
    code = ("import json, torch; c = torch.cuda.is_available(); print(json.dumps({'cuda': c, "
            "'capability': list(torch.cuda.get_device_capability(0)) if c else None}))")
    try:
        out = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env,
                             timeout=120, cwd=tempfile.gettempdir())
        return json.loads(out.stdout.strip().splitlines()[-1])
    except Exception as e:
        return {"cuda": False, "capability": None, "error": f"{type(e).__name__}: {e}"}


def parent_main(a) -> int:
    t0 = time.monotonic()
    out_dir = os.path.abspath(a.out or os.environ.get("OUT") or os.path.join(REPO, "gpu_check_out"))
    os.makedirs(out_dir, exist_ok=True)
    work = tempfile.mkdtemp(prefix="gpu_check_")
    python = sys.executable
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    env.pop("TRITON_INTERPRET", None)
    probe = _probe(python, env)
    dry = a.dry_run or not probe["cuda"]
    mode = "dry run: CPU, tiny sizes, GPU-only checks skipped" if dry else "GPU"
    print(f"gpu_check: {mode}; results in {out_dir}", flush=True)
    header = {"mode": mode, "probe": probe, "repo": REPO, "command": " ".join(sys.argv),
              "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    stage_env = dict(env)
    install = (not dry or a.install) and not a.no_install

    def child(name: str, budget: float, **extra) -> Stage:
        cmd = [python, SCRIPT, "--stage", name, "--result", os.path.join(work, f"{name}.json"),
               "--budget", str(budget), "--context", os.path.join(out_dir, "gpu_check.json")]
        if dry:
            cmd.append("--dry-run")
        return Stage(name, budget, cmd, os.path.join(work, f"{name}.json"), stage_env)

    stages = [child("environment", STAGES["environment"][1])]
    if install:
        pip_log = os.path.join(out_dir, "install.log")
        inst = install_env(env, probe.get("capability"))
        log_q = shlex.quote(pip_log)
        res_q = shlex.quote(os.path.join(work, "install.json"))
        cmd = ["bash", "-c", f"{shlex.join(install_command(python, REPO))} > {log_q} 2>&1; "
               f"rc=$?; tail -5 {log_q}; if [ $rc = 0 ]; then echo '{{\"status\": \"ok\"}}' "
               f"> {res_q}; fi; exit $rc"]
        stages.append(Stage("install", INSTALL_BUDGET_S, cmd, os.path.join(work, "install.json"),
                            inst))
    else:
        stage_env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    for name in ("verify_install", "ceilings", "extension_ops", "memory_store",
                 "triton_correctness", "train_step", "streaming_1m", "armt", "kernel_timing",
                 "tuning"):  # tuning last: it takes what time is left (its rows say what it cut)
        stages.append(child(name, STAGES[name][1] * (a.budget_scale or 1.0)))
    if a.stages:
        stages = [s for s in stages if s.name in a.stages]

    def on_result(name, result, report):
        if name == "install":
            result.setdefault("metrics", {}).update(
                command=" ".join(install_command(python, REPO)),
                arch=inst.get("TORCH_CUDA_ARCH_LIST"), log="install.log")
            if not result["status"].startswith("ok"):
                # run the rest from the source tree (Triton paths need no extension)
                stage_env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
                report["note"] = "install failed: later stages import rmt_fast from the source tree"

    if not install:
        header["note"] = "no install: rmt_fast imported from the source tree"
    report = orchestrate(stages, out_dir, a.deadline, header, on_result, t0)
    print(markdown(report), flush=True)
    failed = [n for n, r in report["stages"].items() if not str(r["status"]).startswith(("ok", "skipped"))]
    print(f"gpu_check: {len(failed)} stage(s) not ok: {failed}" if failed else "gpu_check: all ok",
          flush=True)
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=None, help="output folder (default $OUT, else gpu_check_out/)")
    p.add_argument("--dry-run", action="store_true",
                   help="CPU, tiny sizes, GPU-only checks skipped (the default without CUDA)")
    p.add_argument("--install", action="store_true", help="pip-install even on a dry run")
    p.add_argument("--deadline", type=float, default=DEFAULT_DEADLINE_S, help="global seconds")
    p.add_argument("--no-install", action="store_true",
                   help="import rmt_fast from the source tree, no build (a rerun of the Triton "
                        "stages after a fix; the extension stages then find no CUDA ops)")
    p.add_argument("--budget-scale", type=float, default=None,
                   help="multiply every stage budget (e.g. 3 on a slow shared CPU)")
    p.add_argument("--stages", nargs="+", default=None, help="run only these stages")
    # internal: one stage in this process
    p.add_argument("--stage", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--budget", type=float, default=60.0, help=argparse.SUPPRESS)
    p.add_argument("--context", default=None, help=argparse.SUPPRESS)
    p.add_argument("--dtype", default="float32", help=argparse.SUPPRESS)
    p.add_argument("--shard", default="0/1", help=argparse.SUPPRESS)  # worker INDEX/COUNT
    p.add_argument("--warm", default=None, help=argparse.SUPPRESS)  # warm_worker: which stage
    a = p.parse_args(argv)
    if a.stage:
        return child_main(a)
    return parent_main(a)


if __name__ == "__main__":
    sys.exit(main())
