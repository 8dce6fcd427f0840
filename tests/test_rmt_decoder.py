"""RMTForCausalLM against explicit reference loops that call the base model by hand."""

import pytest
import torch
import torch.nn.functional as F
from models import (
    VOCAB,
    check_repeated_rows,
    eager_copy,
    ids,
    official_loop,
    tiny_gpt2,
    tiny_llama,
    tiny_scored,
)

from rmt_fast.models import RMTForCausalLM


@pytest.mark.parametrize("kind", ["gemma2", "gpt_oss"])
@pytest.mark.parametrize("mask", ["causal", "rmt"])
def test_models_with_softcap_or_sinks_equal_reference_loop(kind, mask):
    """Gemma 2's logit softcapping and gpt-oss's sinks under the memory layout: logits and
    memory equal the official loop on the eager model (the exact-scores path), and reading
    gives the same memory; a sliding window shorter than a segment's keys is refused before
    anything changes."""
    m, s = 3, 7
    model = RMTForCausalLM(tiny_scored(kind, "eager", window=64), num_mem_tokens=m,
                           segment_size=s, mask=mask)
    ref = tiny_scored(kind, "eager", window=64)
    tokens = ids(2, 25)
    with torch.no_grad():
        out = model(tokens)
        logits, mem = official_loop(ref, model.memory.expand(2, -1, -1), tokens, m, s, mask)
    # scores are large (q scaled up so that the softcap binds): float32 rounding ~3e-5
    torch.testing.assert_close(out.logits, logits, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(out.memory, mem, atol=1e-4, rtol=1e-4)
    # reading: the last block runs the memory rows only (gpt-oss's MoE block returns a tuple)
    torch.testing.assert_close(model.eval().read(tokens)[0], out.memory, atol=1e-5, rtol=1e-5)
    short = RMTForCausalLM(tiny_scored(kind, "eager", window=8), num_mem_tokens=m, segment_size=s)
    before = short.memory.detach().clone()
    with pytest.raises(ValueError, match="sliding window of 8 keys, shorter than the 13 keys"):
        short(tokens)
    assert torch.equal(short.memory, before)


def test_a_sliding_window_shorter_than_a_segment_is_refused():
    """Mistral's window is applied by transformers' mask, which the memory layout replaces: a
    window that would cut a segment's keys is refused (also through an XL cache, and while
    generating); one that holds them all runs as the base model would."""
    from transformers import MistralConfig, MistralForCausalLM

    def mistral(window):
        torch.manual_seed(0)
        return MistralForCausalLM(MistralConfig(
            vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
            sliding_window=window)).eval()

    tokens = ids(2, 14)
    with pytest.raises(ValueError, match="sliding window of 10 keys, shorter than the 11 keys"):
        RMTForCausalLM(mistral(10), num_mem_tokens=2, segment_size=7)(tokens)
    with pytest.raises(ValueError, match="sliding window of 12 keys, shorter than the 14 keys"):
        RMTForCausalLM(mistral(12), num_mem_tokens=2, segment_size=7, xl_cache=3)(tokens)
    fits = RMTForCausalLM(mistral(11), num_mem_tokens=2, segment_size=7)
    unbounded = RMTForCausalLM(mistral(None), num_mem_tokens=2, segment_size=7)
    unbounded.load_state_dict(fits.state_dict())
    with torch.no_grad():
        torch.testing.assert_close(fits(tokens).logits, unbounded(tokens).logits)
    xl = RMTForCausalLM(mistral(13), num_mem_tokens=2, segment_size=7, xl_cache=4).eval()
    with pytest.raises(ValueError, match="sliding window of 13 keys, shorter than the 14 keys"):
        xl.generate(tokens, max_new_tokens=5, do_sample=False, pad_token_id=0)


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama])
@pytest.mark.parametrize("mask", ["causal", "rmt"])
def test_logits_memory_loss_equal_reference_loop(make, mask):
    base = make()
    ref = eager_copy(base)
    m, s = 3, 7
    model = RMTForCausalLM(base, num_mem_tokens=m, segment_size=s, mask=mask)
    tokens = ids(2, 25)
    out = model(tokens, labels=tokens)
    logits, mem = official_loop(ref, model.memory.detach().expand(2, -1, -1), tokens, m, s, mask)
    torch.testing.assert_close(out.logits, logits, atol=1e-5, rtol=0)
    torch.testing.assert_close(out.memory, mem, atol=1e-5, rtol=0)
    loss = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), tokens[:, 1:].reshape(-1))
    torch.testing.assert_close(out.loss, loss, atol=1e-5, rtol=0)


