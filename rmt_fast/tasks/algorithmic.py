"""Algorithmic tasks of the RMT paper (NeurIPS 2022): copy, reverse, associative retrieval and
step-by-step quadratic equations, as fixed-length token sequences for a decoder RMT.

Every generator is deterministic given ``seed``, produces unique samples (no sequence appears
twice) and disjoint ``train`` / ``valid`` / ``test`` splits, as the official code does (draw,
drop duplicates, cut into splits). A split is a :class:`TaskData`: ``input_ids [N, T]`` and
``labels_mask [N, T]`` (True at the positions that *predict* a target token, i.e. position
``p`` is selected when ``input_ids[p + 1]`` is a target: the loss convention of
:class:`rmt_fast.models.RMTForCausalLM`).

Formats (id 0 is padding everywhere):

* **copy** (``num_tokens=10``: symbols are ids ``2..9``, 8 symbols, vocabulary 10 as in the
  paper's ``ntokens=10``): ``source (L) + source * copies``. The official code feeds
  ``source + [start=1] + target`` shifted by one; here the start token is dropped and the last
  source token predicts the first target token, so the paper's 24-token copy is exactly
  ``24 + 48 = 72`` tokens (3x24, 6x12, 9x8 segments) with 48 targets.
* **reverse**: ``source (L) + reversed(source)``; 24 tokens -> 48 (2x24, 4x12, 6x8).
* **associative retrieval**: ``l1 d1 l2 d2 ... lK dK q a`` with K distinct letters (ids
  ``11..36`` = ``a..z``), digits ``0..9`` as ids ``1..10`` (digit ``d`` -> id ``d + 1``, so no
  digit collides with padding), ``q`` one of the K letters and ``a`` its digit; vocabulary 37.
  K=4 gives 10 tokens; ``length`` left-pads with id 0 (e.g. to 12 for 4x3 or 3x4 segments).
* **quadratic equations** (character level, see :func:`quadratic_task`): 6 steps of 30 tokens.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

PAD_ID = 0
START_ID = 1
SPLITS = ("train", "valid", "test")


@dataclass
class TaskData:
    """One split: ``input_ids`` ``[N, T]`` long and ``labels_mask`` ``[N, T]`` bool (True where
    position ``p`` predicts the target token ``input_ids[p + 1]``)."""

    input_ids: torch.Tensor
    labels_mask: torch.Tensor

    def __post_init__(self) -> None:
        if self.input_ids.dim() != 2 or self.input_ids.shape != self.labels_mask.shape:
            raise ValueError(f"input_ids and labels_mask must both be [N, T], got "
                             f"{list(self.input_ids.shape)} and {list(self.labels_mask.shape)}")

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index) -> TaskData:
        ids, mask = self.input_ids[index], self.labels_mask[index]
        if ids.dim() == 1:
            ids, mask = ids[None], mask[None]
        return TaskData(ids, mask)

    @property
    def length(self) -> int:
        """Tokens per sample ``T``."""
        return self.input_ids.shape[1]


Splits = dict[str, TaskData]


def _check_int(name: str, value, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def make_splits(sample: Callable[[random.Random], tuple[list[int], list[bool]]], *, seed: int,
                train_size: int, valid_size: int, test_size: int, name: str = "task") -> Splits:
    """Draw unique samples with ``sample(rng)`` -> ``(ids, labels_mask)`` (equal-length lists)
    and cut them, in drawing order, into disjoint ``train``/``valid``/``test`` splits.

    Raises ``ValueError`` when the task has too few distinct samples for the requested sizes.
    """
    sizes = {"train": train_size, "valid": valid_size, "test": test_size}
    for split, size in sizes.items():
        _check_int(f"{split}_size", size, 0)
    total = sum(sizes.values())
    rng = random.Random(seed)
    seen: set[tuple[int, ...]] = set()
    rows: list[list[int]] = []
    masks: list[list[bool]] = []
    tries, max_tries = 0, 20 * total + 1000
    while len(rows) < total:
        tries += 1
        if tries > max_tries:
            raise ValueError(f"{name}: found only {len(rows)} distinct samples after {max_tries} draws, "
                             f"but train_size + valid_size + test_size = {total}; lower the sizes "
                             "or make the task larger")
        ids, mask = sample(rng)
        key = tuple(ids)
        if key in seen:
            continue
        seen.add(key)
        rows.append(ids)
        masks.append(mask)
    ids_t = torch.tensor(rows, dtype=torch.long).reshape(total, -1)
    mask_t = torch.tensor(masks, dtype=torch.bool).reshape(total, -1)
    out, start = {}, 0
    for split in SPLITS:
        end = start + sizes[split]
        out[split] = TaskData(ids_t[start:end], mask_t[start:end])
        start = end
    return out


def _target_mask(length: int, first_target: int, last_target: int | None = None) -> list[bool]:
    """Positions predicting targets ``first_target..last_target`` (inclusive, default: the end)."""
    last = length - 1 if last_target is None else last_target
    return [first_target - 1 <= p <= last - 1 for p in range(length)]


def copy_task(src_len: int = 24, copies: int = 2, num_tokens: int = 10, *, seed: int = 0,
              train_size: int = 10_000, valid_size: int = 1_000, test_size: int = 2_000) -> Splits:
    """Copy: ``source (src_len) + source * copies``, symbols ids ``2..num_tokens-1``.

    Length ``T = src_len * (1 + copies)``; targets are the ``src_len * copies`` copied tokens.
    """
    _check_int("src_len", src_len, 1)
    _check_int("copies", copies, 1)
    _check_int("num_tokens", num_tokens, 3)
    length = src_len * (1 + copies)
    mask = _target_mask(length, src_len)

    def sample(rng: random.Random):
        src = rng.choices(range(2, num_tokens), k=src_len)
        return src * (1 + copies), mask

    return make_splits(sample, seed=seed, train_size=train_size, valid_size=valid_size,
                       test_size=test_size, name="copy")


def reverse_task(src_len: int = 24, num_tokens: int = 10, *, seed: int = 0, train_size: int = 10_000,
                 valid_size: int = 1_000, test_size: int = 2_000) -> Splits:
    """Reverse: ``source (src_len) + reversed(source)``; length ``2 * src_len``."""
    _check_int("src_len", src_len, 1)
    _check_int("num_tokens", num_tokens, 3)
    length = 2 * src_len
    mask = _target_mask(length, src_len)

    def sample(rng: random.Random):
        src = rng.choices(range(2, num_tokens), k=src_len)
        return src + src[::-1], mask

    return make_splits(sample, seed=seed, train_size=train_size, valid_size=valid_size,
                       test_size=test_size, name="reverse")


LETTER_IDS = range(11, 37)  # a..z
RETRIEVAL_VOCAB = 37


def digit_id(d: int) -> int:
    """Retrieval digit ``d`` (0..9) -> token id ``d + 1``."""
    return d + 1


def retrieval_task(num_pairs: int = 4, length: int | None = None, *, seed: int = 0,
                   train_size: int = 10_000, valid_size: int = 1_000, test_size: int = 2_000) -> Splits:
    """Associative retrieval: ``l1 d1 ... lK dK q a`` left-padded with id 0 to ``length``
    (default ``2K + 2``). One target per sample: the answer ``a`` (last position)."""
    _check_int("num_pairs", num_pairs, 1)
    if num_pairs > len(LETTER_IDS):
        raise ValueError(f"num_pairs must be <= {len(LETTER_IDS)} (distinct letters), got {num_pairs}")
    need = 2 * num_pairs + 2
    length = need if length is None else length
    _check_int("length", length, need)
    pad = length - need
    mask = _target_mask(length, length - 1)

    def sample(rng: random.Random):
        letters = rng.sample(LETTER_IDS, num_pairs)
        digits = [digit_id(rng.randrange(10)) for _ in range(num_pairs)]
        q = rng.randrange(num_pairs)
        body = [t for pair in zip(letters, digits, strict=True) for t in pair]
        return [PAD_ID] * pad + body + [letters[q], digits[q]], mask

    return make_splits(sample, seed=seed, train_size=train_size, valid_size=valid_size,
                       test_size=test_size, name="retrieval")


# --- quadratic equations ------------------------------------------------------------------------
QUADRATIC_CHARS = "0123456789+-*/^=()xD;,"
QUADRATIC_VOCAB = 2 + len(QUADRATIC_CHARS)  # 0 = pad, 1 = start (unused), chars 2..23
STEP_LEN = 30
NUM_STEPS = 6


def quadratic_encode(text: str) -> list[int]:
    """Characters of :data:`QUADRATIC_CHARS` -> ids ``2..23``."""
    bad = sorted(set(text) - set(QUADRATIC_CHARS))
    if bad:
        raise ValueError(f"text holds characters outside the quadratic vocabulary: {bad}")
    return [2 + QUADRATIC_CHARS.index(c) for c in text]


def quadratic_decode(ids: Sequence[int]) -> str:
    """Inverse of :func:`quadratic_encode`; padding (0) and start (1) are dropped."""
    return "".join(QUADRATIC_CHARS[i - 2] for i in ids if i >= 2)


def _paren(v: int) -> str:
    return f"({v})" if v < 0 else str(v)


def quadratic_steps(rng: random.Random, no_root_prob: float = 0.2) -> list[str]:
    """Six steps of one problem (each ends with ``;``):

    1. the equation scaled by ``a`` in ``1..9``: ``a*x^2+b*x+c=0`` (all terms written, signed);
    2. canonical (monic) form ``x^2+p*x+q=0``;
    3. discriminant ``D=p^2-4*q=value`` (negative numbers in parentheses);
    4. ``x=(-p-sqrt(D))/2=r1``; 5. ``x=(-p+sqrt(D))/2=r2`` (both ``x=()`` when ``D < 0``);
    6. the answer ``x=r1,r2`` (``x=()`` when there is no real root).

    Roots are integers in ``(-100, 100)``, ``r1 <= r2``; ``no_root_prob`` of the problems have
    ``D < 0`` (``q`` above ``p^2/4``).
    """
    a = rng.randint(1, 9)
    if rng.random() < no_root_prob:
        p = rng.randint(-99, 99) * 2 - rng.randint(0, 1)
        q = rng.randint(p * p // 4 + 1, p * p // 4 + 1 + 2000)
        roots = None
    else:
        r1, r2 = sorted((rng.randint(-99, 99), rng.randint(-99, 99)))
        p, q = -(r1 + r2), r1 * r2
        roots = (r1, r2)
    d = p * p - 4 * q
    steps = [f"{a}*x^2{a * p:+d}*x{a * q:+d}=0", f"x^2{p:+d}*x{q:+d}=0",
             f"D={_paren(p)}^2-4*{_paren(q)}={d}"]
    if roots is None:
        steps += ["x=()", "x=()", "x=()"]
    else:
        s = math.isqrt(d)
        steps += [f"x=({-p}-{s})/2={roots[0]}", f"x=({-p}+{s})/2={roots[1]}",
                  f"x={roots[0]},{roots[1]}"]
    return [t + ";" for t in steps]


def quadratic_task(*, seed: int = 0, no_root_prob: float = 0.2, train_size: int = 10_000,
                   valid_size: int = 1_000, test_size: int = 2_000) -> Splits:
    """Step-by-step quadratic equations, character level: 6 steps (see :func:`quadratic_steps`),
    each right-padded with id 0 to 30 tokens -> 180 tokens (6 segments of 30). Targets: every
    character of steps 2..6 (the equation itself is the input); padding is not a target."""
    if not 0.0 <= no_root_prob <= 1.0:
        raise ValueError(f"no_root_prob must be in [0, 1], got {no_root_prob!r}")

    def sample(rng: random.Random):
        ids: list[int] = []
        mask = [False] * (STEP_LEN * NUM_STEPS)
        for k, step in enumerate(quadratic_steps(rng, no_root_prob)):
            enc = quadratic_encode(step)
            if len(enc) > STEP_LEN:
                raise AssertionError(f"step {step!r} is longer than {STEP_LEN}")
            if k > 0:
                for j in range(len(enc)):
                    mask[k * STEP_LEN + j - 1] = True
            ids += enc + [PAD_ID] * (STEP_LEN - len(enc))
        return ids, mask

    return make_splits(sample, seed=seed, train_size=train_size, valid_size=valid_size,
                       test_size=test_size, name="quadratic")


# --- metrics ------------------------------------------------------------------------------------
def _check_metric_inputs(logits, input_ids, labels_mask) -> None:
    if logits.dim() != 3 or logits.shape[:2] != input_ids.shape or input_ids.shape != labels_mask.shape:
        raise ValueError(f"expected logits [N, T, V] and input_ids, labels_mask [N, T], got "
                         f"{list(logits.shape)}, {list(input_ids.shape)}, {list(labels_mask.shape)}")


def token_accuracy(logits: torch.Tensor, input_ids: torch.Tensor, labels_mask: torch.Tensor) -> float:
    """Fraction of target tokens predicted exactly: over positions ``p`` with
    ``labels_mask[p]``, ``argmax(logits[p]) == input_ids[p + 1]``.

    ``logits`` ``[N, T, V]``, ``input_ids`` / ``labels_mask`` ``[N, T]``. NaN if no position is
    selected. ``labels_mask`` at the last position is ignored (nothing follows it).
    """
    _check_metric_inputs(logits, input_ids, labels_mask)
    pred = logits[:, :-1].argmax(-1)
    sel = labels_mask[:, :-1].to(torch.bool)
    if not sel.any():
        return float("nan")
    return (pred == input_ids[:, 1:])[sel].float().mean().item()


def sequence_accuracy(logits: torch.Tensor, input_ids: torch.Tensor, labels_mask: torch.Tensor) -> float:
    """Fraction of samples whose target tokens are all predicted exactly (shapes as in
    :func:`token_accuracy`); samples without targets are skipped."""
    _check_metric_inputs(logits, input_ids, labels_mask)
    sel = labels_mask[:, :-1].to(torch.bool)
    wrong = (logits[:, :-1].argmax(-1) != input_ids[:, 1:]) & sel
    has = sel.any(dim=1)
    if not has.any():
        return float("nan")
    return (~wrong.any(dim=1))[has].float().mean().item()
