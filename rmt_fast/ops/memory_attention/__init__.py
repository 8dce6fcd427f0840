"""Implementations of :func:`rmt_fast.memory_attention`; each takes validated inputs and an
:class:`rmt_fast.masks.AttentionLayout`.

* ``reference``: dense, any dtype (float64 in the tests), the ground truth.
* ``dense``: ``F.scaled_dot_product_attention`` with a dense bool mask (dropout, tiny shapes).
* ``cpu_flash``: the fused CPU path (ATen's flash kernel per mask block, merged by log-sum-exp).
* ``cpu_kernel``: the C++ extension's fused CPU kernel (float32/bf16, one call for the whole mask;
  what ``backend="auto"`` uses on CPUs with AVX-512, see ``bench/README.md``).
* ``triton``: fused GPU kernels (forward, backward, flash-decoding), custom op for torch.compile.
"""
