"""Real, human-written English noise that every Python installation has: the standard library's
documentation.

Sources (read with :mod:`ast`, nothing is imported or downloaded):

* the docstrings of the modules, classes and functions of the installed standard library's
  ``.py`` sources (tests, demos, ``encodings``, ``lib2to3``, ``distutils``, ``ensurepip`` and
  ``site-packages`` are skipped); one *document* per top-level module or package
  (``email`` holds every ``email.*`` file), so near-duplicate text of sibling files never
  crosses a split;
* the language-reference topics that ``pydoc`` ships (``pydoc_data/topics.py``, parsed as a
  literal), one document per topic.

Cleaning (:func:`clean_sentences`): paragraphs with indented lines (code and literal blocks) are
dropped, the rest is split into sentences, and a sentence is kept only if it starts with a
capital letter followed by a lower-case one, ends with ``.``, ``!`` or ``?``, has 6 to 40
words, contains none of the characters or patterns of code (``>>>``, ``=``, ``_``, brackets,
backquotes, ``()``, dotted names, ...) and is at least 97% letters, spaces and ordinary
punctuation. Each sentence is kept once, in its first document (documents in sorted order).

Splits: a document goes to ``test``, ``valid`` or ``train`` by a hash of ``(split_seed,
document name)``, so the split of a document does not depend on which other documents exist
(another Python version adds or drops modules without moving the rest), and train, valid and
test never share a document (nor, after de-duplication, a sentence).

The text differs between Python versions; it is deterministic for a given installation and
tokenizer. :class:`EnglishNoise` tokenizes the sentences with the model's own tokenizer and
caches the result as JSON (``$RMT_FAST_CACHE`` or ``~/.cache/rmt_fast``), keyed by the Python
version, the build rules and the tokenizer's vocabulary.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import sys
import sysconfig
import tempfile
from collections.abc import Iterable, Iterator

import numpy as np

from rmt_fast.tasks.text_corpus import default_cache_dir

SPLITS = ("train", "valid", "test")
BUILD_VERSION = 2  # bump when the sources or the cleaning rules change (invalidates caches)
MIN_WORDS, MAX_WORDS = 6, 40
MAX_TOKENS = 64  # sentences longer than this many word pieces are dropped

_SKIP_DIRS = frozenset({"test", "tests", "idle_test", "site-packages", "turtledemo", "encodings",
                        "__pycache__", "__phello__", "lib2to3", "ensurepip", "distutils", "pydoc_data"})
_SKIP_MODULES = frozenset({"this", "antigravity"})  # rot13 text; a browser launcher
_CODE = re.compile(r">>>|\.\.\.|::|[=_{}\[\]<>|\\#@`~^$*%+]|\(\)|\w\.\w|\b\w+\(")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')]?\s+(?=[\"(]?[A-Z])")
_ABBREVIATIONS = re.compile(r"\b(e\.g|i\.e|etc|cf|vs|Mr|Mrs|Dr|St)\.", re.IGNORECASE)
_PLAIN = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ ,.;:'\"-?!()0123456789")


def stdlib_documents(stdlib: str | os.PathLike | None = None) -> dict[str, list[str]]:
    """Raw texts per document: ``{"email": [docstring, ...], "pydoc:if": [topic text], ...}``.

    ``stdlib``: the standard library directory (default: this interpreter's)."""
    root = os.fspath(stdlib or sysconfig.get_paths()["stdlib"])
    if not os.path.isdir(root):
        raise FileNotFoundError(f"standard library directory {root!r} not found")
    docs: dict[str, list[str]] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel = os.path.relpath(dirpath, root)
        parts = [] if rel == "." else rel.split(os.sep)
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("config-"))
        for name in sorted(filenames):
            if not name.endswith(".py") or name.startswith("test_"):
                continue
            top = parts[0] if parts else name[:-3]
            if top in _SKIP_MODULES:
                continue
            with open(os.path.join(dirpath, name), encoding="utf-8", errors="replace") as f:
                try:
                    tree = ast.parse(f.read())
                except SyntaxError:
                    continue
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    text = ast.get_docstring(node, clean=True)
                    if text:
                        docs.setdefault(top, []).append(text)
    topics = os.path.join(root, "pydoc_data", "topics.py")
    if os.path.isfile(topics):
        with open(topics, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "topics" for t in node.targets):
                for key, text in sorted(ast.literal_eval(node.value).items()):
                    docs[f"pydoc:{key}"] = [text]
    return docs


