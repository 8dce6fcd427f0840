import os
import sys

# Triton kernels are tested on CPU through the interpreter; it must be set before triton loads.
os.environ.setdefault("TRITON_INTERPRET", "1")
# kernel outputs start as NaN, so an element a kernel fails to write fails the comparisons
os.environ.setdefault("RMT_FAST_POISON", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
sys.path.insert(0, os.path.dirname(__file__))
