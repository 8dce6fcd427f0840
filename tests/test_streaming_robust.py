"""StreamingReader under bad input and faults: constructor checks, atomic feed/flush/generate,
read_file's format detection, inference semantics (eval mode, modes restored)."""

import numpy as np
import pytest
import torch
from models import VOCAB, ids, tiny_gpt2

from rmt_fast.models import RMTForCausalLM
from rmt_fast.streaming import StreamingReader

SEG = 8


@pytest.fixture
def model():
    return RMTForCausalLM(tiny_gpt2(), num_mem_tokens=3, segment_size=SEG, xl_cache=4)


def _state(reader):
    xl = None if reader.xl is None else (
        reader.xl.padding.clone(), {i: (k.clone(), v.clone()) for i, (k, v) in reader.xl.kv.items()})
    return reader.memory.clone(), xl, reader._buffer.clone(), reader.tokens_read


def _assert_state(reader, state):
    memory, xl, buffer, read = state
    assert reader.tokens_read == read
    assert torch.equal(reader.memory, memory)
    assert torch.equal(reader._buffer, buffer)
    if xl is None:
        assert reader.xl is None
    else:
        assert torch.equal(reader.xl.padding, xl[0])
        assert reader.xl.kv.keys() == xl[1].keys()
        for i, (k, v) in xl[1].items():
            assert torch.equal(reader.xl.kv[i][0], k) and torch.equal(reader.xl.kv[i][1], v)


def _started(model, batch_size=1):
    """A reader with memory, XL cache and a non-empty buffer."""
    reader = StreamingReader(model, batch_size=batch_size, progress=False)
    reader.feed(ids(batch_size, 21, seed=3) if batch_size > 1 else ids(1, 21, seed=3)[0])
    assert reader.xl is not None and reader._buffer.shape[1] == 5
    return reader


@pytest.mark.parametrize("kwargs,match", [
    (dict(batch_size=0), r"batch_size must be an int >= 1, got 0"),
    (dict(batch_size=-2), r"batch_size must be an int >= 1, got -2"),
    (dict(batch_size=True), r"batch_size must be an int >= 1, got True"),
    (dict(batch_size=1.0), r"batch_size must be an int >= 1, got 1.0"),
    (dict(progress="no"), r"progress must be a bool, got 'no'"),
])
def test_constructor_rejects(model, kwargs, match):
    with pytest.raises(ValueError, match=match):
        StreamingReader(model, **kwargs)
    with pytest.raises(TypeError, match="model must be an RMTForCausalLM"):
        StreamingReader(tiny_gpt2())


def _bad_late_id():
    t = ids(1, 40, seed=4)[0]
    t[30] = VOCAB  # in the 4th segment of this chunk
    return t


@pytest.mark.parametrize("tokens,match", [
    (_bad_late_id(), r"tokens holds 61 at index \[0, 30\]: every value must be in \[0, 61\)"),
    (torch.tensor([1, 2, -3]), r"tokens holds -3 at index \[0, 2\]"),
    (ids(1, 40)[0].float(), r"tokens must hold integer ids, got dtype torch.float32"),
    (ids(1, 40)[0].numpy().astype(np.float64), r"tokens must hold integer token ids, got a numpy "
                                               r"array of dtype float64"),
    (np.array(["1", "2"]), r"tokens must hold integer token ids, got a numpy array of dtype <U1"),
    (ids(1, 40)[None], r"tokens must be \[n\] or \[B, n\] token ids .* shape \[1, 1, 40\]"),
    (ids(2, 40), r"tokens must have batch size 1 \(\[B, n\] = \[1, n\]\), got \[2, 40\]"),
    ("hello world", r"tokens must be a \[n\] or \[B, n\] tensor/array of token ids or an iterator "
                    r"of ints, got str"),
    (b"\x01\x02", r"got bytes"),
    (7, r"got int"),
    (iter([1, 2, 3] * 10 + ["4"]), r"tokens must yield int token ids, got str '4' at position 30"),
    (iter([1.0, 2.0]), r"tokens must yield int token ids, got float 1.0 at position 0"),
    (iter([1, True]), r"got bool True at position 1"),
    (iter([1] * 35 + [VOCAB + 5]), r"tokens holds 66 at index \[0, 3\]"),
])
def test_feed_rejects_and_leaves_state_unchanged(model, tokens, match):
    reader = _started(model)
    before = _state(reader)
    with pytest.raises(ValueError, match=match):
        reader.feed(tokens)
    _assert_state(reader, before)


def test_batched_reader_rejects_1d_and_iterators(model):
    reader = _started(model, batch_size=2)
    before = _state(reader)
    with pytest.raises(ValueError, match=r"tokens is 1-D \[40\] but batch_size=2"):
        reader.feed(ids(1, 40)[0])
    with pytest.raises(ValueError, match="an iterator of ints feeds batch_size=1 only"):
        reader.feed(iter(range(10)))
    with pytest.raises(ValueError, match=r"prompt_ids must have batch size 2"):
        reader.generate(ids(1, 3), max_new_tokens=1, do_sample=False, pad_token_id=0)
    _assert_state(reader, before)


