"""ARMTForCausalLM: semantics against an independent loop, state API, persistence, generate,
truncated BPTT, the official state-dict layout, and the diagonal executor."""

import copy
import dataclasses
import json

import pytest
import torch
import torch.nn.functional as F
from models import (
    VOCAB,
    check_repeated_rows,
    ids,
    reference_clip_read,
    tiny_armt,
    tiny_gpt2,
    tiny_llama,
)
from torch import nn

from rmt_fast.models.armt import ARMTConfig, ARMTForCausalLM, ARMTOutput, ARMTState
from rmt_fast.models.diagonal import DiagonalExecutor
from rmt_fast.ops.associative_memory import reference_read, reference_write

make = tiny_armt


# --- an independent loop with the paper's formulas ----------------------------------------------
class _RefLayer(nn.Module):
    """Read before the block, delta-rule write after it (dense float64-capable reference ops),
    with its own state: the semantics of the reference code, written from the formulas."""

    def __init__(self, layer, assoc, cfg: ARMTConfig, noise: float = 0.0):
        super().__init__()
        self.layer, self.cfg, self.noise = layer, cfg, noise
        self._assoc = [assoc]  # registered once, as ref.assoc
        self.A = self.z = None

    def forward(self, h, *args, **kwargs):
        a, c = self._assoc[0], self.cfg
        opts = dict(nu=c.nu, normalize=c.use_l2_norm, eps=c.eps, floor=c.normaliser_floor,
                    rule=c.update_rule)
        if self.A is not None:
            read = reference_read(a.W_mq(h), self.A, self.z, **opts)
            if c.read_clip:
                read = reference_clip_read(read, h, c.read_clip)
            if self.noise:  # memory noise: std relative to each read vector's RMS (not differentiated)
                rms = read.detach().pow(2).mean(-1, keepdim=True).sqrt()
                read = read + self.noise * rms * torch.randn_like(read)
            h = h + read
        out = self.layer(h, *args, **kwargs)
        o = out[0] if isinstance(out, tuple) else out
        mem = o[:, -c.num_mem_tokens:]
        first = self.A is None
        if first:
            self.A = h.new_zeros(h.shape[0], c.d_key, h.shape[-1])
            self.z = h.new_zeros(h.shape[0], c.d_key)
        # value_norm: RMS over the width, eps as torch's rms_norm takes by default
        vin = (mem * torch.rsqrt(mem.pow(2).mean(-1, keepdim=True) + torch.finfo(mem.dtype).eps)
               if c.value_norm else mem)
        alpha = c.state_decay  # the decay, then the write
        if c.decay_gate:  # learnt: ceiling * sigmoid(w . mean of the memory outputs + b), per row
            alpha = c.decay_max * torch.sigmoid((mem.mean(1) * a.W_ma.weight[0]).sum(-1)
                                                + a.W_ma.bias[0])[:, None]
            self.A = self.A * alpha[..., None]
        else:
            self.A = self.A * alpha
        self.z = self.z * alpha
        self.A, self.z = reference_write(a.W_mk(mem), a.W_mv(vin), torch.sigmoid(a.W_mb(mem))[..., 0],
                                         self.A, self.z, first=first, correction=c.correction,
                                         gate=c.normaliser_gate, **opts)
        return out


def reference_loop(model: ARMTForCausalLM, x: torch.Tensor, noise: float = 0.0):
    """``(logits, loss, module)``: a deep copy of the base model with eager attention and every
    block wrapped by :class:`_RefLayer` (``noise``: memory noise on every read), called on
    ``[segment | memory]`` segment by segment."""
    cfg = model.rmt_config
    ref = nn.Module()
    ref.base = copy.deepcopy(model.base)
    ref.base.set_attn_implementation("eager")
    ref.memory = copy.deepcopy(model.memory)
    ref.assoc = copy.deepcopy(model.assoc)
    layers = next(m for m in ref.base.modules() if isinstance(m, nn.ModuleList)
                  and len(m) == len(model.assoc))
    for i in range(len(layers)):
        layers[i] = _RefLayer(layers[i], ref.assoc[i], cfg, noise)
    logits = []
    for s in range(0, x.shape[1], cfg.segment_size):
        seg = x[:, s:s + cfg.segment_size]
        emb = ref.base.get_input_embeddings()(seg)
        inp = torch.cat([emb, ref.memory.unsqueeze(0).expand(x.shape[0], -1, -1)], dim=1)
        logits.append(ref.base(inputs_embeds=inp).logits[:, :seg.shape[1]])
    logits = torch.cat(logits, dim=1)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), x[:, 1:].flatten())
    return logits, loss, ref


@pytest.mark.parametrize("kind,l2,extra", [
    ("gpt2", False, {}), ("llama", False, {}), ("gpt2", True, {}), ("llama", True, {}),
    ("gpt2", False, dict(normaliser_floor=1.0)), ("llama", True, dict(normaliser_floor=1.0)),
    ("gpt2", False, dict(normaliser_gate=True, correction=False)),
    ("llama", True, dict(update_rule="delta")), ("gpt2", False, dict(value_norm=True)),
    ("llama", True, dict(update_rule="delta", value_norm=True)),
    ("gpt2", True, dict(update_rule="delta", read_clip=0.02)), ("llama", False, dict(read_clip=0.02)),
    ("gpt2", True, dict(update_rule="delta", state_decay=0.6)),
    ("llama", False, dict(state_decay=0.6)),
    ("gpt2", True, dict(update_rule="delta", state_decay=0.6, decay_gate=True)),
    ("llama", False, dict(state_decay=0.6, decay_gate=True)),
    ("gpt2", True, dict(update_rule="delta", state_decay=0.3, decay_gate=True, decay_max=0.5))])