def _paragraphs(text: str) -> Iterator[str]:
    for para in re.split(r"\n\s*\n", text):
        lines = [line for line in para.split("\n") if line.strip()]
        if not lines or any(line[:1].isspace() for line in lines):
            continue  # indented: a code block, a literal block or a definition list
        if any(re.fullmatch(r"[=*\-~^+]{3,}", line.strip()) for line in lines):
            continue  # a heading underline
        yield " ".join(line.strip() for line in lines)


def _is_clean(sentence: str) -> bool:
    if not re.match(r"[A-Z][a-z]", sentence) or not sentence.endswith((".", "!", "?")):
        return False
    if not MIN_WORDS <= len(sentence.split()) <= MAX_WORDS:
        return False
    if _CODE.search(_ABBREVIATIONS.sub(lambda m: m.group(1).replace(".", ""), sentence)):
        return False
    return sum(c in _PLAIN for c in sentence) >= 0.97 * len(sentence)


def clean_sentences(text: str) -> list[str]:
    """The clean sentences of one text, in order (see the module docstring for the rules)."""
    out = []
    for para in _paragraphs(text):
        # protect abbreviations from the splitter, then restore them
        protected = _ABBREVIATIONS.sub(lambda m: m.group(0).replace(".", "\x00"), para)
        for piece in _SENTENCE_END.split(protected):
            sentence = piece.replace("\x00", ".").strip()
            if _is_clean(sentence):
                out.append(sentence)
    return out


def build_sentences(documents: dict[str, list[str]]) -> dict[str, list[str]]:
    """``{document: [clean sentence, ...]}``; a sentence appears once, in the first document
    (sorted by name) that has it; documents left without sentences are dropped."""
    seen: set[str] = set()
    out: dict[str, list[str]] = {}
    for name in sorted(documents):
        kept = []
        for text in documents[name]:
            for s in clean_sentences(text):
                if s not in seen:
                    seen.add(s)
                    kept.append(s)
        if kept:
            out[name] = kept
    return out


def document_split(name: str, seed: int = 1, valid_fraction: float = 0.1,
                   test_fraction: float = 0.25) -> str:
    """``"train"``, ``"valid"`` or ``"test"`` for document ``name``: a hash of ``(seed, name)``
    mapped to [0, 1), test below ``test_fraction``, valid below ``test + valid``."""
    if not (0 <= valid_fraction and 0 <= test_fraction and valid_fraction + test_fraction < 1):
        raise ValueError(f"valid_fraction and test_fraction must be >= 0 with a sum < 1, got "
                         f"{valid_fraction}, {test_fraction}")
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    u = int.from_bytes(digest[:8], "big") / 2**64
    if u < test_fraction:
        return "test"
    return "valid" if u < test_fraction + valid_fraction else "train"


def _tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps([type(tokenizer).__name__, vocab]).encode()).hexdigest()[:16]


class NoiseSplit:
    """The tokenized sentences of one split, as a flat ``int32`` array.

    Attributes:
        documents: document names, sorted.
        doc_start: ``[D + 1]`` index of each document's first sentence (``sentences`` order).
        offsets: ``[N + 1]`` token offsets of the sentences in ``tokens``.
        tokens: ``[sum of lengths]`` int32 token ids.
        texts: the ``N`` sentences as text.
    """

    def __init__(self, documents: list[str], sentences: list[list[str]], token_ids: list[list[list[int]]]):
        self.documents = list(documents)
        self.texts = [s for doc in sentences for s in doc]
        flat = [ids for doc in token_ids for ids in doc]
        if not flat:
            raise ValueError("a noise split has no sentences")
        self.doc_start = np.cumsum([0] + [len(d) for d in sentences])
        self.lengths = np.array([len(ids) for ids in flat], dtype=np.int64)
        self.offsets = np.concatenate([[0], np.cumsum(self.lengths)])
        self.tokens = np.fromiter((t for ids in flat for t in ids), dtype=np.int32,
                                  count=int(self.offsets[-1]))
        self._doc_of = np.repeat(np.arange(len(sentences)), [len(d) for d in sentences])

    def __len__(self) -> int:
        return len(self.lengths)

    @property
    def num_tokens(self) -> int:
        return int(self.offsets[-1])

    def sentence(self, index: int) -> np.ndarray:
        """Token ids ``[n]`` of sentence ``index``."""
        return self.tokens[self.offsets[index]: self.offsets[index + 1]]

    def document_of(self, index: int) -> str:
        return self.documents[int(self._doc_of[index])]

    def walk(self, rng) -> Iterator[int]:
        """Sentence indices of running text: from a random sentence, the following sentences of
        its document, then on from another random sentence when the document ends (``rng``: a
        :class:`random.Random`). Endless."""
        n = len(self)
        while True:
            i = rng.randrange(n)
            end = int(self.doc_start[self._doc_of[i] + 1])
            while i < end:
                yield i
                i += 1