def test_answer_only_loss_uses_labels_mask_of_predicting_positions():
    model = RMTForCausalLM(tiny_gpt2(), num_mem_tokens=2, segment_size=5)
    tokens = ids(2, 12)
    lm = torch.zeros(2, 12, dtype=torch.bool)
    lm[:, 8:11] = True  # positions 8..10 predict tokens 9..11
    out = model(tokens, labels=tokens, labels_mask=lm)
    expect = F.cross_entropy(out.logits[:, 8:11].reshape(-1, VOCAB), tokens[:, 9:12].reshape(-1))
    torch.testing.assert_close(out.loss, expect, atol=1e-6, rtol=0)
    last = RMTForCausalLM(tiny_gpt2(), num_mem_tokens=2, segment_size=5, loss_over="last")
    out = last(tokens, labels=tokens)
    expect = F.cross_entropy(out.logits[:, 10:11].reshape(-1, VOCAB), tokens[:, 11:12].reshape(-1))
    torch.testing.assert_close(out.loss, expect, atol=1e-6, rtol=0)


def _grads(model, tokens):
    model.zero_grad()
    model(tokens, labels=tokens).loss.backward()
    return {n: p.grad.clone() if p.grad is not None else torch.zeros_like(p)
            for n, p in model.named_parameters()}


@pytest.mark.parametrize("depth", [0, 1, 2])
def test_bptt_depth_truncates_memory_gradient_exactly(depth):
    m, s, n = 2, 4, 4
    tokens = ids(2, s * n)
    model = RMTForCausalLM(tiny_gpt2(), num_mem_tokens=m, segment_size=s, bptt_depth=depth)
    got = _grads(model, tokens)
    assert torch.count_nonzero(got["memory"]) == 0  # the initial memory is beyond the window

    # reference: the same loop by hand, detaching memory entering segments t < n - depth
    model.zero_grad()
    mem = model.expand_memory(2)
    loss = 0
    for t in range(n):
        if t < n - depth:
            mem = mem.detach()
        hidden, mem, _ = model.segment_forward(mem, tokens[:, t * s:(t + 1) * s], None)
        logits = model.logits(hidden)
        tgt = torch.full((2, s), -100)
        nxt = tokens[:, t * s + 1:(t + 1) * s + 1]
        tgt[:, :nxt.shape[1]] = nxt
        loss = loss + F.cross_entropy(logits.reshape(-1, VOCAB), tgt.reshape(-1), reduction="sum")
    (loss / (2 * (s * n - 1))).backward()
    for name, p in model.named_parameters():
        ref = p.grad if p.grad is not None else torch.zeros_like(p)
        torch.testing.assert_close(got[name], ref, atol=1e-6, rtol=1e-5)
    full = RMTForCausalLM(tiny_gpt2(), num_mem_tokens=m, segment_size=s, bptt_depth=-1)
    assert torch.count_nonzero(_grads(full, tokens)["memory"]) > 0


def test_generate_equals_manual_greedy_loop():
    base = tiny_gpt2()
    m, s = 3, 6
    model = RMTForCausalLM(base, num_mem_tokens=m, segment_size=s, mask="rmt")
    tokens = ids(2, 16)
    new = model.generate(tokens, max_new_tokens=5, do_sample=False, pad_token_id=0)
    # manual: read all but the last segment, then re-run [mem | last + generated] each step
    mem = model.expand_memory(2)
    with torch.no_grad():
        for start in (0, 6):
            _, mem, _ = model.segment_forward(mem, tokens[:, start:start + s], None)
        seq = tokens[:, 12:]
        for _ in range(5):
            hidden, _, _ = model.segment_forward(mem, seq, None, write=False)
            nxt = model.logits(hidden[:, -1]).argmax(-1, keepdim=True)
            seq = torch.cat([seq, nxt], dim=1)
    assert torch.equal(new, seq[:, 4:])


@pytest.mark.parametrize("make,xl_positions", [(tiny_gpt2, "before_memory"),
                                               (tiny_llama, "before_memory"),
                                               (tiny_llama, "before_segment")])
