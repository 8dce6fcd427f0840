"""RMT wrappers for transformers models."""

from rmt_fast.models.config import RMTConfig
from rmt_fast.models.decoder import RecurrentState, RMTForCausalLM, RMTOutput

__all__ = ["RMTConfig", "RMTForCausalLM", "RMTOutput", "RecurrentState"]
