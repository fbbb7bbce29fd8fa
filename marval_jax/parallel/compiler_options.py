"""Per-program XLA compiler options that depend on the batch: cuBLAS for every GEMM of large-batch GPU programs.

XLA's GPU compiler may run a matmul as a Triton GEMM fusion (elementwise neighbours fused in) instead of cuBLAS. At
large batches cuBLAS is faster; at batch 1 the fusions win, since they save kernel launches in latency-bound loops.
The measurements (docs/benchmarks.md, "Measurements behind code choices") found cuBLAS faster for the batch-256
block and the fusions faster for the batch-1 teacher sampler.
So the option is set per program for per-device batches >= LARGE_BATCH (32: between the measured batches 1 and 256;
the crossover itself was not measured) and only on GPUs; elsewhere no option is passed.
"""
from __future__ import annotations

from typing import Any, Callable

import jax

LARGE_BATCH = 32
LARGE_BATCH_GPU_OPTIONS = {"xla_gpu_enable_triton_gemm": False}


def gpu_compiler_options(per_device_batch: int | None, backend: str | None = None) -> dict[str, Any]:
    """The compiler options of a program whose per-device batch is `per_device_batch` (None: unknown, none)."""
    backend = backend or jax.default_backend()
    if backend != "gpu" or per_device_batch is None or per_device_batch < LARGE_BATCH:
        return {}
    return dict(LARGE_BATCH_GPU_OPTIONS)


def jit_options(per_device_batch: int | None) -> dict[str, Any]:
    """jax.jit keyword arguments for a program of that per-device batch: {"compiler_options": ...} or nothing."""
    opts = gpu_compiler_options(per_device_batch)
    return {"compiler_options": opts} if opts else {}


class BatchJit:
    """jax.jit of `fn` with the compiler options of the batch it is called with (`batch_of(*args)`): one jitted
    function per distinct option set, each compiling once per shape as jax.jit does. Supports `__call__` and
    `lower` (AOT compile, as the benchmark suite does)."""

    def __init__(self, fn: Callable, batch_of: Callable[..., int], **jit_kwargs):
        self.fn, self.batch_of, self.jit_kwargs = fn, batch_of, jit_kwargs
        self._jits: dict[tuple, Any] = {}

    def jitted_for(self, *args):
        opts = jit_options(self.batch_of(*args))
        key = tuple(sorted(opts.get("compiler_options", {}).items()))
        if key not in self._jits:
            self._jits[key] = jax.jit(self.fn, **opts, **self.jit_kwargs)
        return self._jits[key]

    def __call__(self, *args):
        if any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(args)):
            # called inside another jit (GSIM's on-policy rollout inside the train step): XLA takes compiler options
            # only for a top-level program, and the outer program's options apply to the whole of it
            return self._nested(*args)
        return self.jitted_for(*args)(*args)

    @property
    def _nested(self):
        if None not in self._jits:
            self._jits[None] = jax.jit(self.fn, **self.jit_kwargs)
        return self._jits[None]

    def lower(self, *args):
        return self.jitted_for(*args).lower(*args)
