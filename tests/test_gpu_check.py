"""scripts/gpu_check.py on the CPU: its plumbing (stages isolated, budgets, deadline, report),
its install command, and its checkers (they must catch a wrong kernel). The end-to-end dry run
is slow (one process per stage) and marked so."""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "scripts", "gpu_check.py")


@pytest.fixture(scope="module")
def gc():
    yield load_script("gpu_check")
    sys.modules.pop("gpu_check", None)


def test_install_command_and_environment(gc):
    assert gc.arch_list((9, 0)) == "9.0" and gc.arch_list([8, 6]) == "8.6"
    env = gc.install_env({"PATH": "/bin"}, (9, 0), cpus=64)
    assert env["RMT_FAST_BUILD_CUDA"] == "1" and env["RMT_FAST_REQUIRE_EXT"] == "1"
    assert env["TORCH_CUDA_ARCH_LIST"] == "9.0" and env["MAX_JOBS"] == "16"
    assert env["PATH"] == "/bin"
    kept = gc.install_env({"TORCH_CUDA_ARCH_LIST": "9.0a", "MAX_JOBS": "4"}, (9, 0))
    assert kept["TORCH_CUDA_ARCH_LIST"] == "9.0a" and kept["MAX_JOBS"] == "4"
    cmd = gc.install_command("/usr/bin/python3", "/repo")
    assert cmd[:4] == ["/usr/bin/python3", "-m", "pip", "install"] and cmd[-1] == "/repo"
    # offline machine: no build isolation, no dependency resolution, no index
    assert {"--no-build-isolation", "--no-deps", "--no-index"} <= set(cmd)


def _stage(gc, tmp_path, name, code, budget=30.0):
    result = str(tmp_path / f"{name}.json")
    return gc.Stage(name, budget, [sys.executable, "-c", code.replace("RESULT", repr(result))],
                    result)


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def test_orchestrate_isolates_failures_timeouts_and_deadline(gc, tmp_path):
    write = ("import json; json.dump({{'status': {status!r}, 'checks': [{{'name': 'c', "
             "'status': {check!r}, 'detail': 'd', 'seconds': 0}}]}}, open(RESULT, 'w'))")
    stages = [
        _stage(gc, tmp_path, "good", write.format(status="ok", check="ok")),
        # writes a partial result, then dies: the partial result stays, the status says crashed
        _stage(gc, tmp_path, "crash", write.format(status="running", check="ok")
               + "; import sys; sys.exit(3)"),
        # hangs, and has started a process of its own: both go at the stage's budget
        _stage(gc, tmp_path, "hang", "import subprocess, sys, time; p = subprocess.Popen([sys.executable,"
               " '-c', 'import time; time.sleep(60)']); open(RESULT + '.pid', 'w').write(str(p.pid));"
               " time.sleep(60)", budget=3),
        _stage(gc, tmp_path, "after", write.format(status="failed: 1 check(s)", check="FAIL")),
        _stage(gc, tmp_path, "late", write.format(status="ok", check="ok")),
    ]
    seen = []
    out = tmp_path / "out"
    t0 = __import__("time").monotonic()
    # the deadline lets the first four run and leaves the last one out
    report = gc.orchestrate(stages[:4], str(out), 60.0, {"mode": "test"},
                            on_result=lambda n, r, rep: seen.append(n), t0=t0)
    late = gc.orchestrate(stages[4:], str(out / "late"), 0.0, {"mode": "test"})
    st = report["stages"]
    assert seen == ["good", "crash", "hang", "after"]
    assert st["good"]["status"] == "ok"
    assert st["crash"]["status"].startswith("crashed: exit code 3")
    assert st["crash"]["checks"][0]["status"] == "ok"  # what it wrote before dying
    assert st["hang"]["status"].startswith("timeout") and st["hang"]["seconds"] < 30
    grandchild = int((tmp_path / "hang.json.pid").read_text())
    for _ in range(50):  # killed with its stage (gone, or a zombie until someone reaps it)
        if not _alive(grandchild):
            break
        __import__("time").sleep(0.1)
    assert not _alive(grandchild)
    assert st["after"]["status"].startswith("failed")  # ran although the one before hung
    assert late["stages"]["late"]["status"] == "skipped: global deadline reached"
    data = json.loads((out / "gpu_check.json").read_text())
    assert list(data["stages"]) == ["good", "crash", "hang", "after"]
    md = (out / "gpu_check.md").read_text()
    assert "| hang | timeout" in md and "| after | failed: 1 check(s)" in md
    assert "===== stage hang" in (out / "gpu_check.log").read_text()
    assert sorted(os.listdir(out)) == ["gpu_check.json", "gpu_check.log", "gpu_check.md", "late"]