def test_generate_attends_to_the_xl_cache(make, xl_positions):
    """A model with an XL cache generates as it reads: the prompt's last segment and every new
    token see the cache left by the segment before (prefill and each decoding step), equal to
    re-running ``[mem | last + generated]`` with that cache; dropping the cache differs."""
    m, s, keep = 3, 6, 4
    model = RMTForCausalLM(make(), num_mem_tokens=m, segment_size=s, mask="rmt", xl_cache=keep,
                           xl_positions=xl_positions).eval()
    tokens = ids(2, 15)
    kw = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, output_logits=True,
              return_dict_in_generate=True)
    new = model.generate(tokens, **kw)

    def manual(use_xl: bool):
        mem, xl = model.expand_memory(2), None
        with torch.no_grad():
            for start in (0, 6):
                _, mem, xl = model.segment_forward(mem, tokens[:, start:start + s], None, xl)
            seq, steps = tokens[:, 12:], []
            for _ in range(5):
                hidden, _, _ = model.segment_forward(mem, seq, None, xl if use_xl else None,
                                                     write=False)
                logits = model.logits(hidden[:, -1])
                steps.append(logits)
                seq = torch.cat([seq, logits.argmax(-1, keepdim=True)], dim=1)
        return seq[:, 3:], torch.stack(steps, 1)

    expect, with_cache = manual(True)
    assert torch.equal(new.sequences, expect)
    torch.testing.assert_close(torch.stack(new.logits, 1), with_cache, atol=1e-5, rtol=0)
    _, without = manual(False)
    assert (with_cache - without).abs().max() > 1e-3  # the cache changes the logits
    # the cached state passed in explicitly, as a streaming reader does
    mem, xl = model.read(tokens[:, :12])
    again = model.generate(tokens[:, 12:], memory=mem, xl=xl, **kw)
    assert torch.equal(again.sequences, expect)
    torch.testing.assert_close(torch.stack(again.logits, 1), with_cache, atol=1e-5, rtol=0)


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama])
def test_generate_with_an_xl_cache_pads_rows_as_if_alone(make):
    """A left-padded batch generates, XL cache included, what each row generates alone."""
    model = RMTForCausalLM(make(), num_mem_tokens=2, segment_size=5, xl_cache=4,
                           segment_alignment="right").eval()
    long, short = ids(1, 17, seed=1), ids(1, 8, seed=2)
    batch = torch.zeros(2, 17, dtype=torch.long)
    batch[0], batch[1, 9:] = long[0], short[0]
    mask = torch.ones(2, 17, dtype=torch.long)
    mask[1, :9] = 0
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_logits=True,
              return_dict_in_generate=True)
    both = torch.stack(model.generate(batch, attention_mask=mask, **kw).logits, 1)
    for row, alone in enumerate((long, short)):
        torch.testing.assert_close(both[row], torch.stack(model.generate(alone, **kw).logits, 1)[0],
                                   atol=1e-5, rtol=0)


XL_SETTINGS = [(tiny_gpt2, 0, "before_memory"), (tiny_gpt2, 4, "before_memory"),
               (tiny_llama, 4, "before_memory"), (tiny_llama, 7, "before_segment")]


@pytest.mark.parametrize("xl_cache", [0, 4])
def test_generate_rolling_segments_equals_the_forward_over_its_output(xl_cache):
    """``roll_segments=True``: greedy tokens across two segment boundaries (memory and XL cache
    written as each segment fills) are the argmax of :meth:`forward` over prompt + output, a
    left-padded row included (EOS, which ``min_new_tokens`` holds back, masked there too)."""
    m, s = 3, 6
    model = RMTForCausalLM(tiny_llama(), num_mem_tokens=m, segment_size=s, mask="rmt",
                           xl_cache=xl_cache).eval()
    tokens = ids(2, 15)
    mask = torch.ones(2, 15, dtype=torch.long)
    mask[1, :4] = 0
    kw = dict(max_new_tokens=14, min_new_tokens=14, do_sample=False, pad_token_id=0)
    new = model.generate(tokens, attention_mask=mask, roll_segments=True, **kw)
    assert new.shape == (2, 14)
    full = torch.cat([tokens, new], 1)
    with torch.no_grad():
        logits = model(full, attention_mask=torch.cat([mask, torch.ones_like(new)], 1)).logits
    logits[..., model.lm.generation_config.eos_token_id] = float("-inf")
    assert torch.equal(logits[:, 14:-1].argmax(-1), new)
    # without rolling the last segment grows past segment_size: other tokens after the boundary
    grown = model.generate(tokens, attention_mask=mask, **kw)
    assert torch.equal(grown[:, :3], new[:, :3]) and not torch.equal(grown, new)


