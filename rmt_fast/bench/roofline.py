"""Roofline model of one ``memory_attention`` call: useful FLOPs, minimum bytes, achieved rates.

FLOPs count only the (query, key) pairs the mask makes visible, taken exactly from
:func:`rmt_fast.masks.block_plan`, or from the dense visibility in row chunks when a sliding
window cuts keys (key padding is not modelled; a logit soft-cap adds no counted FLOPs):
``4 * D`` per visible pair and query head in the forward (``2 * D`` for ``q @ k^T``, ``2 * D``
for ``p @ v``; the softmax is not counted), and 2.5x that for the backward, FlashAttention's
convention (its benchmarks report ``fwd``, ``bwd = 2.5 * fwd`` and ``fwd+bwd = 3.5 * fwd``).

Bytes are a lower bound: every tensor crosses HBM exactly once. Forward: read q, k, v, past
k/v; write out and the float32 LSE. Forward + backward additionally: read dO; write dq, dk, dv
and, when the past needs gradients, dpast_k/dpast_v. (A real backward also re-reads q, k, v,
out and the LSE, so it moves more.)

Device peaks are dense (no sparsity) tensor-core bf16/fp16 rates and CUDA-core fp32 rates from
NVIDIA's datasheets, with HBM bandwidths; :func:`device_peak` maps a GPU name
(``torch.cuda.get_device_name()``) to an entry.
"""

from __future__ import annotations

from dataclasses import dataclass

from rmt_fast.masks import DIAG, FULL, AttentionLayout, block_plan, check_mask_mode, layout_visibility

#: bytes per element of the dtypes the kernels take (names as in ``torch.float16`` etc.)
DTYPE_BYTES = {"float16": 2, "fp16": 2, "bfloat16": 2, "bf16": 2, "float32": 4, "fp32": 4}
#: FlashAttention's convention: backward FLOPs = 2.5 x forward FLOPs
BACKWARD_FLOP_RATIO = 2.5
MODES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class AttentionShape:
    """One ``memory_attention`` call: ``q [B, Hq, L, D]``, ``k/v [B, Hkv, L, D]``, past ``[B, Hkv, P, D]``."""

    batch: int
    heads_q: int
    heads_kv: int
    length: int
    head_dim: int
    past: int = 0
    num_read: int = 0
    num_write: int = 0
    mask: str = "causal"
    past_visible_to_read: bool = False
    dtype: str = "bfloat16"
    past_grad: bool = True
    window: int | None = None

    def __post_init__(self) -> None:
        check_mask_mode(self.mask)
        AttentionLayout(self.num_read, self.num_write, self.mask, window=self.window)
        if self.dtype not in DTYPE_BYTES:
            raise ValueError(f"dtype must be one of {sorted(DTYPE_BYTES)}, got {self.dtype!r}")
        if self.heads_kv <= 0 or self.heads_q % self.heads_kv:
            raise ValueError(f"heads_q ({self.heads_q}) must be a multiple of heads_kv "
                             f"({self.heads_kv})")
        if self.num_read + self.num_write > self.length:
            raise ValueError("num_read + num_write must be <= length")


@dataclass(frozen=True)
class DevicePeak:
    """Dense peak rates of one GPU: TFLOP/s per dtype class and HBM bandwidth in GB/s."""

    name: str
    tflops_16bit: float
    tflops_fp32: float
    hbm_gbps: float

    def tflops(self, dtype: str) -> float:
        return self.tflops_fp32 if DTYPE_BYTES[dtype] == 4 else self.tflops_16bit


#: NVIDIA datasheet figures; 16-bit = dense bf16/fp16 tensor core (half the "with sparsity"
#: number), fp32 = CUDA-core FP32 (the kernels use ``input_precision="ieee"`` for fp32).
PEAKS = {
    "H100-SXM": DevicePeak("H100 SXM5 80GB", 989.4, 66.9, 3350.0),
    "H100-PCIe": DevicePeak("H100 PCIe 80GB", 756.0, 51.2, 2000.0),
    "H100-NVL": DevicePeak("H100 NVL 94GB", 835.0, 60.0, 3900.0),
    "H200": DevicePeak("H200 SXM 141GB", 989.4, 66.9, 4800.0),
    "A100-SXM-80GB": DevicePeak("A100 SXM4 80GB", 312.0, 19.5, 2039.0),
    "A100-SXM-40GB": DevicePeak("A100 SXM4 40GB", 312.0, 19.5, 1555.0),
    "A100-PCIe-80GB": DevicePeak("A100 PCIe 80GB", 312.0, 19.5, 1935.0),
}


def device_peak(gpu_name: str) -> DevicePeak | None:
    """Peak entry for a ``torch.cuda.get_device_name()`` string, or None when unknown.

    E.g. ``"NVIDIA H100 80GB HBM3"`` -> H100 SXM, ``"NVIDIA H100 PCIe"`` -> H100 PCIe,
    ``"NVIDIA A100-SXM4-40GB"`` -> A100 SXM 40GB, ``"NVIDIA H200"`` -> H200.
    """
    name = gpu_name.upper()
    if "H200" in name:
        return PEAKS["H200"]
    if "H100" in name:
        if "PCIE" in name:
            return PEAKS["H100-PCIe"]
        if "NVL" in name:
            return PEAKS["H100-NVL"]
        return PEAKS["H100-SXM"]
    if "A100" in name:
        if "PCIE" in name:
            return PEAKS["A100-PCIe-80GB"]
        return PEAKS["A100-SXM-40GB"] if "40GB" in name else PEAKS["A100-SXM-80GB"]
    return None


