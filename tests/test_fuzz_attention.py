"""Seeded fuzz test of ``memory_attention``: every backend on this machine, random shapes (GQA,
past keys, padding, the four masks, read/write sizes, scales) and random memory layouts of every
input (transposed, strided, expanded, offset, ``[B, L, H, D]`` views), outputs, log-sum-exps and
gradients against the float64 reference computed on contiguous copies.

Reproduce one case: the failure message names the backend, the case seed and its description.
"""

import os

os.environ.setdefault("TRITON_INTERPRET", "1")  # before anything imports triton

import random  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from rmt_fast import attention, memory_attention  # noqa: E402
from rmt_fast.masks import MASK_MODES  # noqa: E402
from rmt_fast.ops.memory_attention import cpu_flash, cpu_kernel  # noqa: E402
from rmt_fast.ops.memory_attention.reference import reference_memory_attention  # noqa: E402

try:
    import triton  # noqa: F401

    HAVE_TRITON = True
except ImportError:  # pragma: no cover - triton is a dependency on Linux
    HAVE_TRITON = False

LAYOUTS = ("contiguous", "transposed", "last_strided", "rows_strided", "blhd", "expanded_batch",
           "expanded_rows", "expanded_last", "permuted", "offset")
KPM_LAYOUTS = ("contiguous", "transposed", "strided", "expanded_batch")


