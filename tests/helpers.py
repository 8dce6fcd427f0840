"""Shared test helpers: random attention inputs and comparisons."""

from __future__ import annotations

import importlib.util
import os
import sys

import torch

from rmt_fast.bench.live_bytes import LiveBytes  # noqa: F401  (for the tests)


def attention_inputs(batch=2, hq=4, hkv=2, length=13, dim=8, past=0, dtype=torch.float64,
                     pad=False, requires_grad=True, seed=0):
    """Fresh random ``q, k, v`` (and past keys, padding) as a kwargs dict for memory_attention."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).requires_grad_(
            requires_grad)

    inp = dict(q=rnd(batch, hq, length, dim), k=rnd(batch, hkv, length, dim),
               v=rnd(batch, hkv, length, dim))
    if past:
        inp["past_k"] = rnd(batch, hkv, past, dim)
        inp["past_v"] = rnd(batch, hkv, past, dim)
    if pad:
        kpm = torch.rand(batch, past + length, generator=g) > 0.3
        kpm[-1] = False  # one batch row sees nothing at all
        inp["key_padding_mask"] = kpm
    return inp


def grads(out, inputs, seed=1):
    """Gradients of ``<out, random>`` w.r.t. ``inputs`` (a fixed random cotangent)."""
    g = torch.Generator().manual_seed(seed)
    cot = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out.dtype)
    return torch.autograd.grad(out, inputs, cot)


def load_script(name: str):
    """The module ``scripts/<name>.py``, loaded under ``name`` (registered in ``sys.modules``,
    where dataclasses look their module up). The scripts are not a package: users run them."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "scripts", f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