def test_recorder_statuses(gc, tmp_path):
    rec = gc.Recorder(str(tmp_path / "r.json"))
    rec.check("fine", lambda: "detail")
    rec.check("wrong", lambda: gc._assert(False, "values differ"))
    rec.check("broken", lambda: 1 / 0)
    rec.check("gpu only", skip="no CUDA device (dry run)")
    rec.finish()
    data = json.loads((tmp_path / "r.json").read_text())
    assert [c["status"] for c in data["checks"]] == ["ok", "FAIL", "error", "skipped"]
    assert data["checks"][1]["detail"] == "values differ"
    assert "ZeroDivisionError" in data["checks"][2]["detail"]
    assert data["status"] == "failed: 2 check(s)"
    ok = gc.Recorder(str(tmp_path / "s.json"))
    ok.check("gpu only", skip="no CUDA")
    ok.row(case="x", status="ok")
    ok.finish()
    assert json.loads((tmp_path / "s.json").read_text())["status"] == "ok"


def test_triton_checker_passes_the_kernel_and_catches_a_wrong_one(gc, monkeypatch):
    """check_case on the CPU (Triton interpreter): the real kernel passes; a kernel off by 1e-3
    in its output fails, as does one with a wrong gradient (those two wrap the fast CPU backend),
    and the windowed and soft-capped cases pass the kernel and fail one that drops the window or
    the cap."""
    case = gc.correctness_cases(tiny=True)[1]  # rmt mask, GQA, past keys
    row = gc.check_case(case, "float32", "cpu")
    assert row["status"] == "ok", row
    assert row["out_err"] < 1e-5 and "dpast_v_err" in row

    import rmt_fast

    real = rmt_fast.memory_attention

    def off(*args, **kw):
        out, lse = real(*args, **kw)
        return out + 1e-3, lse

    monkeypatch.setattr(rmt_fast, "memory_attention", off)
    assert gc.check_case(case, "float32", "cpu", backend="torch")["status"] == "FAIL"

    class WrongGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return 1.01 * g

    def bad_grad(*args, **kw):
        out, lse = real(*args, **kw)
        return WrongGrad.apply(out), lse

    monkeypatch.setattr(rmt_fast, "memory_attention", bad_grad)
    bad = gc.check_case(case, "float32", "cpu", backend="torch")
    assert bad["status"] == "FAIL" and bad["out_err"] < 1e-5  # output right, gradients wrong
    monkeypatch.setattr(rmt_fast, "memory_attention", real)
    window = gc.correctness_cases(tiny=True)[2]  # a sliding window: the kernel passes
    assert window["window"] == 5 and gc.check_case(window, "float32", "cpu")["status"] == "ok"

    def no_window(*args, window=None, **kw):  # a kernel that ignores the window fails
        return real(*args, **kw)

    monkeypatch.setattr(rmt_fast, "memory_attention", no_window)
    assert gc.check_case(window, "float32", "cpu", backend="torch")["status"] == "FAIL"
    monkeypatch.setattr(rmt_fast, "memory_attention", real)
    capped = gc.correctness_cases(tiny=True)[3]  # logit soft-capping: the kernel passes
    assert capped["softcap"] == 1.0 and gc.check_case(capped, "float32", "cpu")["status"] == "ok"

    def no_cap(*args, softcap=None, **kw):  # a kernel that ignores the cap fails
        return real(*args, **kw)

    monkeypatch.setattr(rmt_fast, "memory_attention", no_cap)
    assert gc.check_case(capped, "float32", "cpu", backend="torch")["status"] == "FAIL"


def test_shard_and_worker_count(gc, monkeypatch):
    items = list(range(11))
    for count in (1, 2, 3, 4, 11, 15):
        parts = [gc.shard(items, i, count) for i in range(count)]
        assert sorted(x for p in parts for x in p) == items  # each item in exactly one share
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    for cpus, groups, cap, want in ((16, 3, 4, 4), (16, 1, 12, 12), (8, 3, 4, 2), (2, 3, 4, 1),
                                    (1, 1, 12, 1), (16, 1, 4, 4)):
        monkeypatch.setattr(gc.os, "sched_getaffinity", lambda _, n=cpus: set(range(n)))
        assert gc.worker_count(groups, cap) == want, (cpus, groups, cap)