def _view(gen: torch.Generator, shape, kind: str, dtype, device="cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """``(leaf, x)``: a fresh random leaf tensor and a ``shape`` view of it laid out as ``kind``."""
    b, h, n, d = shape

    def rnd(*s):
        return torch.randn(*s, generator=gen, dtype=torch.float64).to(device, dtype).requires_grad_()

    if kind == "contiguous":
        leaf = rnd(b, h, n, d)
        return leaf, leaf
    if kind == "transposed":  # a [.., D, L] tensor's transpose: the head dim has stride L
        leaf = rnd(b, h, d, n)
        return leaf, leaf.transpose(-1, -2)
    if kind == "last_strided":
        leaf = rnd(b, h, n, 2 * d)
        return leaf, leaf[..., ::2]
    if kind == "rows_strided":
        leaf = rnd(b, h, 2 * n + 1, d)
        return leaf, leaf[:, :, 1::2]
    if kind == "blhd":  # the usual projection output, heads split after the sequence dim
        leaf = rnd(b, n, h, d)
        return leaf, leaf.transpose(1, 2)
    if kind == "expanded_batch":
        leaf = rnd(1, h, n, d)
        return leaf, leaf.expand(b, h, n, d)
    if kind == "expanded_rows":  # stride 0 over the sequence: every row the same vector
        leaf = rnd(b, h, 1, d)
        return leaf, leaf.expand(b, h, n, d)
    if kind == "expanded_last":  # stride 0 over the head dim
        leaf = rnd(b, h, n, 1)
        return leaf, leaf.expand(b, h, n, d)
    if kind == "permuted":
        leaf = rnd(d, n, b, h)
        return leaf, leaf.permute(2, 3, 1, 0)
    if kind == "offset":  # a view that starts inside its storage
        leaf = rnd(b * h * n * d + 3)
        return leaf, leaf[3:].view(b, h, n, d)
    raise AssertionError(kind)


def _kpm_view(gen: torch.Generator, batch: int, keys: int, kind: str) -> torch.Tensor:
    real = torch.rand(batch, keys, generator=gen) > 0.3
    if batch > 1:
        real[-1] = False  # one batch row sees nothing at all
    if kind == "transposed":
        return real.t().contiguous().t()
    if kind == "strided":
        wide = torch.zeros(batch, 2 * keys, dtype=torch.bool)
        wide[:, ::2] = real
        return wide[:, ::2]
    if kind == "expanded_batch":
        return real[:1].expand(batch, keys)
    return real


def _case(seed: int, dtype, small: bool, device="cpu") -> tuple[dict, dict, list[torch.Tensor], str]:
    """One random valid call: ``(tensors, layout kwargs, leaves, description)``."""
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    batch = rng.randint(1, 2 if small else 3)
    hkv = rng.randint(1, 2 if small else 3)
    hq = hkv * rng.choice((1, 2) if small else (1, 2, 3))
    length = rng.randint(1, 12 if small else 24)
    dim = rng.choice((1, 3, 4, 8, 16) if small else (1, 2, 3, 5, 8, 12, 16))
    past = rng.choice((0, 0, rng.randint(1, 6 if small else 10)))
    num_read = rng.randint(0, length)
    num_write = rng.randint(0, length - num_read)
    layout = dict(num_read=num_read, num_write=num_write, mask=rng.choice(MASK_MODES),
                  past_visible_to_read=rng.random() < 0.5,
                  scale=None if rng.random() < 0.6 else rng.uniform(0.05, 2.0))
    wrng = random.Random(seed + 10**6)  # its own stream: the other draws stay as they were
    if wrng.random() < 0.3:  # a sliding window, from one key to more than there are
        layout["window"] = wrng.randint(1, past + length + 1)
    crng = random.Random(seed + 2 * 10**6)  # likewise for the logit soft-cap
    if crng.random() < 0.25:
        layout["softcap"] = crng.uniform(0.3, 5.0)
    kinds = {}
    tensors, leaves = {}, []
    shapes = dict(q=(batch, hq, length, dim), k=(batch, hkv, length, dim), v=(batch, hkv, length, dim))
    if past:
        shapes.update(past_k=(batch, hkv, past, dim), past_v=(batch, hkv, past, dim))
    for name, shape in shapes.items():
        kinds[name] = rng.choice(LAYOUTS)
        leaf, tensors[name] = _view(gen, shape, kinds[name], dtype, device)
        leaves.append(leaf)
    if rng.random() < 0.5:
        kinds["key_padding_mask"] = rng.choice(KPM_LAYOUTS)
        tensors["key_padding_mask"] = _kpm_view(gen, batch, past + length,
                                                kinds["key_padding_mask"]).to(device)
    desc = (f"B={batch} Hq={hq} Hkv={hkv} L={length} D={dim} P={past} {layout} layouts={kinds}")
    return tensors, layout, leaves, desc


def _reference(tensors: dict, layout: dict):
    """float64 reference on contiguous copies (differentiable to the same leaves)."""
    contiguous = {n: (t.double().contiguous() if t.is_floating_point() else t.contiguous())
                  for n, t in tensors.items()}
    return reference_memory_attention(**contiguous, **layout)


def _run_cases(seeds, backend: str, dtype, atol: float, monkeypatch, small=False, device="cpu"):
    for seed in seeds:
        tensors, layout, leaves, desc = _case(seed, dtype, small, device)
        where = f"backend={backend} seed={seed}: {desc}"
        before = [t.detach().clone() for t in leaves]
        if backend == "torch-blocks":  # the fused CPU path split into mask blocks
            monkeypatch.setattr(cpu_flash, "DENSE_MAX_ELEMENTS", 0)
        elif backend == "torch-dense-plan":  # one fused call with the element mask
            monkeypatch.setattr(cpu_flash, "DENSE_MAX_ELEMENTS", 10**9)
        want_lse = backend != "dense"
        name = {"torch-blocks": "torch", "torch-dense-plan": "torch", "dense": "torch"}.get(backend,
                                                                                           backend)
        if backend == "dense":  # the dense-mask SDPA path (taken for dropout or D = 0)
            with monkeypatch.context() as m:
                m.setattr(attention, "_fast_cpu_ok", lambda q: False)
                out = memory_attention(**tensors, **layout, backend=name)
            lse = None
        else:
            out, lse = memory_attention(**tensors, **layout, backend=name, return_lse=True)
        ref, ref_lse = _reference(tensors, layout)
        assert out.shape == ref.shape and out.dtype == dtype, where
        assert not torch.isnan(out).any(), f"NaN output, {where}"
        torch.testing.assert_close(out.double(), ref, atol=atol, rtol=0, msg=lambda m, w=where: f"{m}\n{w}")
        if want_lse:
            assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse)), where
            finite = torch.isfinite(ref_lse)
            torch.testing.assert_close(lse[finite].double(), ref_lse[finite].double(), atol=1e-5,
                                       rtol=0, msg=lambda m, w=where: f"lse: {m}\n{w}")
        gen = torch.Generator().manual_seed(seed)
        cot = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(device)
        wl = torch.randn(ref_lse.shape, generator=gen, dtype=torch.float64).to(device)

        def loss(o, lo, cot=cot, wl=wl):  # the lse is differentiable: its gradient must count
            total = (o.double() * cot).sum()
            if lo is not None:
                total = total + (lo.double().masked_fill(torch.isinf(lo), 0) * wl).sum()
            return total

        got = torch.autograd.grad(loss(out, lse), leaves)
        exp = torch.autograd.grad(loss(ref, ref_lse if want_lse else None), leaves)
        for i, (a, b) in enumerate(zip(got, exp, strict=True)):
            torch.testing.assert_close(a.double(), b.double(), atol=atol * 10, rtol=0,
                                       msg=lambda m, i=i, w=where: f"grad of input {i}: {m}\n{w}")
        for t, t0 in zip(leaves, before, strict=True):  # inputs are never written to
            assert torch.equal(t.detach(), t0), where


CPU_BACKENDS = ("reference", "torch", "torch-blocks", "torch-dense-plan", "dense")


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("block", range(2))
def test_fuzz_cpu_backends_float64(backend, block, monkeypatch):
    """5 backends x 2 blocks x 30 cases = 300 random float64 cases, with gradients."""
    seeds = range(1000 * (CPU_BACKENDS.index(backend) + 1) + 30 * block,
                  1000 * (CPU_BACKENDS.index(backend) + 1) + 30 * (block + 1))
    _run_cases(seeds, backend, torch.float64, 1e-10, monkeypatch)


@pytest.mark.skipif(not cpu_kernel.HAS_CPU_KERNEL, reason="rmt_fast._C built without the kernel")
@pytest.mark.parametrize("block", range(2))
def test_fuzz_cpu_kernel_float32(block, monkeypatch):
    """The extension's fused CPU kernel (backend="cpu"): 2 x 30 random float32 cases, with
    gradients (windows included)."""
    _run_cases(range(7000 + 30 * block, 7030 + 30 * block), "cpu", torch.float32, 2e-5,
               monkeypatch)


@pytest.mark.parametrize("backend", ["torch", "reference", "dense"]
                         + (["triton"] if HAVE_TRITON else []))
@pytest.mark.parametrize("shape", [(0, 2, 5, 4), (2, 2, 0, 4), (2, 2, 5, 0)])
def test_empty_inputs_forward_and_backward(backend, shape, monkeypatch):
    """Batch 0, length 0 and head dim 0: empty or zero outputs, and backward still works."""
    b, h, n, d = shape
    dtype = torch.float32 if backend == "triton" else torch.float64
    q, k, v, pk, pv = (torch.randn(*s, dtype=dtype, requires_grad=True)
                       for s in (shape, shape, shape, (b, h, 3, d), (b, h, 3, d)))
    kw = dict(past_k=pk, past_v=pv, mask="rmt", num_read=min(n, 1))
    if backend == "dense":
        monkeypatch.setattr(attention, "_fast_cpu_ok", lambda q: False)
    out = memory_attention(q, k, v, backend="torch" if backend == "dense" else backend, **kw)
    assert out.shape == shape and not out.any()
    grads = torch.autograd.grad(out.sum(), (q, k, v, pk, pv), allow_unused=True)
    for t, g in zip((q, k, v, pk, pv), grads, strict=True):
        assert g is None or (g.shape == t.shape and not g.any())


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
@pytest.mark.parametrize("block", range(4))
def test_fuzz_triton_interpreter_float32(block, monkeypatch):
    """Triton kernels (forward and backward) under the interpreter: 4 x 10 small float32 cases."""
    _run_cases(range(9000 + 10 * block, 9010 + 10 * block), "triton", torch.float32, 2e-5, monkeypatch,
               small=True)


@pytest.mark.skipif(not HAVE_TRITON, reason="triton is not installed")
def test_fuzz_triton_decode_float32(monkeypatch):
    """The flash-decoding path (forward only: few query rows against >= 256 keys), strided inputs."""
    for seed in range(9500, 9503):
        rng = random.Random(seed)
        gen = torch.Generator().manual_seed(seed)
        length, past = rng.randint(1, 8), 256 + rng.randint(0, 40)
        layout = dict(num_read=rng.randint(0, 1), num_write=0, mask=rng.choice(MASK_MODES))
        tensors = {}
        for name, n, h in (("q", length, 4), ("k", length, 2), ("v", length, 2),
                           ("past_k", past, 2), ("past_v", past, 2)):
            _, tensors[name] = _view(gen, (1, h, n, 8), rng.choice(LAYOUTS), torch.float32)
            tensors[name] = tensors[name].detach()
        with torch.no_grad():
            out = memory_attention(**tensors, **layout, backend="triton")
            ref, _ = _reference(tensors, layout)
        torch.testing.assert_close(out.double(), ref, atol=2e-5, rtol=0,
                                   msg=lambda m, s=seed: f"{m} seed={s}")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_fuzz_triton_cuda_float32(monkeypatch):
    """The same fuzz on the GPU: 60 float32 cases (IEEE dots), outputs, lse and gradients."""
    _run_cases(range(9700, 9760), "triton", torch.float32, 2e-5, monkeypatch, device="cuda")
