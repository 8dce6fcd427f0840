"""The segment loop (rmt_fast.models.segment_loop): checkpointed segments (torch.utils.checkpoint,
non-reentrant, states in the extension's store) give plain BPTT's outputs and gradients on every
model, compose with autograd.grad / backward(inputs=) / accumulation / autocast / torch.compile,
and keep training memory flat in the number of segments."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F
from helpers import LiveBytes
from models import ids, tiny_bert, tiny_gpt2
from transformers import BertForSequenceClassification, BertForTokenClassification, BertModel

from rmt_fast._extension import MemoryStore
from rmt_fast.models import (
    MemoryTransformer,
    RMTConfig,
    RMTEncoderForSequenceClassification,
    RMTEncoderForTokenClassification,
    RMTForCausalLM,
    segment_loop,
)
from rmt_fast.models.segment_loop import Segment, SegmentState, keep_rows, run_segments

pytestmark = pytest.mark.usefixtures("one_thread")
DTYPES = [(torch.float64, 1e-10), (torch.float32, 1e-5)]


def assert_grads_equal(ref: dict, got: dict, tol: float) -> None:
    assert ref.keys() == got.keys()
    for name in ref:
        a, b = ref[name], got[name]
        if a is None or b is None:
            assert a is None and b is None, f"{name}: gradient in one mode only"
            continue
        err = (a - b).abs().max().item()
        assert err <= tol * max(1.0, a.abs().max().item()), f"{name}: max |diff| {err:.3g}"


def grads_of(model) -> dict:
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


# ------------------------------------------------------------------------------------- decoder

def padded_batch(length=30, pad=13, seed=0):
    """3 rows; row 1 is left-padded by ``pad`` tokens (its first segments are empty)."""
    tokens = ids(3, length, seed=seed)
    mask = torch.ones(3, length, dtype=torch.long)
    mask[1, :pad] = 0
    labels_mask = mask.bool().clone()
    labels_mask[2, :10] = False  # an answer-only row
    return tokens, mask, labels_mask


def decoder(dtype, ckpt, **kw):
    torch.manual_seed(3)
    base = tiny_gpt2(n_positions=40, dropout=0.1).to(dtype)
    return RMTForCausalLM(base, num_mem_tokens=3, segment_size=6, mask="rmt",
                          checkpoint_segments=ckpt, **kw).train()


def run_decoder(dtype, ckpt, seed=11, **kw):
    model = decoder(dtype, ckpt, **kw)
    tokens, mask, labels_mask = padded_batch()
    torch.manual_seed(seed)
    out = model(tokens, labels=tokens, attention_mask=mask, labels_mask=labels_mask,
                return_logits=True)
    # the final memory feeds the objective too, so its gradient path is exercised
    (out.loss + 0.1 * out.memory.square().mean()).backward()
    return out, grads_of(model)


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("depth", [-1, 2])
def test_decoder_checkpoint_equals_plain(dtype, tol, depth):
    """Dropout, memory noise, XL cache, padded rows with empty segments, truncation: the same
    loss, logits, memory, XL cache and gradients of every parameter (memory init included)."""
    kw = dict(xl_cache=3, bptt_depth=depth, memory_noise=0.2)
    plain, g_plain = run_decoder(dtype, False, **kw)
    ckpt, g_ckpt = run_decoder(dtype, True, **kw)
    for a, b in [(plain.loss, ckpt.loss), (plain.logits, ckpt.logits), (plain.memory, ckpt.memory),
                 (plain.xl.padding, ckpt.xl.padding)]:
        torch.testing.assert_close(b.detach(), a.detach(), atol=tol, rtol=0)
    for layer, (k, v) in plain.xl.kv.items():
        torch.testing.assert_close(ckpt.xl.kv[layer][0], k, atol=tol, rtol=0)
        torch.testing.assert_close(ckpt.xl.kv[layer][1], v, atol=tol, rtol=0)
        # the cache owns its bytes: a view would keep the segment's whole keys alive
        assert k.untyped_storage().nbytes() == k.nbytes and v.untyped_storage().nbytes() == v.nbytes
    assert_grads_equal(g_plain, g_ckpt, tol)
    if depth == -1:
        assert g_ckpt["memory"].abs().max() > 0
    else:  # 5 segments > 2: the memory init is cut off
        assert g_ckpt["memory"] is None or g_ckpt["memory"].abs().max() == 0
    # the randomness is real (dropout and noise), so replaying it is what makes them equal
    other, _ = run_decoder(dtype, True, seed=12, **kw)
    assert (other.loss - ckpt.loss).abs().item() > 1e-6


def test_decoder_checkpoint_logits_default_off_and_outputs():
    model = decoder(torch.float32, True, xl_cache=2)
    tokens, mask, _ = padded_batch()
    out = model(tokens, labels=tokens, attention_mask=mask)
    assert out.logits is None and out.loss.requires_grad and out.memory.requires_grad
    assert out.xl is not None and out.xl.padding.shape == (3, 2)
    out = model(tokens, labels=tokens, attention_mask=mask, return_logits=True, return_hidden=True)
    assert out.logits.shape == (3, 30, 61) and out.hidden_states.shape == (3, 30, 32)
    with torch.no_grad():  # no grad: the plain loop, logits on by default
        assert model(tokens).logits.shape == (3, 30, 61)


def test_padded_rows_keep_their_state_over_empty_segments():
    """Row 1's first two segments are padding: the memory entering its first real segment is
    the initial memory, so its final memory equals the row run alone."""
    model = decoder(torch.float64, True).eval()
    tokens, mask, _ = padded_batch(pad=12)
    with torch.no_grad():
        both = model(tokens, attention_mask=mask)
        alone = model(tokens[1:2, 12:])
    torch.testing.assert_close(both.memory[1], alone.memory[0], atol=1e-10, rtol=0)


@pytest.mark.parametrize("depth", [1, 2])
def test_segments_padded_in_every_row_change_nothing(depth):
    """Whole segments of padding in front of a batch (how per-block FSDP evens out the ranks'
    segment counts): the same loss and gradients, also for the truncation window, which does not
    count them (with depth 2 the memory init of these 2 real segments gets a gradient)."""
    tokens = ids(2, 12)
    padded = torch.cat([torch.zeros(2, 12, dtype=torch.long), tokens], 1)
    mask = torch.cat([torch.zeros(2, 12, dtype=torch.long), torch.ones(2, 12, dtype=torch.long)], 1)
    labels_mask = mask.bool()
    results = []
    for kw in ({"input_ids": tokens}, {"input_ids": padded, "attention_mask": mask,
                                       "labels_mask": labels_mask}):
        model = decoder(torch.float64, True, bptt_depth=depth).eval()
        out = model(labels=kw["input_ids"], **kw)
        out.loss.backward()
        results.append((out.loss.item(), grads_of(model)))
    assert results[0][0] == pytest.approx(results[1][0], abs=1e-12)
    assert_grads_equal(results[0][1], results[1][1], 1e-10)
    memory_grad = results[1][1]["memory"]
    assert (memory_grad is not None and memory_grad.abs().max() > 0) == (depth == 2)


@pytest.mark.parametrize("how", ["grad", "inputs"])
def test_autograd_grad_and_backward_inputs(how):
    plain, g_plain = run_decoder(torch.float64, False)
    model = decoder(torch.float64, True)
    tokens, mask, labels_mask = padded_batch()
    torch.manual_seed(11)
    out = model(tokens, labels=tokens, attention_mask=mask, labels_mask=labels_mask)
    total = out.loss + 0.1 * out.memory.square().mean()
    names = ["memory", "base.transformer.h.0.attn.c_attn.weight", "base.transformer.wte.weight"]
    params = [dict(model.named_parameters())[n] for n in names]
    if how == "grad":
        got = torch.autograd.grad(total, params)
        assert all(p.grad is None for p in model.parameters())
    else:
        total.backward(inputs=params)
        got = [p.grad for p in params]
        assert all(p.grad is None for n, p in model.named_parameters() if n not in names)
    for name, g in zip(names, got, strict=True):
        torch.testing.assert_close(g, g_plain[name], atol=1e-10, rtol=0)


def test_gradient_accumulation_and_retain_graph():
    """Two checkpointed micro-batches accumulate into .grad as two plain ones do; a second
    backward through a retained checkpointed graph recomputes again (gradients doubled)."""
    grads = []
    for ckpt in (False, True):
        model = decoder(torch.float64, ckpt)
        for seed in (0, 1):
            tokens, mask, labels_mask = padded_batch(seed=seed)
            torch.manual_seed(seed)
            model(tokens, labels=tokens, attention_mask=mask, labels_mask=labels_mask).loss.backward()
        grads.append(grads_of(model))
    assert_grads_equal(grads[0], grads[1], 1e-10)
    model = decoder(torch.float64, True)
    tokens, mask, _ = padded_batch()
    out = model(tokens, labels=tokens, attention_mask=mask)
    out.loss.backward(retain_graph=True)
    once = grads_of(model)
    out.loss.backward()
    assert_grads_equal({k: 2 * v for k, v in once.items()}, grads_of(model), 1e-10)


def test_autocast_bf16_checkpoint_equals_plain():
    """bf16 autocast on CPU: the recomputation replays the autocast state."""
    grads, losses = [], []
    for ckpt in (False, True):
        model = decoder(torch.float32, ckpt, xl_cache=2)
        tokens, mask, labels_mask = padded_batch()
        torch.manual_seed(5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(tokens, labels=tokens, attention_mask=mask, labels_mask=labels_mask)
        out.loss.backward()
        grads.append(grads_of(model))
        losses.append(out.loss.item())
    assert losses[0] == losses[1]
    assert_grads_equal(grads[0], grads[1], 1e-6)
    # bf16 really ran: a float32 run gives another loss
    model = decoder(torch.float32, True, xl_cache=2)
    torch.manual_seed(5)
    assert model(tokens, labels=tokens, attention_mask=mask, labels_mask=labels_mask).loss.item() != losses[0]


class _WeightCasts(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts float32 -> bf16 casts of tensors of ``shape`` (a weight's)."""

    def __init__(self, shape):
        super().__init__()
        self.shape, self.count = tuple(shape), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        x = args[0] if args else None
        if func is torch.ops.aten._to_copy.default and isinstance(x, torch.Tensor) \
                and x.dtype == torch.float32 and tuple(x.shape) == self.shape \
                and (kwargs or {}).get("dtype") == torch.bfloat16:
            self.count += 1
        return func(*args, **(kwargs or {}))


