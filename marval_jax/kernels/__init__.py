"""Pallas GPU kernels for the transformer's memory-bound work: flash attention with dropout (no stored logits) and
LayerNorm fused into the following matmul (docs/kernels.md).

Each kernel has a plain-JAX reference beside it: the XLA path, which the models run by default and on every
backend, stays the reference for numerics, and the tests compare each kernel with it (Pallas interpret mode on CPU).
"""
