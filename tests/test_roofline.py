"""The roofline model: exact masked FLOPs against a brute-force count, bytes by hand, peaks."""

import itertools

import pytest
import torch

from rmt_fast.bench import roofline
from rmt_fast.bench.roofline import AttentionShape, attention_flops, device_peak, min_bytes, visible_pairs
from rmt_fast.masks import MASK_MODES, AttentionLayout, dense_visibility, layout_visibility

# (L, P, R, W): empty blocks, no past, tiny segment, all-memory rows, odd sizes
LAYOUTS = [(1, 0, 0, 0), (7, 0, 0, 0), (13, 5, 2, 3), (16, 0, 4, 4), (9, 11, 9, 0), (10, 3, 0, 10),
           (21, 8, 5, 6), (6, 4, 3, 3)]


@pytest.mark.parametrize("mask", MASK_MODES)
@pytest.mark.parametrize("past_visible_to_read", [False, True])
def test_flops_equal_brute_force_visibility_count(mask, past_visible_to_read):
    batch, hq, hkv, d = 2, 4, 2, 24
    for length, past, r, w in LAYOUTS:
        vis = dense_visibility(length, past, num_read=r, num_write=w, mask=mask,
                               past_visible_to_read=past_visible_to_read)
        brute = int(vis.sum()) * 4 * d * batch * hq
        shape = AttentionShape(batch, hq, hkv, length, d, past=past, num_read=r, num_write=w,
                               mask=mask, past_visible_to_read=past_visible_to_read)
        assert attention_flops(shape, "fwd") == brute, (length, past, r, w)
        assert attention_flops(shape, "fwd+bwd") == 3.5 * brute