def test_forward_backward_match_independent_loop(kind, l2, extra):
    """Logits, loss and gradients (memory, associative weights, base weights) of the hooked
    model equal a loop over wrapped blocks with the dense reference ops: logits and loss in
    float32; gradients in float64 to 1e-10 of their largest entry for GPT-2, 1e-4 for Llama
    (transformers runs Llama's RMSNorm and rotary tables in float32 even in a float64 model);
    in float32 they agree only to rounding (~1e-5 relative, set by the attention kernel's
    summation order)."""
    model = make(kind, use_l2_norm=l2, **extra)
    if model.rmt_config.decay_gate:  # W_ma starts at zero: make the decay depend on the data
        with torch.no_grad():
            for a in model.assoc:
                a.W_ma.weight.normal_(0, 0.3)
    x = ids(2, 29)  # 4 segments, the last one short
    out = model(x, labels=x)
    assert isinstance(out, ARMTOutput) and out.logits.shape == (2, 29, VOCAB)
    ref_logits, ref_loss, ref = reference_loop(model, x)
    torch.testing.assert_close(out.logits, ref_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.loss, ref_loss, rtol=1e-6, atol=1e-6)
    model = model.double()
    bound = 1e-10 if kind == "gpt2" else 1e-4
    out = model(x, labels=x)
    ref_logits, ref_loss, ref = reference_loop(model, x)
    out.loss.backward()
    ref_loss.backward()
    ours = dict(model.named_parameters())
    checked = 0
    for name, p in ref.named_parameters():
        name = name.replace(".layer.", ".") if ".layer." in name else name
        q = ours[name]
        assert (p.grad is None) == (q.grad is None), name
        if p.grad is not None:
            err, scale = (q.grad - p.grad).abs().max().item(), p.grad.abs().max().item()
            assert err <= bound * scale + 1e-14, f"{name}: {err:.3e} (max |grad| {scale:.3e})"
            checked += 1
    assert checked >= 20
    assert model.assoc[0].W_mq.weight.grad.abs().max() > 0  # the read is on the graph
    assert model.assoc[1].W_mk.weight.grad.abs().max() > 0  # so is the write
    if model.rmt_config.decay_gate:  # and the learnt decay
        assert model.assoc[0].W_ma.weight.grad.abs().max() > 0


def test_read_clip_bounds_each_reads_share(monkeypatch):
    """With ``read_clip=c`` no token's read exceeds ``c`` times the RMS of the hidden state it is
    added to; reads under the bound are left as they were, those over it end on it; the
    logits change (the clip acts), and ``c=0`` is the unclipped model."""
    from rmt_fast.models import armt

    c, x = 0.02, ids(2, 45)
    model = make("gpt2", use_l2_norm=True, update_rule="delta", read_clip=c).double()
    plain = make("gpt2", use_l2_norm=True, update_rule="delta").double()
    plain.load_state_dict(model.state_dict())
    seen = []
    real = armt.clip_read

    def spy(read, h, clip):
        out = real(read, h, clip)
        rms = lambda t: t.pow(2).mean(-1).sqrt()  # noqa: E731
        seen.append((rms(read) / rms(h), rms(out) / rms(h), clip))
        return out

    monkeypatch.setattr(armt, "clip_read", spy)
    with torch.no_grad():
        clipped = model(x).logits
        unclipped = plain(x).logits
    before = torch.cat([b.flatten() for b, _, clip in seen if clip])
    after = torch.cat([a.flatten() for _, a, clip in seen if clip])
    assert len(seen) == 2 * 2 * 5  # both models, 2 layers, the 5 segments that read
    assert (after <= c * (1 + 1e-9)).all()
    over = before > c
    assert over.any() and (~over).any()  # the bound bites for some tokens, not all
    torch.testing.assert_close(after[over], torch.full_like(after[over], c), rtol=1e-9, atol=0)
    torch.testing.assert_close(after[~over], before[~over], rtol=1e-9, atol=0)
    assert (clipped - unclipped).abs().max() > 1e-3
    assert torch.isfinite(clipped).all()


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_memory_noise_perturbs_every_read_in_training_only(kind):
    """Training mode: every layer's associative read gets ``noise * rms(read) * N(0, 1)``, drawn
    layer by layer, segment by segment, as the independent loop draws it (logits and gradients
    equal); eval mode: no noise at all; the first segment reads nothing, so it is unperturbed."""
    x = ids(2, 29)
    model = make(kind, memory_noise=0.3).double()
    plain = make(kind).double()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        clean = plain(x).logits
        torch.testing.assert_close(model(x).logits, clean, atol=0, rtol=0)
    model.train()
    model.base.eval()  # no dropout: the noise is the only random draw
    torch.manual_seed(5)
    out = model(x, labels=x)
    out.loss.backward()
    torch.manual_seed(5)
    ref_logits, ref_loss, ref = reference_loop(model, x, noise=0.3)
    ref_loss.backward()
    bound = 1e-10 if kind == "gpt2" else 1e-4  # Llama: float32 rotary/RMSNorm tables (see above)
    torch.testing.assert_close(out.logits, ref_logits, atol=bound, rtol=0)
    ours = dict(model.named_parameters())
    for name, p in ref.named_parameters():
        q = ours[name.replace(".layer.", ".") if ".layer." in name else name]
        if p.grad is not None:
            err, scale = (q.grad - p.grad).abs().max().item(), p.grad.abs().max().item()
            assert err <= bound * scale + 1e-14, f"{name}: {err:.3e} (max |grad| {scale:.3e})"
    diff = (out.logits.detach() - clean).abs().amax(dim=(0, 2))
    assert diff[:8].max() == 0 and diff[8:].min() > 1e-5  # segment 1 reads no state
    with pytest.raises(ValueError, match="memory_noise must be a finite float >= 0"):
        make(kind, memory_noise=-0.1)


