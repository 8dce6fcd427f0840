"""Shared test helpers: random attention inputs and comparisons."""

from __future__ import annotations

import torch


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


class LiveBytes:
    """Peak bytes of tensor storages allocated by torch ops while active (a context manager).

    A ``TorchDispatchMode`` sees every op's outputs, also inside autograd's backward and the
    checkpoint recomputation; each new storage counts until it is freed (a finalizer on the
    storage, which PyTorch keeps as one Python object per storage). Tensors that existed before
    (parameters, inputs) are not counted. Deterministic on CPU, unlike RSS."""

    def __init__(self) -> None:
        import weakref

        from torch.utils._python_dispatch import TorchDispatchMode
        from torch.utils._pytree import tree_leaves

        sizes: dict[int, int] = {}
        self.sizes, self.live, self.peak = sizes, 0, 0
        tracker = self

        def free(key: int) -> None:
            tracker.live -= sizes.pop(key)

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                out = func(*args, **(kwargs or {}))
                for t in tree_leaves(out):
                    if isinstance(t, torch.Tensor) and t.device.type != "meta":
                        storage = t.untyped_storage()
                        key = id(storage)
                        if key not in sizes and storage.nbytes() > 0:
                            sizes[key] = storage.nbytes()
                            tracker.live += sizes[key]
                            tracker.peak = max(tracker.peak, tracker.live)
                            weakref.finalize(storage, free, key)
                return out

        self._mode = _Mode()

    def __enter__(self) -> LiveBytes:
        self._mode.__enter__()
        return self

    def __exit__(self, *exc) -> None:
        self._mode.__exit__(*exc)