class EnglishNoise:
    """Tokenized, split standard-library English (see the module docstring).

    Args:
        tokenizer: a Hugging Face tokenizer (token ids are made without special tokens).
        split_seed: seed of the document split. The default, 1, was picked among 0, 1, 2 for
            its larger test split (Python 3.11.7, MiniLM tokenizer, before removing fact
            words: 78K train, 20K valid, 42K test tokens; seed 0 gives 18K test tokens).
        valid_fraction, test_fraction: expected shares of the documents in valid and test.
        exclude_words: sentences containing any of these words (case-insensitive, whole
            words) are dropped, e.g. the names and places of the facts hidden in the noise.
        cache_dir: where the tokenized corpus is cached (None: :func:`default_cache_dir`;
            ``False``: no cache).
        stdlib: the standard library directory to read (default: this interpreter's).
    """

    def __init__(self, tokenizer, *, split_seed: int = 1, valid_fraction: float = 0.1,
                 test_fraction: float = 0.25, exclude_words: Iterable[str] = (),
                 cache_dir: str | os.PathLike | None | bool = None, stdlib: str | os.PathLike | None = None):
        self.split_seed = split_seed
        corpus = self._load(tokenizer, cache_dir, stdlib)
        banned = {w.lower() for w in exclude_words}
        word = re.compile(r"[A-Za-z]+")
        self.assignment: dict[str, str] = {}
        grouped: dict[str, tuple[list, list, list]] = {s: ([], [], []) for s in SPLITS}
        for name in sorted(corpus):
            keep = [(s, ids) for s, ids in corpus[name]
                    if len(ids) <= MAX_TOKENS and not banned.intersection(w.lower() for w in word.findall(s))]
            if not keep:
                continue
            split = document_split(name, split_seed, valid_fraction, test_fraction)
            self.assignment[name] = split
            names, sents, ids = grouped[split]
            names.append(name)
            sents.append([s for s, _ in keep])
            ids.append([i for _, i in keep])
        self.splits = {s: NoiseSplit(*grouped[s]) for s in SPLITS}

    def __getitem__(self, split: str) -> NoiseSplit:
        if split not in self.splits:
            raise KeyError(f"split must be one of {SPLITS}, got {split!r}")
        return self.splits[split]

    @staticmethod
    def _load(tokenizer, cache_dir, stdlib) -> dict[str, list[tuple[str, list[int]]]]:
        key = hashlib.sha256(json.dumps([BUILD_VERSION, sys.version, os.fspath(stdlib or ""),
                                         _tokenizer_fingerprint(tokenizer)]).encode()).hexdigest()[:16]
        path = None
        if cache_dir is not False:
            path = os.path.join(os.fspath(cache_dir or default_cache_dir()), f"english_noise-{key}.json")
            if os.path.isfile(path):
                with open(path) as f:
                    return {k: [(s, ids) for s, ids in v] for k, v in json.load(f).items()}
        sentences = build_sentences(stdlib_documents(stdlib))
        corpus = {}
        for name, sents in sentences.items():
            ids = tokenizer(sents, add_special_tokens=False)["input_ids"]
            corpus[name] = list(zip(sents, ids, strict=True))
        if path is not None:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
            with os.fdopen(fd, "w") as f:
                json.dump(corpus, f)
            os.replace(tmp, path)  # atomic: concurrent builders never see a partial file
        return corpus

    def summary(self) -> dict:
        """Documents, sentences and tokens per split."""
        return {s: {"documents": len(sp.documents), "sentences": len(sp), "tokens": sp.num_tokens}
                for s, sp in self.splits.items()}
