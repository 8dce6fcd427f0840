"""bAbI facts hidden in real English, as in the 1M-token RMT report (Figure 1), for an encoder RMT.

Three tasks; every answer is one of the six :data:`LOCATIONS` (a class id):

* ``memorize``: one bAbI qa1 fact (``Mary went to the kitchen.``) at the very start, then
  noise, then the question (``Where is Mary?``);
* ``detect``: (detect and memorize) the same fact at a random sentence boundary;
* ``reasoning``: two bAbI qa4 facts (two-argument relations) about one shared location at
  random boundaries, e.g. ``The hallway is east of the bathroom.`` ... ``The bedroom is west
  of the bathroom.`` ... ``What is the bathroom east of?`` -> ``bedroom``: the answer needs the
  fact the question's direction picks, and both facts must be kept until the question comes.

The noise is :class:`rmt_fast.tasks.english.EnglishNoise` (standard-library documentation,
train/valid/test from disjoint documents), read as running text; facts go in, in order,
between noise sentences (as BABILong does) and the question ends the sample. A sample of ``n``
segments is exactly ``n * segment_size`` tokens: ``[PAD] * p + noise-with-facts + question``,
where ``p`` (< one short sentence) is what whole sentences could not fill. With right-aligned
segments (the encoder wrapper's default) the question is in the last segment.

Samples are deterministic: sample ``i`` of split ``s`` at ``n`` segments comes from
``random.Random(f"{seed}:{task}:{s}:{n}:{i}")``. Training draws fresh indices every step
(unlimited data); valid and test use indices ``0..N-1`` of their own documents.

Long inputs need not be materialized: :meth:`BabiQA.plans` keeps only sentence indices
(4 bytes per sentence) and :meth:`BabiQA.stream` yields one ``[B, S]`` segment at a time.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from rmt_fast.tasks.english import SPLITS, EnglishNoise

TASKS = ("memorize", "detect", "reasoning")
LOCATIONS = ("bathroom", "bedroom", "garden", "hallway", "kitchen", "office")
PEOPLE = ("Mary", "John", "Daniel", "Sandra")
MOVES = ("went to", "moved to", "journeyed to", "travelled to", "went back to")
DIRECTIONS = ("north", "south", "east", "west")
OPPOSITE = {"north": "south", "south": "north", "east": "west", "west": "east"}
WORLD_WORDS = tuple(w.lower() for w in PEOPLE + LOCATIONS + DIRECTIONS)
FILL_TRIES = 20  # random sentences tried to fill the gap left when the running text overflows


@dataclass(frozen=True)
class Story:
    """The facts (in order), the question and the answer (``label`` = index in LOCATIONS)."""

    facts: tuple[str, ...]
    question: str
    answer: str

    @property
    def label(self) -> int:
        return LOCATIONS.index(self.answer)


def make_story(task: str, rng: random.Random) -> Story:
    """A random story of ``task`` (one of :data:`TASKS`)."""
    if task in ("memorize", "detect"):
        person, place = rng.choice(PEOPLE), rng.choice(LOCATIONS)
        return Story((f"{person} {rng.choice(MOVES)} the {place}.",), f"Where is {person}?", place)
    if task == "reasoning":
        anchor, first, second = rng.sample(LOCATIONS, 3)
        # first/second lie in directions d1 != d2 from the anchor
        d1, d2 = rng.sample(DIRECTIONS, 2)
        facts = []
        for place, d in ((first, d1), (second, d2)):
            if rng.random() < 0.5:
                facts.append(f"The {place} is {d} of the {anchor}.")
            else:
                facts.append(f"The {anchor} is {OPPOSITE[d]} of the {place}.")
        target, d = (first, d1) if rng.random() < 0.5 else (second, d2)
        if rng.random() < 0.5:
            question = f"What is {d} of the {anchor}?"
        else:
            question = f"What is the {anchor} {OPPOSITE[d]} of?"
        return Story(tuple(facts), question, target)
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def direction_word(sentence: str) -> str | None:
    """The direction (one of :data:`DIRECTIONS`) named in ``sentence``, or None."""
    words = sentence.rstrip(".?").split()
    return next((w for w in DIRECTIONS if w in words), None)


def asked_and_other_fact(story: Story) -> tuple[str, str]:
    """A ``reasoning`` story's two facts: ``(the one naming the answer, the other one)``."""
    asked = [f for f in story.facts if story.answer in f.rstrip(".").split()]
    if len(story.facts) != 2 or len(asked) != 1:
        raise ValueError(f"not a two-fact story with one fact naming the answer: {story!r}")
    return asked[0], next(f for f in story.facts if f is not asked[0])


