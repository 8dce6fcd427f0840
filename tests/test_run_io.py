"""Run directory robustness (rmt_fast/run_io.py): torn metrics lines, crash-safe appends, a full
disk during a checkpoint (simulated by monkeypatching the writers), corrupt trainer state."""

from __future__ import annotations

import errno
import json
import os

import pytest
import torch

from rmt_fast import run_io
from rmt_fast.tasks import make_task
from rmt_fast.train import build_model, latest_checkpoint, train

RECORDS = [{"step": 2, "loss": 1.5}, {"step": 4, "loss": 1.25, "valid_accuracy": 0.5}]


def _write(path, records):
    for r in records:
        run_io.append_jsonl(path, r)


def test_append_and_read_round_trip(tmp_path):
    path = tmp_path / "m.jsonl"
    _write(path, RECORDS)
    assert path.read_text() == "".join(json.dumps(r) + "\n" for r in RECORDS)
    assert run_io.read_jsonl(path) == RECORDS


@pytest.mark.parametrize("tail", [b'{"step": 6, "lo', b"\x00" * 37, b'{"step": 6}garbage\n', b"[1, 2]"])
def test_torn_last_line_is_dropped_with_a_warning(tmp_path, tail):
    path = tmp_path / "m.jsonl"
    _write(path, RECORDS)
    with open(path, "ab") as f:
        f.write(tail)
    if tail.strip(b"\x00"):
        with pytest.warns(RuntimeWarning, match=r"m\.jsonl:3: dropping a torn last line"):
            assert run_io.read_jsonl(path) == RECORDS
    else:  # NUL bytes (a power loss) count as nothing written
        assert run_io.read_jsonl(path) == RECORDS


@pytest.mark.parametrize("bad", ['{"step": 3, "lo', "[1]", "\udcff"])
def test_corruption_before_the_last_line_names_file_and_line(tmp_path, bad):
    path = tmp_path / "m.jsonl"
    path.write_bytes((json.dumps(RECORDS[0]) + "\n" + bad + "\n" + json.dumps(RECORDS[1]) + "\n")
                     .encode("utf-8", "surrogateescape"))
    with pytest.raises(ValueError, match=r"m\.jsonl:2: corrupt line"):
        run_io.read_jsonl(path)


