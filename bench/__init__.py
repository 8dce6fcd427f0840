"""Benchmarks (installed as ``rmt_fast.bench``): sweeps, the FLOPs model, memory checks."""
