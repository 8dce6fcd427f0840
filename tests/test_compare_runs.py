"""scripts/compare_runs.py: runs scored now and runs kept from an earlier output, side by side."""

from __future__ import annotations

import json

from helpers import load_script

compare_runs = load_script("compare_runs")


def _run(tmp_path, name, accs):
    path = tmp_path / name
    path.mkdir()
    with open(path / "metrics.jsonl", "w") as f:
        for i, acc in enumerate(accs):
            f.write(json.dumps({"step": 100 * (i + 1), "wall_time": 10.0 * (i + 1),
                                "valid_accuracy": acc}) + "\n")
            f.write(json.dumps({"step": 100 * (i + 1) + 1, "loss": 1.0}) + "\n")
    return str(path)


def test_keep_adds_earlier_runs_and_rescores_named_ones(tmp_path, monkeypatch):
    scored = []

    def fake_eval(path, split, dtype):
        scored.append(path)
        return {"step": 300, "train_wall_time": 30.0, "accuracy": 0.25 + len(scored) / 10,
                "samples": 1000}

    monkeypatch.setattr(compare_runs, "evaluate_run", fake_eval)
    a, b = _run(tmp_path, "a", [0.1, 0.5, 0.4]), _run(tmp_path, "b", [0.2, 0.3, 0.6])
    first = compare_runs.main(["--runs", f"A={a}", f"B={b}", "--out", str(tmp_path / "first")])
    assert [r["test"]["accuracy"] for r in first["runs"].values()] == [0.35, 0.45]
    assert first["runs"]["A"]["valid"] == [[100, 10.0, 0.1], [200, 20.0, 0.5], [300, 30.0, 0.4]]
    c = _run(tmp_path, "c", [0.9])
    second = compare_runs.main(["--runs", f"C={c}", f"B={b}", "--out", str(tmp_path / "second"),
                                "--keep", str(tmp_path / "first.json")])
    assert list(second["runs"]) == ["A", "C", "B"]
    assert second["runs"]["A"] == first["runs"]["A"]  # kept as scored then, not re-run
    assert scored == [a, b, c, b]
    md = (tmp_path / "second.md").read_text()
    assert "| A | 300 |" in md and "**0.550**" in md and "**0.650**" in md
    assert (tmp_path / "second.png").stat().st_size > 1000
