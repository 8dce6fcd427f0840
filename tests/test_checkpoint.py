"""segment_bptt (the step-function front of the segment loop): checkpointed BPTT must give the
plain BPTT gradients with bounded memory."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from helpers import LiveBytes

from rmt_fast._extension import HAS_EXTENSION, MemoryStore, assemble_segment, extract_memory
from rmt_fast.checkpoint import segment_bptt
from rmt_fast.models.segment_loop import is_cut

VOCAB = 13
pytestmark = pytest.mark.usefixtures("one_thread")


class ToyRMT(nn.Module):
    """One pre-LN transformer block over [memory | segment | memory] with dropout p=0.1."""

    def __init__(self, d: int = 16, mem: int = 3, heads: int = 2, p: float = 0.1) -> None:
        super().__init__()
        self.mem = mem
        self.emb = nn.Embedding(VOCAB, d)
        self.mem_init = nn.Parameter(torch.randn(1, mem, d) * 0.5)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.attn = nn.MultiheadAttention(d, heads, dropout=p, batch_first=True)
        self.ff = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Dropout(p), nn.Linear(4 * d, d))
        self.head = nn.Linear(d, VOCAB)

    def initial_memory(self, batch: int) -> torch.Tensor:
        return self.mem_init.expand(batch, -1, -1)

    def step(self, memory: torch.Tensor, seg, t: int, *, embedded: bool = False,
             last_only: bool = False, num_segments: int = 0):
        """memory [B, M, d], seg = (tokens [B, S] or embeddings [B, S, d], labels [B, S])."""
        x_in, labels = seg
        emb = x_in if embedded else self.emb(x_in)
        x = assemble_segment(memory, emb, memory)  # [B, M + S + M, d]
        h = self.ln1(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        x = x + self.ff(self.ln2(x))
        m, s = self.mem, emb.shape[1]
        new_memory = extract_memory(x, m + s, m)  # [B, M, d]
        logits = self.head(x[:, m:m + s])
        if last_only and t != num_segments - 1:
            return None, new_memory, logits.detach()
        loss = F.cross_entropy(logits.reshape(-1, VOCAB), labels.reshape(-1))
        return loss, new_memory, logits.detach()


def _segments(n: int, batch: int = 2, seg_len: int = 5, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randint(0, VOCAB, (batch, seg_len), generator=g),
             torch.randint(0, VOCAB, (batch, seg_len), generator=g)) for _ in range(n)]


def _run(model: ToyRMT, segs, *, checkpoint: bool, bptt_depth: int = -1, seed: int = 1234,
         last_only: bool = False, reduction: str = "sum", offload: bool = False):
    """Loss value, final memory and {name: grad} of one forward + backward."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    n = len(segs)

    def step(memory, seg, t):
        return model.step(memory, seg, t, last_only=last_only, num_segments=n)

    res = segment_bptt(step, model.initial_memory(segs[0][0].shape[0]), segs,
                       bptt_depth=bptt_depth, checkpoint=checkpoint, reduction=reduction,
                       offload=offload)
    # The final memory feeds a loss too, so its gradient path is exercised.
    (res.loss + 0.1 * res.memory.square().mean()).backward()
    grads = {k: (p.grad.clone() if p.grad is not None else None)
             for k, p in model.named_parameters()}
    return res.loss.detach(), res.memory.detach(), grads


def _assert_grads_equal(a: dict, b: dict, tol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if a[k] is None or b[k] is None:
            assert a[k] is None and b[k] is None, f"{k}: grad None in one mode only"
            continue
        err = (a[k] - b[k]).abs().max().item()
        assert err <= tol * max(1.0, a[k].abs().max().item()), f"{k}: max abs diff {err}"


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
@pytest.mark.parametrize("bptt_depth", [-1, 1, 2])
def test_checkpoint_matches_plain_bptt(dtype, tol, bptt_depth):
    torch.manual_seed(0)
    model = ToyRMT().to(dtype).train()
    segs = _segments(5)
    loss_p, mem_p, grads_p = _run(model, segs, checkpoint=False, bptt_depth=bptt_depth)
    loss_c, mem_c, grads_c = _run(model, segs, checkpoint=True, bptt_depth=bptt_depth)
    torch.testing.assert_close(loss_c, loss_p, rtol=0, atol=tol)
    torch.testing.assert_close(mem_c, mem_p, rtol=0, atol=tol)
    _assert_grads_equal(grads_p, grads_c, tol)
    assert all(g is not None for k, g in grads_p.items() if k != "mem_init")
    # dropout is really on: another seed gives another loss
    loss_other, _, _ = _run(model, segs, checkpoint=False, bptt_depth=bptt_depth, seed=99)
    assert (loss_other - loss_p).abs().item() > 1e-6


def test_dropout_replayed_not_just_disabled():
    """Without RNG restore the recomputed dropout masks differ and so do the gradients."""
    torch.manual_seed(0)
    model = ToyRMT().double().train()
    segs = _segments(4)
    _, _, grads_p = _run(model, segs, checkpoint=False)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1234)
    res = segment_bptt(lambda m, s, t: model.step(m, s, t), model.initial_memory(2), segs,
                       checkpoint=True, preserve_rng_state=False)
    (res.loss + 0.1 * res.memory.square().mean()).backward()
    diff = max((p.grad - grads_p[k]).abs().max().item() for k, p in model.named_parameters())
    assert diff > 1e-6