def test_generate_rolling_segments_stops_rows_at_eos_and_refuses_what_it_cannot_do():
    model = RMTForCausalLM(tiny_llama(), num_mem_tokens=2, segment_size=4).eval()
    tokens = ids(2, 6)
    kw = dict(roll_segments=True, max_new_tokens=9, do_sample=False, suppress_tokens=[0])
    first = model.generate(tokens, pad_token_id=0, **kw)  # the default EOS (0) never comes
    row = first[0].tolist()
    end = next(i for i in range(4, 9) if row[i] not in row[:i])  # a token new in segment 2+
    out = model.generate(tokens, eos_token_id=row[end], pad_token_id=60, **kw)
    assert out[0, :end + 1].tolist() == row[:end + 1] and (out[0, end + 1:] == 60).all()
    other = first[1].tolist()
    stop = other.index(row[end]) + 1 if row[end] in other else 9
    assert out[1, :stop].tolist() == other[:stop] and (out[1, stop:] == 60).all()
    for bad in (dict(num_beams=2), dict(return_dict_in_generate=True)):
        with pytest.raises(ValueError, match=r"roll_segments=True\) needs max_new_tokens"):
            model.generate(tokens, roll_segments=True, max_new_tokens=5, pad_token_id=0, **bad)
    with pytest.raises(ValueError, match="num_return_sequences=2 needs do_sample=True"):
        model.generate(tokens, roll_segments=True, max_new_tokens=5, pad_token_id=0,
                       num_return_sequences=2, do_sample=False)
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="num_return_sequences must be an int >= 1"):
            model.generate(tokens, roll_segments=True, max_new_tokens=5, pad_token_id=0,
                           num_return_sequences=bad, do_sample=True)
    for bad in (dict(max_length=20), dict()):
        with pytest.raises(ValueError, match=r"roll_segments=True\) needs max_new_tokens"):
            model.generate(tokens, roll_segments=True, pad_token_id=0, **bad)


@pytest.mark.parametrize("xl_cache", [0, 4])
def test_generate_rolling_several_sequences_per_row(xl_cache):
    """``roll_segments=True, num_return_sequences=3`` with sampling across two segment
    boundaries: the same tokens as the rows repeated by hand (same seed; a left-padded row
    and a given memory repeated with them)."""
    model = RMTForCausalLM(tiny_llama(), num_mem_tokens=3, segment_size=6, mask="rmt",
                           xl_cache=xl_cache).eval()
    tokens = ids(2, 9)  # segments 6 + 3: the XL cache of the first is repeated too
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[1, :2] = 0
    memory = 30 * torch.randn(2, 3, model.base.config.hidden_size)  # rows far apart: it shows
    kw = dict(roll_segments=True, max_new_tokens=13, min_new_tokens=13, do_sample=True,
              pad_token_id=0)
    torch.manual_seed(5)
    three = model.generate(tokens, attention_mask=mask, memory=memory, num_return_sequences=3,
                           **kw)
    torch.manual_seed(5)
    by_hand = model.generate(tokens.repeat_interleave(3, 0), attention_mask=mask.repeat_interleave(
        3, 0), memory=memory.repeat_interleave(3, 0), **kw)
    assert three.shape == (6, 13) and torch.equal(three, by_hand)
    assert not torch.equal(three[0], three[1])  # sampled: the copies differ


@pytest.mark.parametrize("xl_cache", [0, 4])
def test_generate_with_beams_and_several_sequences_per_row(xl_cache):
    """transformers' generate repeats each row for beams and ``num_return_sequences``: memory,
    padding and XL cache are repeated alike."""
    model = RMTForCausalLM(tiny_llama(), num_mem_tokens=3, segment_size=6, xl_cache=xl_cache).eval()
    check_repeated_rows(model, ids(2, 15))


