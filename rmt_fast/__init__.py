"""rmt_fast: kernel-accelerated Recurrent Memory Transformer.

``import rmt_fast`` registers ``attn_implementation="rmt_fast"`` with transformers. The model
classes are imported lazily on first use (``rmt_fast.RMTForCausalLM``), as transformers does.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

from rmt_fast.attention import memory_attention
from rmt_fast.integrations.transformers import register as _register_transformers
from rmt_fast.masks import MASK_MODES, AttentionLayout, dense_visibility

__version__ = "0.2.0"

HAS_TRANSFORMERS_BACKEND = _register_transformers()

# name -> module that defines it; loaded on first attribute access
_LAZY = {
    "ARMTConfig": "rmt_fast.models.armt",
    "ARMTForCausalLM": "rmt_fast.models.armt",
    "ARMTOutput": "rmt_fast.models.armt",
    "ARMTState": "rmt_fast.models.armt",
    "DiagonalExecutor": "rmt_fast.models.diagonal",
    "AutoRMT": "rmt_fast.models.auto",
    "RMTConfig": "rmt_fast.models.config",
    "RMTDataCollator": "rmt_fast.data",
    "RMTForCausalLM": "rmt_fast.models.decoder",
    "RMTOutput": "rmt_fast.models.decoder",
    "RMTEncoderForSequenceClassification": "rmt_fast.models.encoder",
    "RMTEncoderForTokenClassification": "rmt_fast.models.encoder",
    "RMTEncoderOutput": "rmt_fast.models.encoder",
    "MemoryTransformer": "rmt_fast.models.memory_transformer",
    "MemoryTransformerOutput": "rmt_fast.models.memory_transformer",
    "StreamingReader": "rmt_fast.streaming",
    "TrainConfig": "rmt_fast.train",
    "fuse_activations": "rmt_fast.integrations.fused_activations",
}

if TYPE_CHECKING:  # for type checkers and IDEs; at run time these load lazily
    from rmt_fast.data import RMTDataCollator
    from rmt_fast.integrations.fused_activations import fuse_activations
    from rmt_fast.models.armt import ARMTConfig, ARMTForCausalLM, ARMTOutput, ARMTState
    from rmt_fast.models.auto import AutoRMT
    from rmt_fast.models.config import RMTConfig
    from rmt_fast.models.decoder import RMTForCausalLM, RMTOutput
    from rmt_fast.models.diagonal import DiagonalExecutor
    from rmt_fast.models.encoder import (
        RMTEncoderForSequenceClassification,
        RMTEncoderForTokenClassification,
        RMTEncoderOutput,
    )
    from rmt_fast.models.memory_transformer import MemoryTransformer, MemoryTransformerOutput
    from rmt_fast.streaming import StreamingReader
    from rmt_fast.train import TrainConfig


def __getattr__(name: str):
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'rmt_fast' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later accesses skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = [
    "ARMTConfig", "ARMTForCausalLM", "ARMTOutput", "ARMTState", "DiagonalExecutor",
    "MASK_MODES", "AttentionLayout", "AutoRMT", "MemoryTransformer", "MemoryTransformerOutput", "RMTConfig",
    "RMTEncoderForSequenceClassification", "RMTEncoderForTokenClassification", "RMTEncoderOutput",
    "RMTDataCollator", "RMTForCausalLM", "RMTOutput", "StreamingReader", "TrainConfig", "__version__",
    "dense_visibility", "fuse_activations", "memory_attention",
]
assert set(_LAZY) <= set(__all__)