def _diag_pairs(rows: int, keys: int) -> int:
    """Pairs of a causal-diagonal block: row ``r`` sees ``min(r + 1, keys)`` keys."""
    if rows <= keys:
        return rows * (rows + 1) // 2
    return keys * (keys + 1) // 2 + (rows - keys) * keys


def _windowed_pairs(layout: AttentionLayout, length: int, past: int, chunk: int = 1024) -> int:
    """Visible pairs under a cutting window, counted from the dense visibility ``chunk`` query
    rows at a time (``[chunk, P + L]`` booleans; block plans have no window)."""
    return sum(int(layout_visibility(layout, length, past, rows=range(s, min(s + chunk, length)))
                   .sum()) for s in range(0, length, chunk))


def visible_pairs(length: int, past: int = 0, *, num_read: int = 0, num_write: int = 0,
                  mask: str = "causal", past_visible_to_read: bool = False,
                  window: int | None = None) -> int:
    """Exact number of visible (query row, key) pairs of one head, past keys included;
    ``window``: a sliding window in keys (:mod:`rmt_fast.masks`)."""
    layout = AttentionLayout(num_read, num_write, mask, past_visible_to_read, window=window)
    if layout.cutting_window(past, length) is not None:
        return _windowed_pairs(layout, length, past)
    layout = AttentionLayout(num_read, num_write, mask, past_visible_to_read)
    total = 0
    for group in block_plan(length, past, layout):
        rows = group.end - group.start
        for blk in group.blocks:
            keys = blk.end - blk.start
            if blk.kind == FULL:
                total += rows * keys
            elif blk.kind == DIAG:
                total += _diag_pairs(rows, keys)
            else:  # pragma: no cover - block_plan only emits FULL and DIAG
                raise ValueError(f"unknown block kind {blk.kind!r}")
    return total


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def attention_flops(shape: AttentionShape, mode: str = "fwd") -> float:
    """Useful FLOPs: ``4 * D`` per visible pair per (batch, query head); x3.5 for fwd+bwd."""
    _check_mode(mode)
    pairs = visible_pairs(shape.length, shape.past, num_read=shape.num_read,
                          num_write=shape.num_write, mask=shape.mask,
                          past_visible_to_read=shape.past_visible_to_read, window=shape.window)
    fwd = 4.0 * shape.head_dim * pairs * shape.batch * shape.heads_q
    return fwd if mode == "fwd" else fwd * (1.0 + BACKWARD_FLOP_RATIO)


def min_bytes(shape: AttentionShape, mode: str = "fwd") -> int:
    """Minimum HBM bytes: each input read once, each output written once (see module doc)."""
    _check_mode(mode)
    e = DTYPE_BYTES[shape.dtype]
    q_elems = shape.batch * shape.heads_q * shape.length * shape.head_dim
    kv_elems = shape.batch * shape.heads_kv * shape.length * shape.head_dim
    past_elems = shape.batch * shape.heads_kv * shape.past * shape.head_dim
    lse_bytes = 4 * shape.batch * shape.heads_q * shape.length
    fwd = e * (q_elems + 2 * kv_elems + 2 * past_elems) + e * q_elems + lse_bytes
    if mode == "fwd":
        return fwd
    dpast = 2 * past_elems if shape.past_grad else 0
    return fwd + e * (q_elems + q_elems + 2 * kv_elems + dpast)  # dO in; dq, dk, dv, dpast out


def roofline(shape: AttentionShape, seconds: float, mode: str = "fwd",
             peak: DevicePeak | None = None) -> dict:
    """Achieved rates of a call that took ``seconds``.

    Returns ``flops``, ``bytes``, ``tflops`` (TFLOP/s), ``gbps`` (GB/s, 1e9 bytes),
    ``intensity`` (FLOP/byte) and, with a ``peak``: ``frac_peak_flops``, ``frac_peak_bw``,
    ``ridge`` (the device's FLOP/byte balance point) and ``bound`` (``"compute"`` when the
    intensity is above the ridge, else ``"memory"``).
    """
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    flops = attention_flops(shape, mode)
    nbytes = min_bytes(shape, mode)
    out = dict(flops=flops, bytes=nbytes, tflops=flops / seconds / 1e12,
               gbps=nbytes / seconds / 1e9, intensity=flops / nbytes)
    if peak is not None:
        peak_tflops = peak.tflops(shape.dtype)
        ridge = peak_tflops * 1e12 / (peak.hbm_gbps * 1e9)
        out.update(frac_peak_flops=out["tflops"] / peak_tflops,
                   frac_peak_bw=out["gbps"] / peak.hbm_gbps, ridge=ridge,
                   bound="compute" if out["intensity"] >= ridge else "memory", device=peak.name)
    return out