@pytest.mark.parametrize("make,xl_cache,xl_positions", XL_SETTINGS)
def test_padded_rows_equal_rows_run_alone(make, xl_cache, xl_positions):
    """Left padding + right alignment: a short row gets fewer segments, nothing leaks; its
    empty segments leave its memory as it was, also while an XL cache is first made."""
    m, s = 2, 5
    model = RMTForCausalLM(make(), num_mem_tokens=m, segment_size=s, segment_alignment="right",
                           xl_cache=xl_cache, xl_positions=xl_positions)
    long, short = ids(1, 17, seed=1), ids(1, 8, seed=2)
    batch = torch.zeros(2, 17, dtype=torch.long)
    batch[0], batch[1, 9:] = long[0], short[0]
    mask = torch.ones(2, 17, dtype=torch.long)
    mask[1, :9] = 0
    with torch.no_grad():
        out = model(batch, attention_mask=mask)
        alone_long, alone_short = model(long), model(short)
    torch.testing.assert_close(out.logits[0], alone_long.logits[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.logits[1, 9:], alone_short.logits[0], atol=1e-5, rtol=0)
    torch.testing.assert_close(out.memory[1], alone_short.memory[0], atol=1e-5, rtol=0)


def _real_xl(xl, row):
    """Per layer the keys and values of ``xl``'s real (unpadded) entries in ``row``."""
    keep = xl.padding[row]
    return [(k[row][:, keep], v[row][:, keep]) for k, v in xl.kv.values()]


@pytest.mark.parametrize("make,xl_cache,xl_positions", XL_SETTINGS[1:])
def test_right_padded_rows_end_with_the_state_of_rows_run_alone(make, xl_cache, xl_positions):
    """Right padding + left alignment: a short row's last segments are empty; it ends with the
    memory and the XL cache (its real entries, at their positions) it has alone, also when
    its empty segments come while the cache still fills up."""
    model = RMTForCausalLM(make(), num_mem_tokens=2, segment_size=4, xl_cache=xl_cache,
                           xl_positions=xl_positions)
    long, short = ids(1, 16, seed=1), ids(1, 5, seed=2)
    batch = torch.zeros(2, 16, dtype=torch.long)
    batch[0], batch[1, :5] = long[0], short[0]
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 5:] = 0
    with torch.no_grad():
        out = model(batch, attention_mask=mask)
        alone = [model(long), model(short)]
    for row in (0, 1):
        torch.testing.assert_close(out.memory[row], alone[row].memory[0], atol=1e-5, rtol=0)
        for (k, v), (ka, va) in zip(_real_xl(out.xl, row), _real_xl(alone[row].xl, 0), strict=True):
            torch.testing.assert_close(k, ka, atol=1e-5, rtol=0)
            torch.testing.assert_close(v, va, atol=1e-5, rtol=0)


def test_xl_cache_is_used_detached_and_changes_later_segments_only():
    tokens = ids(2, 15)
    base = tiny_gpt2()
    plain = RMTForCausalLM(base, num_mem_tokens=2, segment_size=5)
    with torch.no_grad():
        a = plain(tokens)
    xl = RMTForCausalLM(base, num_mem_tokens=2, segment_size=5, xl_cache=4)
    xl.memory = plain.memory
    with torch.no_grad():
        b = xl(tokens)
    torch.testing.assert_close(a.logits[:, :5], b.logits[:, :5])
    assert (a.logits[:, 5:] - b.logits[:, 5:]).abs().max() > 1e-3
    assert all(k.shape[2] == 4 and not k.requires_grad for k, _ in b.xl.kv.values())
    assert b.xl.padding.shape == (2, 4)


