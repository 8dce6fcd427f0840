"""rmt_fast: kernel-accelerated Recurrent Memory Transformer."""

from rmt_fast.attention import memory_attention
from rmt_fast.masks import MASK_MODES, dense_visibility

__version__ = "0.1.0"

__all__ = ["MASK_MODES", "dense_visibility", "memory_attention", "__version__"]