def test_first_segment_neither_reads_nor_corrects():
    """One segment: the output is the base model's on ``[segment | memory]`` (no read), and the
    state is the first write (v_bar = 0, gamma = 1)."""
    model = make()
    x = ids(2, 8)
    out = model(x)
    ref_logits, _, _ = reference_loop(model, x)
    torch.testing.assert_close(out.logits, ref_logits, rtol=1e-5, atol=1e-5)
    assert out.state.segments == 1
    assert all(a.abs().max() > 0 for a in out.state.A)


# --- truncated BPTT, state API, persistence --------------------------------------------------------
@pytest.mark.parametrize("depth", [0, 1])
def test_detached_state_cuts_the_gradient(depth):
    """``bptt_depth=k`` equals calling the model segment by segment and passing
    ``state.detach()`` into segment ``t`` when ``t < N - k`` (and the state otherwise): same
    loss, same parameter gradients. With ``k = 0`` no gradient reaches the memory tokens (they
    only act on later segments, through the state)."""
    x = ids(2, 24)  # N = 3 segments
    cut = make(bptt_depth=depth)
    loss = cut(x, labels=x).loss
    loss.backward()
    man = make()
    state, total = None, 0.0
    for t, s in enumerate(range(0, 24, 8)):
        if state is not None and t < 3 - depth:
            state = state.detach()
        out = man(x[:, s:s + 8], state=state)
        state = out.state
        targets = x[:, s + 1:s + 9]
        logits = out.logits[:, :targets.shape[1]]
        total = total + F.cross_entropy(logits.flatten(0, 1), targets.flatten(), reduction="sum")
    total = total / (2 * 23)
    total.backward()
    torch.testing.assert_close(loss, total, rtol=1e-6, atol=1e-6)
    got = dict(cut.named_parameters())
    for name, p in man.named_parameters():
        assert (got[name].grad is None) == (p.grad is None), name
        if p.grad is not None:
            err, scale = (got[name].grad - p.grad).abs().max().item(), p.grad.abs().max().item()
            assert err <= 1e-5 * scale + 1e-8, f"{name}: {err:.3e} (max |grad| {scale:.3e})"
    assert (cut.memory.grad is not None and cut.memory.grad.abs().max() > 0) == (depth > 0)
    full = make()
    full_loss = full(x, labels=x).loss
    full_loss.backward()
    torch.testing.assert_close(full_loss, loss)  # same forward
    # segment 0's write (W_mk) reaches the later losses only through the cut state
    cut_grad = cut.assoc[0].W_mk.weight.grad
    cut_grad = torch.zeros(()) if cut_grad is None else cut_grad  # depth 0: it reaches nothing
    assert (full.assoc[0].W_mk.weight.grad - cut_grad).abs().max() > 1e-6


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("depth", [-1, 1])
@pytest.mark.parametrize("noise", [0.0, 0.3])
def test_segment_checkpointing_same_loss_and_gradients(kind, depth, noise):
    """``checkpoint_segments=True`` (the shared segment loop's checkpointing): the loss and every
    gradient equal the plain forward's (float64), also with memory noise in training mode (the
    recomputation draws the same noise), and between forward and backward autograd keeps far
    fewer bytes (only each segment's state and ids, recomputed in backward)."""
    x = ids(2, 29)  # 4 segments, the last one short
    saved = {}
    grads = {}
    for ckpt in (False, True):
        model = make(kind, bptt_depth=depth, checkpoint_segments=ckpt, memory_noise=noise).double()
        if noise:
            model.train()
            model.base.eval()  # no dropout
        torch.manual_seed(11)
        nbytes = []

        def pack(t, nbytes=nbytes):
            nbytes.append(t.numel() * t.element_size())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x, labels=x, return_logits=False)
        out.loss.backward()
        saved[ckpt] = sum(nbytes)
        grads[ckpt] = (out.loss.detach(), {n: p.grad for n, p in model.named_parameters()})
        assert out.state.segments == 4
    torch.testing.assert_close(grads[True][0], grads[False][0], rtol=1e-12, atol=1e-12)
    for name, g in grads[False][1].items():
        h = grads[True][1][name]
        assert (g is None) == (h is None), name
        if g is not None:
            torch.testing.assert_close(h, g, rtol=1e-10, atol=1e-12, msg=name)
    assert saved[True] < saved[False] / 3, saved


def test_state_clone_restore_save_load_exact(tmp_path):
    model = make("llama")
    x1, x2 = ids(2, 16, seed=1), ids(2, 12, seed=2)
    model.reset_memory()
    model(x1, persist=True)
    snap = model.clone_state()
    model.save_state(tmp_path / "state.safetensors")
    a = model(x2, persist=True).logits
    after = model.clone_state()
    model.restore_state(snap)
    b = model(x2, persist=True).logits
    assert torch.equal(a, b)
    model.load_state(tmp_path / "state.safetensors")
    c = model(x2, persist=True).logits
    assert torch.equal(a, c)
    for s, t in zip(after.A + after.z, model.memory_state.A + model.memory_state.z, strict=True):
        assert torch.equal(s, t)
    assert model.memory_state.segments == after.segments == 4
    model.reset_memory()
    assert torch.equal(model(x2, persist=True).logits, model(x2).logits)  # fresh again
    functional = model(x2, state=snap).logits  # the functional form gives the same
    assert torch.equal(functional, a)
    loaded = ARMTState.load(tmp_path / "state.safetensors")
    assert loaded.segments == 2 and len(loaded.A) == 2


