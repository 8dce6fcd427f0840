"""Triton kernels for ``rmt_fast.memory_attention`` (installed as ``rmt_fast.kernels``)."""