def order_decides(story: Story) -> bool:
    """True for a ``reasoning`` story whose other fact also names the question's direction, so
    that only the order of the two locations in the facts tells which one answers (``The X is
    east of the A.`` / ``The A is east of the Y.`` / ``What is east of the A?``); about 19% of
    the stories :func:`make_story` draws."""
    if len(story.facts) != 2:
        return False
    word = direction_word(story.question)
    return word is not None and word in asked_and_other_fact(story)[1].rstrip(".").split()


def anchor_of(story: Story) -> str:
    """The location both facts of a ``reasoning`` story name."""
    first, second = (set(f.rstrip(".").split()) for f in story.facts)
    (anchor,) = first & second & set(LOCATIONS)
    return anchor


def fact_parts(fact: str, anchor: str) -> tuple[str, str]:
    """``(place, direction of the place from anchor)`` of a qa4 fact about ``anchor``
    (``The P is d of the A.`` or ``The A is d' of the P.``)."""
    words = fact.rstrip(".").split()
    first, d, second = words[1], words[3], words[-1]
    if second == anchor:
        return first, d
    if first == anchor:
        return second, OPPOSITE[d]
    raise ValueError(f"{fact!r} is not about {anchor!r}")


def fact_targets(story: Story) -> list[tuple[int, int]]:
    """A ``reasoning`` story's facts in order as ``(place, direction)`` class ids: the place's
    index in :data:`LOCATIONS`, its direction from the anchor's in :data:`DIRECTIONS`."""
    anchor = anchor_of(story)
    parts = (fact_parts(f, anchor) for f in story.facts)
    return [(LOCATIONS.index(place), DIRECTIONS.index(d)) for place, d in parts]


def other_question(story: Story) -> Story:
    """The ``reasoning`` story asking for the other fact's place, in the story's question form
    (the same words but the direction)."""
    anchor = anchor_of(story)
    (other, d), = [part for part in (fact_parts(f, anchor) for f in story.facts) if part[0] != story.answer]
    if story.question.startswith("What is the "):
        question = f"What is the {anchor} {OPPOSITE[d]} of?"
    else:
        question = f"What is {d} of the {anchor}?"
    return Story(story.facts, question, other)


@dataclass
class Plan:
    """One sample before its tokens are laid out: ``pad`` padding tokens, then ``items`` in
    order (``>= 0``: a noise sentence index of the split, ``-1 - k``: fact ``k``), then the
    question. ``fact_starts``: token offsets of the facts in the sample."""

    story: Story
    split: str
    pad: int
    items: np.ndarray
    fact_starts: tuple[int, ...]
    length: int