def test_state_detach_and_clone_are_independent():
    model = make()
    x = ids(1, 16)
    state = model(x).state
    assert state.A[0].requires_grad
    det = state.detach()
    assert not det.A[0].requires_grad and det.A[0].data_ptr() == state.A[0].data_ptr()
    clo = state.clone()
    assert clo.A[0].data_ptr() != state.A[0].data_ptr() and torch.equal(clo.A[0], state.A[0])
    model.memory_state = state
    model.detach_memory()
    assert not model.memory_state.A[0].requires_grad


@pytest.mark.parametrize("kind,mode", [("gpt2", "wrap"), ("llama", "model")])
def test_save_load_pretrained_exact(tmp_path, kind, mode):
    model = make(kind, position_mode=mode, use_l2_norm=kind == "llama")
    x = ids(2, 21)
    want = model(x).logits
    model.save_pretrained(tmp_path / "m")
    cfg = json.loads((tmp_path / "m" / "armt_config.json").read_text())
    assert cfg["position_mode"] == mode and cfg["d_mem"] == 4
    back = ARMTForCausalLM.from_pretrained(tmp_path / "m")
    assert not back.training and back.rmt_config == model.rmt_config
    assert torch.equal(back(x).logits, want)
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), back.state_dict().items(), strict=True):
        assert n1 == n2 and torch.equal(p1, p2), n1


def test_wrap_positions_give_memory_new_rows():
    model = make(position_mode="wrap")
    wpe = model.base.transformer.wpe
    assert wpe.num_embeddings == 64 + 3 and model.base.config.n_positions == 67
    pos = model._position_ids(None, 8, True, torch.device("cpu"))
    assert pos.tolist() == [list(range(8)) + [64, 65, 66]]
    with pytest.raises(TypeError, match="learned absolute position table"):
        ARMTForCausalLM(tiny_llama(), num_mem_tokens=2, d_mem=4, segment_size=8, position_mode="wrap")


