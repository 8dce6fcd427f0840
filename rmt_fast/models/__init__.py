"""RMT wrappers for transformers models."""

from rmt_fast.models.armt import ARMTConfig, ARMTForCausalLM, ARMTOutput, ARMTState
from rmt_fast.models.config import RMTConfig
from rmt_fast.models.decoder import RecurrentState, RMTForCausalLM, RMTOutput
from rmt_fast.models.diagonal import DiagonalExecutor
from rmt_fast.models.encoder import (
    RMTEncoderForSequenceClassification,
    RMTEncoderForTokenClassification,
    RMTEncoderOutput,
)
from rmt_fast.models.memory_transformer import MemoryTransformer, MemoryTransformerOutput

__all__ = ["ARMTConfig", "ARMTForCausalLM", "ARMTOutput", "ARMTState", "DiagonalExecutor",
           "MemoryTransformer", "MemoryTransformerOutput", "RMTConfig",
           "RMTEncoderForSequenceClassification", "RMTEncoderForTokenClassification",
           "RMTEncoderOutput", "RMTForCausalLM", "RMTOutput", "RecurrentState"]
