"""StreamingReader over an ARMTForCausalLM: the same reader, the associative state instead of
memory tokens (ARMT runs the shared segment loop)."""

import pytest
import torch
from models import VOCAB, ids, tiny_armt

from rmt_fast.models.armt import ARMTState
from rmt_fast.streaming import StreamingReader

SEG = 8  # tiny_armt's segment size


def assert_same_state(a: ARMTState, b: ARMTState, exact=False):
    assert a.segments == b.segments
    for x, y in zip(a.A + a.z, b.A + b.z, strict=True):
        if exact:
            assert torch.equal(x, y)
        else:
            torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_streaming_in_any_chunks_equals_reading_at_once(kind):
    model = tiny_armt(kind)
    x = ids(2, 5 * SEG + 3)  # 5 whole segments and a tail of 3
    want = model.read(x)
    reader = StreamingReader(model, batch_size=2, progress=False)
    assert reader.state.segments == 0 and reader.xl is None
    for lo, hi in [(0, 3), (3, 11), (11, 30), (30, 43)]:
        reader.feed(x[:, lo:hi])
    assert reader.tokens_read == 5 * SEG and reader.state.segments == 5
    reader.flush()
    assert reader.tokens_read == x.shape[1]
    assert_same_state(reader.state, want)
    with pytest.raises(AttributeError, match="carries no memory tokens"):
        reader.memory  # noqa: B018


def test_generate_after_reading_equals_model_generate():
    model = tiny_armt()
    # inputs on which the read state changes the greedy tokens (the tiny random model often
    # repeats one token whatever it read)
    x, prompt = ids(1, 3 * SEG + 5, seed=5), ids(1, 4, seed=6)
    reader = StreamingReader(model, progress=False)
    reader.feed(x[0])
    got = reader.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    state = model.read(x)
    want = model.generate(prompt, state=state, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert torch.equal(got, want)
    assert reader.tokens_read == x.shape[1]  # the tail was flushed and committed
    # the state matters: a fresh state answers differently on this seed
    fresh = model.generate(prompt, max_new_tokens=5, do_sample=False, pad_token_id=0)
    assert not torch.equal(got, fresh)


def test_save_load_resume_exactly_and_reject_bad_states(tmp_path):
    model = tiny_armt()
    x = ids(1, 6 * SEG + 2, seed=3)
    straight = StreamingReader(model, progress=False)
    straight.feed(x[0])
    half = StreamingReader(model, progress=False)
    half.feed(x[0, :3 * SEG + 5])
    half.save(tmp_path / "s.safetensors")
    resumed = StreamingReader(model, progress=False)
    resumed.load(tmp_path / "s.safetensors")
    assert resumed.tokens_read == half.tokens_read and resumed.state.segments == 3
    resumed.feed(x[0, 3 * SEG + 5:])
    assert_same_state(resumed.state, straight.state, exact=True)
    assert torch.equal(resumed._buffer, straight._buffer)

    before = resumed.state_dict()
    bad = dict(before)
    bad["A.0"] = bad["A.0"][:, :-1]
    with pytest.raises(ValueError, match=r"reader state: state tensors must be A \[B=1"):
        resumed.load_state_dict(bad)
    bad = {k: v for k, v in before.items() if k != "z.1"}
    with pytest.raises(ValueError, match=r"missing key\(s\) \['z.1'\]"):
        resumed.load_state_dict(bad)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['memory'\]"):
        resumed.load_state_dict({**before, "memory": torch.zeros(1, 3, 32)})
    with pytest.raises(ValueError, match="segments must be an integer scalar"):
        resumed.load_state_dict({**before, "segments": torch.tensor(-1)})
    after = resumed.state_dict()  # every failed load left the reader as it was
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)

    other = tiny_armt(seed=1)
    with pytest.raises(ValueError, match="saved by a reader of another model"):
        StreamingReader(other, progress=False).load(tmp_path / "s.safetensors")


def test_bad_ids_leave_the_state_unchanged():
    model = tiny_armt()
    reader = StreamingReader(model, progress=False)
    reader.feed(ids(1, 2 * SEG + 1)[0])
    before = reader.state_dict()
    bad = ids(1, 3 * SEG)[0].clone()
    bad[-1] = VOCAB  # out of the vocabulary, in the last segment
    with pytest.raises(ValueError, match="vocab"):
        reader.feed(bad)
    after = reader.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
