"""Inference semantics for reading and generation: the model in eval mode (no dropout, no memory
noise) for the duration of a call, every submodule's own mode restored afterwards; and inference
execution: linear layers through oneDNN with packed weights on CPU
(:mod:`rmt_fast.integrations.packed_linear`)."""

from __future__ import annotations

import contextlib
import functools
import threading
from collections.abc import Iterator

from torch import nn

from rmt_fast.integrations.packed_linear import packed_linears

_LOCK = threading.Lock()
_USERS, _SAVED = "_rmt_fast_eval_users", "_rmt_fast_eval_saved"


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[None]:
    """``module`` (and every submodule) in eval mode inside the block. Afterwards each submodule
    that was training is switched back, so a mix of modes (e.g. a frozen part kept in eval)
    survives. Nested and concurrent uses (threads reading with one model) are counted: the first
    one in switches, the last one out restores. A module wholly in eval mode is not touched."""
    with _LOCK:
        users = module.__dict__.get(_USERS, 0)
        if users == 0:
            training = [m for m in module.modules() if m.training]
            module.__dict__[_SAVED] = training
            if training:
                module.eval()
        module.__dict__[_USERS] = users + 1
    try:
        yield
    finally:
        with _LOCK:
            module.__dict__[_USERS] -= 1
            if module.__dict__[_USERS] == 0:
                del module.__dict__[_USERS]
                for m in module.__dict__.pop(_SAVED):
                    m.training = True


@contextlib.contextmanager
def inference(module: nn.Module) -> Iterator[None]:
    """:func:`eval_mode` and :func:`~rmt_fast.integrations.packed_linear.packed_linears` of
    ``module`` inside the block: what reading and generation run under."""
    with eval_mode(module), packed_linears(module):
        yield


def evaluating(method):
    """Decorator: run ``method(self, ...)`` under :func:`inference` of ``self``."""

    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):
        with inference(self):
            return method(self, *args, **kwargs)

    return wrapper