def test_xl_cache_of_a_rotary_model_equals_full_attention():
    """With no memory tokens and a cache of every earlier token, Transformer-XL over segments is
    causal attention over the whole input (a segment's keys only ever saw earlier tokens), but
    only if the cached rotary keys are moved to their true positions before the next segment:
    Llama's logits must equal the base model's on the whole sequence, also for a left-padded
    row (positions count real tokens). GPT-2's absolute positions cannot be moved (differs)."""
    seg, n = 6, 3
    tokens = ids(2, seg * n)
    mask = torch.ones_like(tokens, dtype=torch.bool)
    mask[0, :2] = False
    for make, equal in ((tiny_llama, True), (tiny_gpt2, False)):
        base = make().double()
        model = RMTForCausalLM(base, num_mem_tokens=0, segment_size=seg, xl_cache=(n - 1) * seg)
        with torch.no_grad():
            out = model(tokens, attention_mask=mask).logits
            full, padded = base(tokens[1:]).logits, base(tokens[:1, 2:]).logits
        if equal:
            torch.testing.assert_close(out[1:], full, atol=1e-7, rtol=0)
            torch.testing.assert_close(out[:1, 2:], padded, atol=1e-7, rtol=0)
        else:
            assert (out[1:, seg:] - full[:, seg:]).abs().max() > 1e-2


@pytest.mark.parametrize("xl_positions", ["before_memory", "before_segment"])
def test_xl_cache_with_memory_keeps_true_rotary_distances(xl_positions):
    """With memory tokens the cached keys move ``-(M + r)`` (``before_memory``: the last cached
    token sits one position before the next segment's read memory) or ``-r``
    (``before_segment``: one position before the first segment token). Rotary attention depends
    on distances only, so the same logits come from leaving the cache where it was computed and
    numbering the next segment from ``M + r`` on (``before_memory``) or from ``r`` on
    (``before_segment``); the other numbering differs."""
    m, seg = 3, 8
    model = RMTForCausalLM(tiny_llama().double(), num_mem_tokens=m, segment_size=seg, xl_cache=5,
                           xl_positions=xl_positions).eval()
    tokens = ids(2, 2 * seg)
    with torch.no_grad():
        out = model(tokens).logits

    def unshifted(offset):
        ref = RMTForCausalLM(model.lm, num_mem_tokens=m, segment_size=seg, xl_cache=5).eval()
        ref.load_state_dict(model.state_dict())
        ref.__dict__["_rotary"] = None  # keep the cache at the positions it was computed at
        calls = []

        def positions(seg_mask, seg_len, write, device):
            start = offset if calls else 0
            calls.append(start)
            return (torch.arange(m + seg_len + (m if write else 0), device=device) + start).expand(2, -1)

        ref._position_ids = positions
        with torch.no_grad():
            logits = ref(tokens).logits
        assert calls == [0, offset]
        return logits

    same, other = (m + seg, seg) if xl_positions == "before_memory" else (seg, m + seg)
    # the rotary angles are float32 (in transformers and in shift_keys): about 1e-8 apart
    torch.testing.assert_close(unshifted(same), out, atol=1e-6, rtol=0)
    assert (unshifted(other)[:, seg:] - out[:, seg:]).abs().max() > 1e-5  # (about 5e-4 here)


def test_xl_positions_before_segment_needs_rotary_positions():
    """GPT-2's cached keys cannot be moved: ``before_segment`` is refused at construction and by
    ``replace_config`` (the config stays as it was); without a cache it is harmless."""
    with pytest.raises(ValueError, match="xl_positions='before_segment'.*rotary"):
        RMTForCausalLM(tiny_gpt2(), num_mem_tokens=2, segment_size=6, xl_cache=3,
                       xl_positions="before_segment")
    model = RMTForCausalLM(tiny_gpt2(), num_mem_tokens=2, segment_size=6, xl_cache=3)
    before = model.rmt_config
    with pytest.raises(ValueError, match="rotary"):
        model.replace_config(xl_positions="before_segment")
    assert model.rmt_config is before
    RMTForCausalLM(tiny_gpt2(), num_mem_tokens=2, segment_size=6, xl_positions="before_segment")
    with pytest.raises(ValueError, match="xl_positions must be one of"):
        RMTForCausalLM(tiny_llama(), num_mem_tokens=2, segment_size=6, xl_positions="after")


@pytest.mark.parametrize("make,extra", [(tiny_gpt2, {}),
                                        (tiny_llama, {"xl_positions": "before_segment"})])
def test_save_load_round_trip_exact(tmp_path, make, extra):
    model = RMTForCausalLM(make(), num_mem_tokens=3, segment_size=6, mask="rmt", xl_cache=2,
                           memory_noise=0.1, **extra).eval()
    tokens = ids(2, 14)
    with torch.no_grad():
        before = model(tokens).logits
    model.save_pretrained(tmp_path)
    loaded = RMTForCausalLM.from_pretrained(tmp_path)
    assert loaded.rmt_config == model.rmt_config
    with torch.no_grad():
        after = loaded(tokens).logits
    assert torch.equal(before, after)


