"""Persistence: the checkpoint manifest (sizes, SHA-256, config, fingerprint) verified on load,
required config keys, reader states tied to their model, and file errors that name the file."""

import json
import os
import warnings

import pytest
import torch
from models import ids, tiny_gpt2, tiny_llama
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForTokenClassification

from rmt_fast.manifest import MANIFEST_NAME, ManifestError, model_fingerprint, read_manifest
from rmt_fast.models import RMTConfig, RMTEncoderForTokenClassification, RMTForCausalLM
from rmt_fast.streaming import StreamingReader


def _lm(seed=0, **kw):
    torch.manual_seed(seed)
    model = RMTForCausalLM(tiny_gpt2(seed=seed), **{"num_mem_tokens": 2, "segment_size": 8, **kw})
    with torch.no_grad():
        model.memory.normal_()
    return model


@pytest.fixture
def saved(tmp_path):
    model = _lm()
    model.save_pretrained(tmp_path / "ckpt")
    return model, tmp_path / "ckpt"


def _load_quietly(path, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "not verified" warning for a checkpoint with a manifest
        return RMTForCausalLM.from_pretrained(path, **kw)


def _flip_bit(path, tensor=None):
    """Flip one bit of a safetensors file: in ``tensor``'s data when named, else near the end."""
    data = bytearray(path.read_bytes())
    offset = len(data) - 5
    if tensor is not None:
        n = int.from_bytes(data[:8], "little")
        offset = 8 + n + json.loads(data[8:8 + n])[tensor]["data_offsets"][0] + 1
    data[offset] ^= 0x01
    path.write_bytes(bytes(data))


def test_manifest_written_and_round_trip(saved):
    model, path = saved
    manifest = read_manifest(path)
    assert set(manifest["files"]) == {"rmt_config.json", "rmt_weights.safetensors", "base/config.json",
                                      "base/model.safetensors", "base/generation_config.json"}
    for rel, entry in manifest["files"].items():
        assert entry["size"] == os.path.getsize(path / rel) and len(entry["sha256"]) == 64
    assert manifest["config"] == model.rmt_config.to_dict()
    fp = manifest["fingerprint"]
    assert fp["model_type"] == "gpt2" and fp["hidden_size"] == 32 and fp["vocab_size"] == 61
    loaded = _load_quietly(path)
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


def test_flipped_bit_in_rmt_weights_is_refused(saved):
    _, path = saved
    _flip_bit(path / "rmt_weights.safetensors", "memory")
    with pytest.raises(ManifestError, match=r"rmt_weights\.safetensors does not match the checkpoint's "
                                            r"manifest \(same size but different content"):
        RMTForCausalLM.from_pretrained(path)
    loaded = RMTForCausalLM.from_pretrained(path, verify=False)  # the opt-out loads it as it is
    assert not torch.equal(loaded.memory, saved[0].memory)


def test_truncated_or_missing_base_is_refused(saved):
    _, path = saved
    weights = path / "base" / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises(ManifestError, match=r"base/model\.safetensors: the base model's weights differ "
                                            r".*size \d+ bytes, saved \d+"):
        RMTForCausalLM.from_pretrained(path)
    # without the manifest check, the decoding error still names the file
    with pytest.raises(ValueError, match=r"base: cannot read the base model"):
        RMTForCausalLM.from_pretrained(path, verify=False)
    weights.write_bytes(data)
    (path / "base" / "config.json").unlink()
    with pytest.raises(ManifestError, match=r"base/config\.json is missing"):
        RMTForCausalLM.from_pretrained(path)


def test_base_replaced_by_another_of_the_same_shape_is_refused(saved, tmp_path):
    _, path = saved
    other = _lm(seed=1)
    other.base.save_pretrained(path / "base", safe_serialization=True)
    with pytest.raises(ManifestError, match=r"model\.safetensors: the base model's weights differ .*same "
                                            r"size but different content"):
        RMTForCausalLM.from_pretrained(path)


def test_edited_config_is_refused_with_the_fields(saved):
    _, path = saved
    cfg = json.loads((path / "rmt_config.json").read_text())
    cfg["num_mem_tokens"] = 3
    (path / "rmt_config.json").write_text(json.dumps(cfg))
    with pytest.raises(ManifestError, match=r"rmt_config\.json does not match .*edited fields: "
                                            r"num_mem_tokens: 2 -> 3"):
        RMTForCausalLM.from_pretrained(path)


def test_config_keys_are_required_and_unknown_keys_rejected(saved):
    _, path = saved
    cfg = json.loads((path / "rmt_config.json").read_text())
    for mutate, match in [
        (lambda c: c.pop("memory_noise"), r"rmt_config\.json: missing required key\(s\) \['memory_noise'\]"),
        (lambda c: c.pop("mask"), r"missing required key\(s\) \['mask'\]"),
        (lambda c: c.update(num_mem_tokenz=3), r"rmt_config\.json: unknown key\(s\) \['num_mem_tokenz'\]"),
        (lambda c: c.update(mask="banana"), r"rmt_config\.json: mask must be one of"),
    ]:
        bad = dict(cfg)
        mutate(bad)
        (path / "rmt_config.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match):
            RMTConfig.load(path)
        with pytest.raises(ValueError, match=r"rmt_config\.json"):  # from_pretrained, verified or not
            RMTForCausalLM.from_pretrained(path)
        with pytest.raises(ValueError, match=match):
            RMTForCausalLM.from_pretrained(path, verify=False)


@pytest.mark.parametrize("content,match", [
    ("", r"rmt_config\.json: not a valid rmt_fast config \(empty file\)"),
    ('{"num_mem_tokens": 2, "segm', r"rmt_config\.json: not a valid rmt_fast config \(Unterminated"),
    ("[1, 2]", r"rmt_config\.json: expected a JSON object of RMTConfig fields, got list"),
    ("\xff\xfe", r"rmt_config\.json: not a valid rmt_fast config"),
])
def test_malformed_config_names_the_file(saved, content, match):
    _, path = saved
    (path / "rmt_config.json").write_bytes(content.encode("latin-1"))
    with pytest.raises(ValueError, match=match):
        RMTConfig.load(path)


@pytest.mark.parametrize("content", [b"", b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":", b"garbage"])
def test_malformed_rmt_weights_and_manifest_name_the_file(saved, content):
    _, path = saved
    (path / "rmt_weights.safetensors").write_bytes(content)
    with pytest.raises(ValueError, match=r"rmt_weights\.safetensors: cannot read the RMT weights"):
        RMTForCausalLM.from_pretrained(path, verify=False)
    (path / MANIFEST_NAME).write_text('{"format": 1, "files": ')
    with pytest.raises(ValueError, match=rf"{MANIFEST_NAME}: not a valid rmt_fast manifest"):
        RMTForCausalLM.from_pretrained(path)


def test_checkpoint_without_manifest_loads_with_a_warning(saved):
    model, path = saved
    (path / MANIFEST_NAME).unlink()
    with pytest.warns(UserWarning, match=r"has no rmt_manifest\.json .* not verified"):
        loaded = RMTForCausalLM.from_pretrained(path)
    assert torch.equal(loaded.memory, model.memory)


def test_encoder_checkpoint_has_a_verified_manifest(tmp_path):
    torch.manual_seed(0)
    base = BertForTokenClassification(BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1,
                                                 num_attention_heads=4, intermediate_size=64,
                                                 max_position_embeddings=64, num_labels=3))
    model = RMTEncoderForTokenClassification(base, num_mem_tokens=2, segment_size=8, cls_token_id=1,
                                             sep_token_id=2)
    model.save_pretrained(tmp_path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        RMTEncoderForTokenClassification.from_pretrained(tmp_path)
    _flip_bit(tmp_path / "base" / "model.safetensors")
    with pytest.raises(ManifestError, match="base model's weights differ"):
        RMTEncoderForTokenClassification.from_pretrained(tmp_path)


def test_shipped_needle_checkpoint_verifies():
    from rmt_fast.demo import NEEDLE_CHECKPOINT as path

    assert read_manifest(path) is not None
    _load_quietly(path)


# --- model fingerprint and reader states ---------------------------------------------------------
def test_model_fingerprint_tells_models_apart():
    a, b = _lm(seed=0), _lm(seed=0)
    assert model_fingerprint(a) == model_fingerprint(b)
    with torch.no_grad():
        b.base.transformer.h[0].mlp.c_fc.weight[0, 0] += 1e-3  # element 0 is always in the sample
    assert model_fingerprint(a) != model_fingerprint(b)
    assert model_fingerprint(_lm(seed=1)) != model_fingerprint(a)  # same architecture, other weights
    assert model_fingerprint(_lm(segment_size=4)) != model_fingerprint(a)  # same weights, other config
    assert model_fingerprint(_lm().double()) != model_fingerprint(a)


def _reader_with_state(model):
    reader = StreamingReader(model, progress=False)
    reader.feed(ids(1, 21, seed=2)[0])
    return reader


def _same(reader, other):
    return (torch.equal(reader.memory, other.memory) and torch.equal(reader._buffer, other._buffer)
            and reader.tokens_read == other.tokens_read)


def test_reader_state_refused_from_another_model(tmp_path):
    source = _reader_with_state(_lm(seed=0, xl_cache=4))
    state = tmp_path / "state.safetensors"
    source.save(state)
    assert not (tmp_path / "state.safetensors.tmp").exists()
    for model, match in [(_lm(seed=1, xl_cache=4), r"same RMT config, different weights"),
                         (_lm(seed=0, xl_cache=2), r"RMT config differs in \['xl_cache'\]")]:
        reader = _reader_with_state(model)
        before = _reader_with_state(model)
        with pytest.raises(ValueError, match=rf"state\.safetensors: this state was saved by a reader of "
                                             rf"another model \({match}"):
            reader.load(state)
        assert _same(reader, before)
    target = StreamingReader(_lm(seed=1, xl_cache=4), progress=False)
    target.load(state, verify=False)  # the opt-out
    assert _same(target, source)
    same = StreamingReader(_lm(seed=0, xl_cache=4), progress=False)
    same.load(state)
    assert _same(same, source)


def _as_format_1(path):
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    save_file(load_file(str(path)), str(path), metadata={**meta, "format": "rmt_fast.StreamingReader/1"})


def test_format_1_xl_state_of_a_rotary_model_is_refused(tmp_path):
    """Format 1 kept a rotary model's cached keys at their old positions; format 2 moves them, so
    an old file would be read wrongly without a word: refused, the reader unchanged. GPT-2's
    (absolute positions, nothing moved) still load."""
    torch.manual_seed(0)
    llama = RMTForCausalLM(tiny_llama(), num_mem_tokens=2, segment_size=8, xl_cache=4)
    reader = _reader_with_state(llama)
    reader.save(tmp_path / "llama.safetensors")
    _as_format_1(tmp_path / "llama.safetensors")
    target, before = _reader_with_state(llama), _reader_with_state(llama)
    with pytest.raises(ValueError, match=r"llama\.safetensors: its XL cache of a rotary model was saved "
                                         r"before .* \(format 1\)"):
        target.load(tmp_path / "llama.safetensors")
    assert _same(target, before)
    gpt2 = _lm(xl_cache=4)
    source = _reader_with_state(gpt2)
    source.save(tmp_path / "gpt2.safetensors")
    _as_format_1(tmp_path / "gpt2.safetensors")
    other = StreamingReader(gpt2, progress=False)
    other.load(tmp_path / "gpt2.safetensors")
    assert _same(other, source)


@pytest.mark.parametrize("content", [b"", b"\x08\x00\x00\x00\x00\x00\x00\x00{}", b"not safetensors"])
def test_truncated_reader_state_names_the_file(tmp_path, content):
    path = tmp_path / "bad_state.safetensors"
    path.write_bytes(content)
    reader = _reader_with_state(_lm())
    before = _reader_with_state(_lm())
    with pytest.raises(ValueError, match=r"bad_state\.safetensors: "):
        reader.load(path)
    assert _same(reader, before)


def test_bad_reader_state_leaves_reader_unchanged(tmp_path):
    model = _lm(xl_cache=4)
    good = _reader_with_state(model).state_dict()
    cases = [
        (lambda s: s.pop("buffer"), r"missing key\(s\) \['buffer'\]"),
        (lambda s: s.update(extra=torch.zeros(1)), r"unknown key\(s\) \['extra'\]"),
        (lambda s: s.update(buffer=torch.full((1, 3), 99)), r"buffer holds 99"),
        (lambda s: s.update(buffer=torch.zeros(1, 8, dtype=torch.long)), r"buffer must be \[B, n\]"),
        (lambda s: s.update(tokens_read=torch.tensor(-4)), r"tokens_read must be an integer scalar"),
        (lambda s: s.pop("xl_v.0"), r"layer 0 needs both xl_k\.0 and xl_v\.0"),
        (lambda s: s.update({"xl_k.1": s["xl_k.1"][:, :, :2]}), r"xl_k\.1/xl_v\.1 must be"),
        (lambda s: s.pop("xl_padding"), r"XL keys/values without xl_padding"),
        (lambda s: s.update(memory=torch.zeros(1, 5, 32)), r"saved memory is \[1, 5, 32\]"),
    ]
    for mutate, match in cases:
        state = dict(good)
        mutate(state)
        reader = _reader_with_state(model)
        before = _reader_with_state(model)
        with pytest.raises(ValueError, match=match):
            reader.load_state_dict(state)
        assert _same(reader, before)
        assert reader.xl.padding.shape == before.xl.padding.shape
        # through a file too: the error names it
        save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "s.safetensors")
        with pytest.raises(ValueError, match=r"s\.safetensors: "):
            reader.load(tmp_path / "s.safetensors", verify=False)
        assert _same(reader, before)


def test_reader_state_without_fingerprint_warns(tmp_path):
    reader = _reader_with_state(_lm())
    save_file({k: v.contiguous() for k, v in reader.state_dict().items()}, tmp_path / "old.safetensors")
    fresh = StreamingReader(_lm(), progress=False)
    with pytest.warns(UserWarning, match="has no model fingerprint"):
        fresh.load(tmp_path / "old.safetensors")
    assert _same(fresh, reader)
    assert load_file(tmp_path / "old.safetensors").keys() == reader.state_dict().keys()


def test_field_added_later_defaults_only_through_load_defaults(saved, monkeypatch):
    """A key absent from an older file is an error unless RMTConfig.LOAD_DEFAULTS names it; the
    manifest's config comparison ignores such a field."""
    from rmt_fast.manifest import write_manifest

    _, path = saved
    cfg = json.loads((path / "rmt_config.json").read_text())
    cfg.pop("memory_noise")
    (path / "rmt_config.json").write_text(json.dumps(cfg))
    manifest = read_manifest(path)
    write_manifest(path, cfg, {k: v for k, v in manifest["fingerprint"].items() if k != "base_weights"},
                   ["base", "rmt_config.json", "rmt_weights.safetensors"])  # as an older save wrote it
    with pytest.raises(ValueError, match=r"missing required key\(s\) \['memory_noise'\]"):
        RMTForCausalLM.from_pretrained(path)
    monkeypatch.setattr(RMTConfig, "LOAD_DEFAULTS", {"memory_noise": 0.0})
    assert _load_quietly(path).rmt_config.memory_noise == 0.0


def test_files_from_before_fuse_activations_and_variant_load(saved):
    """Those two fields came later: an older rmt_config.json without them means what the code of
    the time did (fused activations, variant 'mem'), through RMTConfig's LOAD_DEFAULTS."""
    _, path = saved
    cfg = json.loads((path / "rmt_config.json").read_text())
    for key in ("fuse_activations", "variant"):
        cfg.pop(key)
    (path / "rmt_config.json").write_text(json.dumps(cfg))
    loaded = RMTConfig.load(path)
    assert loaded.fuse_activations is True and loaded.variant == "mem"
