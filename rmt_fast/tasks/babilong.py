"""BABILong-style question answering and a needle task, fully offline.

* A word-level :class:`Vocab` (lower-cased words and punctuation; ``<pad>`` = 0, ``<unk>`` = 1),
  saved next to a model as ``vocab.json``.
* :func:`babilong_task`: bAbI-like stories (``qa1`` single supporting fact, ``qa2`` two
  supporting facts with objects) whose facts are hidden, in order, at random sentence
  boundaries inside background text; the question comes at the end and the answer (one word)
  is the single target. The background is generated from a small built-in grammar (no
  downloads); its words never overlap the fact words.
* :func:`needle_task`: ``the key is 7 .`` within the first ``fact_within`` tokens, background
  noise, ``what is the key ?`` and the digit at the end; any length.
* :func:`load_babilong`: files in the public BABILong format (JSON lines, or a JSON list, of
  objects with ``input`` (the context), ``question`` and ``target``).

Every sequence is left-padded with ``<pad>`` (0) to the requested length, so the question and
answer always sit at the end (in the last segment). Tensors as in
:mod:`rmt_fast.tasks.algorithmic`: ``input_ids [N, T]``, ``labels_mask [N, T]`` (True at the
positions that predict an answer token).
"""

from __future__ import annotations

import json
import os
import random
import re
from collections.abc import Iterable, Sequence

import torch

from rmt_fast.tasks.algorithmic import Splits, TaskData, _check_int, make_splits

PAD, UNK = "<pad>", "<unk>"
VOCAB_NAME = "vocab.json"
_TOKEN_RE = re.compile(r"<\w+>|\w+|[^\w\s]")


def tokenize(text: str) -> list[str]:
    """Lower-cased words and single punctuation marks: ``"Mary went." -> ["mary", "went", "."]``."""
    return _TOKEN_RE.findall(text.lower())


class Vocab:
    """Word <-> id mapping; ``<pad>`` is 0 and ``<unk>`` is 1."""

    def __init__(self, words: Iterable[str] = ()):
        self.itos: list[str] = [PAD, UNK]
        self.stoi: dict[str, int] = {PAD: 0, UNK: 1}
        for w in words:
            self.add(w)

    def add(self, word: str) -> int:
        """Add ``word`` (if new) and return its id."""
        if word not in self.stoi:
            self.stoi[word] = len(self.itos)
            self.itos.append(word)
        return self.stoi[word]

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, word: str) -> bool:
        return word in self.stoi

    @property
    def pad_id(self) -> int:
        return 0

    def encode(self, text: str | Sequence[str], strict: bool = False) -> list[int]:
        """Text (or already split words) -> ids; unknown words -> ``<unk>`` (``strict``: error)."""
        words = tokenize(text) if isinstance(text, str) else list(text)
        if strict:
            missing = [w for w in words if w not in self.stoi]
            if missing:
                raise KeyError(f"words not in the vocabulary: {missing[:10]}")
        return [self.stoi.get(w, 1) for w in words]

    def decode(self, ids: Iterable[int], skip_pad: bool = True) -> str:
        """Ids -> space-joined words (padding dropped unless ``skip_pad=False``)."""
        out = []
        for i in ids:
            i = int(i)
            if not 0 <= i < len(self.itos):
                raise ValueError(f"id {i} is outside the vocabulary of {len(self.itos)} words")
            if skip_pad and i == 0:
                continue
            out.append(self.itos[i])
        return " ".join(out)

    def save(self, directory: str | os.PathLike) -> str:
        """Write ``directory/vocab.json``; returns its path."""
        os.makedirs(directory, exist_ok=True)
        path = os.path.join(directory, VOCAB_NAME)
        with open(path, "w") as f:
            json.dump({"itos": self.itos}, f)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike) -> Vocab:
        """Read a vocabulary written by :meth:`save` (``path`` is the file or its directory)."""
        if os.path.isdir(path):
            path = os.path.join(path, VOCAB_NAME)
        with open(path) as f:
            itos = json.load(f)["itos"]
        if itos[:2] != [PAD, UNK]:
            raise ValueError(f"{path}: not an rmt_fast vocabulary (must start with {PAD}, {UNK})")
        return cls(itos[2:])


