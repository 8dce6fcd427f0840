"""The benchmark harness on tiny sizes: its outputs and its budgets (no timing asserts)."""

import json
import os

import pytest
import torch

from rmt_fast.bench import ceilings, flops, sweep, systems

# A stand-in with the official wrapper's interface (MemoryCell(base, M), RecurrentWrapper(cell,
# segment_size=..., ...), forward(input_ids, labels=None) -> .loss, .logits), written for these
# tests: the official file itself is not on PyPI and is never shipped or committed.
OFFICIAL_STANDIN = """
from types import SimpleNamespace

import torch
import torch.nn.functional as F


class MemoryCell(torch.nn.Module):
    def __init__(self, base_model, num_mem_tokens):
        super().__init__()
        self.model = base_model
        self.memory = torch.nn.Parameter(torch.randn(num_mem_tokens, base_model.config.n_embd))

    def forward(self, input_ids, memory_state=None):
        m = self.memory.shape[0]
        if memory_state is None:
            memory_state = self.memory.expand(input_ids.shape[0], -1, -1)
        x = torch.cat([memory_state, self.model.get_input_embeddings()(input_ids), memory_state], 1)
        out = self.model(inputs_embeds=x, output_hidden_states=True)
        return out.logits[:, m:-m], out.hidden_states[-1][:, -m:]


class RecurrentWrapper(torch.nn.Module):
    def __init__(self, memory_cell, **rmt_kwargs):
        super().__init__()
        self.memory_cell, self.rmt_config = memory_cell, rmt_kwargs

    def forward(self, input_ids, labels=None):
        memory, logits = None, []
        for seg in input_ids.split(self.rmt_config["segment_size"], dim=1):
            seg_logits, memory = self.memory_cell(seg, memory_state=memory)
            logits.append(seg_logits)
        logits = torch.cat(logits, 1)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels[:, 1:].flatten())
        return SimpleNamespace(loss=loss, logits=logits)
"""


@pytest.fixture
def official_standin(tmp_path):
    path = tmp_path / "language_modeling.py"
    path.write_text(OFFICIAL_STANDIN)
    return path


def test_flops_model_reproduces_the_1m_report_scale():
    rows = {(r["model"], r["tokens"]): r["ratio"]
            for r in flops.table([2_048_000], {k: flops.OPT[k] for k in ("opt-125m", "opt-175b")})}
    # report: x29 for OPT-175B; x295 for OPT-125M (we get x223 counting embedding and logit FLOPs,
    # x288 without the embeddings: the report's exact convention is not stated)
    assert 28 <= rows[("opt-175b", 2_048_000)] <= 30
    assert 200 < rows[("opt-125m", 2_048_000)] < 300
    no_emb = flops.table([2_048_000], {"opt-125m": flops.OPT["opt-125m"]}, embeddings=False)
    assert 280 < no_emb[0]["ratio"] < 300
    opt = flops.OPT["opt-125m"]
    assert flops.forward_flops(1024, opt) > 2 * flops.forward_flops(512, opt)  # quadratic term


