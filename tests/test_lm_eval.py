"""rmt_fast.tasks.lm_eval: streamed bits per byte carry memory and the XL cache exactly as the
model's full-sequence forward does, whatever the batching; the state-size report."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from models import random_mv

from rmt_fast.tasks.lm_eval import long_streams, report, state_floats, stream_nll
from rmt_fast.tasks.text_corpus import BOS, CorpusSplit
from rmt_fast.train import build_model

torch.set_num_threads(1)
SEG = 8


def tiny(mem, xl, mask="causal", seed=1, arch="gpt2"):
    # init="torch" (larger weights) makes the outputs depend strongly on the carried state
    if arch == "armt":  # ARMT around GPT-2, with a W_mv that is not zero (it starts at zero)
        return random_mv(build_model(257, SEG, mem, layers=2, d_model=32, heads=4, d_inner=64, seed=seed,
                                     init="torch", model="armt", d_mem=4).double(), seed, 0.3)
    return build_model(257, SEG, mem, layers=2, d_model=32, heads=4, d_inner=64, xl_cache=xl,
                       mask=mask, seed=seed, init="torch", arch=arch).double()


def documents(seed=0, sizes=(5, 7, 8, 30, 19, 1, 0, 41, 16)):
    g = np.random.default_rng(seed)
    return [g.integers(0, 256, n).astype(np.uint8) for n in sizes]


@torch.no_grad()
def full_forward_nll(model, doc):
    """Summed NLL of ``[BOS] + doc`` from one ``forward`` over the whole document."""
    if len(doc) == 0:
        return 0.0
    ids = torch.cat([torch.tensor([BOS]), torch.as_tensor(doc).long()])[None]
    out = model(ids, labels=ids)
    return float(out.loss) * len(doc)


@pytest.mark.parametrize("mem,xl,mask,arch", [(0, 0, "causal", "gpt2"), (3, 0, "causal", "gpt2"),
                                              (0, 3, "causal", "gpt2"), (3, 3, "rmt", "gpt2"),
                                              (2, 12, "causal", "gpt2"), (2, 12, "causal", "llama"),
                                              (0, 3, "causal", "llama"), (3, 0, "causal", "armt")])
def test_stream_equals_full_sequence_forward(mem, xl, mask, arch):
    """Also for rotary keys moved in the XL cache, where lanes of a batch have different
    amounts of real tokens (so different moves) when documents end inside it, and for ARMT
    (lanes in waves)."""
    model = tiny(mem, xl, mask, arch=arch)
    docs = documents()
    ref = np.array([full_forward_nll(model, d) for d in docs])
    for lanes in (1, 3):  # 3 lanes < 9 documents: lanes take new documents and reset their state
        res = stream_nll(model, docs, batch_size=lanes)
        assert res.bytes.tolist() == [len(d) for d in docs]
        np.testing.assert_allclose(res.nll, ref, rtol=1e-6, atol=1e-9)
    assert math.isclose(res.bits_per_byte, ref.sum() / math.log(2) / sum(len(d) for d in docs),
                        rel_tol=1e-6)
    # cutting the documents into segment-sized pieces (state not carried) gives other numbers:
    # the comparison above can tell a broken carry from a right one
    if mem or xl:
        pieces = [docs[3][s: s + SEG] for s in range(0, len(docs[3]), SEG)]
        cut = stream_nll(model, pieces).nll.sum()
        assert abs(cut - ref[3]) > 1e-3 * abs(ref[3])  # 1,000 times the tolerance


@pytest.mark.parametrize("mem,xl,arch", [(3, 3, "gpt2"), (3, 0, "armt")])
@torch.no_grad()
def test_bits_by_segment_position_and_index_add_up_and_match_the_full_forward(mem, xl, arch):
    model = tiny(mem, xl, arch=arch)
    docs = documents(3)
    want_nll, want_bytes = np.zeros(SEG), np.zeros(SEG, dtype=np.int64)
    longest = max(-(-(len(d) + 1) // SEG) for d in docs)  # segments of [BOS] + doc
    want_idx, want_idx_bytes = np.zeros(longest), np.zeros(longest, dtype=np.int64)
    for doc in docs:
        if len(doc) == 0:
            continue
        ids = torch.cat([torch.tensor([BOS]), torch.as_tensor(doc).long()])
        logits = model(ids[None]).logits[0]
        tok = torch.nn.functional.cross_entropy(logits[:-1], ids[1:], reduction="none")
        for i, v in enumerate(tok.tolist()):  # token i predicts token i + 1
            want_nll[i % SEG] += v
            want_bytes[i % SEG] += 1
            want_idx[i // SEG] += v
            want_idx_bytes[i // SEG] += 1
    res = stream_nll(model, docs, batch_size=3)
    assert res.position_bytes.tolist() == want_bytes.tolist()
    assert res.position_bytes.sum() == res.bytes.sum()
    np.testing.assert_allclose(res.position_nll, want_nll, rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(res.position_nll.sum(), res.nll.sum(), rtol=1e-9)
    assert res.index_bytes.tolist() == want_idx_bytes.tolist()
    np.testing.assert_allclose(res.index_nll, want_idx, rtol=1e-6, atol=1e-9)
    by_pos = report(model, res)["bits_per_byte_by_position"]
    assert len(by_pos) == SEG
    assert by_pos[0] == pytest.approx(want_nll[0] / math.log(2) / want_bytes[0], rel=1e-4)


@pytest.mark.parametrize("mem,xl,arch", [(3, 0, "gpt2"), (2, 12, "llama")])
@torch.no_grad()
def test_streams_of_several_documents_carry_the_state_through_bos(mem, xl, arch):
    """A stream ``[BOS] d0 [BOS] d1 ...`` (:func:`long_streams`) is read through with the state
    carried: its NLL is the full forward's over the whole stream with nothing scored where BOS
    is the next token, and it differs from reading the documents apart (state reset)."""
    model = tiny(mem, xl, arch=arch)
    docs = documents(5, sizes=(13, 9, 21, 6, 17))
    split = CorpusSplit("test", np.concatenate(docs), np.cumsum([0] + [len(d) for d in docs]),
                        tuple(f"d{i}" for i in range(len(docs))))
    pieces = long_streams(split, 2, 34)
    whole = split.stream()
    assert torch.equal(torch.cat(pieces), whole[:68]) and int(pieces[0][0]) == BOS
    want = []
    for piece in pieces:
        ids = piece if int(piece[0]) == BOS else torch.cat([torch.tensor([BOS]), piece])
        tok = torch.nn.functional.cross_entropy(model(ids[None]).logits[0, :-1], ids[1:], reduction="none")
        want.append(float(tok[ids[1:] != BOS].sum()))
    for lanes in (1, 2):
        res = stream_nll(model, pieces, batch_size=lanes)
        assert res.bytes.tolist() == [int((p[1:] != BOS).sum()) if int(p[0]) == BOS
                                      else int((p != BOS).sum()) for p in pieces]
        np.testing.assert_allclose(res.nll, want, rtol=1e-6, atol=1e-9)
    # [BOS] d0 [BOS] d1 read as one stream against d0 and d1 read apart: the test can tell
    together = stream_nll(model, [pieces[0][: 1 + 13 + 1 + 9]])
    apart = stream_nll(model, docs[:2])
    assert together.bytes.sum() == apart.bytes.sum() == 22
    assert abs(together.nll.sum() - apart.nll.sum()) > 1e-4 * apart.nll.sum()  # 100x the rtol
    with pytest.raises(ValueError, match="need 102 tokens"):
        long_streams(split, 3, 34)
    with pytest.raises(ValueError, match="streams must be"):
        long_streams(split, 0, 34)


def test_stream_restores_mode_and_checks_inputs():
    model = tiny(2, 0)
    model.train()
    stream_nll(model, documents(sizes=(3, 9)), batch_size=2)
    assert model.training
    with pytest.raises(ValueError, match="batch_size"):
        stream_nll(model, documents(), batch_size=0)
    with pytest.raises(ValueError, match="byte values"):
        stream_nll(model, [np.array([1, 300])])
    small = build_model(100, SEG, 2, layers=1, d_model=16, heads=2, d_inner=32)
    with pytest.raises(ValueError, match="BOS"):
        stream_nll(small, documents())
    with pytest.raises(TypeError, match="RMTForCausalLM"):
        stream_nll(torch.nn.Linear(2, 2), documents())


@pytest.mark.parametrize("mem,xl", [(0, 0), (4, 0), (0, 5), (4, 5)])
def test_state_size_matches_the_carried_tensors(mem, xl):
    model = tiny(mem, xl)
    ids = torch.randint(0, 256, (1, 3 * SEG))
    with torch.no_grad():
        out = model(ids)
    carried = out.memory[0].numel()
    if out.xl is not None:
        carried += sum(k[0].numel() + v[0].numel() for k, v in out.xl.kv.values())
    floats = state_floats(model)
    assert floats["total"] == carried
    assert floats["memory"] == mem * 32 and floats["xl"] == xl * 32 * 2 * 2
    res = stream_nll(model, documents(sizes=(20,)))
    row = report(model, res)
    assert row["state_bytes"] == 4 * carried and row["bytes"] == 20
    assert row["bits_per_byte"] == pytest.approx(res.nll.sum() / math.log(2) / 20)