@pytest.mark.parametrize("exc", [RuntimeError("boom in segment 3"), KeyboardInterrupt()])
def test_failure_inside_the_model_leaves_state_unchanged(model, monkeypatch, exc):
    """The issue's case: an error in segment 3 of a chunk; feeding the chunk again reads it once."""
    tokens = ids(1, 45, seed=5)[0]
    reader = _started(model)
    before = _state(reader)
    real, calls = model._step, []  # the per-segment step the segment loop calls

    def failing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise exc
        return real(*args, **kwargs)

    monkeypatch.setattr(model, "_step", failing)
    with pytest.raises(type(exc)):
        reader.feed(tokens)
    assert len(calls) == 3
    _assert_state(reader, before)
    monkeypatch.setattr(model, "_step", real)
    reader.feed(tokens)
    expect = _started(model)
    expect.feed(tokens)
    _assert_state(reader, _state(expect))
    assert reader.tokens_read == 21 + 45 - (21 + 45) % SEG


def test_generate_with_bad_prompt_does_not_flush(model):
    reader = _started(model)
    before = _state(reader)
    with pytest.raises(ValueError, match=r"prompt_ids holds 99"):
        reader.generate(torch.tensor([[1, 99]]), max_new_tokens=1, do_sample=False, pad_token_id=0)
    with pytest.raises(ValueError, match=r"prompt_ids must hold integer ids"):
        reader.generate(torch.tensor([[1.0, 2.0]]), max_new_tokens=1)
    with pytest.raises(ValueError, match=r"prompt_ids must be \[B, T\] token ids"):
        reader.generate(torch.tensor([1, 2]), max_new_tokens=1)
    _assert_state(reader, before)


# --- inference semantics -------------------------------------------------------------------------
def _noisy_model():
    """Dropout 0.3 and memory noise 0.5, in train mode: every training-mode read differs."""
    model = RMTForCausalLM(tiny_gpt2(dropout=0.3), num_mem_tokens=3, segment_size=SEG, memory_noise=0.5)
    return model.train()