class BabiQA:
    """Sample generator for one task.

    Args:
        task: one of :data:`TASKS`.
        tokenizer: the model's tokenizer (its ``pad_token_id`` pads).
        segment_size: tokens per segment ``S`` (samples are ``n * S`` tokens).
        noise: the noise corpus (default: ``EnglishNoise(tokenizer, exclude_words=WORLD_WORDS)``;
            noise sentences must not contain the names, places or directions of the facts).
        seed: sample seed.
        order_fraction: ``reasoning`` only: the share of *training* stories drawn among those
            where the argument order decides (:func:`order_decides`) before the rest are drawn as
            usual (default 0: all as drawn, about 19% of them such); validation and test
            stories are never changed.
        memory_fraction: ``detect``/``reasoning``, samples of two or more segments: the share of
            *training* samples whose facts all end before the question's segment begins, so that
            the memory must carry every fact (drawn as usual, only one in four at 2 segments has
            both facts before the last one); validation and test samples are never changed.
    """

    num_classes = len(LOCATIONS)

    def __init__(self, task: str, tokenizer, segment_size: int, noise: EnglishNoise | None = None,
                 seed: int = 0, order_fraction: float = 0.0, memory_fraction: float = 0.0):
        if task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {task!r}")
        if not 0 <= order_fraction <= 1 or (order_fraction and task != "reasoning"):
            raise ValueError(f"order_fraction must be in [0, 1] (and 0 unless task='reasoning'), "
                             f"got {order_fraction!r} for task {task!r}")
        self.order_fraction = float(order_fraction)
        if not 0 <= memory_fraction <= 1 or (memory_fraction and task == "memorize"):
            raise ValueError(f"memory_fraction must be in [0, 1] (and 0 for task='memorize', whose "
                             f"fact is always first), got {memory_fraction!r} for task {task!r}")
        self.memory_fraction = float(memory_fraction)
        if not isinstance(segment_size, int) or segment_size < 16:
            raise ValueError(f"segment_size must be an int >= 16, got {segment_size!r}")
        self.task, self.tokenizer, self.segment_size, self.seed = task, tokenizer, segment_size, seed
        self.noise = noise if noise is not None else EnglishNoise(tokenizer, exclude_words=WORLD_WORDS)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        self._ids: dict[str, np.ndarray] = {}

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text`` (no special tokens), cached."""
        if text not in self._ids:
            self._ids[text] = np.asarray(self.tokenizer(text, add_special_tokens=False)["input_ids"],
                                         dtype=np.int32)
        return self._ids[text]

    # --- planning -----------------------------------------------------------------------------
    def rng(self, split: str, num_segments: int, index: int) -> random.Random:
        return random.Random(f"{self.seed}:{self.task}:{split}:{num_segments}:{index}")

    def plan(self, split: str, num_segments: int, index: int) -> Plan:
        """Sample ``index`` of ``split`` with ``num_segments`` segments."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not isinstance(num_segments, int) or num_segments < 1:
            raise ValueError(f"num_segments must be an int >= 1, got {num_segments!r}")
        rng = self.rng(split, num_segments, index)
        story = make_story(self.task, rng)
        if split == "train" and self.order_fraction and rng.random() < self.order_fraction:
            while not order_decides(story):
                story = make_story(self.task, rng)
        noise = self.noise[split]
        length = num_segments * self.segment_size
        fixed = sum(len(self.encode(f)) for f in story.facts) + len(self.encode(story.question))
        budget = length - fixed
        if budget < 0:
            raise ValueError(f"num_segments={num_segments} x segment_size={self.segment_size} = {length} "
                             f"tokens cannot hold the facts and question ({fixed} tokens)")
        lengths = noise.lengths
        sentences: list[int] = []
        for i in noise.walk(rng):
            if lengths[i] > budget:
                break
            sentences.append(i)
            budget -= int(lengths[i])
        for _ in range(FILL_TRIES):
            if budget == 0:
                break
            i = rng.randrange(len(noise))
            if lengths[i] <= budget:
                sentences.append(i)
                budget -= int(lengths[i])
        k = len(story.facts)
        if self.task == "memorize":
            slots = [0] * k
        else:
            slots = sorted(rng.randrange(len(sentences) + 1) for _ in range(k))
        sizes = [len(self.encode(f)) for f in story.facts]
        bounds = self._boundaries(lengths, sentences, budget)
        if (split == "train" and self.memory_fraction and num_segments > 1
                and rng.random() < self.memory_fraction):
            # every fact must end before the question's segment: the slots (sentence boundaries)
            # that allow it, drawn among those; the noise and the story stay as drawn
            last = (num_segments - 1) * self.segment_size
            ok = np.flatnonzero(bounds + sum(sizes) <= last).tolist()
            if ok:
                slots = sorted(rng.choice(ok) for _ in range(k))
        # fact f follows every earlier fact (slots are sorted) at its sentence boundary
        starts = tuple(int(bounds[slot]) + sum(sizes[:f]) for f, slot in enumerate(slots))
        items = self._items(sentences, slots)
        return Plan(story, split, budget, np.asarray(items, dtype=np.int32), starts, length)

    @staticmethod
    def _boundaries(lengths: np.ndarray, sentences: list[int], budget: int) -> np.ndarray:
        """``[len(sentences) + 1]`` int64: token offset of each sentence boundary before any fact
        (the sample starts with ``budget`` padding tokens)."""
        ends = np.cumsum(lengths[np.asarray(sentences, dtype=np.intp)], dtype=np.int64)
        return np.concatenate(([0], ends)) + budget

    @staticmethod
    def _items(sentences: list[int], slots: list[int]) -> list[int]:
        """Sentence indices in order, fact ``f`` as ``-1 - f`` before sentence ``slots[f]``."""
        items: list[int] = []
        f = 0
        for pos in range(len(sentences) + 1):
            while f < len(slots) and slots[f] == pos:
                items.append(-1 - f)
                f += 1
            if pos < len(sentences):
                items.append(sentences[pos])
        return items

    def plans(self, split: str, num_segments: int, indices: Sequence[int]) -> list[Plan]:
        return [self.plan(split, num_segments, int(i)) for i in indices]

    # --- tokens -------------------------------------------------------------------------------
    def pieces(self, plan: Plan) -> Iterator[np.ndarray]:
        """The sample's tokens as consecutive int32 arrays (padding, sentences, facts, question)."""
        if plan.pad:
            yield np.full(plan.pad, self.pad_id, dtype=np.int32)
        noise = self.noise[plan.split]
        for it in plan.items:
            yield self.encode(plan.story.facts[-1 - it]) if it < 0 else noise.sentence(int(it))
        yield self.encode(plan.story.question)

    def tokens(self, plan: Plan) -> np.ndarray:
        """``[T]`` int32 token ids of the whole sample."""
        out = np.concatenate(list(self.pieces(plan)))
        assert len(out) == plan.length, (len(out), plan.length)
        return out

    def segments(self, plan: Plan) -> Iterator[np.ndarray]:
        """The sample's ``[S]`` segments, one at a time (the whole sample is never built)."""
        size, buf, have = self.segment_size, [], 0
        for piece in self.pieces(plan):
            while len(piece):
                take = piece[: size - have]
                buf.append(take)
                have += len(take)
                piece = piece[len(take):]
                if have == size:
                    yield np.concatenate(buf)
                    buf, have = [], 0
        if have:
            raise AssertionError(f"plan length {plan.length} is not a multiple of {size}")

    # --- batches ------------------------------------------------------------------------------
    def batch(self, split: str, num_segments: int, indices: Sequence[int]) -> dict[str, torch.Tensor]:
        """``input_ids`` ``[B, T]`` long, ``attention_mask`` ``[B, T]`` long (0 on padding),
        ``labels`` ``[B]`` long, with ``T = num_segments * segment_size``; ``reasoning`` also
        ``fact_labels`` ``[B, 2, 2]`` long (:func:`fact_targets` of each story)."""
        plans = self.plans(split, num_segments, indices)
        ids = torch.from_numpy(np.stack([self.tokens(p) for p in plans]).astype(np.int64))
        mask = torch.ones_like(ids)
        for row, p in enumerate(plans):
            mask[row, : p.pad] = 0
        out = {"input_ids": ids, "attention_mask": mask, "labels": self.labels(plans)}
        if self.task == "reasoning":
            out["fact_labels"] = torch.tensor([fact_targets(p.story) for p in plans], dtype=torch.long)
        return out

    @staticmethod
    def labels(plans: Sequence[Plan]) -> torch.Tensor:
        return torch.tensor([p.story.label for p in plans], dtype=torch.long)

    def stream(self, plans: Sequence[Plan]) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(input_ids [B, S], attention_mask [B, S])`` per segment, first to last, for plans of
        one length (the last segment holds the question)."""
        if len({p.length for p in plans}) != 1:
            raise ValueError("stream: every plan must have the same length")
        iters = [self.segments(p) for p in plans]
        done = [0] * len(plans)
        for _ in range(plans[0].length // self.segment_size):
            ids = torch.from_numpy(np.stack([next(it) for it in iters]).astype(np.int64))
            mask = torch.ones_like(ids)
            for row, p in enumerate(plans):
                if done[row] < p.pad:  # padding only ever sits at the start
                    cut = min(p.pad - done[row], self.segment_size)
                    mask[row, :cut] = 0
                done[row] += self.segment_size
            yield ids, mask

    def describe(self, plan: Plan) -> dict:
        """The story in words and where its facts are: for printing."""
        return {"facts": list(plan.story.facts), "question": plan.story.question,
                "answer": plan.story.answer, "fact_token_offsets": list(plan.fact_starts),
                "tokens": plan.length}
