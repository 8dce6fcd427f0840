import os
import sys

# Triton kernels are tested on CPU through the interpreter; it must be set before triton loads.
os.environ.setdefault("TRITON_INTERPRET", "1")
# kernel outputs start as NaN, so an element a kernel fails to write fails the comparisons
os.environ.setdefault("RMT_FAST_POISON", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(__file__))


import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def one_thread():
    """One intra-op thread for the test (restored after): small ops on a shared, loaded machine
    run far faster without OpenMP threads contending for the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
