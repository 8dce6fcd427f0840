"""Crash-safe files of a training run: metrics lines a kill cannot corrupt, a torn last line that
does not block a resume, and "no space left on device" said as such when a checkpoint write fails.

* :func:`append_jsonl`: one ``os.write`` of the whole line to an ``O_APPEND`` descriptor, then
  ``fsync``: a kill or a full disk can only cut the line being written, never an earlier one.
* :func:`read_jsonl`: a malformed *last* line (cut by a kill or a full disk, or NUL bytes after a
  power loss) is dropped with a warning; a malformed line anywhere else is an error naming the
  file and the line number (that is corruption, not an interrupted append).
* :func:`rewrite_jsonl`: the whole file replaced atomically (temporary file, fsync, rename).
* :func:`checkpoint_errors`: a failed checkpoint write (``torch.save``'s ``inline_container``
  errors, safetensors, transformers) becomes ``OSError(ENOSPC, "No space left on device ...
  <path>")`` when the disk is full; the partial ``<path>.tmp`` is removed, earlier checkpoints are
  untouched.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import warnings
from collections.abc import Iterator

#: a failed write with less free space than this on the target filesystem is reported as a full disk
LOW_SPACE_BYTES = 64 << 20


def append_jsonl(path: str | os.PathLike, record: dict) -> None:
    """Append ``record`` as one JSON line, durably (see the module docstring)."""
    path = os.fspath(path)
    data = (json.dumps(record) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:  # a regular file takes it in one write; loop only on a short write
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    except OSError as exc:
        raise OSError(exc.errno, f"{exc.strerror}: appending to {path}") from exc
    finally:
        os.close(fd)


def read_jsonl(path: str | os.PathLike) -> list[dict]:
    """The JSON objects of ``path``, one a line (blank lines skipped). A malformed last line is
    dropped with a warning; any other malformed line raises a ValueError ``"<path>:<line>: ..."``."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    numbered = [(i + 1, line) for i, line in enumerate(lines) if line.strip(b" \t\r\x00")]
    records = []
    for k, (lineno, line) in enumerate(numbered):
        try:
            record = json.loads(line.decode("utf-8"))
            if not isinstance(record, dict):
                raise ValueError(f"expected a JSON object, got {type(record).__name__}")
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            if k == len(numbered) - 1:
                warnings.warn(f"{path}:{lineno}: dropping a torn last line ({len(line)} bytes; an "
                              f"append cut by a kill or a full disk)", RuntimeWarning, stacklevel=2)
                break
            raise ValueError(f"{path}:{lineno}: corrupt line ({exc}); only the last line of a JSON-lines "
                             f"file can be cut by an interrupted append, so this file was damaged "
                             f"otherwise") from exc
        records.append(record)
    return records


def _fsync_dir(directory: str) -> None:
    with contextlib.suppress(OSError):  # not every platform/filesystem can fsync a directory
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def rewrite_jsonl(path: str | os.PathLike, records: list[dict]) -> None:
    """Replace ``path`` with ``records``, one JSON line each, atomically."""
    path = os.fspath(path)
    tmp = path + ".tmp"
    try:
        with open(tmp, "w") as f:
            f.writelines(json.dumps(r) + "\n" for r in records)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as exc:
        with contextlib.suppress(OSError):
            os.remove(tmp)
        raise OSError(exc.errno, f"{exc.strerror}: rewriting {path}") from exc
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def is_no_space(exc: BaseException, path: str | os.PathLike | None = None) -> bool:
    """Whether ``exc`` (or an exception it chains) is a full disk: ``errno.ENOSPC``/``EDQUOT``, the
    message says so, or (``path`` given) the filesystem of ``path`` has under
    :data:`LOW_SPACE_BYTES` free after the failure (torch's zip writer reports a full disk as
    ``inline_container.cc ... file write failed`` or ``unexpected pos``, without an errno)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(exc).lower()
        if "no space left" in text or "enospc" in text or "disk quota exceeded" in text:
            return True
        exc = exc.__cause__ or exc.__context__
    return path is not None and free_bytes(path) < LOW_SPACE_BYTES


def free_bytes(path: str | os.PathLike) -> int:
    """Free bytes on the filesystem holding ``path`` (or its nearest existing parent)."""
    path = os.path.abspath(os.fspath(path))
    while not os.path.exists(path) and os.path.dirname(path) != path:
        path = os.path.dirname(path)
    return shutil.disk_usage(path).free


@contextlib.contextmanager
def checkpoint_errors(path: str | os.PathLike, cleanup: str | os.PathLike | None = None) -> Iterator[None]:
    """Around writing checkpoint ``path``: on an OSError/RuntimeError from the writers, remove the
    partial ``cleanup`` directory (default ``<path>.tmp``) and, when the disk is full, raise
    ``OSError(ENOSPC, "No space left on device while writing checkpoint <path> ...")``; other
    errors propagate unchanged."""
    path = os.fspath(path)
    cleanup = path + ".tmp" if cleanup is None else os.fspath(cleanup)
    try:
        yield
    except (OSError, RuntimeError) as exc:
        shutil.rmtree(cleanup, ignore_errors=True)  # frees the space the partial write took
        if is_no_space(exc, path):
            raise OSError(errno.ENOSPC, f"No space left on device while writing checkpoint {path} "
                                        f"({free_bytes(path)} bytes free; earlier checkpoints are kept; "
                                        f"the writer said: {exc})") from exc
        raise


def load_torch(path: str | os.PathLike, **kwargs):
    """``torch.load(path, weights_only=True)`` whose errors name the file (empty, truncated,
    corrupted)."""
    import torch

    from rmt_fast.manifest import reading

    with reading(path, "a torch file"):
        return torch.load(os.fspath(path), weights_only=True, **kwargs)