def _autocast_nesting() -> int:
    depth = torch.autocast_increment_nesting() - 1
    torch.autocast_decrement_nesting()
    return depth


def _bf16_step(model, hold: bool, monkeypatch):
    """One bf16-autocast training step; the weight casts of the first attention projection
    counted; ``hold=False``: the recomputations without the shared cast cache."""
    if not hold:
        monkeypatch.setattr(segment_loop.RecomputeCastCache, "contexts",
                            lambda self: (contextlib.nullcontext(), contextlib.nullcontext()))
    tokens, mask, labels_mask = padded_batch()
    weight = model.base.transformer.h[0].attn.c_attn.weight
    torch.manual_seed(5)
    with _WeightCasts(weight.shape) as casts:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(tokens, labels=tokens, attention_mask=mask, labels_mask=labels_mask)
        forward = casts.count
        out.loss.backward()
    monkeypatch.undo()
    return forward, casts.count - forward, grads_of(model)


def test_recomputations_share_the_weight_casts(monkeypatch):
    """Under bf16 autocast the checkpointed segments' recomputations cast each weight once per
    backward pass (was: once per segment), with the same gradients bit for bit, and autocast's
    nesting is back to 0 after the pass (its cache cleared)."""
    segments = -(-30 // 6)
    forward, backward, grads_off = _bf16_step(decoder(torch.float32, True), False, monkeypatch)
    assert forward > 0 and backward == segments * forward  # each recomputation casts again
    forward_on, backward, grads_on = _bf16_step(decoder(torch.float32, True), True, monkeypatch)
    assert forward_on == forward and backward == forward and _autocast_nesting() == 0
    assert grads_on.keys() == grads_off.keys()
    assert all(torch.equal(grads_on[k], grads_off[k]) for k in grads_on)


def test_a_failed_backward_leaves_no_stale_casts():
    """A backward pass that raises after the recomputations began never reaches its final
    callback: the next checkpointed forward releases the hold, so a step after an in-place
    weight update computes with the new weights (a stale cast would give the old logits)."""
    model = decoder(torch.float32, True).eval()
    tokens, mask, _ = padded_batch()

    def boom(grad):
        raise RuntimeError("boom")

    handle = model.memory.register_hook(boom)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(tokens, attention_mask=mask, labels=tokens)
    with pytest.raises(RuntimeError, match="boom"):
        out.loss.backward()
    handle.remove()
    assert _autocast_nesting() == 1  # the failed pass's hold
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = model(tokens, attention_mask=mask, return_logits=True).logits
    assert _autocast_nesting() == 0
    fresh = decoder(torch.float32, True).eval()
    with torch.no_grad():
        for p in fresh.parameters():
            p.mul_(1.5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        want = fresh(tokens, attention_mask=mask, return_logits=True).logits
    assert torch.equal(got, want)


@pytest.mark.slow  # ~12 s of compilation
def test_compiled_step_aot_eager():
    """torch.compile of the segment step (backend aot_eager) under checkpointing: the eager
    gradients."""
    ref = decoder(torch.float32, True)
    tokens, mask, labels_mask = padded_batch(length=18)
    ref.eval()  # no dropout: compiled and eager draw random numbers differently
    ref(tokens, labels=tokens, attention_mask=mask, labels_mask=labels_mask).loss.backward()
    model = decoder(torch.float32, True).compile_step(backend="aot_eager").eval()
    model(tokens, labels=tokens, attention_mask=mask, labels_mask=labels_mask).loss.backward()
    assert_grads_equal(grads_of(ref), grads_of(model), 1e-5)


# ------------------------------------------------------------------------------------- encoder

def bert(cls, dtype):
    return tiny_bert(cls, dropout=0.1).to(dtype).train()


@pytest.mark.parametrize("dtype,tol", DTYPES)
@pytest.mark.parametrize("kind", ["sequence", "token"])
def test_encoder_checkpoint_equals_plain(dtype, tol, kind):
    """Encoder RMT (which ignored checkpoint_segments before): dropout, padded rows, truncation."""
    x = torch.randint(3, 53, (2, 17), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 17, dtype=torch.long)
    mask[1, 9:] = 0  # right alignment: row 1's last two segments are empty
    results = []
    for ckpt in (False, True):
        if kind == "sequence":
            base = bert(BertForSequenceClassification, dtype)
            model = RMTEncoderForSequenceClassification(base, loss_over="all", bptt_depth=2,
                                                        checkpoint_segments=ckpt, **ENC)
            labels = torch.tensor([0, 2])
        else:
            base = bert(BertForTokenClassification, dtype)
            model = RMTEncoderForTokenClassification(base, bptt_depth=2, checkpoint_segments=ckpt, **ENC)
            labels = torch.randint(0, 3, (2, 17), generator=torch.Generator().manual_seed(2))
            labels[1, 9:] = -100
        torch.manual_seed(7)
        out = model(x, labels=labels, attention_mask=mask)
        (out.loss + 0.1 * out.memory.square().mean()).backward()
        results.append((out, grads_of(model)))
    (plain, g_plain), (ckpt, g_ckpt) = results
    torch.testing.assert_close(ckpt.loss.detach(), plain.loss.detach(), atol=tol, rtol=0)
    torch.testing.assert_close(ckpt.logits.detach(), plain.logits.detach(), atol=tol, rtol=0)
    torch.testing.assert_close(ckpt.memory.detach(), plain.memory.detach(), atol=tol, rtol=0)
    assert_grads_equal(g_plain, g_ckpt, tol)
    assert g_ckpt["base.bert.encoder.layer.0.attention.self.query.weight"].abs().max() > 0


ENC = dict(num_mem_tokens=3, segment_size=4, cls_token_id=1, sep_token_id=2,
           segment_alignment="left")


@pytest.mark.parametrize("dtype,tol", DTYPES)
def test_memory_transformer_checkpoint_equals_plain(dtype, tol):
    x = torch.randint(3, 53, (2, 9), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, 6:] = 0
    results = []
    for ckpt in (False, True):
        model = MemoryTransformer(bert(BertModel, dtype), num_mem_tokens=3, variant="ctrl",
                                  checkpoint_segments=ckpt)
        torch.manual_seed(7)
        out = model(x, attention_mask=mask)
        (out.hidden.square().mean() + out.memory.square().mean()).backward()
        results.append((out, grads_of(model)))
    (plain, g_plain), (ckpt, g_ckpt) = results
    torch.testing.assert_close(ckpt.hidden.detach(), plain.hidden.detach(), atol=tol, rtol=0)
    assert_grads_equal(g_plain, g_ckpt, tol)
    assert g_ckpt["memory"].abs().max() > 0


# ------------------------------------------------------------------------ memory and the store

def train_peak(segments: int, checkpoint: bool) -> int:
    torch.manual_seed(0)
    model = RMTForCausalLM(tiny_gpt2(n_positions=40), num_mem_tokens=4, segment_size=32,
                           checkpoint_segments=checkpoint).train()
    tokens = ids(2, 32 * segments)
    with LiveBytes() as counter:
        model(tokens, labels=tokens).loss.backward()
    return counter.peak


def test_training_memory_bounds():
    """Peak bytes of a training step's tensors: checkpointed, 64 segments within 1.3x of 4;
    at 16 segments below half of plain BPTT."""
    ckpt4, ckpt16, ckpt64 = (train_peak(n, True) for n in (4, 16, 64))
    plain16 = train_peak(16, False)
    print(f"peak bytes: checkpointed 4={ckpt4} 16={ckpt16} 64={ckpt64}; plain 16={plain16}")
    assert ckpt64 <= 1.3 * ckpt4, (ckpt4, ckpt64)
    assert ckpt16 < 0.5 * plain16, (ckpt16, plain16)


def capture_loop(monkeypatch):
    """Record the LoopResult of the decoder's forward."""
    import rmt_fast.models.decoder as dec

    seen = []

    def spy(*args, **kwargs):
        seen.append(run_segments(*args, **kwargs))
        return seen[-1]

    monkeypatch.setattr(dec, "run_segments", spy)
    return seen


def test_states_live_in_the_store_until_recomputed(monkeypatch):
    """Memory and XL cache of every segment go to the extension's MemoryStore (in place on
    CPU: no copy), one key per tensor; backward empties it."""
    seen = capture_loop(monkeypatch)
    model = decoder(torch.float32, True, xl_cache=2)
    tokens, mask, _ = padded_batch()
    out = model(tokens, labels=tokens, attention_mask=mask)
    res = seen[-1]
    # segment 0: memory; segments 1-4: memory, XL padding, (k, v) of 2 layers
    assert res.store.size() == 1 + 4 * 6 and not res.store.offload
    assert res.kept_bytes == res.store.nbytes() > 0
    assert res.store.get(0).data_ptr() == model.memory.data_ptr()  # the expanded init, in place
    out.loss.backward()
    assert res.store.size() == 0


def test_offloading_store_copies_and_gives_the_same_gradients(monkeypatch):
    """An offloading store (a copy on CPU; pinned host memory + prefetch on CUDA) and
    torch's save_on_cpu / the checkpoint's own saving give the same gradients."""
    _, ref = run_decoder(torch.float64, True, xl_cache=2)
    import rmt_fast.models.decoder as dec

    for kw in ({"store": MemoryStore(offload=True)}, {"saved_state": "save_on_cpu"},
               {"saved_state": "autograd"}):
        def with_kw(*args, _kw=kw, **kwargs):
            return run_segments(*args, **{**kwargs, **_kw})

        monkeypatch.setattr(dec, "run_segments", with_kw)
        _, got = run_decoder(torch.float64, True, xl_cache=2)
        assert_grads_equal(ref, got, 1e-10)
    store = MemoryStore(offload=True)
    mem = torch.randn(2, 3, 4, dtype=torch.float64, requires_grad=True)
    step = lambda s, seg, t: (s.tanh(), {"loss": s.square().sum()})
    plain = torch.autograd.grad(run_segments(step, mem, [None, None]).loss, mem)[0]
    res = run_segments(step, mem, [None, None], checkpoint=True, store=store)
    assert store.size() == 2 and store.get(0).data_ptr() != mem.data_ptr()  # a copy
    res.loss.backward()
    assert store.size() == 0
    torch.testing.assert_close(mem.grad, plain, atol=1e-12, rtol=0)


def test_offloaded_states_are_prefetched_in_reverse_order():
    """With an offloading store, recomputing segment t first starts bringing segment t - 1's
    state back (a side-stream copy on CUDA), then takes its own."""

    class SpyStore(MemoryStore):
        def __init__(self):
            super().__init__(offload=True)
            self.log = []

        def prefetch(self, key):
            self.log.append(("prefetch", key))
            super().prefetch(key)

        def pop(self, key):
            self.log.append(("pop", key))
            return super().pop(key)

    store = SpyStore()
    mem = torch.randn(2, 3, 4, requires_grad=True)
    res = run_segments(lambda s, seg, t: (s.tanh(), {"loss": s.square().sum()}), mem, [None] * 4,
                       checkpoint=True, store=store)
    assert store.log == [] and store.segments() == [0, 1, 2, 3]
    res.loss.backward()
    assert store.log == [("prefetch", 2), ("pop", 3), ("prefetch", 1), ("pop", 2),
                         ("prefetch", 0), ("pop", 1), ("pop", 0)]


def test_extra_states_ride_in_the_loop():
    """An associative-memory-like state (``A`` [B, d_key, d], ``z`` [B, d_key]) in
    SegmentState.extra: checkpointed == plain, and padded rows keep A and z."""
    torch.manual_seed(0)
    d, dk, batch = 8, 4, 3
    wk, wv = (torch.randn(d, dk, dtype=torch.float64, requires_grad=True),
              torch.randn(d, d, dtype=torch.float64, requires_grad=True))
    emb = torch.randn(20, d, dtype=torch.float64, requires_grad=True)

    def step(state, seg, t):
        x = torch.nn.functional.dropout(emb[seg.ids], 0.2)  # [B, S, d]
        k = F.elu(x @ wk) + 1  # [B, S, dk]
        a = state.extra["A"] + k.transpose(1, 2) @ (x @ wv)
        z = state.extra["z"] + k.sum(1)
        read = (k @ a) / (k @ z.unsqueeze(-1))
        memory = state.memory + read.mean(1, keepdim=True)
        return SegmentState(memory, None, {"A": a, "z": z}), {"loss": read.square().mean()}

    tokens = torch.randint(0, 20, (batch, 12), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(batch, 12, dtype=torch.bool)
    mask[2, 4:] = False  # row 2: segments 2 and 3 (of 4) are empty
    segments = [Segment(s, s + 3, tokens[:, s:s + 3], mask[:, s:s + 3]) for s in range(0, 12, 3)]
    results = []
    for ckpt in (False, True):
        state = SegmentState(torch.zeros(batch, 1, d, dtype=torch.float64), None,
                             {"A": torch.zeros(batch, dk, d, dtype=torch.float64),
                              "z": torch.full((batch, dk), 1e-3, dtype=torch.float64)})
        torch.manual_seed(3)
        res = run_segments(step, state, segments, checkpoint=ckpt, bptt_depth=3)
        grads = torch.autograd.grad(res.loss + res.state.extra["A"].sum(), [wk, wv, emb])
        results.append((res, grads))
    (plain, g_plain), (ckpt, g_ckpt) = results
    for a, b in zip(g_plain, g_ckpt, strict=True):
        torch.testing.assert_close(b, a, atol=1e-10, rtol=0)
    torch.testing.assert_close(ckpt.state.extra["A"], plain.state.extra["A"], atol=1e-10, rtol=0)
    # row 2 stopped after its second segment: as if the loop had ended there
    torch.manual_seed(3)
    short = run_segments(step, SegmentState(torch.zeros(batch, 1, d, dtype=torch.float64), None,
                                            {"A": torch.zeros(batch, dk, d, dtype=torch.float64),
                                             "z": torch.full((batch, dk), 1e-3, dtype=torch.float64)}),
                         segments[:2])
    torch.testing.assert_close(plain.state.extra["A"][2], short.state.extra["A"][2], atol=1e-12, rtol=0)
    assert (plain.state.extra["A"][0] - short.state.extra["A"][0]).abs().max() > 1e-3


def test_keep_rows_and_bad_input():
    old = SegmentState(torch.zeros(2, 1, 3))
    new = SegmentState(torch.ones(2, 1, 3))
    kept = keep_rows(torch.tensor([True, False]), new, old)
    assert kept.memory[0].eq(1).all() and kept.memory[1].eq(0).all()
    step = lambda s, seg, t: (s, {})
    with pytest.raises(ValueError, match="bptt_depth must be -1"):
        run_segments(step, old, [None], bptt_depth=-2)
    with pytest.raises(ValueError, match="at least one segment"):
        run_segments(step, old, [])
    with pytest.raises(ValueError, match="saved_state must be one of"):
        run_segments(step, old, [None], saved_state="disk")
    with pytest.raises(TypeError, match=r"step must return \(new_state, outputs: dict\)"):
        run_segments(lambda s, seg, t: s, old, [None])
    with pytest.raises(ValueError, match="loss of segment 0 must be a scalar"):
        run_segments(lambda s, seg, t: (s, {"loss": torch.ones(2)}), old, [None])
    with pytest.raises(ValueError, match="offload_memory must be a bool"):
        RMTConfig(offload_memory="yes")


def test_generate_reads_the_context_like_read():
    """generate reads all but the last segment through the loop, as read() does (with the XL
    cache), then generates from that memory."""
    model = RMTForCausalLM(tiny_gpt2(n_positions=40), num_mem_tokens=3, segment_size=6,
                           xl_cache=3).eval()
    tokens = ids(1, 20)
    memory, _ = model.read(tokens[:, :18])
    got = model.generate(tokens, max_new_tokens=4, do_sample=False, pad_token_id=0)
    expect = model.generate(tokens[:, 18:], memory=memory, max_new_tokens=4, do_sample=False,
                            pad_token_id=0)
    assert torch.equal(got, expect)


def test_the_segment_loop_reads_an_iterator_lazily():
    """run_segments with bptt_depth=-1 takes one segment from an iterator per step."""
    made, seen = [], []

    def gen():
        for t in range(4):
            made.append(t)
            yield Segment(t, t + 1, torch.full((2, 1), t))

    def step(state, seg, t):
        seen.append((t, len(made)))
        return state + seg.ids.float().sum(), {}

    res = run_segments(step, torch.zeros(2, 1), gen())
    assert seen == [(0, 1), (1, 2), (2, 3), (3, 4)]
    assert res.state.sum().item() == 2 * 2 * (0 + 1 + 2 + 3)
    with pytest.raises(ValueError, match="at least one segment"):
        run_segments(step, torch.zeros(2, 1), iter([]))