# --- the generated world ------------------------------------------------------------------------
PEOPLE = ("mary", "john", "daniel", "sandra")
PLACES = ("kitchen", "garden", "office", "bathroom", "bedroom", "hallway")
OBJECTS = ("apple", "football", "milk")
MOVES = (("went", "to"), ("moved", "to"), ("journeyed", "to"), ("travelled", "to"))
GRABS = (("picked", "up"), ("got",), ("grabbed",))
DROPS = (("dropped",), ("discarded",), ("put", "down"))
DIGITS = tuple(str(d) for d in range(10))

# background grammar: DET ADJ NOUN VERB ADV [PREP DET NOUN] .
_DET = ("a", "every", "some", "this", "that")
_ADJ = ("old", "quiet", "bright", "small", "green", "heavy", "cold", "distant", "gentle", "strange")
_NOUN = ("river", "hill", "cloud", "tree", "stone", "bird", "road", "lamp", "storm", "ship", "forest",
         "bridge")
_VERB = ("shines", "moves", "rests", "turns", "falls", "grows", "waits", "sings", "fades", "rises")
_ADV = ("slowly", "softly", "quickly", "again", "today", "silently")
_PREP = ("near", "over", "under", "beyond", "beside")

_FACT_WORDS = (PEOPLE + PLACES + OBJECTS + tuple(w for m in MOVES + GRABS + DROPS for w in m)
               + ("the", "where", "is", "what", "key", ".", "?") + DIGITS)
_BACKGROUND_WORDS = _DET + _ADJ + _NOUN + _VERB + _ADV + _PREP


def default_vocab() -> Vocab:
    """The fixed vocabulary of the generated tasks (same ids for every seed)."""
    return Vocab(_FACT_WORDS + _BACKGROUND_WORDS)


def background_sentence(rng: random.Random) -> list[str]:
    """One sentence of the built-in grammar, e.g. ``a quiet river rests slowly near the hill .``
    (5 to 8 words and a full stop; no word is shared with facts or questions except ``the``)."""
    words = [rng.choice(_DET), rng.choice(_ADJ), rng.choice(_NOUN), rng.choice(_VERB), rng.choice(_ADV)]
    if rng.random() < 0.5:
        words += [rng.choice(_PREP), "the", rng.choice(_NOUN)]
    return words + ["."]


def _qa1_story(rng: random.Random, num_facts: int) -> tuple[list[list[str]], list[str], str]:
    """``num_facts`` moves; the question asks for a person who moved (answer: last place)."""
    facts, where = [], {}
    for _ in range(num_facts):
        person, place = rng.choice(PEOPLE), rng.choice(PLACES)
        facts.append([person, *rng.choice(MOVES), "the", place, "."])
        where[person] = place
    person = rng.choice(sorted(where))
    return facts, ["where", "is", person, "?"], where[person]


def _qa2_story(rng: random.Random, num_facts: int) -> tuple[list[list[str]], list[str], str]:
    """Moves, grabs and drops (two supporting facts: who holds the object, where they are);
    the question asks where an object is whose place is known."""
    while True:
        facts, where, holder, obj_place = [], {}, {}, {}
        for _ in range(num_facts):
            kind = rng.random()
            free = [o for o in OBJECTS if o not in holder]
            held = sorted(holder)
            if kind < 0.25 and free and where:
                person, obj = rng.choice(sorted(where)), rng.choice(free)
                facts.append([person, *rng.choice(GRABS), "the", obj, "."])
                holder[obj] = person
                obj_place.pop(obj, None)
            elif kind < 0.35 and held:
                obj = rng.choice(held)
                person = holder.pop(obj)
                facts.append([person, *rng.choice(DROPS), "the", obj, "."])
                obj_place[obj] = where[person]
            else:
                person, place = rng.choice(PEOPLE), rng.choice(PLACES)
                facts.append([person, *rng.choice(MOVES), "the", place, "."])
                where[person] = place
        known = {o: where[p] for o, p in holder.items()} | obj_place
        if holder and known:
            # prefer an object someone carries (needs both facts)
            obj = rng.choice(sorted(holder))
            return facts, ["where", "is", "the", obj, "?"], known[obj]