@pytest.mark.parametrize("bptt_depth", [1, 2, 3])
def test_truncation_cuts_memory_init_gradient(bptt_depth):
    torch.manual_seed(0)
    model = ToyRMT().double().train()
    n = 4
    segs = _segments(n)
    _, _, full = _run(model, segs, checkpoint=False, bptt_depth=-1)
    assert full["mem_init"].abs().max().item() > 0
    for checkpoint in (False, True):
        _, _, trunc = _run(model, segs, checkpoint=checkpoint, bptt_depth=bptt_depth)
        g = trunc["mem_init"]
        assert g is None or g.abs().max().item() == 0.0  # N > k: memory init is cut off
        diff = (trunc["emb.weight"] - full["emb.weight"]).abs().max().item()
        if bptt_depth < n - 1:  # memory between segments is cut too: other grads change
            assert diff > 1e-8
        else:  # only the memory entering segment 0 (= memory init) is cut
            assert diff < 1e-12
    # k >= N: nothing is cut, identical to full BPTT
    _, _, no_cut = _run(model, segs, checkpoint=True, bptt_depth=n)
    _assert_grads_equal(full, no_cut, 1e-10)


def test_truncation_rule():
    assert [is_cut(t, 5, 2) for t in range(5)] == [True, True, True, False, False]
    assert not any(is_cut(t, 5, -1) for t in range(5))
    assert all(is_cut(t, 5, 0) for t in range(5))


def test_truncated_window_matches_manual_loop():
    """bptt_depth=k equals a hand-written loop that detaches memory entering t < N - k."""
    torch.manual_seed(0)
    model = ToyRMT().double().train()
    segs, k = _segments(5), 2
    _, _, grads_c = _run(model, segs, checkpoint=True, bptt_depth=k)
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1234)
    mem, total = model.initial_memory(2), 0
    for t, seg in enumerate(segs):
        if t < len(segs) - k:
            mem = mem.detach()
        loss, mem, _ = model.step(mem, seg, t)
        total = total + loss
    (total + 0.1 * mem.square().mean()).backward()
    manual = {k_: (p.grad.clone() if p.grad is not None else None)
              for k_, p in model.named_parameters()}
    _assert_grads_equal(manual, grads_c, 1e-10)


def test_last_segment_loss_only_and_mean_reduction():
    torch.manual_seed(0)
    model = ToyRMT().double().train()
    segs = _segments(4)
    for kwargs in ({"last_only": True}, {"reduction": "mean"}, {"offload": True}):
        lp, mp, gp = _run(model, segs, checkpoint=False, **kwargs)
        lc, mc, gc = _run(model, segs, checkpoint=True, **kwargs)
        torch.testing.assert_close(lc, lp, rtol=0, atol=1e-10)
        _assert_grads_equal(gp, gc, 1e-10)


def test_segment_inputs_requiring_grad():
    """Embeddings computed outside step_fn (graph leaves of the segments) get their gradients."""
    torch.manual_seed(0)
    model = ToyRMT().double().train()
    segs = _segments(4)
    results = []
    for checkpoint in (False, True):
        model.zero_grad(set_to_none=True)
        torch.manual_seed(7)
        emb_segs = [(model.emb(tok), lab) for tok, lab in segs]
        res = segment_bptt(lambda m, s, t: model.step(m, s, t, embedded=True),
                           model.initial_memory(2), emb_segs, checkpoint=checkpoint)
        res.loss.backward()
        results.append({k: p.grad.clone() for k, p in model.named_parameters()})
    _assert_grads_equal(results[0], results[1], 1e-10)
    assert results[1]["emb.weight"].abs().max().item() > 0


