"""Operators, one folder per op (as flash-linear-attention's ``fla/ops/<name>/``).

* :mod:`rmt_fast.ops.memory_attention`: attention over ``[read memory | segment | write memory]``
  with past keys; its implementations are ``reference`` (float64-capable dense reference),
  ``dense`` (SDPA with a dense mask), ``cpu_flash`` (the fused CPU path) and ``triton`` (GPU
  kernels). The public entry point is :func:`rmt_fast.memory_attention`.
* :mod:`rmt_fast.ops.associative_memory`: ARMT's associative read and delta-rule write
  (``reference``, ``chunked`` (PyTorch, row-chunked), ``triton``), through the
  ``rmt_fast::assoc_read`` / ``rmt_fast::assoc_update`` custom ops.
"""