def test_reading_and_generation_use_eval_mode_and_restore_modes():
    model = _noisy_model()
    model.base.transformer.h[0].eval()  # a mixed state the user set: must survive
    modes = {name: m.training for name, m in model.named_modules()}
    tokens, prompt = ids(1, 40, seed=6), ids(1, 4, seed=7)
    torch.manual_seed(0)
    with torch.no_grad():  # training mode really is random here (so the test can fail)
        a = model(tokens).memory
        b = model(tokens).memory
    assert not torch.equal(a, b)
    readers = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        reader = StreamingReader(model, progress=False)
        reader.feed(tokens[0])
        readers.append(reader)
        assert {name: m.training for name, m in model.named_modules()} == modes
    _assert_state(readers[0], _state(readers[1]))
    gen = [r.generate(prompt, max_new_tokens=3, do_sample=False, pad_token_id=0) for r in readers]
    assert torch.equal(gen[0], gen[1])
    assert {name: m.training for name, m in model.named_modules()} == modes
    # model.read / model.generate directly: the same inference semantics
    mem_read, _ = model.read(tokens)
    model.eval()
    mem_eval, _ = model.read(tokens)
    expect = model.generate(torch.cat([tokens, prompt], 1), max_new_tokens=3, do_sample=False,
                            pad_token_id=0)
    model.train()
    torch.testing.assert_close(mem_read, mem_eval, rtol=0, atol=0)
    torch.testing.assert_close(readers[0].memory, mem_eval, rtol=0, atol=0)
    got = model.generate(torch.cat([tokens, prompt], 1), max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert torch.equal(got, expect)
    assert model.training


# --- read_file -----------------------------------------------------------------------------------
def _fed(model, tokens, batch_size=1):
    reader = StreamingReader(model, batch_size=batch_size, progress=False)
    reader.feed(tokens)
    return reader


@pytest.mark.parametrize("dtype", [np.int32, np.uint16, np.int64])
def test_read_file_raw_and_npy_equal_feed(model, tmp_path, dtype):
    tokens = ids(1, 50, seed=8)[0]
    expect = _state(_fed(model, tokens))
    raw = tmp_path / "tokens.bin"
    tokens.numpy().astype(dtype).tofile(raw)
    reader = StreamingReader(model, progress=False)
    reader.read_file(raw, dtype=dtype, chunk_tokens=13)
    _assert_state(reader, expect)
    for name in ("tokens.npy", "tokens_npy_content.bin"):  # recognised by the header, not the name
        path = tmp_path / name
        with open(path, "wb") as f:
            np.save(f, tokens.numpy().astype(dtype))
        reader = StreamingReader(model, progress=False)
        reader.read_file(path, chunk_tokens=17)
        _assert_state(reader, expect)


def test_read_file_batched_npy(model, tmp_path):
    tokens = ids(2, 30, seed=9)
    np.save(tmp_path / "rows.npy", tokens.numpy())
    reader = StreamingReader(model, batch_size=2, progress=False)
    reader.read_file(tmp_path / "rows.npy", chunk_tokens=7)
    _assert_state(reader, _state(_fed(model, tokens, batch_size=2)))


def _write(path, data: bytes):
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("make,kwargs,match", [
    (lambda p: _write(p, np.arange(1, 41, dtype=np.int64).tobytes()), {},
     r"every second int32 value is 0, as when int64 ids are read as int32: pass dtype=np.int64"),
    (lambda p: _write(p, np.arange(1, 41, dtype=np.int32).tobytes()), dict(dtype=np.uint16),
     r"every second uint16 value is 0, as when uint32 ids"),
    (lambda p: _write(p, b"\x01\x00\x00\x00\x02\x00"), {},
     r"has 6 bytes, not a multiple of int32's item size 4"),
    (lambda p: _write(p, "Eine Nadel im Heuhaufen, größer als gedacht — ça va.\n".encode() * 4), {},
     r"looks like a text file"),
    (lambda p: _write(p, np.array([1, 2, 3, 70, 4] * 20, dtype=np.int32).tobytes()), dict(chunk_tokens=16),
     r"token id 70 at position 3 is outside the vocabulary \[0, 61\) \(is dtype=int32 right\?\)"),
    (lambda p: _write(p, np.array([5, -1] * 40, dtype=np.int16).tobytes()), dict(dtype=np.int16),
     r"token id -1 at position 1 is outside the vocabulary"),
    (lambda p: np.save(p, np.ones(10, dtype=np.float32)) or p.with_suffix(".npy"), {},
     r"is a .npy file of float32: token ids must be integers"),
    (lambda p: np.save(p, np.ones(10, dtype=np.int64)) or p.with_suffix(".npy"), dict(dtype=np.int32),
     r"is a .npy file of int64, not dtype=int32"),
    (lambda p: np.save(p, np.ones((3, 10), dtype=np.int64)) or p.with_suffix(".npy"), {},
     r"is a .npy array of shape \[3, 10\]: this reader needs \[n\]"),
    (lambda p: _write(p, b"\x93NUMPY\x01\x00garbage"), {}, r"cannot read this .npy file"),
    (lambda p: _write(p, b"\x01\x00\x00\x00"), dict(dtype=np.float32), r"dtype must be an integer numpy"),
    (lambda p: _write(p, b"\x01\x00\x00\x00"), dict(chunk_tokens=0), r"chunk_tokens must be an int >= 1"),
])
def test_read_file_detects_bad_files_before_reading(model, tmp_path, make, kwargs, match):
    path = make(tmp_path / "data")
    reader = _started(model)
    before = _state(reader)
    with pytest.raises(ValueError, match=match) as info:
        reader.read_file(path, **kwargs)
    assert str(path) in str(info.value) or "chunk_tokens" in match or "dtype must" in match
    _assert_state(reader, before)


def test_read_file_flat_file_needs_batch_one_and_empty_file_is_a_noop(model, tmp_path):
    path = _write(tmp_path / "t.bin", np.arange(1, 20, dtype=np.int32).tobytes())
    with pytest.raises(ValueError, match=r"flat binary file \(one stream\) but batch_size=2"):
        StreamingReader(model, batch_size=2, progress=False).read_file(path)
    reader = _started(model)
    before = _state(reader)
    reader.read_file(_write(tmp_path / "empty.bin", b""))
    _assert_state(reader, before)
    with pytest.raises(FileNotFoundError, match="missing.bin"):
        reader.read_file(tmp_path / "missing.bin")


def test_eval_mode_is_counted_across_nesting_and_threads():
    """Threads reading with one train-mode model: the first in switches to eval, the last out
    restores; every reader gets the eval-mode result."""
    import threading

    from rmt_fast.models.modes import eval_mode

    model = _noisy_model()
    tokens = ids(1, 48, seed=11)[0]
    model.eval()
    expect, _ = model.read(tokens[None])
    model.train()
    results, errors = [], []

    def work():
        try:
            for _ in range(3):
                reader = StreamingReader(model, progress=False)
                reader.feed(tokens)
                results.append(reader.memory)
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and len(results) == 9
    for memory in results:
        torch.testing.assert_close(memory, expect, rtol=0, atol=0)
    assert all(m.training for m in model.modules())
    with eval_mode(model):
        with eval_mode(model):
            assert not model.training
        assert not model.training  # the inner exit does not restore early
    assert model.training and "_rmt_fast_eval_users" not in model.__dict__