def _fill(rng: random.Random, facts: list[list[str]], question: list[str], answer: str,
          length: int, fact_within: int | None = None) -> list[str]:
    """Background sentences with ``facts`` inserted in order at random boundaries, then the
    question and answer, left-padded to ``length`` words. ``fact_within``: every fact must end
    within the first ``fact_within`` words of the story (used by the needle task)."""
    fixed = sum(map(len, facts)) + len(question) + 1
    if fixed > length:
        raise ValueError(f"length={length} is too short: facts, question and answer need {fixed} tokens")
    noise: list[list[str]] = []
    budget = length - fixed
    while True:
        s = background_sentence(rng)
        if len(s) > budget:
            break
        noise.append(s)
        budget -= len(s)
    if fact_within is None:
        slots = sorted(rng.choices(range(len(noise) + 1), k=len(facts)))
    else:
        slots, used = [], 0
        for k in range(len(noise) + 1):
            if used + sum(map(len, facts)) > fact_within:
                break
            slots.append(k)
            used += len(noise[k]) if k < len(noise) else 0
        slots = sorted(rng.choices(slots or [0], k=len(facts)))
    words: list[str] = []
    f = 0
    for k in range(len(noise) + 1):
        while f < len(facts) and slots[f] == k:
            words += facts[f]
            f += 1
        if k < len(noise):
            words += noise[k]
    words += question + [answer]
    return [PAD] * (length - len(words)) + words


def _answer_mask(length: int) -> list[bool]:
    return [p == length - 2 for p in range(length)]


STORIES = {"qa1": _qa1_story, "qa2": _qa2_story}


def babilong_sample(rng: random.Random, task: str, length: int, num_facts: int, vocab: Vocab) -> list[int]:
    """One ``task`` (``qa1``/``qa2``) story of exactly ``length`` ids: ``num_facts`` facts hidden
    in order in background text, the question, and the answer as the last id."""
    facts, question, answer = STORIES[task](rng, num_facts)
    return vocab.encode(_fill(rng, facts, question, answer, length), strict=True)


def babilong_task(task: str = "qa1", length: int = 128, num_facts: int = 4, *, seed: int = 0,
                  train_size: int = 10_000, valid_size: int = 1_000, test_size: int = 1_000,
                  vocab: Vocab | None = None) -> Splits:
    """Generated BABILong-style QA of exactly ``length`` tokens (see the module docstring).

    ``task``: ``qa1`` (single supporting fact) or ``qa2`` (two supporting facts); ``num_facts``
    facts per story. Uses :func:`default_vocab` unless ``vocab`` is given (it must contain it).
    """
    if task not in STORIES:
        raise ValueError(f"task must be one of {sorted(STORIES)}, got {task!r}")
    _check_int("length", length, 2)
    _check_int("num_facts", num_facts, 1)
    vocab = default_vocab() if vocab is None else vocab
    mask = _answer_mask(length)

    def sample(rng: random.Random):
        return babilong_sample(rng, task, length, num_facts, vocab), mask

    return make_splits(sample, seed=seed, train_size=train_size, valid_size=valid_size,
                       test_size=test_size, name=f"babilong-{task}")


def needle_sample(rng: random.Random, length: int, fact_within: int, vocab: Vocab) -> list[int]:
    """One needle story of exactly ``length`` ids; the key digit is the last id."""
    key = rng.choice(DIGITS)
    words = _fill(rng, [["the", "key", "is", key, "."]], ["what", "is", "the", "key", "?"], key,
                  length, fact_within=fact_within)
    return vocab.encode(words, strict=True)


