"""rmt_fast/bench/kernels.py on CPU: the smoke run of its main (tiny sizes) and the flex mask_mod.

No GPU here: the main must say it ran CPU reference paths only, and never print Triton or
flash_attn rows as if they had been timed. No timing asserts.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from rmt_fast.bench import kernels as kb
from rmt_fast.masks import MASK_MODES, dense_visibility

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXPECTED_COLUMNS = ("system", "mask", "L", "D", "B", "H", "mode", "ms", "TFLOP/s", "peak%",
                    "GB/s", "max_diff", "status")


@pytest.mark.parametrize("mask", MASK_MODES)
@pytest.mark.parametrize("past, pvr", [(0, False), (5, False), (5, True)])
def test_flex_mask_mod_equals_dense_visibility(mask, past, pvr):
    case = kb.Case(mask, 13, 16, "fwd", 1, 1, num_read=3, num_write=4, past=past,
                   past_visible_to_read=pvr)
    qi = torch.arange(13)[:, None]
    kj = torch.arange(past + 13)[None, :]
    got = kb.mask_mod_for(case)(0, 0, qi, kj)
    want = dense_visibility(13, past, num_read=3, num_write=4, mask=mask, past_visible_to_read=pvr)
    assert torch.equal(got, want)


@pytest.mark.parametrize("mask", MASK_MODES)
@pytest.mark.parametrize("past, pvr", [(0, False), (5, False), (5, True)])
@pytest.mark.parametrize("window", [1, 4, 9])
def test_flex_mask_mod_with_window_equals_dense_visibility(mask, past, pvr, window):
    case = kb.Case(mask, 13, 16, "fwd", 1, 1, num_read=3, num_write=4, past=past,
                   past_visible_to_read=pvr, window=window)
    qi = torch.arange(13)[:, None]
    kj = torch.arange(past + 13)[None, :]
    got = kb.mask_mod_for(case)(0, 0, qi, kj)
    want = dense_visibility(13, past, num_read=3, num_write=4, mask=mask, past_visible_to_read=pvr,
                            window=window)
    assert torch.equal(got, want)
    assert not torch.equal(got, kb.mask_mod_for(kb.Case(mask, 13, 16, "fwd", 1, 1, num_read=3,
                                                        num_write=4, past=past,
                                                        past_visible_to_read=pvr))(0, 0, qi, kj))


def test_flex_score_mod_is_the_softcap():
    assert kb.score_mod_for(kb.Case("causal", 8, 16, "fwd", 1, 1)) is None
    s = torch.randn(5, 7, dtype=torch.float64) * 40
    mod = kb.score_mod_for(kb.Case("causal", 8, 16, "fwd", 1, 1, softcap=20.0))
    assert torch.allclose(mod(s, 0, 0, 0, 0), 20.0 * torch.tanh(s / 20.0), rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="softcap"):
        kb.Case("causal", 8, 16, "fwd", 1, 1, softcap=-1.0)
    with pytest.raises(ValueError, match="window"):
        kb.Case("causal", 8, 16, "fwd", 1, 1, window=0)


def test_windowed_and_capped_cases_on_cpu():
    """Every CPU system that can express a window and a cap agrees with ours (``torch``); the
    others say why not; the FLOPs are the window's."""
    dev = torch.device("cpu")
    case = kb.Case("rmt", 24, 16, "fwd", 1, 2, num_read=3, num_write=3, past=6, window=7,
                   softcap=2.0)
    ref, _ = None, None
    rows = {}
    for system in kb.CPU_SYSTEMS:
        row, out = kb.run_case(system, case, dev, torch.float32, 1, 0, ref, None)
        if ref is None:
            ref = out
        rows[system] = row
    assert rows["torch"]["status"] == "ok"
    assert rows["reference"]["status"] == "ok" and rows["reference"]["max_diff"] < 1e-5
    assert rows["flex"]["status"] == "ok" and rows["flex"]["max_diff"] < 1e-5
    assert rows["sdpa_mask"]["status"] == "skipped: SDPA has no logit soft-cap"
    assert rows["sdpa_causal"]["status"].startswith("skipped")
    vis = dense_visibility(24, 6, num_read=3, num_write=3, mask="rmt", window=7)
    assert rows["torch"]["flops"] == 4 * 16 * 2 * int(vis.sum())
    # without the cap SDPA takes the windowed mask and agrees
    nocap = kb.Case("rmt", 24, 16, "fwd", 1, 2, num_read=3, num_write=3, past=6, window=7)
    ref, _ = kb.run_case("torch", nocap, dev, torch.float32, 1, 0, None, None)[1], None
    row, _ = kb.run_case("sdpa_mask", nocap, dev, torch.float32, 1, 0, ref, None)
    assert row["status"] == "ok" and row["max_diff"] < 1e-5
    # and the cap changes the output (the comparison above could not pass without it)
    capped = kb.run_case("torch", case, dev, torch.float32, 1, 0, None, None)[1]
    assert (capped - ref).abs().max() > 1e-3


