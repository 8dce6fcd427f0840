"""Streaming reader: same memory as reading at once, resumable, flat peak memory."""

import json
import subprocess
import sys
import textwrap

import pytest
import torch
from models import ids, tiny_gpt2

from rmt_fast.models import RMTForCausalLM
from rmt_fast.streaming import StreamingReader


@pytest.fixture
def model():
    return RMTForCausalLM(tiny_gpt2(), num_mem_tokens=3, segment_size=8, xl_cache=4)


def test_streaming_equals_reading_at_once(model):
    tokens = ids(1, 45)
    memory, xl = model.read(tokens)
    reader = StreamingReader(model, progress=False)
    for start in range(0, 45, 11):  # chunks that straddle segment boundaries
        reader.feed(tokens[0, start:start + 11])
    reader.flush()
    assert reader.tokens_read == 45
    torch.testing.assert_close(reader.memory, memory)
    for layer in xl.kv:
        torch.testing.assert_close(reader.xl.kv[layer][0], xl.kv[layer][0])
    it = StreamingReader(model, progress=False)
    it.feed(iter(tokens[0].tolist()), total=45)
    it.flush()
    torch.testing.assert_close(it.memory, memory)


def test_resume_from_saved_state(model, tmp_path):
    tokens = ids(1, 50)
    whole = StreamingReader(model, progress=False)
    whole.feed(tokens[0])
    whole.flush()
    first = StreamingReader(model, progress=False)
    first.feed(tokens[0, :21])
    first.save(tmp_path / "state.safetensors")
    second = StreamingReader(model, progress=False)
    second.load(tmp_path / "state.safetensors")
    second.feed(tokens[0, 21:])
    second.flush()
    assert second.tokens_read == 50
    torch.testing.assert_close(second.memory, whole.memory)
    with pytest.raises(ValueError, match="saved memory is"):
        StreamingReader(model, batch_size=2, progress=False).load(tmp_path / "state.safetensors")


def test_generate_after_stream_equals_model_generate(model):
    tokens = ids(1, 40)
    question = ids(1, 5, seed=9)
    reader = StreamingReader(model, progress=False)
    reader.feed(tokens[0])
    kw = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_logits=True,
              return_dict_in_generate=True)
    got = reader.generate(question, **kw)
    expect = model.generate(torch.cat([tokens, question], 1), **kw)  # XL cache included
    assert torch.equal(got.sequences, expect.sequences)
    torch.testing.assert_close(torch.stack(got.logits), torch.stack(expect.logits), atol=1e-6,
                               rtol=0)


PEAK_SCRIPT = textwrap.dedent("""
    import json, resource, sys, torch
    sys.path.insert(0, "tests")
    from models import tiny_gpt2
    from rmt_fast.models import RMTForCausalLM
    from rmt_fast.streaming import StreamingReader
    torch.set_num_threads(1)
    n = int(sys.argv[1])
    model = RMTForCausalLM(tiny_gpt2(), num_mem_tokens=4, segment_size=56, xl_cache=8).eval()
    reader = StreamingReader(model, progress=False)
    reader.feed(torch.randint(1, 61, (n,)))
    print(json.dumps({"tokens": reader.tokens_read,
                      "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}))
""")


def test_streaming_peak_memory_is_flat():
    """Peak RSS reading 100k tokens vs 10k (fresh processes): the difference stays small."""
    peaks = {}
    for n in (10_000, 100_000):
        out = subprocess.run([sys.executable, "-c", PEAK_SCRIPT, str(n)], capture_output=True,
                             text=True, check=True, timeout=600)
        peaks[n] = json.loads(out.stdout.strip().splitlines()[-1])["peak_kib"]
    growth_mib = (peaks[100_000] - peaks[10_000]) / 1024
    # a model keeping per-token state would grow by tens of MiB here (logits alone: 23 MiB)
    assert growth_mib < 8, peaks


def test_progress_bar_only_for_a_feed_that_lasts(model, capsys, monkeypatch):
    import rmt_fast.streaming as streaming

    reader = StreamingReader(model, progress=True)
    for _ in range(4):  # short feeds in a loop: no bars
        reader.feed(ids(1, 8)[0])
    assert "reading" not in capsys.readouterr().err
    monkeypatch.setattr(streaming, "BAR_DELAY_S", 0.0)  # as a feed longer than the delay
    reader.feed(ids(1, 16)[0])
    assert "reading" in capsys.readouterr().err