def needle_task(length: int = 64, fact_within: int = 16, *, seed: int = 0, train_size: int = 10_000,
                valid_size: int = 1_000, test_size: int = 1_000, vocab: Vocab | None = None) -> Splits:
    """Needle: ``the key is D .`` ending within the first ``fact_within`` words of the story,
    background noise, ``what is the key ?`` and the digit ``D`` (the only target) at the end.
    ``length`` may be anything >= 11, so one task serves any number of segments."""
    _check_int("length", length, 11)
    _check_int("fact_within", fact_within, 5)
    vocab = default_vocab() if vocab is None else vocab
    mask = _answer_mask(length)

    def sample(rng: random.Random):
        return needle_sample(rng, length, fact_within, vocab), mask

    return make_splits(sample, seed=seed, train_size=train_size, valid_size=valid_size,
                       test_size=test_size, name="needle")


# --- public BABILong files ----------------------------------------------------------------------
def read_babilong_records(path: str | os.PathLike) -> list[dict]:
    """Records of a BABILong file: JSON lines, a JSON list, or a JSON object with a ``data``
    list; each record must have ``input``, ``question`` and ``target`` strings."""
    with open(path) as f:
        text = f.read()
    stripped = text.lstrip()
    if stripped.startswith("["):
        records = json.loads(text)
    elif stripped.startswith("{") and '"data"' in stripped[:200] and "\n{" not in stripped:
        records = json.loads(text)["data"]
    else:
        records = [json.loads(line) for line in text.splitlines() if line.strip()]
    for i, r in enumerate(records):
        missing = [k for k in ("input", "question", "target") if not isinstance(r.get(k), str)]
        if missing:
            raise ValueError(f"{path}: record {i} lacks string field(s) {missing}")
    return records


def load_babilong(path: str | os.PathLike, vocab: Vocab | None = None, length: int | None = None,
                  pad_to_multiple: int = 1, truncate: bool = False) -> tuple[TaskData, Vocab]:
    """Load a BABILong file as ``context question answer`` sequences.

    Args:
        path: the file (see :func:`read_babilong_records`).
        vocab: map words with it (unknown -> ``<unk>``); default: build one from the file
            (words in first-seen order, so the result is deterministic).
        length: pad every sequence (left, with ``<pad>``) to this many tokens; default: the
            longest sequence, rounded up to ``pad_to_multiple`` (e.g. the segment size).
        truncate: drop the oldest context tokens of sequences longer than ``length`` (else
            a ``ValueError``).

    Returns:
        ``(TaskData, vocab)``: ``input_ids [N, T]``, ``labels_mask [N, T]`` selecting the
        positions that predict the answer tokens.
    """
    _check_int("pad_to_multiple", pad_to_multiple, 1)
    records = read_babilong_records(path)
    if not records:
        raise ValueError(f"{path}: no records")
    if vocab is None:
        vocab = Vocab()
        for r in records:
            for key in ("input", "question", "target"):
                for w in tokenize(r[key]):
                    vocab.add(w)
    seqs = []
    for r in records:
        context = vocab.encode(r["input"]) + vocab.encode(r["question"])
        answer = vocab.encode(r["target"])
        if not answer:
            raise ValueError(f"{path}: empty target in record {r!r}")
        seqs.append((context, answer))
    longest = max(len(c) + len(a) for c, a in seqs)
    if length is None:
        length = -(-longest // pad_to_multiple) * pad_to_multiple
    _check_int("length", length, 2)
    ids = torch.zeros(len(seqs), length, dtype=torch.long)
    mask = torch.zeros(len(seqs), length, dtype=torch.bool)
    for i, (context, answer) in enumerate(seqs):
        over = len(context) + len(answer) - length
        if over > 0:
            if not truncate or over >= len(context):
                raise ValueError(f"{path}: record {i} has {len(context) + len(answer)} tokens, more "
                                 f"than length={length} (pass truncate=True to cut the context)")
            context = context[over:]
        seq = context + answer
        ids[i, length - len(seq):] = torch.tensor(seq)
        mask[i, length - len(answer) - 1: length - 1] = True
    return TaskData(ids, mask), vocab