def test_sweep_writes_json_markdown_png(tmp_path, official_standin):
    """Two dtypes, the official system from a file, 2 timed runs per point: every row has its
    runs, spread, GFLOP/s and fraction of the ceiling measured in the same run."""
    rows = sweep.main(["--systems", "rmt_fast", "--official-rmt", str(official_standin),
                       "--modes", "infer", "train", "--lengths", "64", "--config", "tiny",
                       "--repeats", "2", "--train-batch", "2", "--dtype", "float32", "bfloat16",
                       "--mem-budget", "100000", "--ceiling-size", "128", "--ceiling-copy-mib", "4",
                       "--out", str(tmp_path)])
    data = json.loads((tmp_path / "results.json").read_text())
    assert {"machine", "rows", "command", "ceilings", "dtypes"} <= set(data)
    assert data["machine"]["torch"] and data["machine"]["cores"]
    assert data["dtypes"] == ["float32", "bfloat16"]
    ceil = data["ceilings"]
    assert set(ceil["gflops"]) == {"float32", "bfloat16"} and ceil["copy_gbps"] > 0
    assert ceil["before"]["matmul"]["float32"]["size"] == 128 and ceil["after"] is not None
    ok = [r for r in data["rows"] if r["status"] == "ok"]
    assert len(ok) == len(rows) == 8  # 2 systems x 2 modes x 2 dtypes
    assert {(r["system"], r["mode"], r["dtype"]) for r in ok} == {
        (s, m, d) for s in ("rmt_fast", "official") for m in ("infer", "train")
        for d in ("float32", "bfloat16")}
    for r in ok:
        assert r["tokens_per_s"] > 0 and r["peak_mib"] > 0 and len(r["times_s"]) == 2
        assert r["tokens_per_s_min"] <= r["tokens_per_s"] <= r["tokens_per_s_max"]
        assert r["flops"] > 0 and r["gflops"] > 0 and 0 < r["frac_ceiling"]
        assert r["ours_speedup"] > 0  # measured against ours in the same run
        assert ("vs_float32" in r) == (r["dtype"] == "bfloat16")
    md = (tmp_path / "results.md").read_text()
    assert "### Machine ceilings" in md and "bfloat16 matrix product 128^3" in md
    assert "### train, bfloat16 (float32 weights, bf16 autocast), batch 2" in md
    assert "| official | 64 |" in md and "min-max" in md and "vs float32" in md
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"
    assert len(json.loads((tmp_path / "results.partial.json").read_text())) == 8


def test_sweep_marks_points_past_the_memory_budget():
    rows = sweep.sweep(["full"], ["infer"], [64, 128], {"infer": 1, "train": 1}, repeats=1,
                       time_budget=120, mem_budget_mib=50, config="tiny", threads=1, progress=False)
    assert rows[0]["status"].startswith("over memory budget")
    assert rows[1]["status"] == rows[0]["status"]  # not run again at a longer length


