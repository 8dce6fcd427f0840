"""Inference semantics for reading and generation: the model in eval mode (no dropout, no memory
noise) for the duration of a call, every submodule's own mode restored afterwards."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator

from torch import nn


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """``module`` (and every submodule) in eval mode inside the block. Afterwards each submodule
    that was training is switched back, so a mix of modes (e.g. a frozen part kept in eval)
    survives. A module already wholly in eval mode is not touched at all (safe to share between
    threads that only read or generate)."""
    training = [m for m in module.modules() if m.training]
    if not training:
        yield
        return
    module.eval()
    try:
        yield
    finally:
        for m in training:
            m.training = True


def evaluating(method):
    """Decorator: run ``method(self, ...)`` under :func:`eval_mode` of ``self``."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with eval_mode(self):
            return method(self, *args, **kwargs)

    return wrapper
