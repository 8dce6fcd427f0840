"""scripts/lm_xl_comparison.py: every row trains (with a resume) and is evaluated at tiny sizes;
settings are pinned per run; the measurement, plot and table modes work."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from helpers import load_script
from test_text_corpus import fake_stdlib

from rmt_fast.tasks.lm_eval import long_streams
from rmt_fast.tasks.text_corpus import BOS, load_corpus

torch.set_num_threads(1)
lm = load_script("lm_xl_comparison")

TINY = dict(layers=1, d_model=16, heads=2, d_inner=32, segment_size=8, segments=5, mem=2,
            batch_size=2, steps=2, warmup=1, eval_every=1, valid_windows=4, eval_batch_size=4,
            eval_lanes=3, eval_docs=4, amp=None, d_mem=4)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("lib")
    fake_stdlib(root, n=40)
    return load_corpus(tmp_path_factory.mktemp("cache"), stdlib=root, min_bytes=0)


@pytest.mark.parametrize("row", sorted(lm.ROWS))
def test_every_row_trains_and_evaluates(row, corpus, tmp_path):
    settings = lm.Settings(**TINY)
    result = lm.run_row(row, settings, str(tmp_path), corpus, log=lambda s: None)
    spec = lm.ROWS[row]
    assert result["step"] == 2
    assert result["test"]["num_mem_tokens"] == (2 if spec["mem"] else 0)
    assert result["test"]["xl_cache"] == spec["xl"] and result["test"]["mask"] == spec["mask"]
    for split in ("test", "valid"):
        r = result[split]
        n = min(4, len(corpus[split]))
        assert 0 < r["bits_per_byte"] < 9 and r["documents"] == n
        assert r["bytes"] == sum(len(corpus[split].document(i)) for i in range(n))
    d = 16
    if spec.get("model") == "armt":  # one layer's A [6 d_mem, d] and z [6 d_mem]
        assert result["test"]["state_floats"] == 6 * 4 * (d + 1)
    else:
        assert result["test"]["state_floats"] == (2 * d if spec["mem"] else 0) + spec["xl"] * 2 * d
    hist = [json.loads(line) for line in open(tmp_path / row / lm.LM_METRICS)]
    assert [h["step"] for h in hist] == [1, 2] and all(h["valid_bpb"] > 0 for h in hist)
    cfg = settings.row_model(row).rmt_config
    if spec.get("model") == "armt":
        assert cfg.correction == spec.get("correction", True)
        assert cfg.use_l2_norm == spec.get("l2", False)
        assert cfg.update_rule == spec.get("rule", "armt")
        assert cfg.state_decay == spec.get("decay", 1.0)
        assert cfg.decay_gate == spec.get("decay_gate", False)
    else:
        assert cfg.memory_noise == spec.get("noise", 0.0)
        assert cfg.xl_positions == spec.get("xl_positions", "before_memory")


def test_settings_are_pinned_and_a_finished_row_is_not_redone(corpus, tmp_path):
    settings = lm.Settings(**{**TINY, "steps": 3})
    first = lm.run_row("rmt-xl10", settings, str(tmp_path), corpus, log=lambda s: None)
    with pytest.raises(SystemExit, match="other settings"):  # another budget in the same run dir
        lm.run_row("rmt-xl10", lm.Settings(**{**TINY, "steps": 6}), str(tmp_path), corpus,
                   log=lambda s: None)
    again = lm.run_row("rmt-xl10", lm.Settings(**{**TINY, "steps": 3, "eval_lanes": 1}), str(tmp_path),
                       corpus, log=lambda s: None)
    assert again == first  # evaluation-only settings may change; nothing was retrained
    hist = [json.loads(line) for line in open(tmp_path / "rmt-xl10" / lm.LM_METRICS)]
    assert [h["step"] for h in hist] == [1, 2, 3]


def test_a_settings_file_from_before_arch_means_gpt2(tmp_path):
    settings = lm.Settings(**{**TINY, "arch": "gpt2", "d_mem": 32})
    old = {"row": "plain", **{k: v for k, v in vars(settings).items() if k not in lm.ADDED}}
    os.makedirs(tmp_path / "plain")
    with open(tmp_path / "plain" / lm.SETTINGS_NAME, "w") as f:
        json.dump(old, f)
    lm._check_settings(str(tmp_path / "plain"), settings, "plain")  # same run: accepted
    with pytest.raises(SystemExit, match=r"'arch': \('gpt2', 'llama'\)"):
        lm._check_settings(str(tmp_path / "plain"), lm.Settings(**{**TINY, "d_mem": 32}), "plain")


def _weights(run_dir):
    from rmt_fast.models import RMTForCausalLM

    return RMTForCausalLM.from_pretrained(os.path.join(run_dir, "checkpoint-4")).state_dict()


def test_interrupted_run_resumes_to_the_same_weights(corpus, tmp_path):
    import shutil

    settings = lm.Settings(**{**TINY, "steps": 4, "eval_every": 2, "lr": 1e-2})
    a = lm.run_row("rmt-d1", settings, str(tmp_path / "a"), corpus, log=lambda s: None)
    # killed during the second chunk: the step-2 checkpoint is the latest, logs run further
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "b" / "rmt-d1" / "checkpoint-4")
    os.remove(tmp_path / "b" / "rmt-d1" / lm.RESULT_NAME)
    b = lm.run_row("rmt-d1", settings, str(tmp_path / "b"), corpus, log=lambda s: None)
    wa, wb = _weights(tmp_path / "a" / "rmt-d1"), _weights(tmp_path / "b" / "rmt-d1")
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert b["test"]["bits_per_byte"] == a["test"]["bits_per_byte"]
    clocks = ("wall_time", "driver_seconds", "chunk_seconds", "valid_eval_seconds")
    strip = lambda run: [{k: v for k, v in json.loads(line).items() if k not in clocks}
                         for line in open(tmp_path / run / "rmt-d1" / lm.LM_METRICS)]
    assert strip("b") == strip("a")
    # another seed trains other weights (the comparison can fail)
    lm.run_row("rmt-d1", lm.Settings(**{**TINY, "steps": 4, "eval_every": 2, "lr": 1e-2, "seed": 1}),
               str(tmp_path / "c"), corpus, log=lambda s: None)
    wc = _weights(tmp_path / "c" / "rmt-d1")
    assert any(not torch.equal(wa[k], wc[k]) for k in wa)


def test_measure_one_plot_and_table(corpus, tmp_path, monkeypatch):
    settings = lm.Settings(**TINY)
    for ckpt in (False, True):
        rec = lm.measure_one("rmt-d4", settings, ckpt, steps=2, warmup=1, corpus_dir=corpus.directory)
        assert rec["tokens_per_step"] == 2 * 5 * 8 and rec["s_per_step_median"] > 0
        assert rec["peak_rss_mib"] > 0 and rec["checkpoint_segments"] is ckpt
        step_peak = rec["peak_rss_mib"] - rec["rss_before_mib"]
        assert rec["train_step_peak_mib"] == pytest.approx(step_peak, abs=0.2)
    for row in ("plain", "rmt-d2"):
        lm.run_row(row, settings, str(tmp_path), corpus, log=lambda s: None)
    png = tmp_path / "curves.png"
    lm.plot(str(png), str(tmp_path))
    assert png.stat().st_size > 1000
    text = lm.table(str(tmp_path))
    assert text.count("\n") == 3 and "| plain (first 4 documents only) | 0 | 0 | - | causal |" in text
    with pytest.raises(ValueError, match="row must be one of"):
        lm.run_row("nope", settings, str(tmp_path), corpus)
    # bits by position in the segment: they add up to the streamed total of the same documents
    saved = lm.positions(str(tmp_path), 4, corpus=corpus, log=lambda s: None)
    assert list(saved["rows"]) == ["plain", "rmt-d2"]
    for row, r in saved["rows"].items():
        result = json.load(open(tmp_path / row / lm.RESULT_NAME))
        assert r["step"] == 2 and r["bytes"] == result["test"]["bytes"] and len(r["by_position"]) == 8
        assert r["bits_per_byte"] == pytest.approx(result["test"]["bits_per_byte"], rel=1e-6)
        assert r["by_position"] == pytest.approx(result["test"]["bits_per_byte_by_position"], abs=2e-5)
        assert sum(r["index_bytes"].values()) == r["bytes"] and "0-0" in r["index_bands"]
    with monkeypatch.context() as m:  # kept, not redone: no model is even loaded
        m.setattr(lm, "_row_model", lambda *a: 1 / 0)
        assert lm.positions(str(tmp_path), 4, corpus=corpus, log=lambda s: 1 / 0) == saved
    lm.plot_positions(saved, str(tmp_path / "positions.png"))
    assert (tmp_path / "positions.png").stat().st_size > 1000
    assert lm.positions_table(saved).count("\n") == 3
    # long streams cut from the test split's [BOS] doc [BOS] doc ...: every byte in them scored
    # once, the bands add up to the total
    segs = min(40, len(corpus["test"].stream()) // (2 * 8))
    saved = lm.drift(str(tmp_path), 2, segs, corpus=corpus, log=lambda s: None)
    assert (saved["streams"], saved["segments"], list(saved["rows"])) == (2, segs, ["plain", "rmt-d2"])
    pieces = long_streams(corpus["test"], 2, segs * 8)
    for r in saved["rows"].values():
        assert r["bytes"] == sum(int((p != BOS).sum()) for p in pieces) == sum(r["band_bytes"].values())
        mean = sum(r["bands"][b] * n for b, n in r["band_bytes"].items()) / r["bytes"]
        assert mean == pytest.approx(r["bits_per_byte"], rel=1e-9)
        assert len(r["curve"]) == -(-segs // lm.DRIFT_WINDOW) and r["step"] == 2
    with monkeypatch.context() as m:
        m.setattr(lm, "_row_model", lambda *a: 1 / 0)
        assert lm.drift(str(tmp_path), 2, segs, corpus=corpus, log=lambda s: 1 / 0) == saved
    lm.plot_drift(saved, str(tmp_path / "drift.png"))
    assert (tmp_path / "drift.png").stat().st_size > 1000
    assert lm.drift_table(saved).count("\n") == 3


def test_armt_state_trace(corpus, tmp_path):
    """scripts/armt_state_trace.py on a tiny trained ARMT row: every regime, one record per
    segment; 'every' starts fresh (no read) every --every segments; with the correction off z
    sums every key (never smaller than the corrected z); JSON and plot written."""
    trace = load_script("armt_state_trace")
    lm.run_row("armt-d4", lm.Settings(**TINY), str(tmp_path), corpus, log=lambda s: None)
    png = tmp_path / "trace.png"
    saved = trace.main(["--out", str(tmp_path), "--row", "armt-d4", "--streams", "2", "--segments",
                        "12", "--every", "4", "--png", str(png)], corpus=corpus)
    assert set(saved["modes"]) == set(trace.MODES) and saved["correction"] is True
    for recs in saved["modes"].values():
        assert len(recs) == 12 and all(r["bytes"] > 0 and math.isfinite(r["bits"]) for r in recs)
        assert len(recs[0]["read_ratio"]) == 0 and all(len(r["read_ratio"]) == 1 for r in recs[1:4])
    every = saved["modes"]["every"]
    assert [len(every[t]["read_ratio"]) for t in (4, 5, 8, 9)] == [0, 1, 0, 1]
    assert every[:4] == saved["modes"]["carry"][:4]
    last = saved["modes"]["carry"][-1]["z"][0], saved["modes"]["carry-nocorr"][-1]["z"][0]
    assert last[1] >= last[0] > 0
    assert "0-7" in saved["bands"]["carry"]
    assert json.load(open(tmp_path / "armt-d4" / "state_trace.json"))["segments"] == 12
    assert png.stat().st_size > 0
    with pytest.raises(SystemExit, match="not an ARMT row"):
        lm.run_row("plain", lm.Settings(**TINY), str(tmp_path), corpus, log=lambda s: None)
        trace.main(["--out", str(tmp_path), "--row", "plain"], corpus=corpus)


def test_armt_lm_decays(corpus, tmp_path):
    """scripts/armt_lm_decays.py on a tiny trained row with a learnt decay: per layer, every
    segment's decay of every stream counted once, split by whether the segment holds a BOS
    (counted here from the streams); decays in (0, 1); a row without the gate is refused."""
    from rmt_fast.models.armt import AssociativeMemory

    probe = load_script("armt_lm_decays")
    settings = lm.Settings(**TINY)
    lm.run_row("armt-d4-delta-learnt", settings, str(tmp_path), corpus, log=lambda s: None)
    methods = AssociativeMemory.read, AssociativeMemory.write
    out = probe.main(["--out", str(tmp_path), "--row", "armt-d4-delta-learnt", "--streams", "2",
                      "--segments", "12", "--json", str(tmp_path / "d.json")], corpus=corpus)
    assert (AssociativeMemory.read, AssociativeMemory.write) == methods  # the tracing is undone
    S = settings.segment_size
    ids = torch.stack(long_streams(corpus["test"], 2, 12 * S)).reshape(2, 12, S)
    starts = int((ids == BOS).any(-1).sum())
    assert 0 < starts < 24  # the tiny corpus's documents are shorter than 12 segments
    assert len(out["layers"]) == settings.layers
    for layer in out["layers"]:
        assert layer["start"]["n"] == starts and layer["other"]["n"] == 24 - starts
        for part in ("start", "other"):
            assert 0 < layer[part]["min"] <= layer[part]["mean"] <= layer[part]["max"] < 1
    assert json.load(open(tmp_path / "d.json")) == out
    decays = torch.tensor([[0.1, 0.2], [0.3, 0.4]])  # [T=2, B=2]
    ids = torch.tensor([[1, 2, BOS, 3], [BOS, 1, 2, 3]])  # segment size 2: row 0's BOS in segment 1
    assert probe.split_by_document_start(decays, ids, 2) == {"start": [pytest.approx(0.2),
                                                                       pytest.approx(0.3)],
                                                             "other": [pytest.approx(0.1),
                                                                       pytest.approx(0.4)]}
    with pytest.raises(ValueError, match=r"ids must be \[B=2, T \* segment_size=4\]"):
        probe.split_by_document_start(decays, ids[:, :3], 2)
    lm.run_row("armt-d4-delta-decay", settings, str(tmp_path), corpus, log=lambda s: None)
    with pytest.raises(SystemExit):
        probe.main(["--out", str(tmp_path), "--row", "armt-d4-delta-decay"], corpus=corpus)
