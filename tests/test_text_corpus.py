"""rmt_fast.tasks.text_corpus: the stdlib byte corpus (determinism, document split, sizes,
exclusions) and its training windows."""

from __future__ import annotations

import hashlib
import os
import random

import numpy as np
import pytest
import torch

from rmt_fast.tasks import token_accuracy
from rmt_fast.tasks.text_corpus import (
    BOS,
    MIN_BYTES,
    REFERENCE,
    SPLITS,
    VOCAB_SIZE,
    collect_documents,
    load_corpus,
    python_version,
    split_documents,
    text_splits,
    text_task,
)


def fake_stdlib(root, seed=0, n=60):
    """A directory shaped like Lib/: random .py documents plus files the corpus must skip."""
    rng = random.Random(seed)
    kept = {}
    for i in range(n):
        rel = f"pkg{i % 3}/mod_{i}.py" if i % 2 else f"mod_{i}.py"
        data = bytes(rng.randrange(256) for _ in range(rng.randrange(1, 400)))
        kept[rel] = data
    skipped = {"site-packages/x.py": b"third party", "__pycache__/a.py": b"cache",
               "pkg0/__pycache__/b.py": b"cache", "_sysconfigdata__linux.py": b"build",
               "config-3.11-x86_64/python-config.py": b"build", "keyword.py": b"generated",
               "encodings/cp999.py": b'""" Python Character Mapping Codec generated from X with gencodec.py.',
               "notes.txt": b"not python"}
    keep_codec = {"encodings/utf_99.py": b"# hand-written codec\n"}
    kept.update(keep_codec)
    for rel, data in {**kept, **skipped}.items():
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "wb") as f:
            f.write(data)
    return kept


def test_collect_keeps_py_sources_and_skips_generated(tmp_path):
    kept = fake_stdlib(tmp_path / "lib")
    docs = collect_documents(tmp_path / "lib")
    assert dict(docs) == kept
    assert [p for p, _ in docs] == sorted(kept)


def test_build_is_deterministic_disjoint_and_sized(tmp_path):
    kept = fake_stdlib(tmp_path / "lib")
    a = load_corpus(tmp_path / "a", stdlib=tmp_path / "lib", min_bytes=0)
    b = load_corpus(tmp_path / "b", stdlib=tmp_path / "lib", min_bytes=0)
    assert a.sha256() == b.sha256()
    for s in SPLITS:
        assert a[s].paths == b[s].paths
        assert np.array_equal(a[s].data, b[s].data)
        assert hashlib.sha256(a[s].data.tobytes()).hexdigest() == a.sha256()[s]
    paths = [set(a[s].paths) for s in SPLITS]
    assert not (paths[0] & paths[1]) and not (paths[0] & paths[2]) and not (paths[1] & paths[2])
    assert set().union(*paths) == set(kept)
    for s in SPLITS:  # every document comes back byte for byte
        for i, p in enumerate(a[s].paths):
            assert a[s].document(i).tobytes() == kept[p]
    total = sum(len(v) for v in kept.values())
    for s in ("test", "valid"):  # held out until >= 5% of the bytes, one document at most over
        n = a[s].num_bytes
        assert n >= 0.05 * total
        assert n - max(len(kept[p]) for p in a[s].paths) < 0.05 * total
    assert sum(a[s].num_bytes for s in SPLITS) == total == a.manifest["bytes"]
    # another seed gives another split
    c = load_corpus(tmp_path / "c", stdlib=tmp_path / "lib", min_bytes=0, seed=7)
    assert c["test"].paths != a["test"].paths


def test_load_detects_a_corrupted_cache_and_too_small_a_stdlib(tmp_path):
    fake_stdlib(tmp_path / "lib")
    corpus = load_corpus(tmp_path / "a", stdlib=tmp_path / "lib", min_bytes=0)
    path = os.path.join(corpus.directory, "valid.bin")
    data = bytearray(open(path, "rb").read())
    data[0] ^= 1
    open(path, "wb").write(bytes(data))
    with pytest.raises(ValueError, match="SHA-256"):
        load_corpus(tmp_path / "a", stdlib=tmp_path / "lib", min_bytes=0)
    with pytest.raises(ValueError, match="test suite"):
        load_corpus(tmp_path / "b", stdlib=tmp_path / "lib")  # far under MIN_BYTES
    with pytest.raises(FileNotFoundError, match="does not exist"):
        collect_documents(tmp_path / "missing")


def test_split_documents_rejects_bad_fraction():
    with pytest.raises(ValueError, match="held_out"):
        split_documents([("a.py", b"x")], held_out=0.6)


def test_real_stdlib_corpus_matches_reference(tmp_path):
    corpus = load_corpus(tmp_path)
    summary = corpus.summary()
    assert summary["bytes"] >= MIN_BYTES
    assert summary["python"] == python_version()
    ref = REFERENCE.get(python_version())
    if ref is None:
        pytest.skip(f"no reference SHA-256s recorded for Python {python_version()}")
    for s in SPLITS:
        assert summary["splits"][s]["sha256"] == ref[s]["sha256"]
        assert summary["splits"][s]["bytes"] == ref[s]["bytes"]
        assert summary["splits"][s]["num_documents"] == ref[s]["num_documents"]


def test_stream_and_windows(tmp_path):
    fake_stdlib(tmp_path / "lib", n=30)
    corpus = load_corpus(tmp_path / "c", stdlib=tmp_path / "lib", min_bytes=0)
    train = corpus["train"]
    stream = train.stream()
    assert stream.dtype == torch.int64 and len(stream) == train.num_bytes + len(train)
    starts = train.offsets[:-1] + np.arange(len(train))
    assert (stream == BOS).nonzero()[:, 0].tolist() == starts.tolist()
    assert bytes(stream[starts[1] + 1: starts[2]].tolist()) == train.document(1).tobytes()

    task = text_task(4, corpus, seed=3)
    assert task.vocab_size == VOCAB_SIZE
    splits = task.splits(3)
    tr = splits["train"]
    assert len(tr) == len(stream) - 12 + 1 and tr.length == 12
    for k in (0, 5, len(tr) - 1):
        assert torch.equal(tr.input_ids[k], stream[k: k + 12])
        nxt = torch.cat([stream[k + 1: k + 13], torch.tensor([BOS])])[:12]
        assert torch.equal(tr.labels_mask[k], nxt != BOS)
    batch = tr[torch.tensor([3, 1, 4])]  # train() indexes windows with a LongTensor
    assert batch.input_ids.shape == (3, 12) and torch.equal(batch.input_ids[1], stream[1:13])
    for name in ("valid", "test"):
        data, s = splits[name], corpus[name].stream()
        assert len(data) == len(s) // 12
        rows = sorted(tuple(r.tolist()) for r in data.input_ids)
        assert rows == sorted(tuple(s[i * 12: i * 12 + 12].tolist()) for i in range(len(data)))
    assert not torch.equal(splits["valid"].input_ids, text_splits(corpus, 12, seed=4)["valid"].input_ids)
    # next-byte accuracy over the selected positions: a perfect predictor scores 1.0
    ids, mask = splits["valid"].input_ids[:4], splits["valid"].labels_mask[:4]
    perfect = torch.nn.functional.one_hot(torch.cat([ids[:, 1:], ids[:, :1]], 1), VOCAB_SIZE).float()
    assert token_accuracy(perfect, ids, mask) == 1.0
    with pytest.raises(ValueError, match="length"):
        text_splits(corpus, 1)