def test_point_flops_by_hand():
    cfg = systems.CONFIGS["tiny"]  # 2 layers, d 64, ffw 128, vocab 100, segment 32, memory 4
    # 80 tokens: segments of 32, 32, 16 -> 40, 40, 24 positions with read + write memory.
    # per layer: projections 8 P d^2, MLP 4 P d f, attention 4 d P (P + 1) / 2
    p40 = 2 * (2 * 40 * 4 * 64 ** 2 + 2 * 40 * 2 * 64 * 128 + 4 * 64 * 40 * 41 // 2)
    p24 = 2 * (2 * 24 * 4 * 64 ** 2 + 2 * 24 * 2 * 64 * 128 + 4 * 64 * 24 * 25 // 2)
    assert (p40, p24) == (5_662_720, 3_299_328)
    body = 2 * p40 + p24
    # reading: no logits, and the last layer past q/k/v for the 4 write rows only (a write row
    # at position P - 4 + i sees P - 4 + i + 1 keys)
    def read(p):
        layer = 2 * p * 4 * 64 ** 2 + 2 * p * 2 * 64 * 128 + 4 * 64 * p * (p + 1) // 2
        last = (2 * p * 3 * 64 ** 2 + 2 * 4 * 64 ** 2 + 2 * 4 * 2 * 64 * 128
                + 4 * 64 * sum(p - 4 + i + 1 for i in range(4)))
        return layer + last
    reading = 2 * read(40) + read(24)
    assert reading < 0.8 * body
    assert systems.point_flops("rmt_fast", "infer", cfg, 80) == reading
    assert systems.point_flops("rmt_fast", "infer", cfg, 80, batch=3) == 3 * reading
    seg_logits = 2 * 64 * 100 * 80  # 2 d V per segment token
    assert systems.point_flops("rmt_fast", "train", cfg, 80) == 3 * (body + seg_logits)
    assert systems.point_flops("lucidrains", "infer", cfg, 80) == body + seg_logits
    all_logits = 2 * 64 * 100 * (40 + 40 + 24)  # the official wrapper: memory positions too
    assert systems.point_flops("official", "infer", cfg, 80) == body + all_logits
    full = 2 * (2 * 80 * 4 * 64 ** 2 + 2 * 80 * 2 * 64 * 128 + 4 * 64 * 80 * 81 // 2)
    assert systems.point_flops("full", "infer", cfg, 80) == full + 2 * 64 * 100 * 80
    m = cfg.shape()
    assert flops.matmul_forward_flops(40, m) == p40
    assert flops.matmul_forward_flops(40, m, attention_pairs=0, logit_positions=1) == (
        p40 - 2 * 4 * 64 * 40 * 41 // 2 + 2 * 64 * 100)


def test_official_system_from_a_file(official_standin, tmp_path):
    cfg = systems.CONFIGS["tiny"]
    tokens = torch.randint(1, cfg.vocab, (2, 70))
    for dtype in (torch.float32, torch.bfloat16):
        systems.build("official", "infer", cfg, 70, dtype, str(official_standin))(tokens)
        systems.build("official", "train", cfg, 70, dtype, str(official_standin))(tokens)
    assert systems.unavailable("official") == "not run: pass --official-rmt PATH"
    assert systems.unavailable("official", str(tmp_path / "nope.py")).startswith("not found")
    assert systems.available("official", str(official_standin))
    with pytest.raises(ValueError, match="--official-rmt"):
        systems.build("official", "infer", cfg, 70)
    with pytest.raises(FileNotFoundError, match="language_modeling.py"):
        systems.load_official(tmp_path / "nope.py")
    empty = tmp_path / "empty.py"
    empty.write_text("X = 1\n")
    with pytest.raises(ValueError, match="MemoryCell / RecurrentWrapper"):
        systems.load_official(empty)
    with pytest.raises(ValueError, match="mode"):
        systems.build("rmt_fast", "decode", cfg, 70)


@pytest.mark.skipif(not os.environ.get("RMT_FAST_OFFICIAL_RMT"),
                    reason="set RMT_FAST_OFFICIAL_RMT to a copy of the official language_modeling.py")
@pytest.mark.parametrize("mode", ["infer", "train"])
def test_real_official_wrapper(mode):
    from rmt_fast.bench.point import run_point

    row = run_point("official", mode, 100, 2, repeats=1, config="tiny", dtype="bfloat16",
                    official_rmt=os.environ["RMT_FAST_OFFICIAL_RMT"])
    assert row["status"] == "ok" and row["tokens_per_s"] > 0 and row["dtype"] == "bfloat16"


def test_dtype_reaches_the_models():
    from transformers.pytorch_utils import Conv1D

    cfg = systems.CONFIGS["tiny"]
    tokens = torch.randint(1, cfg.vocab, (1, 40))
    seen = []
    hook = torch.nn.modules.module.register_module_forward_hook(
        lambda mod, inp, out: seen.append(out.dtype)
        if isinstance(mod, (torch.nn.Linear, Conv1D)) else None)  # GPT-2's projections: Conv1D
    try:
        systems.build("rmt_fast", "infer", cfg, 40, torch.bfloat16)(tokens)
        assert seen and set(seen) == {torch.bfloat16}
        seen.clear()
        systems.build("full", "train", cfg, 40, torch.bfloat16)(tokens)  # autocast
        assert seen and set(seen) == {torch.bfloat16}
    finally:
        hook.remove()


def test_ceilings_measured_in_process():
    out = ceilings.measure(("float32", "bfloat16"), "cpu", threads=1, size=64, copy_mib=1,
                           repeats=2)
    assert set(out["matmul"]) == {"float32", "bfloat16"} and out["threads"] == 1
    for r in out["matmul"].values():
        assert r["gflops"] >= r["median_gflops"] > 0 and len(r["times_s"]) == 2
    assert out["copy"]["gbps"] > 0 and out["copy"]["mib"] == 1
    best = sweep.best_ceilings([out, None, {"matmul": {"float32": {"gflops": 1e9}},
                                            "copy": {"gbps": 0.0}}])
    assert best["gflops"]["float32"] == 1e9 and best["copy_gbps"] == out["copy"]["gbps"]


def test_ceiling_size_fits_the_dtypes_rate():
    """A dtype whose products are slow gets a smaller matrix (ATen's emulated bf16 ran at
    0.3 GFLOP/s on an AVX2 EPYC); a fast one keeps the default; an explicit size is kept."""
    assert ceilings.fit_size(2048, probe_gflops=50.0) == 2048  # 0.34 s a product
    assert ceilings.fit_size(2048, probe_gflops=0.3) == 512  # 1024: 7.2 s, 512: 0.9 s
    assert ceilings.fit_size(2048, probe_gflops=1e-6) == ceilings.PROBE_SIZE
    assert ceilings.fit_size(100, probe_gflops=1e-6) == 100  # never below the probe, never up
    out = ceilings.measure(("float32",), "cpu", threads=1, copy_mib=1, repeats=1,
                           max_seconds=1e-9)
    assert out["matmul"]["float32"]["size"] == ceilings.PROBE_SIZE
    assert out["matmul"]["float32"]["gflops"] > 0


def test_rounds_pool_runs_ratios_and_table(tmp_path):
    def point(system, dtype, times):
        r = {"system": system, "mode": "infer", "dtype": dtype, "length": 100, "batch": 2}
        sweep._merge(r, {**r, "status": "ok", "times_s": times, "median_s": 0.0, "flops": 4e9,
                         "peak_mib": 10.0})
        return r

    ours = point("rmt_fast", "float32", [1.0, 2.0, 3.0])
    sweep._merge(ours, {**ours, "times_s": [4.0, 5.0], "peak_mib": 30.0})  # a second round
    assert ours["times_s"] == [1.0, 2.0, 3.0, 4.0, 5.0] and ours["rounds"] == 2
    assert ours["median_s"] == 3.0 and ours["peak_mib"] == 30.0
    assert ours["tokens_per_s_min"] == 200 / 5 and ours["tokens_per_s_max"] == 200 / 1
    assert ours["gflops"] == pytest.approx(4 / 3)
    peer = point("lucidrains", "float32", [6.0])
    ours16, peer16 = point("rmt_fast", "bfloat16", [1.0]), point("lucidrains", "bfloat16", [4.0])
    failed = {"system": "official", "mode": "infer", "dtype": "bfloat16", "length": 100,
              "batch": 2, "status": "not run: pass --official-rmt PATH"}
    rows = [ours, peer, ours16, peer16, failed]
    sweep._add_ratios(rows)
    sweep.add_ceiling_fractions(rows, {"gflops": {"float32": 2.0, "bfloat16": 8.0}})
    assert peer["ours_speedup"] == pytest.approx(2.0) and peer16["ours_speedup"] == 4.0
    assert ours16["vs_float32"] == pytest.approx(3.0) and "vs_float32" not in ours
    assert ours["frac_ceiling"] == pytest.approx(2 / 3) and ours16["frac_ceiling"] == 0.5
    md = sweep.markdown(rows)
    assert "| rmt_fast | 100 | 67 | 40-200 | 5 | 1.3 | 66.7% | 30 | 1.00x | 1.00x |" in md
    assert "| official | 100 | not run: pass --official-rmt PATH |" in md
    for block in md.split("### ")[1:]:  # failed rows have as many cells as measured ones
        assert len({ln.count("|") for ln in block.splitlines() if ln.startswith("|")}) == 1, block
    sweep.plot(rows, str(tmp_path / "p.png"))
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_quick_and_official_arguments(official_standin, monkeypatch):
    from rmt_fast import dtypes

    monkeypatch.setattr(dtypes, "cpu_has_native_bf16", lambda *a, **k: True)
    a = sweep.parse_args(["--quick"])
    assert a.lengths == list(sweep.QUICK_LENGTHS) and a.max_train_length == 4096
    assert a.repeats >= 3 and a.min_repeats == 3 and a.train_batch == 1 and a.time_budget <= 90
    assert a.dtypes == ["bfloat16"] and "official" not in a.systems
    monkeypatch.setattr(dtypes, "cpu_has_native_bf16", lambda *a, **k: False)
    b = sweep.parse_args(["--dtype", "auto", "bfloat16", "float32", "--official-rmt",
                          str(official_standin)])
    assert b.dtypes == ["float32", "bfloat16"] and b.systems[-1] == "official"
    assert b.official_rmt == str(official_standin.resolve()) and b.train_batch == 4
    assert b.lengths[0] == 1000 and b.lengths[-1] == 2_048_000
    with pytest.raises(SystemExit):
        sweep.parse_args(["--official-rmt", "/no/such/language_modeling.py"])
    with pytest.raises(SystemExit):
        sweep.parse_args(["--config", "gpt5"])


@pytest.mark.parametrize("system", ["lucidrains"])
def test_missing_peer_is_reported_not_fatal(system, monkeypatch):
    monkeypatch.setattr(sweep, "unavailable", lambda s, official_rmt=None, mode=None: "not installed")
    rows = sweep.sweep([system], ["infer"], [64], {"infer": 1, "train": 1}, 1, 60, 1e5, "tiny", 1,
                       progress=False)
    assert rows[0]["status"] == "not installed"


def test_stream_rate_reports_per_chunk_rates():
    from rmt_fast.bench import stream_rate

    out = stream_rate.run(chunks=3, chunk_tokens=64, config="tiny", fresh=1)
    assert len(out["stream_chunks"]) == 3 and len(out["fresh_before"]) == len(out["fresh_after"]) == 1
    assert all(r > 0 for r in out["stream_chunks"] + out["fresh_before"] + out["fresh_after"])
    assert out["first_tenth_mean"] > 0 and out["last_tenth_mean"] > 0


def test_armt_systems_run_agree_and_count_their_flops():
    """armt (sequential read) and armt_diagonal (grouped anti-diagonals) read the same model to
    the same final state; training is armt only; FLOPs are the [segment | memory] positions
    plus the associative read/write per layer."""
    cfg = systems.CONFIGS["tiny"]  # segment 32, memory 4, d 64, d_mem 64, 2 layers
    tokens = torch.randint(1, cfg.vocab, (2, 80))
    states = []
    for name in ("armt", "armt_diagonal"):
        model = systems._armt(cfg).eval()
        with torch.no_grad():
            state = (model.read(tokens) if name == "armt"
                     else model.diagonal()(tokens, return_logits=False).state)
        states.append(state)
        systems.build(name, "infer", cfg, 80)(tokens)  # the bench's own callables run too
    for a, b in zip(states[0].A, states[1].A, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
    systems.build("armt", "train", cfg, 80)(tokens)
    assert systems.unavailable("armt_diagonal", mode="train") == "inference only"
    with pytest.raises(ValueError, match="inference only"):
        systems.build("armt_diagonal", "train", cfg, 80)
    m = cfg.shape()
    body = sum(flops.matmul_forward_flops(p, m) + 2 * systems.armt_layer_flops(cfg, p)
               for p in (36, 36, 20))  # segments 32, 32, 16 + 4 memory rows
    assert systems.point_flops("armt", "infer", cfg, 80) == body
    d, dk = 64, 6 * 64
    assert systems.armt_layer_flops(cfg, 36) == (36 * (2 * d * 64 + 2 * dk * d + 2 * dk)
                                                 + 4 * (2 * d * 64 + 2 * d * d + 2 * d
                                                        + 4 * dk * d + 2 * dk))


@pytest.mark.skipif(not os.path.exists("/proc/self/clear_refs"), reason="needs Linux /proc")
def test_peak_rss_of_a_phase_is_its_own():
    from rmt_fast.bench.memory import peak_rss_mib, reset_peak_rss, rss_mib

    mib = 256
    big = torch.ones(mib * 2**18)  # 256 MiB of touched pages: resident
    high = peak_rss_mib()
    assert high >= rss_mib() >= mib
    del big
    assert reset_peak_rss()
    quiet = peak_rss_mib()
    assert quiet <= high - 0.9 * mib  # the earlier peak is gone: it was not this phase's
    phase = torch.ones(mib // 2 * 2**18)
    assert peak_rss_mib() >= quiet + 0.9 * mib / 2
    del phase


def test_scored_bench_runs_both_ways_and_they_agree(capsys):
    """``python -m rmt_fast.bench.scored`` on small cases (sinks, softcap): both ways timed,
    outputs agree."""
    from rmt_fast.bench import scored

    rows = scored.main(["--dtype", "float32", "--lengths", "48", "--rounds", "1"])
    assert [r["term"] for r in rows] == ["sinks", "softcap"]
    for r in rows:
        assert r["max_diff"] < 1e-5
        assert all(r[f"{w} {m}"] > 0 for w in ("exact", "fused") for m in ("fwd", "fwd+bwd"))
    out = capsys.readouterr().out
    assert "| sinks | float32 | 48 |" in out and "| softcap | float32 | 48 |" in out


def test_scored_bench_whole_models_differ_only_in_attention(capsys):
    """``--model``: a Gemma 2 and a gpt-oss, each eager and ``rmt_fast`` (same weights: logits
    agree, so the two really are the same model on two backends), both ways timed."""
    from rmt_fast.bench import scored

    rows = scored.main(["--model", "--dtype", "float32", "--lengths", "40", "--rounds", "1",
                        "--heads", "4", "--kv-heads", "2", "--dim", "16"])
    assert [r["term"] for r in rows] == ["sinks", "softcap"]
    for r in rows:
        assert 0 < r["max_diff"] < 1e-4  # 0 would mean both ran the same backend
        assert all(r[f"{w} {m}"] > 0 for w in ("exact", "fused") for m in ("fwd", "fwd+bwd"))


def test_windows_bench_runs_both_ways_and_they_agree(capsys):
    """``python -m rmt_fast.bench.windows`` on a small case: both ways timed, outputs agree."""
    from rmt_fast.bench import windows

    rows = windows.main(["--dtype", "float32", "--lengths", "80", "--windows", "7", "--rounds", "1"])
    assert len(rows) == 1 and rows[0]["max_diff"] < 1e-5
    assert all(rows[0][f"{w} {m}"] > 0 for w in ("dense", "fused") for m in ("fwd", "fwd+bwd"))
    assert "| float32 | 80 | 7 |" in capsys.readouterr().out


def test_elementwise_bench_runs_every_path_and_agrees(monkeypatch):
    """rmt_fast.bench.elementwise on tiny rows: a row per (kernel, dtype, shape, path this CPU
    runs), ATen and ours computing the same values; RMT_FAST_CPU_ISA restored."""
    import os

    from rmt_fast import _extension
    from rmt_fast.bench import elementwise
    from rmt_fast.ops.memory_attention import cpu_kernel

    if not (_extension.HAS_LAYER_NORM and _extension.HAS_CROSS_ENTROPY and cpu_kernel.HAS_CPU_KERNEL):
        pytest.skip("rmt_fast._C without the element-wise kernels")
    monkeypatch.setenv("RMT_FAST_CPU_ISA", "avx2")
    rows = elementwise.run(rounds=1, calls=1, scale=0.01)
    assert os.environ["RMT_FAST_CPU_ISA"] == "avx2"
    paths = {r["path"] for r in rows}
    assert "generic" in paths and paths <= set(elementwise.PATHS)
    per_path = len(elementwise.LAYER_NORM_SHAPES) + len(elementwise.CROSS_ENTROPY_SHAPES) + 1
    assert len(rows) == 2 * per_path * len(paths)
    for r in rows:
        assert r["aten_ms"] > 0 and r["ours_ms"] > 0
        tol = 1e-3 if r["dtype"] == "float32" else 0.1  # bf16 outputs; sums of ~20 rows
        assert r["max_diff"] <= tol * max(1.0, r["shape"][0]), r


def test_point_does_not_repeat_the_emulated_bf16_warning(monkeypatch):
    """``rmt-fast bench`` warns once (its parent) that bf16 is emulated on such a CPU; each point
    process does not say it again."""
    import warnings

    from rmt_fast import dtypes
    from rmt_fast.bench.point import run_point

    monkeypatch.setattr(dtypes.platform, "machine", lambda: "x86_64")
    monkeypatch.setattr(dtypes, "cpu_flags", lambda path="/proc/cpuinfo": frozenset({"avx2"}))
    with pytest.warns(RuntimeWarning, match="no native bf16"):  # the mock makes bf16 emulated
        dtypes.resolve_dtype("bfloat16", "cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        row = run_point("rmt_fast", "infer", 40, 1, repeats=1, warmup=0, config="tiny",
                        dtype="bfloat16")
    assert row["status"] == "ok" and row["dtype"] == "bfloat16"
