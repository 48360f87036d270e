"""Benchmarks (not tests). Run from the repository root as modules, e.g.
``python -m benchmarks.ffn_kernels --preset cpu``; ``harness`` is what they share."""