# --- generate ----------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_generate_equals_manual_loop(kind):
    """Greedy ``generate`` (KV cache, read active, no writes) equals re-running the last segment
    plus the generated tokens without memory tokens and taking the argmax."""
    model = make(kind)
    x = ids(2, 21)  # segments 8, 8, 5
    got = model.generate(x, max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert got.shape == (2, 4)
    with torch.no_grad():
        state = model.read(x[:, :16])
        seq = x[:, 16:]
        for _ in range(4):
            hidden, same = model.segment_forward(state, seq, None, write=False)
            assert same is state
            nxt = model.logits(hidden[:, -1]).argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(got, seq[:, 5:])
    # the read matters: with a fresh state the continuation is computed differently
    with torch.no_grad():
        h_read, _ = model.segment_forward(state, x[:, 16:], None, write=False)
        h_fresh, _ = model.segment_forward(model.init_state(2), x[:, 16:], None, write=False)
    assert (h_read - h_fresh).abs().max() > 1e-4


def test_generate_rolling_segments_equals_the_forward_over_its_output():
    """``roll_segments=True``: each full segment written into the associative state; greedy
    tokens across two boundaries are the argmax of the forward over prompt + output."""
    model = make("llama")
    x = ids(2, 19)  # segments 8, 8, 3
    new = model.generate(x, roll_segments=True, max_new_tokens=14, min_new_tokens=14,
                         do_sample=False, pad_token_id=0)
    with torch.no_grad():
        logits = model(torch.cat([x, new], 1)).logits
    logits[..., model.base.generation_config.eos_token_id] = float("-inf")
    assert torch.equal(logits[:, 18:-1].argmax(-1), new)
    grown = model.generate(x, max_new_tokens=14, min_new_tokens=14, do_sample=False, pad_token_id=0)
    assert not torch.equal(grown, new)


def test_generate_rolling_several_sequences_per_row():
    """``roll_segments=True, num_return_sequences=2`` with sampling: the associative state is
    repeated with the rows (same tokens as the rows and a given state repeated by hand)."""
    model = make("llama")
    x = ids(2, 19)
    state = model.segment_forward(model.init_state(2), ids(2, 8), None, need_hidden=False)[1]
    state = torch.utils._pytree.tree_map(lambda t: 30 * t, state)  # rows far apart: it shows
    kw = dict(roll_segments=True, max_new_tokens=14, min_new_tokens=14, do_sample=True,
              pad_token_id=0)
    torch.manual_seed(7)
    two = model.generate(x, state=state, num_return_sequences=2, **kw)
    torch.manual_seed(7)
    rep = torch.utils._pytree.tree_map(lambda t: t.repeat_interleave(2, 0), state)
    by_hand = model.generate(x.repeat_interleave(2, 0), state=rep, **kw)
    assert two.shape == (4, 14) and torch.equal(two, by_hand)


def test_generate_with_beams_and_several_sequences_per_row():
    """transformers' generate repeats each row for beams and ``num_return_sequences``: the
    associative state the blocks read is repeated alike."""
    check_repeated_rows(make("llama"), ids(2, 21))


# --- padding ------------------------------------------------------------------------------------
def test_right_padding_matches_the_row_alone():
    model = make()
    x = ids(2, 22)
    mask = torch.ones_like(x, dtype=torch.bool)
    mask[1, 19:] = False  # row 1 is 19 tokens long; its last segment is padded
    out = model(x, attention_mask=mask)
    alone = model(x[1:, :19])
    torch.testing.assert_close(out.logits[1:, :19], alone.logits, rtol=1e-5, atol=1e-5)
    for a, b in zip(out.state.A, alone.state.A, strict=True):
        torch.testing.assert_close(a[1:], b, rtol=1e-5, atol=1e-6)


# --- the official (reference code) state-dict layout ---------------------------------------------
def _official(model: ARMTForCausalLM) -> dict:
    """Our state dict under the reference's key names (AssociativeRecurrentWrapper)."""
    out = {}
    for k, v in model.state_dict().items():
        if k == "_extra_state":  # rmt_fast's own metadata entry; the reference has none
            continue
        if k == "memory":
            out["memory_cell.memory"] = v
        elif k.startswith("assoc."):
            _, i, rest = k.split(".", 2)
            out[f"memory_cell.model.transformer.h.{i}.{rest}"] = v
        elif k.startswith("base.transformer.h."):
            i, rest = k.removeprefix("base.transformer.h.").split(".", 1)
            out[f"memory_cell.model.transformer.h.{i}.layer.{rest}"] = v
            out[f"memory_cell.layers.{i}.layer.{rest}"] = v  # the cell's alias
        else:
            out["memory_cell.model." + k.removeprefix("base.")] = v
    return out


def test_load_official_state_dict_round_trip():
    src = make(position_mode="wrap", seed=3)
    dst = make(position_mode="wrap", seed=4)
    x = ids(2, 20)
    assert not torch.equal(src(x).logits, dst(x).logits)
    dst.load_official_state_dict(_official(src))
    assert torch.equal(src(x).logits, dst(x).logits)
    plain = make(seed=5)  # no wrap_pos: its position table is M rows shorter
    with pytest.raises(ValueError, match="wrap_pos checkpoint: use position_mode='wrap'"):
        plain.load_official_state_dict(_official(src))
    bad = dict(_official(src))
    bad["memory_cell.model.transformer.h.0.W_mz.weight"] = torch.zeros(1)
    with pytest.raises(ValueError, match="mismatch"):
        dst.load_official_state_dict(bad)


# --- the diagonal executor ------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["gpt2", "llama"])
@pytest.mark.parametrize("grouped", [True, False])
def test_diagonal_equals_sequential(kind, grouped):
    """n_layers + n_segments - 1 grouped steps give the sequential logits and state (float32,
    1e-5), from a fresh state and from a carried one; a short last segment is its own group."""
    model = ARMTForCausalLM(tiny_gpt2(layers=3) if kind == "gpt2" else tiny_llama(),
                            num_mem_tokens=3, d_mem=4, segment_size=8).eval()
    with torch.no_grad():
        for a in model.assoc:
            a.W_mv.weight.normal_(0, 0.3)
    ex = DiagonalExecutor(model, grouped=grouped)
    assert ex.grouped == grouped
    x = ids(2, 45)  # 6 segments, the last 5 tokens
    with torch.no_grad():
        seq = model(x)
        dia = ex(x)
        seq2 = model(x[:, :20], state=seq.state)
    dia2 = ex(x[:, :20], state=dia.state)
    torch.testing.assert_close(dia.logits, seq.logits, rtol=1e-5, atol=1e-5)
    for a, b in zip(dia.state.A + dia.state.z, seq.state.A + seq.state.z, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    assert dia.state.segments == seq.state.segments == 6
    torch.testing.assert_close(dia2.logits, seq2.logits, rtol=1e-5, atol=1e-5)
    assert ex.sequential_steps(6) == (ex.n + 5, ex.n * 6)


@pytest.mark.parametrize("extra", [{}, dict(update_rule="delta", value_norm=True),
                                   dict(update_rule="delta", read_clip=0.02),
                                   dict(update_rule="delta", state_decay=0.6),
                                   dict(update_rule="delta", state_decay=0.6, decay_gate=True),
                                   dict(state_decay=0.6, decay_gate=True),
                                   dict(update_rule="delta", state_decay=0.3, decay_gate=True,
                                        decay_max=0.5)])
def test_diagonal_float64_l2_features(extra):
    """L2-normalised features (the newer upstream variant) in float64, with ARMT's rule and with
    the delta rule on normalised values, fixed and learnt decays: equal to ~1e-12."""
    model = make("llama", use_l2_norm=True, **extra).double()
    with torch.no_grad():  # W_v (and W_ma) start at zero: values that matter
        for a in model.assoc:
            a.W_mv.weight.normal_(0, 0.3)
            if a.W_ma is not None:
                a.W_ma.weight.normal_(0, 0.3)
    x = ids(2, 37)
    with torch.no_grad():
        seq = model(x)
    dia = model.diagonal()(x)
    torch.testing.assert_close(dia.logits, seq.logits, rtol=1e-11, atol=1e-11)


def test_diagonal_counts_steps():
    """The grouped path calls the stacked blocks once per length group per diagonal."""
    model = make(num_mem_tokens=2, segment_size=4)
    ex = model.diagonal()
    calls = []
    orig = ex.blocks.__call__

    class Spy:
        def __call__(self, sl, H, extras):
            calls.append((sl.start, sl.stop, H.shape[2]))
            return orig(sl, H, extras)

    ex.blocks = Spy()
    ex(ids(1, 16))  # 4 full segments, 2 layers
    assert len(calls) == 2 + 4 - 1
    assert [c[:2] for c in calls] == [(0, 1), (0, 2), (0, 2), (0, 2), (1, 2)]


# --- config and bad input -------------------------------------------------------------------------
def test_config_frozen_json_and_overrides(tmp_path):
    cfg = ARMTConfig(num_mem_tokens=4, d_mem=8, segment_size=16, use_l2_norm=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.d_mem = 3
    assert cfg.d_key == 48
    cfg.save(tmp_path)
    assert ARMTConfig.load(tmp_path) == cfg
    # a file written before segment checkpointing existed loads with it off
    path = tmp_path / ARMTConfig.FILE_NAME
    old = {k: v for k, v in json.loads(path.read_text()).items()
           if k not in ("checkpoint_segments", "offload_memory", "normaliser_floor",
                        "normaliser_gate", "update_rule", "value_norm", "read_clip",
                        "state_decay", "decay_gate", "decay_max")}
    path.write_text(json.dumps(old))
    assert ARMTConfig.load(tmp_path) == cfg
    path.write_text(json.dumps({k: v for k, v in old.items() if k != "d_mem"}))
    with pytest.raises(ValueError, match=r"missing required key\(s\) \['d_mem'\]"):
        ARMTConfig.load(tmp_path)
    model = ARMTForCausalLM(tiny_gpt2(), config=cfg, d_mem=4)
    assert model.rmt_config.d_mem == 4 and model.rmt_config.use_l2_norm
    for bad, msg in [(dict(d_mem=0), "d_mem must be an int >= 1"),
                     (dict(position_mode="abs"), "position_mode must be one of"),
                     (dict(bptt_depth=-2), "bptt_depth must be -1"),
                     (dict(state_dtype="half"), "state_dtype must be None or one of"),
                     (dict(backend="cuda"), "backend must be one of"),
                     (dict(correction=1), "correction must be a bool"),
                     (dict(normaliser_floor=-1.0), "normaliser_floor must be a finite float >= 0"),
                     (dict(normaliser_floor=float("nan")), "normaliser_floor must be a finite"),
                     (dict(normaliser_gate=1), "normaliser_gate must be a bool"),
                     (dict(value_norm="yes"), "value_norm must be a bool"),
                     (dict(read_clip=-0.1), "read_clip must be a finite float >= 0"),
                     (dict(read_clip=float("inf")), "read_clip must be a finite float >= 0"),
                     (dict(read_clip=True), "read_clip must be a finite float >= 0"),
                     (dict(state_decay=0.0), r"state_decay must be a float in \(0, 1\]"),
                     (dict(state_decay=1.01), r"state_decay must be a float in \(0, 1\]"),
                     (dict(state_decay=float("nan")), r"state_decay must be a float in \(0, 1\]"),
                     (dict(decay_gate=1), "decay_gate must be a bool"),
                     (dict(decay_gate=True), "decay_gate=True learns the decay from state_decay"),
                     (dict(decay_gate=True, state_decay=0.5, decay_max=0.5),
                      r"set state_decay below decay_max=0.5 .*got 0.5"),
                     (dict(decay_max=0.5), "decay_max is the learnt decay's ceiling: it needs "
                                           "decay_gate=True"),
                     (dict(decay_gate=True, state_decay=0.5, decay_max=0.0),
                      r"decay_max must be a float in \(0, 1\]"),
                     (dict(decay_gate=True, state_decay=0.5, decay_max=1.5),
                      r"decay_max must be a float in \(0, 1\]"),
                     (dict(update_rule="deltanet"), "update_rule must be one of"),
                     (dict(update_rule="delta"), "update_rule='delta' needs use_l2_norm=True"),
                     (dict(update_rule="delta", use_l2_norm=True, normaliser_gate=True),
                      "act on z, which update_rule='delta' does not use")]:
        with pytest.raises(ValueError, match=msg):
            ARMTConfig(**bad)


@pytest.mark.parametrize("change", [dict(use_l2_norm=True), dict(nu=2), dict(correction=False),
                                    dict(normaliser_floor=1.0), dict(normaliser_gate=True),
                                    dict(use_l2_norm=True, update_rule="delta"),
                                    dict(value_norm=True), dict(read_clip=0.02),
                                    dict(state_decay=0.6)])
def test_replace_config_reaches_the_associative_memory(change):
    """A changed option reaches every layer's read and write (the model equals one built with
    it); fields that shape the associative weights are refused."""
    x = ids(2, 24, seed=3)
    model = make()
    fresh = make(**change)
    fresh.load_state_dict(model.state_dict())
    before = model(x).logits
    model.replace_config(**change)
    torch.testing.assert_close(model(x).logits, fresh(x).logits, rtol=0, atol=0)
    assert (model(x).logits - before).abs().max() > 1e-4  # the option matters here
    torch.testing.assert_close(model.diagonal()(x).logits, fresh.diagonal()(x).logits,
                               rtol=1e-5, atol=1e-5)
    for fixed in (dict(d_mem=8), dict(state_dtype="float64"), dict(position_mode="wrap")):
        with pytest.raises(ValueError, match="cannot change after construction"):
            model.replace_config(**fixed)


def test_learnt_decay_starts_at_the_fixed_one_and_learns(tmp_path):
    """``decay_gate``: each layer gets ``W_ma`` (zero weight, bias ``logit(state_decay)``), so the
    untrained model equals the fixed decay's exactly; the decay then depends on the data (per
    row), gets gradients, survives save/load, and its ``state_decay`` cannot change."""
    x = ids(2, 24, seed=3)
    fixed = make(state_decay=0.6)
    learnt = make(state_decay=0.6, decay_gate=True)
    assert fixed.assoc[0].W_ma is None
    a = learnt.assoc[0].W_ma
    assert a.weight.abs().max() == 0
    torch.testing.assert_close(torch.sigmoid(a.bias), torch.tensor([0.6]), rtol=1e-6, atol=0)
    missing, unexpected = learnt.load_state_dict(fixed.state_dict(), strict=False)
    assert sorted(missing) == [f"assoc.{i}.W_ma.{w}" for i in range(len(learnt.assoc))
                               for w in ("bias", "weight")] and not unexpected
    torch.testing.assert_close(learnt(x).logits, fixed(x).logits, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        for m in learnt.assoc:
            m.W_ma.weight.normal_(0, 0.3)
    assert (learnt(x).logits - fixed(x).logits).abs().max() > 1e-4
    learnt(x, labels=x).loss.backward()
    assert all(m.W_ma.weight.grad.abs().max() > 0 and m.W_ma.bias.grad.abs().max() > 0
               for m in learnt.assoc)
    learnt.save_pretrained(tmp_path)
    again = ARMTForCausalLM.from_pretrained(tmp_path)
    assert again.rmt_config.decay_gate
    torch.testing.assert_close(again(x).logits, learnt(x).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"\['state_decay'\] cannot change after construction"):
        learnt.replace_config(state_decay=0.9)
    with pytest.raises(ValueError, match=r"\['decay_gate'\] cannot change after construction"):
        fixed.replace_config(decay_gate=True)
    assert learnt.replace_config(bptt_depth=2).state_decay == 0.6


def test_learnt_decay_under_a_ceiling(tmp_path):
    """``decay_max``: the learnt decay is ``decay_max * sigmoid(...)``: it starts at
    ``state_decay`` (the untrained model equals the fixed decay's), never exceeds the ceiling
    however far ``W_ma`` pushes it, and the ceiling is saved and fixed after construction."""
    from rmt_fast.models.armt import AssociativeMemory, learnt_decay

    x = ids(2, 24, seed=4)
    fixed = make(state_decay=0.3)
    capped = make(state_decay=0.3, decay_gate=True, decay_max=0.5)
    a = capped.assoc[0]
    assert a.decay_max == 0.5
    torch.testing.assert_close(0.5 * torch.sigmoid(a.W_ma.bias), torch.tensor([0.3]), rtol=1e-6, atol=0)
    capped.load_state_dict(fixed.state_dict(), strict=False)
    torch.testing.assert_close(capped(x).logits, fixed(x).logits, rtol=1e-6, atol=1e-6)
    mem = torch.randn(3, 4, a.W_ma.weight.shape[1])
    with torch.no_grad():
        a.W_ma.bias.fill_(30.0)  # sigmoid saturates at 1: the decay sits on the ceiling
    alpha = learnt_decay(mem, a.W_ma.weight, a.W_ma.bias, a.decay_max)
    torch.testing.assert_close(alpha, torch.full((3,), 0.5))
    with torch.no_grad():
        a.W_ma.bias.fill_(0.0)
        a.W_ma.weight.normal_(0, 1.0)
    alpha = learnt_decay(mem, a.W_ma.weight, a.W_ma.bias, a.decay_max)
    assert alpha.max() < 0.5 and alpha.min() > 0 and alpha.std() > 0
    capped.save_pretrained(tmp_path)
    again = ARMTForCausalLM.from_pretrained(tmp_path)
    assert again.rmt_config.decay_max == 0.5 and again.assoc[0].decay_max == 0.5
    torch.testing.assert_close(again(x).logits, capped(x).logits, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"\['decay_max'\] cannot change after construction"):
        capped.replace_config(decay_max=0.9)
    with pytest.raises(ValueError, match=r"decay_init must be in \(0, decay_max=0.5\)"):
        AssociativeMemory(8, 4, decay_init=0.6, decay_max=0.5)


def test_bad_inputs():
    model = make()
    x = ids(2, 10)
    with pytest.raises(ValueError, match=r"input_ids must be \[B, T\]"):
        model(x[0])
    with pytest.raises(ValueError, match="labels must have input_ids' shape"):
        model(x, labels=x[:, :5])
    with pytest.raises(ValueError, match=r"state tensors must be A \[B=2"):
        model(x, state=model.init_state(3))
    with pytest.raises(TypeError, match="state must be an ARMTState"):
        model(x, state=torch.zeros(2))
    with pytest.raises(ValueError, match="segment of 70 positions"):
        ARMTForCausalLM(tiny_gpt2(), num_mem_tokens=6, d_mem=4, segment_size=64)
    with pytest.raises(TypeError, match="config must be an ARMTConfig"):
        ARMTForCausalLM(tiny_gpt2(), config={"d_mem": 4})
    with pytest.raises(ValueError, match="no memory state to save"):
        model.save_state("/nonexistent/x")
    model.base.activation_checkpointing_enable()
    with pytest.raises(ValueError, match="gradient checkpointing of the base model is not"):
        model(x, labels=x)


def test_state_dtype_float32_on_bfloat16_model():
    base = tiny_llama().to(torch.bfloat16)
    model = ARMTForCausalLM(base, num_mem_tokens=2, d_mem=4, segment_size=8, state_dtype="float32")
    out = model(ids(1, 20), labels=ids(1, 20))
    assert out.logits.dtype == torch.bfloat16 and out.state.A[0].dtype == torch.float32
    out.loss.backward()
    assert model.assoc[0].W_mq.weight.grad.dtype == torch.float32


def test_triton_backend_in_the_model():
    """The model with the Triton kernels (interpreter on CPU) gives the PyTorch path's loss and
    gradients (float32)."""
    x = ids(1, 12)  # two segments: the second reads, both write
    runs = {}
    for backend in ("torch", "triton"):
        model = make(backend=backend, num_mem_tokens=2, segment_size=6)
        out = model(x, labels=x)
        out.loss.backward()
        runs[backend] = (out, {n: p.grad for n, p in model.named_parameters() if n.startswith("assoc")})
    (a, ga), (b, gb) = runs["torch"], runs["triton"]
    torch.testing.assert_close(b.logits, a.logits, rtol=1e-5, atol=1e-5)
    for n in ga:
        err, scale = (gb[n] - ga[n]).abs().max().item(), ga[n].abs().max().item()
        assert err <= 1e-5 * scale + 1e-8, f"{n}: {err:.3e} ({scale:.3e})"


@pytest.mark.parametrize("value_norm,read_clip", [(False, 0.0), (True, 0.0), (False, 0.02)])
def test_state_growth_script_traces_what_each_layer_wrote(value_norm, read_clip, monkeypatch):
    """``scripts/armt_state_growth.py --writes``: per layer the memory outputs' RMS, the largest
    value norm (of the values the model wrote: with ``value_norm``, from the normalised outputs),
    the mean gate and the read's size relative to the hidden states (with ``read_clip``, the
    clipped read's, at most the clip, and the raw read's); the traced model computes what the
    untraced one does."""
    from helpers import load_script

    from rmt_fast.models.armt import AssociativeMemory

    for name in ("read", "write"):  # restored after the test
        monkeypatch.setattr(AssociativeMemory, name, getattr(AssociativeMemory, name))
    model = make("gpt2", use_l2_norm=True, update_rule="delta", value_norm=value_norm,
                 read_clip=read_clip).eval()
    with torch.no_grad():
        for a in model.assoc:
            a.W_mv.weight.normal_(0, 0.3)
    x = ids(2, 24)
    with torch.no_grad():
        plain = model(x).logits
    mem_out = {}
    block = model.assoc[1]

    def keep(module, args, kwargs, out):  # the last block's outputs (its memory rows write)
        mem_out["h"] = out[0] if isinstance(out, tuple) else out
    handle = model.base.transformer.h[1].register_forward_hook(keep, with_kwargs=True)
    stats = load_script("armt_state_growth").trace_writes(model.rmt_config.read_clip)
    with torch.no_grad():
        traced = model(x).logits
    handle.remove()
    torch.testing.assert_close(traced, plain, rtol=0, atol=0)
    s = stats[id(block)]
    assert set(s) == {"read/h", "mem", "|v|", "beta"} | ({"raw read/h"} if read_clip else set())
    if read_clip:  # the clip is per token: the whole read's share stays under it
        assert s["read/h"] <= read_clip * (1 + 1e-6) and s["read/h"] <= s["raw read/h"]
    mem = mem_out["h"][:, -model.rmt_config.num_mem_tokens:]  # the last segment's memory rows
    vin = F.rms_norm(mem, (mem.shape[-1],)) if value_norm else mem
    assert s["mem"] == pytest.approx(float(mem.pow(2).mean().sqrt()), rel=1e-5)
    with torch.no_grad():
        v = block.W_mv(vin)
    assert s["|v|"] == pytest.approx(float(v.norm(dim=-1).max()), rel=1e-5)
    assert 0 < s["beta"] < 1 and s["read/h"] > 0


def test_state_growth_traces_the_learnt_decay(monkeypatch):
    """``scripts/armt_state_growth.py --decays``: each write's learnt decay per row, one entry per
    segment and layer, equal to ``sigmoid(W_ma mean(mem) + b)`` of the memory rows' outputs; the
    traced model computes what the untraced one does."""
    from helpers import load_script

    from rmt_fast.models.armt import AssociativeMemory

    for name in ("read", "write"):  # restored after the test
        monkeypatch.setattr(AssociativeMemory, name, getattr(AssociativeMemory, name))
    model = make("gpt2", use_l2_norm=True, update_rule="delta", state_decay=0.5,
                 decay_gate=True).eval()
    with torch.no_grad():
        for a in model.assoc:
            a.W_ma.weight.normal_(0, 0.5)
    x = ids(2, 24)  # 3 segments
    with torch.no_grad():
        plain = model(x).logits
    outs = []
    handle = model.base.transformer.h[1].register_forward_hook(
        lambda m, a, k, o: outs.append(o[0] if isinstance(o, tuple) else o), with_kwargs=True)
    decays = {}
    load_script("armt_state_growth").trace_writes(0.0, decays)
    with torch.no_grad():
        traced = model(x).logits
    handle.remove()
    torch.testing.assert_close(traced, plain, rtol=0, atol=0)
    assert set(decays) == {id(a) for a in model.assoc}
    got = decays[id(model.assoc[1])]
    assert len(got) == 3 and all(d.shape == (2,) for d in got)
    a = model.assoc[1].W_ma
    for t, out in enumerate(outs):
        mem = out[:, -model.rmt_config.num_mem_tokens:]
        want = torch.sigmoid(mem.mean(1) @ a.weight[0] + a.bias[0])
        torch.testing.assert_close(got[t], want, rtol=1e-6, atol=1e-7)
    assert float(torch.stack(got).std()) > 1e-4  # it depends on the data


def test_state_growth_twins():
    """``scripts/armt_state_growth.py --twins``: each twin differs from its story in the fact's
    place and the answer only; the fact signal is per layer and story ``|A_i - A_twin| / |A_i|``."""
    from helpers import load_script

    from rmt_fast.models.armt import ARMTState
    from rmt_fast.tasks.babilong import PLACES, default_vocab
    from rmt_fast.tasks.length_eval import story_batch

    growth = load_script("armt_state_growth")
    vocab = default_vocab()
    stories = story_batch("qa1", 5, 16, 3, vocab, seed=4, num_facts=1)
    both, where = growth.twin_stories(stories, vocab, 16)
    assert torch.equal(both[:3], stories)
    places = [vocab.stoi[p] for p in PLACES]
    for i in range(3):
        diff = (both[3 + i] != stories[i]).nonzero().flatten().tolist()
        assert len(diff) == 2 and diff[1] == stories.shape[1] - 1 and diff[0] // 16 == where[i]
        assert int(stories[i, diff[0]]) == int(stories[i, -1])  # the fact names the answer
        assert places.index(int(both[3 + i, -1])) == (places.index(int(stories[i, -1])) + 1) % 6
    bad = stories.clone()
    bad[0, where[0] * 16:(where[0] + 1) * 16] = vocab.stoi["the"]  # no fact left in story 0
    with pytest.raises(ValueError, match="story 0: expected one fact"):
        growth.twin_stories(bad, vocab, 16)
    A = torch.randn(4, 3, 5, dtype=torch.float64)
    got = growth.fact_signal(ARMTState((A, 2 * A), (torch.zeros(4, 3),) * 2, 1), 2)
    want = [[float((A[i] - A[2 + i]).norm() / A[i].norm()) for i in range(2)]]
    assert got[0] == pytest.approx(want[0]) and got[1] == pytest.approx(want[0])
