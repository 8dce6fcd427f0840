"""pytest-benchmark GPU benchmarks of rmt_fast/bench/kernels.py systems (skipped without CUDA).

Run on a GPU machine: ``pytest -m slow tests/test_gpu_bench.py --benchmark-columns=median``.
Each test checks its output against ours (``backend="triton"``) and records TFLOP/s and the
fraction of peak in ``extra_info``; there are no timing asserts.
"""

import pytest
import torch

pytest.importorskip("pytest_benchmark")

from rmt_fast.bench import kernels as kb  # noqa: E402
from rmt_fast.bench.roofline import device_peak, roofline  # noqa: E402

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.mark.parametrize("mode", ["fwd", "fwd+bwd"])
@pytest.mark.parametrize("length", [1024, 8192, 32768])
@pytest.mark.parametrize("head_dim", [64, 128])
@pytest.mark.parametrize("mask", ["causal", "rmt"])
@pytest.mark.parametrize("system", kb.GPU_SYSTEMS)
def test_attention(benchmark, system, mask, head_dim, length, mode):
    device, dtype = torch.device("cuda"), torch.bfloat16
    mem = 0 if mask == "causal" else 16
    case = kb.Case(mask, length, head_dim, mode, batch=max(1, 16384 // length),
                   heads=2048 // head_dim, num_read=mem, num_write=mem)
    grad = mode == "fwd+bwd"
    try:
        fn, leaves = kb.build(system, case, device, dtype, grad)
    except kb.Unsupported as e:
        pytest.skip(str(e))
    with torch.no_grad():
        out = fn().float()
        ours = kb.build("triton", case, device, dtype, False)[0]().float()
    assert (out - ours).abs().max().item() < 3e-2  # bf16 outputs of the same attention
    dout = torch.randn_like(out).to(dtype)

    def step():
        if grad:
            for t in leaves:
                t.grad = None
            fn().backward(dout)
        else:
            with torch.no_grad():
                fn()
        torch.cuda.synchronize()

    benchmark.pedantic(step, rounds=20, warmup_rounds=3, iterations=1)
    rates = roofline(case.shape(dtype), benchmark.stats.stats.median, mode,
                     device_peak(torch.cuda.get_device_name()))
    benchmark.extra_info.update({k: v for k, v in rates.items() if k != "bound"})
