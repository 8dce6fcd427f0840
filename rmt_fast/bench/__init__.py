"""Benchmarks (`rmt-fast bench`, `rmt-fast flops`): sweeps, the FLOPs model, memory checks.

The recorded results live in `bench/README.md` of the source tree."""
