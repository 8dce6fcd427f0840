"""scripts/armt_summary.py: runs gathered by label, seeds, the table's counts, clear errors."""

import json
import os

import pytest

from tests.helpers import load_script

summary = load_script("armt_summary")


def _file(tmp_path, name, runs, segment_size=32):
    path = tmp_path / name
    path.write_text(json.dumps({"task": "qa1", "segment_size": segment_size, "runs": {
        label: [{"segments": n, "samples": t, "accuracy": c / t} for n, (c, t) in rows.items()]
        for label, rows in runs.items()}}))
    return str(path)


def test_seed_of():
    assert summary.seed_of("ARMT (L2, delta rule, trained to 32 mixed, seed 12)") == 12
    assert summary.seed_of("ARMT (L2, trained to 32 mixed)") == 0


def test_table_and_plot_from_merged_files(tmp_path):
    a = _file(tmp_path, "a.json", {"RMT (seed 1)": {1024: (64, 64), 31250: (15, 16)},
                                   "delta (seed 0)": {1024: (60, 64), 31250: (3, 16)}})
    # a merged file repeats a run with the same numbers and adds others
    b = _file(tmp_path, "b.json", {"delta (seed 0)": {1024: (60, 64)},
                                   "delta (seed 2)": {1024: (32, 64), 31250: (9, 16)},
                                   "RMT": {1024: (63, 64)}})
    out = tmp_path / "out"
    got = summary.main([a, b, "--group", "RMT=^RMT", "--group", "delta=^delta",
                        "--segments", "1024", "31250", "--out", str(out)])
    assert got == {"RMT": {0: {1024: (63, 64)}, 1: {1024: (64, 64), 31250: (15, 16)}},
                   "delta": {0: {1024: (60, 64), 31250: (3, 16)}, 2: {1024: (32, 64), 31250: (9, 16)}}}
    md = (out / "summary.md").read_text().splitlines()
    assert md[2] == "| RMT | 0 / 1 | 63/64 / 64/64 (mean 0.99) | - / 15/16 (mean 0.94) |"
    assert md[3] == "| delta | 0 / 2 | 60/64 / 32/64 (mean 0.72) | 3/16 / 9/16 (mean 0.38) |"
    assert os.path.getsize(out / "summary.png") > 10_000


def test_errors(tmp_path):
    a = _file(tmp_path, "a.json", {"delta (seed 0)": {1024: (60, 64)}})
    b = _file(tmp_path, "b.json", {"delta (seed 0)": {1024: (61, 64)}})
    with pytest.raises(ValueError, match="other numbers"):
        summary.load_runs([a, b])
    runs, size = summary.load_runs([a, _file(tmp_path, "c.json", {"delta, seed 0": {1024: (1, 64)}})])
    assert size == 32
    with pytest.raises(ValueError, match="two runs of seed 0"):
        summary.gather(runs, [("delta", "delta")], [1024])
    with pytest.raises(ValueError, match="no run label matches"):
        summary.gather(runs, [("RMT", "^RMT")], [1024])
    other = _file(tmp_path, "d.json", {"RMT": {1024: (1, 64)}}, segment_size=64)
    with pytest.raises(ValueError, match="different segment sizes"):
        summary.load_runs([a, other])
    with pytest.raises(SystemExit):
        summary.main([a, other, "--group", "delta=delta", "--out", str(tmp_path / "o")])
    with pytest.raises(SystemExit):
        summary.main([a, "--group", "delta", "--out", str(tmp_path / "o")])