def test_fan_out_collects_results_and_kills_stragglers(gc, tmp_path, monkeypatch):
    """Every worker runs at once with its own arguments; each one's result comes back with its
    exit code; one that outlives the wait is killed (code None), what it wrote kept; a worker
    that dies says so; one that writes nothing, or half a file, comes back as a status without
    rows."""
    fake = tmp_path / "fake_stage.py"
    fake.write_text(
        "import json, sys, time\n"
        "a = sys.argv\n"
        "result, mode = a[a.index('--result') + 1], a[a.index('--mode') + 1]\n"
        "if mode == 'half': open(result, 'w').write('{\"rows\": [')\n"
        "elif mode != 'none': json.dump({'rows': [{'mode': mode, 'interp': "
        "__import__('os').environ.get('TRITON_INTERPRET')}]}, open(result, 'w'))\n"
        "if mode == 'hang': time.sleep(60)\n"
        "sys.exit(3 if mode == 'die' else 0)\n")
    monkeypatch.setattr(gc, "SCRIPT", str(fake))
    rec = gc.Recorder(str(tmp_path / "stage.json"))
    ctx = gc.Ctx("cpu", True, 30.0, {})
    modes = ("ok", "hang", "die", "ok2", "none", "half")
    t0 = __import__("time").monotonic()
    done = gc.fan_out(ctx, rec, "w", [["--mode", m] for m in modes], 8.0)
    assert __import__("time").monotonic() - t0 < 20  # not 60: the hanging one was killed
    assert [extra for extra, _, _ in done] == [["--mode", m] for m in modes]
    assert [code for _, _, code in done] == [0, None, 3, 0, 0, 0]
    assert [part["rows"][0]["mode"] for _, part, _ in done[:4]] == ["ok", "hang", "die", "ok2"]
    assert all(part["rows"][0]["interp"] == "1" for _, part, _ in done[:4])  # no CUDA
    for _, part, _ in done[4:]:
        assert "rows" not in part and part["status"].startswith("error: unreadable result")


def test_tuning_plan_order(gc):
    """Backward kernels first (the weak spot), each head dim, the plain variant before the
    soft-capped one; each candidate list starts with the shipped config, without repeats."""
    for cuda in (True, False):
        plan = gc.tuning_plan(cuda)
        kernels = [(v, k) for v, _, k, _, _ in plan]
        assert kernels == sorted(kernels, key=lambda vk: ([v for v, *_ in gc.TUNING_VARIANTS].index(
            vk[0]), gc.TUNING_ORDER.index(vk[1])))
        assert [k for v, k in kernels if v == "plain"][0] == "bwd_dkdv"
        for variant, softcap, kernel, hd, cands in plan:
            assert cands[0] == gc_launch_config(kernel, hd, softcap=softcap is not None)
            assert len(set(cands)) == len(cands)
            assert len(cands) == (len({tuple(c) for c in dict(
                (v, c) for v, _, c in gc.TUNING_VARIANTS)[variant][kernel]} | {cands[0]})
                if cuda else 2)
        dims = {hd for *_, hd, _ in plan}
        assert dims == ({64, 128} if cuda else {64})


def test_cases_cover_masks_dtypes_gqa_past_decode(gc):
    cases = gc.correctness_cases(tiny=False)
    assert {c["mask"] for c in cases} == {"causal", "rmt", "full", "bottleneck"}
    assert any(c["Hq"] > c["Hkv"] and c["P"] for c in cases)  # GQA with past keys
    assert any(c.get("kpm") and c.get("pvr") for c in cases)
    assert any(c.get("grad") is False and c["L"] <= 16 and c["P"] >= 256 for c in cases)  # decode
    windows = [c for c in cases if c.get("window")]  # windows that cut keys, with and without grad
    assert all(c["window"] < c["P"] + c["L"] for c in windows)
    assert {c.get("grad", True) for c in windows} == {True, False}
    assert any(c.get("kpm") for c in windows)
    capped = [c for c in cases if c.get("softcap")]  # with and without grad, a window, padding
    assert {c.get("grad", True) for c in capped} == {True, False}
    assert any(c.get("window") and c["P"] for c in capped) and any(c.get("kpm") for c in capped)
    assert any(c["softcap"] == 50.0 for c in capped)  # Gemma 2's cap
    assert set(gc.TOL_FLOOR) == {"bfloat16", "float16", "float32"}


