"""rmt_fast: kernel-accelerated Recurrent Memory Transformer.

``import rmt_fast`` registers ``attn_implementation="rmt_fast"`` with transformers.
"""

from rmt_fast.attention import memory_attention
from rmt_fast.integrations.transformers import register as _register_transformers
from rmt_fast.masks import MASK_MODES, dense_visibility

__version__ = "0.1.0"

HAS_TRANSFORMERS_BACKEND = _register_transformers()

__all__ = ["MASK_MODES", "dense_visibility", "memory_attention", "__version__"]