@pytest.mark.parametrize("how", ["grad", "inputs"])
def test_autograd_grad_and_backward_inputs_work(how):
    """torch.autograd.grad and backward(inputs=...) through checkpointed segments (the old
    hand-made engine refused both) give the plain BPTT gradients, only for what was asked."""
    torch.manual_seed(0)
    model = ToyRMT().double().train()
    segs = _segments(4)
    _, _, plain = _run(model, segs, checkpoint=False, bptt_depth=2)
    wanted = ["mem_init", "attn.in_proj_weight", "head.weight"]
    params = [dict(model.named_parameters())[k] for k in wanted]
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1234)
    res = segment_bptt(lambda m, s, t: model.step(m, s, t), model.initial_memory(2), segs,
                       bptt_depth=2, checkpoint=True)
    total = res.loss + 0.1 * res.memory.square().mean()
    if how == "grad":
        got = torch.autograd.grad(total, params, allow_unused=True, materialize_grads=True)
        assert all(p.grad is None for p in model.parameters())  # .grad untouched
    else:
        total.backward(inputs=params)
        got = [p.grad for p in params]
        assert all(p.grad is None for k, p in model.named_parameters() if k not in wanted)
    for k, g in zip(wanted, got, strict=True):
        if plain[k] is None:  # mem_init: cut off by the truncation (N = 4 > k = 2)
            assert g is None or g.abs().max().item() == 0.0, k
            continue
        assert (g - plain[k]).abs().max().item() <= 1e-10, k
    assert got[1].abs().max() > 0


def test_store_holds_one_state_per_segment_and_is_emptied():
    model = ToyRMT().double().train()
    store = MemoryStore()
    assert store.native == HAS_EXTENSION
    res = segment_bptt(lambda m, s, t: model.step(m, s, t), model.initial_memory(2),
                       _segments(6), checkpoint=True, store=store)
    assert store.segments() == list(range(6))
    assert store.nbytes() == 6 * 2 * 3 * 16 * 8
    assert res.store is store and res.kept_bytes == store.nbytes()
    res.loss.backward()
    assert store.size() == 0  # each state left the store when its segment was recomputed
    with pytest.raises(RuntimeError, match="second time"):
        res.loss.backward()


def test_bad_arguments():
    model = ToyRMT().double()
    with pytest.raises(ValueError, match="bptt_depth"):
        segment_bptt(model.step, model.initial_memory(2), _segments(2), bptt_depth=-2)
    with pytest.raises(ValueError, match="at least one"):
        segment_bptt(model.step, model.initial_memory(2), [])
    with pytest.raises(ValueError, match="scalar"):
        segment_bptt(lambda m, s, t: (m.sum(1), m, None), model.initial_memory(2), [0])


def _peak_bytes(n: int, checkpoint: bool) -> int:
    torch.manual_seed(0)
    model = ToyRMT(d=32, mem=2).train()
    # memory (512 B) + token ids are kept per segment: activations of one segment (~1 MB here)
    # must dominate them for the 1.3x bound.
    segs = _segments(n, batch=8, seg_len=32)
    with LiveBytes() as counter:
        # no aux: the logits a step returns are the caller's, kept by any loop
        res = segment_bptt(lambda m, s, t: model.step(m, s, t)[:2] + (None,),
                           model.initial_memory(8), segs, checkpoint=checkpoint)
        res.loss.backward()
        del res
    return counter.peak


def test_memory_bounded_with_checkpointing():
    plain4, plain64 = _peak_bytes(4, checkpoint=False), _peak_bytes(64, checkpoint=False)
    ckpt4, ckpt64 = _peak_bytes(4, checkpoint=True), _peak_bytes(64, checkpoint=True)
    print(f"peak bytes: plain 4={plain4} 64={plain64}; checkpoint 4={ckpt4} 64={ckpt64}")
    assert plain64 >= 12 * plain4, (plain4, plain64)  # ~linear (16x)
    assert ckpt64 <= 1.3 * ckpt4, (ckpt4, ckpt64)
    # the recomputation is counted: at least about one segment of activations
    assert ckpt4 >= 0.5 * plain4 / 4, (ckpt4, plain4)
    assert ckpt64 < plain64 / 10


def test_checkpoint_with_dict_store_and_no_grad():
    """The pure-PyTorch store (used without the extension) gives the same gradients; under
    no_grad checkpoint=True is a plain loop."""
    from rmt_fast._extension import _PyMemoryStore

    torch.manual_seed(0)
    model = ToyRMT().double().train()
    segs = _segments(3)
    _, _, grads_p = _run(model, segs, checkpoint=False, bptt_depth=2)
    store = MemoryStore.__new__(MemoryStore)
    store._impl = _PyMemoryStore()
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1234)
    res = segment_bptt(lambda m, s, t: model.step(m, s, t), model.initial_memory(2), segs,
                       bptt_depth=2, store=store)
    assert not store.native and store.size() == 3
    (res.loss + 0.1 * res.memory.square().mean()).backward()
    _assert_grads_equal(grads_p, {k: p.grad for k, p in model.named_parameters()}, 1e-10)
    with torch.no_grad():
        res = segment_bptt(lambda m, s, t: model.step(m, s, t), model.initial_memory(2), segs)
    assert res.kept_bytes == 0 and res.store is None and not res.loss.requires_grad