def test_append_cut_by_a_kill_or_full_disk_keeps_earlier_lines(tmp_path, monkeypatch):
    path = tmp_path / "m.jsonl"
    _write(path, RECORDS)
    real_write = os.write

    def half_then_enospc(fd, data):
        real_write(fd, bytes(data[: len(data) // 2]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "write", half_then_enospc)
    with pytest.raises(OSError, match=r"No space left on device: appending to .*m\.jsonl") as info:
        run_io.append_jsonl(path, {"step": 6, "loss": 1.0})
    assert info.value.errno == errno.ENOSPC
    monkeypatch.setattr(os, "write", real_write)
    with pytest.warns(RuntimeWarning, match="torn last line"):
        kept = run_io.read_jsonl(path)
    assert kept == RECORDS
    run_io.rewrite_jsonl(path, kept)  # what a resume does before appending again
    run_io.append_jsonl(path, {"step": 6})
    assert run_io.read_jsonl(path) == [*RECORDS, {"step": 6}]


def test_rewrite_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "m.jsonl"
    _write(path, RECORDS)
    before = path.read_bytes()

    def fail(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(OSError, match=r"rewriting .*m\.jsonl"):
        run_io.rewrite_jsonl(path, [{"step": 1}])
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.jsonl"]  # the temporary file is gone


# --- a full disk while writing a checkpoint --------------------------------------------------------
TORCH_ENOSPC = RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 1280 vs 1174")


@pytest.mark.parametrize("exc,free", [
    (OSError(errno.ENOSPC, "No space left on device"), 1 << 40),
    (RuntimeError("Error while writing: No space left on device (os error 28)"), 1 << 40),
    (TORCH_ENOSPC, 1000),  # torch's zip writer gives no errno: the free space decides
])
def test_checkpoint_errors_reports_no_space(tmp_path, monkeypatch, exc, free):
    monkeypatch.setattr(run_io, "free_bytes", lambda path: free)
    final = tmp_path / "checkpoint-4"
    (tmp_path / "checkpoint-4.tmp").mkdir()
    (tmp_path / "checkpoint-4.tmp" / "partial").write_bytes(b"x" * 100)
    with pytest.raises(OSError, match=r"No space left on device while writing checkpoint .*checkpoint-4 "
                                      r"\(.*earlier checkpoints are kept") as info:
        with run_io.checkpoint_errors(final):
            raise exc
    assert info.value.errno == errno.ENOSPC and info.value.__cause__ is exc
    assert not (tmp_path / "checkpoint-4.tmp").exists()


def test_checkpoint_errors_leave_other_errors_alone(tmp_path, monkeypatch):
    monkeypatch.setattr(run_io, "free_bytes", lambda path: 1 << 40)
    for exc in (TORCH_ENOSPC, RuntimeError("some other failure"), PermissionError(13, "denied")):
        # with plenty of free space, a zip-writer error is not called a full disk
        with pytest.raises(type(exc)) as info:
            with run_io.checkpoint_errors(tmp_path / "checkpoint-1"):
                raise exc
        assert info.value is exc
    with pytest.raises(KeyError):  # not a write error at all
        with run_io.checkpoint_errors(tmp_path / "checkpoint-1"):
            raise KeyError("x")


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04truncated", b"\x80\x02}q\x00."])
def test_corrupt_trainer_state_names_the_file(tmp_path, content):
    path = tmp_path / "trainer_state.pt"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=r"trainer_state\.pt: cannot read a torch file"):
        run_io.load_torch(path)


# --- through train() -------------------------------------------------------------------------------
SMALL = dict(train_size=200, valid_size=32, test_size=0)


def _tiny(task):
    return build_model(task.vocab_size, task.segment_size, 2, layers=1, d_model=16, heads=2, d_inner=32,
                       seed=0)


def test_train_full_disk_keeps_earlier_checkpoints_and_resumes(tmp_path, monkeypatch):
    task = make_task("copy", 8, copies=1, **SMALL)
    kw = dict(segments=2, batch_size=4, eval_every=2, eval_size=8, log_every=1, save_every=2,
              keep_checkpoints=3, progress=False, output_dir=tmp_path)
    train(_tiny(task), task, 2, **kw)
    assert latest_checkpoint(tmp_path).endswith("checkpoint-2")
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):  # the trainer state is the last file of a checkpoint
        real_save(obj, f, *args, **kwargs)
        raise TORCH_ENOSPC

    monkeypatch.setattr(torch, "save", full_disk)
    monkeypatch.setattr(run_io, "free_bytes", lambda path: 0)
    with pytest.raises(OSError, match=r"No space left on device while writing checkpoint .*checkpoint-4"):
        train(_tiny(task), task, 4, **kw)
    monkeypatch.undo()
    assert sorted(n for n in os.listdir(tmp_path) if n.startswith("checkpoint")) == ["checkpoint-2"]
    type(_tiny(task)).from_pretrained(tmp_path / "checkpoint-2")  # still verified and loadable
    # the metrics of the failed run end in a torn line (the disk filled mid-append): resume anyway
    with open(tmp_path / "metrics.jsonl", "ab") as f:
        f.write(b'{"step": 5, "lo')
    with pytest.warns(RuntimeWarning, match=r"metrics\.jsonl:\d+: dropping a torn last line"):
        res = train(_tiny(task), task, 4, **kw)
    assert res.step == 4
    steps = [r["step"] for r in run_io.read_jsonl(tmp_path / "metrics.jsonl")]
    assert steps == [1, 2, 3, 4]


def test_train_refuses_metrics_corrupted_in_the_middle(tmp_path):
    task = make_task("copy", 8, copies=1, **SMALL)
    kw = dict(segments=1, batch_size=4, eval_every=2, eval_size=8, log_every=1, save_every=2,
              progress=False, output_dir=tmp_path)
    train(_tiny(task), task, 2, **kw)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    lines[0] = lines[0][:10]
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(ValueError, match=r"metrics\.jsonl:1: corrupt line"):
        train(_tiny(task), task, 4, **kw)
    assert sorted(os.listdir(tmp_path)) == before