def test_cpu_main_smoke(tmp_path):
    """``python -m rmt_fast.bench.kernels`` without CUDA: the explicit CPU line, the table, sane rows."""
    out_json = tmp_path / "rows.json"
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "PYTHONPATH": ROOT}
    res = subprocess.run(
        [sys.executable, "-m", "rmt_fast.bench.kernels", "--masks", "causal", "rmt",
         "--lengths", "32", "--head-dims", "16", "--repeats", "1", "--warmup", "0",
         "--json", str(out_json)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    lines = res.stdout.splitlines()
    assert "no CUDA device: CPU reference paths only" in lines
    assert "times are CPU times, not GPU numbers" in res.stdout
    header = "| " + " | ".join(EXPECTED_COLUMNS) + " |"
    assert header in lines
    table = [ln for ln in lines[lines.index(header) + 2:] if ln.startswith("| ")]
    systems = {ln.split(" | ")[0][2:] for ln in table}
    assert systems == set(kb.CPU_SYSTEMS)  # no triton / flash rows on CPU
    for ln in table:
        assert len(ln.strip("|").split(" | ")) == len(EXPECTED_COLUMNS), ln
    rows = json.loads(out_json.read_text())["rows"]
    assert len(rows) == len(table) == 2 * 2 * len(kb.CPU_SYSTEMS)  # masks x modes x systems
    ok = [r for r in rows if r["status"] == "ok"]
    for r in ok:
        assert r["seconds"] > 0 and r["tflops"] > 0 and r["flops"] > 0
        assert r["max_diff"] < 1e-5, r  # same mask, same result as ours (torch backend)
        assert "frac_peak_flops" not in r  # no device peak on CPU
    status = {(r["system"], r["mask"], r["mode"]): r["status"] for r in rows}
    assert status[("sdpa_causal", "causal", "fwd")] == "ok"
    assert status[("sdpa_causal", "rmt", "fwd")].startswith("skipped")
    assert status[("flex", "rmt", "fwd")] == "ok"
    assert status[("flex", "rmt", "fwd+bwd")].startswith("skipped")
    assert len(ok) == len(rows) - 4  # sdpa_causal x rmt x 2 modes, flex backward x 2 masks


def test_compiled_flex_starts_from_clear_dynamo_caches(monkeypatch):
    """Each flex case compiles from clear caches: past Dynamo's recompile limit the bench would
    time eager flex_attention (what the first GPU check did for 3 of its 8 flex rows)."""
    calls = []
    monkeypatch.setattr(torch._dynamo, "reset", lambda: calls.append("reset"))
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: calls.append(("compile", fn.__name__,
                                                                         kw)) or fn)
    kb.compiled_flex()
    assert calls == ["reset", ("compile", "flex_attention", {"dynamic": False})]


def test_error_status_names_the_exception_and_its_first_line():
    """The status a failed case's row gets (bench and gpu_check alike), also for an exception
    without a message."""
    from rmt_fast.bench.kernels import error_status

    assert error_status(RuntimeError("out of shared memory\ndetails")) == \
        "error: RuntimeError: out of shared memory"
    assert error_status(ValueError()) == "error: ValueError: "
    assert error_status(RuntimeError("x" * 200)) == "error: RuntimeError: " + "x" * 80