@pytest.mark.parametrize("mask", MASK_MODES)
@pytest.mark.parametrize("past_visible_to_read", [False, True])
@pytest.mark.parametrize("window", [1, 2, 5, 13])
def test_windowed_flops_equal_brute_force_visibility_count(mask, past_visible_to_read, window,
                                                            monkeypatch):
    """A cutting sliding window is counted from the element predicate in row chunks (3 rows
    here, so chunk edges fall inside every layout); a window cutting nothing takes the block
    plans' count."""
    counted = []
    real = roofline._windowed_pairs
    monkeypatch.setattr(roofline, "_windowed_pairs",
                        lambda *a, **k: counted.append(1) or real(*a, chunk=3))
    batch, hq, hkv, d = 1, 2, 1, 8
    for length, past, r, w in LAYOUTS:
        vis = dense_visibility(length, past, num_read=r, num_write=w, mask=mask,
                               past_visible_to_read=past_visible_to_read, window=window)
        shape = AttentionShape(batch, hq, hkv, length, d, past=past, num_read=r, num_write=w,
                               mask=mask, past_visible_to_read=past_visible_to_read,
                               window=window)
        assert attention_flops(shape, "fwd") == int(vis.sum()) * 4 * d * batch * hq, \
            (length, past, r, w)
        layout = AttentionLayout(r, w, mask, past_visible_to_read, window=window)
        rows = range(length // 3, length, 2)
        assert torch.equal(layout_visibility(layout, length, past, rows=rows), vis[rows.start::2])
    # windows of 13 keys cut nothing in the layouts with P + L <= 13: no element count there
    cutting = sum(window < past + length for length, past, _, _ in LAYOUTS)
    assert len(counted) == cutting


def test_window_checked():
    with pytest.raises(ValueError, match="window"):
        AttentionShape(1, 1, 1, 4, 16, window=0)


def test_visible_pairs_closed_forms():
    assert visible_pairs(100) == 100 * 101 // 2  # plain causal
    assert visible_pairs(100, mask="full") == 100 * 100
    # every (length, past, R, W) up to small sizes, rmt mask: brute force once more
    for length, past in itertools.product(range(1, 7), range(0, 3)):
        for r, w in itertools.product(range(length + 1), repeat=2):
            if r + w > length:
                continue
            vis = dense_visibility(length, past, num_read=r, num_write=w, mask="rmt")
            assert visible_pairs(length, past, num_read=r, num_write=w, mask="rmt") == int(vis.sum())


def test_bytes_by_hand():
    # B=2, Hq=4, Hkv=2, L=8, P=3, D=16, bf16 (2 bytes)
    s = AttentionShape(2, 4, 2, 8, 16, past=3, num_read=1, num_write=1, mask="rmt")
    q = 2 * 4 * 8 * 16          # 1024 elements (also out, dO, dq)
    kv = 2 * 2 * 8 * 16         # 512 each of k, v (also dk, dv)
    past = 2 * 2 * 3 * 16       # 192 each of past k, v (also their grads)
    lse = 2 * 4 * 8 * 4         # float32 bytes
    fwd = 2 * (q + 2 * kv + 2 * past) + 2 * q + lse  # q, k, v, past k/v in; out, lse out
    assert fwd == 2 * 2432 + 2048 + 256 == 7168
    assert min_bytes(s, "fwd") == 7168
    bwd_extra = 2 * (q + q + 2 * kv + 2 * past)  # dO in; dq, dk, dv, dpast out
    assert bwd_extra == 6912
    assert min_bytes(s, "fwd+bwd") == 7168 + 6912
    no_past_grad = AttentionShape(2, 4, 2, 8, 16, past=3, num_read=1, num_write=1, mask="rmt",
                                  past_grad=False)
    assert min_bytes(no_past_grad, "fwd+bwd") == 7168 + 6912 - 2 * 2 * past
    fp32 = AttentionShape(2, 4, 2, 8, 16, past=3, dtype="float32")
    assert min_bytes(fp32, "fwd") == 4 * 2432 + 4 * 1024 + 256 == 14080


def test_roofline_rates_and_bound():
    s = AttentionShape(1, 16, 16, 4096, 128, mask="causal")
    flops = 4 * 128 * (4096 * 4097 // 2) * 16
    r = roofline.roofline(s, 1e-3, "fwd", device_peak("NVIDIA H100 80GB HBM3"))
    assert r["flops"] == flops
    assert r["tflops"] == pytest.approx(flops / 1e-3 / 1e12)
    assert r["gbps"] == pytest.approx(r["bytes"] / 1e-3 / 1e9)
    assert r["frac_peak_flops"] == pytest.approx(r["tflops"] / 989.4)
    assert r["intensity"] == pytest.approx(flops / r["bytes"])
    assert r["bound"] == "compute"  # ~1000 FLOP/byte against an H100 ridge of ~295
    tiny = roofline.roofline(AttentionShape(1, 1, 1, 1, 64), 1e-6, "fwd", roofline.PEAKS["H200"])
    assert tiny["bound"] == "memory"
    with pytest.raises(ValueError, match="mode"):
        attention_flops(s, "bwd-only")
    with pytest.raises(ValueError, match="seconds"):
        roofline.roofline(s, 0.0)


@pytest.mark.parametrize("name, key", [
    ("NVIDIA H100 80GB HBM3", "H100-SXM"), ("NVIDIA H100 PCIe", "H100-PCIe"),
    ("NVIDIA H100 NVL", "H100-NVL"), ("NVIDIA H200", "H200"),
    ("NVIDIA A100-SXM4-80GB", "A100-SXM-80GB"), ("NVIDIA A100-SXM4-40GB", "A100-SXM-40GB"),
    ("NVIDIA A100 80GB PCIe", "A100-PCIe-80GB")])
def test_device_peak_from_name(name, key):
    assert device_peak(name) is roofline.PEAKS[key]


def test_unknown_device_and_fp32_peak():
    assert device_peak("NVIDIA GeForce RTX 4090") is None
    peak = roofline.PEAKS["H100-SXM"]
    assert peak.tflops("float32") == 66.9 and peak.tflops("bfloat16") == 989.4
    with pytest.raises(ValueError, match="dtype"):
        AttentionShape(1, 1, 1, 4, 16, dtype="int8")