@pytest.mark.slow
def test_dry_run_end_to_end(tmp_path):
    """The whole script without a GPU: every stage runs its CPU part at tiny sizes, the GPU-only
    checks say skipped, the report files are there."""
    env = dict(os.environ, CUDA_VISIBLE_DEVICES="")
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, SCRIPT, "--dry-run", "--out", str(tmp_path),
                          "--deadline", "1200", "--budget-scale", "4"],
                         capture_output=True, text=True, env=env, timeout=1500)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    data = json.loads((tmp_path / "gpu_check.json").read_text())
    assert data["mode"].startswith("dry run")
    names = list(data["stages"])
    assert names == ["environment", "verify_install", "ceilings", "extension_ops", "memory_store",
                     "triton_correctness", "train_step", "streaming_1m", "armt", "kernel_timing",
                     "tuning"]
    assert all(s["status"] == "ok" for s in data["stages"].values()), data["stages"]
    skipped = [c["name"] for s in data["stages"].values() for c in s.get("checks", [])
               if c["status"] == "skipped"]
    assert "offload + prefetch on a side stream" in skipped
    assert "CUDA kernels registered" in skipped
    rows = data["stages"]["triton_correctness"]["rows"]
    assert len(rows) == 4 and all(r["status"] == "ok" for r in rows)
    assert rows[-1]["case"] == "rmt softcap 1 window 7 past kpm"
    assert data["stages"]["streaming_1m"]["metrics"]["tokens_read"] == 4096
    checks = {c["name"]: c["status"] for s in data["stages"].values() for c in s.get("checks", [])}
    assert checks["C++ errors reach Python"] == "ok"
    assert checks["get of a missing segment raises"] == "ok"
    assert checks["associative read + write, float32, normaliser floor on about half the rows"] == "ok"
    assert checks["delta rule read + write, bfloat16"] == "ok"
    assert data["stages"]["armt"]["metrics"]["armt_logits_rel_diff"] < 1e-5
    timing = data["stages"]["kernel_timing"]["rows"]
    capped = [r for r in timing if r.get("softcap") == 50.0]
    assert {r.get("window") for r in capped} == {None, 16}
    ok = {(r["system"], r["window"], r["mode"]) for r in capped if r["status"] == "ok"}
    assert {("torch", w, "fwd") for w in (None, 16)} | {("flex", w, "fwd") for w in (None, 16)} <= ok
    assert all(r["max_diff"] < 1e-5 for r in capped if r["status"] == "ok")
    # every case ran once in the warm-up workers first, without errors
    warmed = data["stages"]["kernel_timing"]["metrics"]["warm"]
    assert warmed["items"] == len({(r["mask"], r["window"], r["softcap"], r["head_dim"], r["mode"])
                                   for r in timing})
    assert warmed["errors"] == 0 and warmed["killed"] == 0 and warmed["workers"] >= 1
    assert data["stages"]["triton_correctness"]["metrics"]["workers_per_dtype"] >= 1
    # tuning, last, needs CUDA or the interpreter: the dry run says so
    assert [c["status"] for c in data["stages"]["tuning"]["checks"]] == ["skipped"]
    assert sorted(os.listdir(tmp_path)) == ["gpu_check.json", "gpu_check.log", "gpu_check.md"]


def _run_tuning_stage(tmp_path, budget: float) -> dict:
    """The tuning stage alone in a process, under the Triton interpreter: its result."""
    env = dict(os.environ, TRITON_INTERPRET="1", CUDA_VISIBLE_DEVICES="")
    result = tmp_path / "tuning.json"
    res = subprocess.run([sys.executable, SCRIPT, "--stage", "tuning", "--result", str(result),
                          "--dry-run", "--budget", str(budget)], capture_output=True, text=True,
                         env=env, timeout=budget + 300)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return json.loads(result.read_text())