def test_load_official_state_dict():
    src = RMTForCausalLM(tiny_gpt2(seed=3), num_mem_tokens=2, segment_size=5)
    official = {"memory_cell.memory": src.memory.detach().clone()}
    official.update({f"memory_cell.model.{k}": v for k, v in src.base.state_dict().items()})
    dst = RMTForCausalLM(tiny_gpt2(seed=4), num_mem_tokens=2, segment_size=5)
    dst.load_official_state_dict(official)
    tokens = ids(1, 12)
    with torch.no_grad():
        logits, _ = official_loop(eager_copy(src.base), src.memory.expand(1, -1, -1), tokens, 2, 5)
        torch.testing.assert_close(dst(tokens).logits, logits, atol=1e-5, rtol=0)
    with pytest.raises(ValueError, match="unexpected key"):
        dst.load_official_state_dict({"memory": src.memory, "bogus": src.memory})


@pytest.mark.parametrize("kwargs,match", [
    (dict(segment_size=0), "segment_size must be an int >= 1"),
    (dict(num_mem_tokens=30, segment_size=10), "exceeds the base model's 64 positions"),
    (dict(mask="sideways"), "mask must be one of"),
    (dict(bptt_depth=-3), "bptt_depth must be -1"),
    (dict(memory_noise=-0.1), "memory_noise must be a finite float >= 0"),
    (dict(memory_noise=float("nan")), "memory_noise must be a finite float >= 0"),
])
def test_bad_configuration_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        RMTForCausalLM(tiny_gpt2(), **{"num_mem_tokens": 2, "segment_size": 8, **kwargs})


def test_unsupported_model_and_bad_inputs():
    with pytest.raises(TypeError, match="unsupported base model"):
        RMTForCausalLM(torch.nn.Linear(3, 3), num_mem_tokens=2, segment_size=4)
    model = RMTForCausalLM(tiny_gpt2(), num_mem_tokens=2, segment_size=4)
    with pytest.raises(ValueError, match=r"input_ids must be \[B, T\]"):
        model(ids(1, 5)[0])
    with pytest.raises(ValueError, match="labels must have input_ids' shape"):
        model(ids(2, 5), labels=ids(2, 4))
    with pytest.raises(ValueError, match=r"memory must be \[B, M, d\]"):
        model(ids(2, 5), memory=torch.zeros(2, 3, 32))


@pytest.mark.parametrize("depth,noise", [(-1, 0.0), (2, 0.0), (-1, 0.3)])
def test_checkpoint_segments_gives_identical_gradients(depth, noise):
    """Segment-level checkpointing (recompute in backward, dropout and memory noise replayed)
    == plain BPTT."""
    tokens = ids(2, 22)
    lm = torch.zeros(2, 22, dtype=torch.bool)
    lm[:, 15:] = True
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(7)
        base = tiny_gpt2(dropout=0.1).double()
        model = RMTForCausalLM(base, num_mem_tokens=2, segment_size=5, mask="rmt",
                               bptt_depth=depth, checkpoint_segments=ckpt,
                               memory_noise=noise).train()
        torch.manual_seed(11)
        out = model(tokens, labels=tokens, labels_mask=lm)
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
        assert (out.logits is None) == ckpt
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-10, rtol=0)


def test_memory_noise_perturbs_every_read_in_training_only():
    """Training mode: each segment reads memory + noise * rms(memory) * N(0, 1), drawn in segment
    order; eval mode: no noise at all."""
    tokens = ids(2, 15)
    model = RMTForCausalLM(tiny_gpt2(), num_mem_tokens=2, segment_size=5, memory_noise=0.3)
    plain = RMTForCausalLM(tiny_gpt2(), num_mem_tokens=2, segment_size=5)
    plain.load_state_dict(model.state_dict())
    model.eval()
    torch.testing.assert_close(model(tokens).logits, plain(tokens).logits, atol=0, rtol=0)
    model.train()
    model.base.eval()  # no dropout: the noise is the only random draw
    torch.manual_seed(5)
    out = model(tokens)
    model.eval()
    torch.manual_seed(5)
    memory, logits = model.memory.detach().expand(2, -1, -1), []
    with torch.no_grad():
        for seg in tokens.split(5, dim=1):
            rms = memory.pow(2).mean(-1, keepdim=True).sqrt()
            step = model(seg, memory=memory + 0.3 * rms * torch.randn_like(memory))
            logits.append(step.logits)
            memory = step.memory
    torch.testing.assert_close(out.logits.detach(), torch.cat(logits, 1), atol=1e-5, rtol=0)
    torch.testing.assert_close(out.memory.detach(), memory, atol=1e-5, rtol=0)
    assert (out.logits.detach() - plain(tokens).logits).abs().max() > 1e-2


