"""scripts/armt_timing.py's ``delta`` mode at tiny sizes: it checks the UT form against the row
loop before timing and prints one row per write (no timing asserts)."""

from helpers import load_script


def test_delta_mode_smoke(capsys):
    timing = load_script("armt_timing")
    timing.main(["delta", "--batch", "2", "--d-model", "8", "--d-mem", "4", "--mems", "3", "5",
                 "--reps", "1"])
    out = capsys.readouterr().out
    rows = [ln for ln in out.splitlines() if ln.startswith("| 2 x ")]
    assert [r.split(" | ")[1] for r in rows] == ["one row at a time", "UT form"] * 2
    assert rows[0].startswith("| 2 x 3 x 4 x 8 |") and rows[2].startswith("| 2 x 5 x 4 x 8 |")


def test_delta_mode_catches_a_wrong_write(monkeypatch):
    """The script's own agreement check fails when the write is wrong."""
    import pytest

    from rmt_fast.ops import associative_memory as am

    real = am._delta_write
    monkeypatch.setattr(am, "_delta_write", lambda km, v, *a: real(km, 2 * v, *a))
    timing = load_script("armt_timing")
    with pytest.raises(AssertionError, match="UT form differs"):
        timing.main(["delta", "--batch", "2", "--d-model", "8", "--d-mem", "4", "--mems", "3",
                     "--reps", "1"])