@pytest.mark.slow
def test_tuning_stage_under_the_interpreter(tmp_path):
    """The tuning stage's plumbing (rows, the check against the shipped config, the config
    restored) under the Triton interpreter, which ignores tile configs: every row ok, the
    differences 0, a best config per kernel."""
    data = _run_tuning_stage(tmp_path, budget=900)
    assert [c["status"] for c in data["checks"]] == ["ok"], data["checks"]
    assert len(data["rows"]) == 8 and all(r["status"] == "ok" for r in data["rows"]), data["rows"]
    assert [r["kernel"] for r in data["rows"]][:2] == ["bwd_dkdv"] * 2  # backward first
    warmed = data["metrics"]["warm"]  # each candidate ran once in the warm-up workers first
    assert warmed["items"] == 8 and warmed["errors"] == 0 and warmed["killed"] == 0
    assert all(r["max_rel_diff"] == 0.0 for r in data["rows"])
    assert set(data["metrics"]["best"]) == {"plain_fwd_64", "plain_bwd_dkdv_64", "plain_bwd_dq_64",
                                            "softcap_bwd_dkdv_64"}
    # the soft-capped dK/dV rows start from the config shipped for it, not the plain one
    capped = [r for r in data["rows"] if r["variant"] == "softcap"]
    assert capped[0]["config"] == str(gc_launch_config("bwd_dkdv", 64, softcap=True))
    assert capped[0]["config"] != str(gc_launch_config("bwd_dkdv", 64))


@pytest.mark.slow
def test_tuning_stage_cut_short_reports_what_it_timed(tmp_path):
    """With too little time the tuning stage still passes: the rows it could not time say
    ``skipped: stage budget``, and the check names what was cut instead of failing."""
    data = _run_tuning_stage(tmp_path, budget=11)
    assert data["status"] == "ok", data
    skipped = [r for r in data["rows"] if r["status"] == "skipped: stage budget"]
    assert skipped and len(data["rows"]) == 8
    assert "cut short by the stage budget" in data["checks"][0]["detail"]


def gc_launch_config(kernel, head_dim, softcap=False):
    import dataclasses

    from rmt_fast.ops.memory_attention.triton import launch

    return dataclasses.astuple(launch.gpu_config(kernel, head_dim, "bf16", softcap=softcap))


def test_kernel_timing_cases(gc):
    """The plain masks at every head dim, then Gemma 2's capped global and capped + windowed
    local layers at D 128; every case builds (window and cap validated)."""
    from rmt_fast.bench import kernels as kb

    for cuda in (True, False):
        cases = gc.kernel_timing_cases(cuda, tiny=not cuda)
        plain = [c for c in cases if "softcap" not in c]
        assert [c["mask"] for c in plain] == ["causal"] * (len(plain) // 2) + ["rmt"] * (len(plain) // 2)
        scored = cases[len(plain):]
        assert [c.get("softcap") for c in scored] == [50.0, 50.0]
        assert scored[0].get("window") is None
        assert 0 < scored[1]["window"] < scored[1]["length"]
        if cuda:
            assert scored[1]["window"] == 4096 and scored[1]["head_dim"] == 128
        for c in cases:
            kb.Case(mode="fwd", batch=1, heads=1, **c)


def test_correctness_stage_names_a_worker_without_rows(gc, tmp_path, monkeypatch):
    """A correctness worker that exited 0 without a readable result (or without rows) becomes an
    error row of its own; the rows of the others are kept; a killed or failed worker says so."""
    parts = [({"status": "error: unreadable result (Expecting value)"}, 0), ({}, 0),
             ({"rows": [{"dtype": "float32", "case": "x", "status": "ok"}]}, 0),
             ({"rows": []}, None), ({"rows": []}, 3)]
    monkeypatch.setattr(gc, "worker_count", lambda groups, cap=4: len(parts))
    monkeypatch.setattr(gc, "fan_out", lambda ctx, rec, worker, argsets, wait_s, env=None: [
        (extra, part, code) for extra, (part, code) in zip(argsets, parts, strict=True)])
    rec = gc.Recorder(str(tmp_path / "stage.json"))
    gc.stage_triton_correctness(gc.Ctx("cpu", True, 30.0, {}), rec)
    status = {r["case"]: r["status"] for r in rec.data["rows"]}
    assert status == {"(worker 0/5)": "error: unreadable result (Expecting value)",
                      "(worker 1/5)": "error: no rows written", "x": "ok",
                      "(worker 3/5)": "error: worker killed at the stage budget",
                      "(worker 4/5)": "error: worker exit 3"}