def _saved_peak(segments: int, checkpoint: bool) -> int:
    from helpers import LiveBytes

    model = RMTForCausalLM(tiny_gpt2(n_positions=40), num_mem_tokens=4, segment_size=32,
                           checkpoint_segments=checkpoint).train()
    tokens = ids(2, 32 * segments)
    with LiveBytes() as counter:
        model(tokens, labels=tokens, return_logits=False).loss.backward()
    return counter.peak


def test_checkpointed_training_memory_does_not_grow_with_segments(one_thread):
    """Regression check of the linear-memory claim on the RMT model itself (peak bytes of
    the tensors a training step allocates, deterministic): 64 vs 4 segments."""
    ckpt4, ckpt64 = _saved_peak(4, True), _saved_peak(64, True)
    plain4, plain64 = _saved_peak(4, False), _saved_peak(64, False)
    assert ckpt64 <= 1.3 * ckpt4, (ckpt4, ckpt64)
    assert plain64 >= 12 * plain4, (plain4, plain64)


@pytest.mark.parametrize("make", [tiny_gpt2, tiny_llama])
@pytest.mark.parametrize("mask", ["causal", "rmt"])
@pytest.mark.parametrize("xl_cache", [0, 3])
def test_reading_without_hidden_gives_the_same_memory(make, mask, xl_cache):
    """Reading without hidden states (no logits kept) gives the same memory and XL cache."""
    model = RMTForCausalLM(make(), num_mem_tokens=3, segment_size=6, mask=mask, xl_cache=xl_cache)
    tokens = ids(2, 20)
    am = torch.ones(2, 20, dtype=torch.long)
    am[1, :8] = 0
    with torch.no_grad():
        for kw in ({}, {"attention_mask": am}):
            full = model(tokens, **kw)
            read_mem, read_xl = model.read(tokens, **kw)
            torch.testing.assert_close(read_mem, full.memory, atol=1e-5, rtol=0)
            if xl_cache:
                for layer, (k, _) in full.xl.kv.items():
                    torch.testing.assert_close(read_xl.kv[layer][0], k, atol=1e-5, rtol=0)


def test_generate_refuses_to_run_past_the_base_models_positions():
    """[read memory (2) | last segment (8)] leaves 12 - 10 = 2 positions: 3 new tokens fit (the
    last one is never fed back), 4 are refused up front with the limit in the message."""
    model = RMTForCausalLM(tiny_gpt2(n_positions=12), num_mem_tokens=2, segment_size=8).eval()
    x = ids(1, 16)
    assert model.generate(x, max_new_tokens=3, do_sample=False).shape == (1, 3)
    with pytest.raises(ValueError, match=r"at most 3 new tokens \(max_new_tokens\)"):
        model.generate(x, max_new_tokens=4, do_sample=False)
    with pytest.raises(ValueError, match="base model has 12"):
        model.generate(x, max_length=14, do_sample=False)


def test_generate_without_memory_from_a_one_token_segment():
    """num_mem_tokens=0 and a last segment of one token: the prompt is that token alone, so the
    result is the base model's own greedy continuation of it (the layout applies to the prefill
    only, not to the cached decoding steps of the same length)."""
    model = RMTForCausalLM(tiny_gpt2(), num_mem_tokens=0, segment_size=8).eval()
    x = ids(1, 9)
    got = model.generate(x, max_new_tokens=4, do_sample=False)
    ref = eager_copy(model.lm)
    want = ref.generate(x[:, 8:], attention_mask=torch.ones(1, 1, dtype=torch.long), max_new_tokens=4,
                        do_sample=False)[:, 1:]
    assert torch.equal(got, want)
