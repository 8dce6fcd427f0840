"""Tasks for training RMTs: the paper's algorithmic tasks, BABILong-style QA and a needle task.

:class:`Task` ties a data generator to a fixed ``segment_size``: ``task.splits(n)`` returns the
train/valid/test data of sequences of exactly ``n * segment_size`` tokens, which is what the
segment curriculum of :func:`rmt_fast.train.train` grows. :func:`make_task` builds one by name.
"""

from __future__ import annotations

from collections.abc import Callable

from rmt_fast.tasks.algorithmic import (
    NUM_STEPS,
    QUADRATIC_VOCAB,
    RETRIEVAL_VOCAB,
    STEP_LEN,
    Splits,
    TaskData,
    copy_task,
    make_splits,
    quadratic_task,
    retrieval_task,
    reverse_task,
    sequence_accuracy,
    token_accuracy,
)
from rmt_fast.tasks.babilong import (
    Vocab,
    babilong_task,
    default_vocab,
    load_babilong,
    needle_task,
)


class Task:
    """A task of sequences ``num_segments * segment_size`` tokens long.

    Args:
        name: a label (``copy``, ``needle``, ...).
        segment_size: tokens per segment ``S``.
        vocab_size: token ids are in ``[0, vocab_size)``.
        build: ``build(length)`` -> :data:`Splits` for sequences of ``length`` tokens; it raises
            ``ValueError`` when the task has no sequences of that length.
        vocab: the word vocabulary of text tasks (saved with checkpoints), else None.
    """

    def __init__(self, name: str, segment_size: int, vocab_size: int, build: Callable[[int], Splits],
                 vocab: Vocab | None = None):
        if not isinstance(segment_size, int) or segment_size < 1:
            raise ValueError(f"segment_size must be an int >= 1, got {segment_size!r}")
        self.name, self.segment_size, self.vocab_size = name, segment_size, vocab_size
        self.vocab = vocab
        self._build = build
        self._cache: dict[int, Splits] = {}

    def splits(self, num_segments: int) -> Splits:
        """``{"train", "valid", "test"}`` -> :class:`TaskData` with ``T = num_segments * S``
        (generated once, then cached)."""
        if not isinstance(num_segments, int) or num_segments < 1:
            raise ValueError(f"num_segments must be an int >= 1, got {num_segments!r}")
        if num_segments not in self._cache:
            try:
                self._cache[num_segments] = self._build(num_segments * self.segment_size)
            except ValueError as exc:
                raise ValueError(f"task {self.name!r} cannot make {num_segments} segments of "
                                 f"{self.segment_size} tokens: {exc}") from exc
        return self._cache[num_segments]

    def __repr__(self) -> str:
        return f"Task({self.name!r}, segment_size={self.segment_size}, vocab_size={self.vocab_size})"


TASKS = ("copy", "reverse", "retrieval", "quadratic", "qa1", "qa2", "needle", "babilong-file")


def make_task(name: str, segment_size: int, *, seed: int = 0, train_size: int = 10_000,
              valid_size: int = 1_000, test_size: int = 1_000, num_tokens: int = 10, copies: int = 2,
              num_pairs: int = 4, pairs_fit: bool = False, num_facts: int = 4,
              fact_within: int | None = None, path: str | None = None) -> Task:
    """Build a :class:`Task` by name (one of :data:`TASKS`).

    * ``copy``: ``length = src_len * (1 + copies)`` must divide evenly (72 = 24 + 48 for the
      paper's copy, 6x12); ``reverse``: even lengths; symbols ``2..num_tokens-1``.
    * ``retrieval``: ``num_pairs`` pairs, left-padded to the length (>= ``2 * num_pairs + 2``);
      with ``pairs_fit``, shorter lengths hold as many pairs as fit (``K = length // 2 - 1``), so
      that a curriculum over segments is one over pairs (16 pairs in segments of 6: 2, 5, 8, 11,
      14, 16 pairs at 1-6 segments).
    * ``quadratic``: only ``length == 180`` (6 steps of 30).
    * ``qa1`` / ``qa2`` / ``needle``: any length that fits the facts (``fact_within``: needle
      fact position bound, default ``segment_size``).
    * ``babilong-file``: the file at ``path`` padded to the length (see :func:`load_babilong`);
      all three splits are the file's records (use separate files for a real evaluation).
    """
    sizes = dict(seed=seed, train_size=train_size, valid_size=valid_size, test_size=test_size)
    if name in ("copy", "reverse"):
        parts = 1 + copies if name == "copy" else 2

        def build(length: int) -> Splits:
            if length % parts:
                raise ValueError(f"{name} needs a length divisible by {parts}, got {length}")
            if name == "copy":
                return copy_task(length // parts, copies, num_tokens, **sizes)
            return reverse_task(length // parts, num_tokens, **sizes)

        return Task(name, segment_size, num_tokens, build)
    if name == "retrieval":
        def build_retrieval(length: int) -> Splits:
            if pairs_fit and length < 4:
                raise ValueError(f"retrieval with pairs_fit needs a length >= 4 (a pair and the query), "
                                 f"got {length}")
            pairs = min(num_pairs, length // 2 - 1) if pairs_fit else num_pairs
            return retrieval_task(pairs, length, **sizes)

        return Task(name, segment_size, RETRIEVAL_VOCAB, build_retrieval)
    if name == "quadratic":

        def build_quadratic(length: int) -> Splits:
            if length != NUM_STEPS * STEP_LEN:
                raise ValueError(f"quadratic sequences are {NUM_STEPS * STEP_LEN} tokens, got {length}")
            return quadratic_task(**sizes)

        return Task(name, segment_size, QUADRATIC_VOCAB, build_quadratic)
    if name in ("qa1", "qa2", "needle"):
        vocab = default_vocab()
        if name == "needle":
            within = segment_size if fact_within is None else fact_within
            build = lambda length: needle_task(length, within, vocab=vocab, **sizes)
        else:
            build = lambda length: babilong_task(name, length, num_facts, vocab=vocab, **sizes)
        return Task(name, segment_size, len(vocab), build, vocab)
    if name == "babilong-file":
        if path is None:
            raise ValueError("task 'babilong-file' needs path= (a BABILong .json/.jsonl file)")
        _, vocab = load_babilong(path)

        def build_file(length: int) -> Splits:
            data, _ = load_babilong(path, vocab=vocab, length=length)
            return {"train": data, "valid": data, "test": data}

        return Task(name, segment_size, len(vocab), build_file, vocab)
    raise ValueError(f"unknown task {name!r}; expected one of {TASKS}")


__all__ = ["TASKS", "QUADRATIC_VOCAB", "RETRIEVAL_VOCAB", "Splits", "Task", "TaskData", "Vocab",
           "babilong_task", "copy_task", "default_vocab", "load_babilong", "make_splits", "make_task",
           "needle_task", "quadratic_task", "retrieval_task", "reverse_task", "sequence_accuracy",
           "token_accuracy"]
