"""Peak bytes of the tensors a piece of PyTorch code allocates (CPU or any device)."""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

__all__ = ["LiveBytes"]


class LiveBytes:
    """Peak bytes of tensor storages allocated by torch ops while active (a context manager).

    A ``TorchDispatchMode`` sees every op's outputs, also inside autograd's backward and the
    checkpoint recomputation; each new storage counts until it is freed (a finalizer on the
    storage, which PyTorch keeps as one Python object per storage). Tensors that existed before
    (parameters, inputs) are not counted. Deterministic on CPU, unlike RSS."""

    def __init__(self) -> None:
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
