"""Timing helpers: ahead-of-time compilation with its cost, warm-up, device-synchronised repeats, memory.

- `compile_timed(jitted, *args)`: `jitted.lower(*args)` and `.compile()` timed separately; the compiled executable
  is what gets timed afterwards, so nothing compiles twice. XLA's buffer assignment for the program
  (`memory_analysis()`: arguments + outputs + temporaries - aliased) is the program's own peak device memory.
- `time_calls(call, ...)`: warm-up calls, then repeats each ended by `jax.block_until_ready`; the number of repeats
  grows until `target_s` seconds were timed (bounded by min/max repeats and a deadline).
- `time_steps(step, state, ...)`: training throughput - `steps` calls dispatched back to back (the state is fed
  back, as a training loop does) and one synchronisation at the end, per round.
"""
from __future__ import annotations

import statistics
import threading
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np


class Deadline:
    """Wall-clock budget for the whole suite; `None` means unlimited."""

    def __init__(self, budget_s: float | None):
        self.start = time.perf_counter()
        self.budget_s = budget_s

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def remaining(self) -> float:
        return float("inf") if self.budget_s is None else self.budget_s - self.elapsed()


def memory_analysis(compiled) -> dict | None:
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - not every backend / version implements it
        return None
    if m is None:
        return None
    if isinstance(m, (list, tuple)):
        m = m[0]
    fields = ("argument_size_in_bytes", "output_size_in_bytes", "temp_size_in_bytes", "alias_size_in_bytes",
              "generated_code_size_in_bytes")
    out = {f: int(getattr(m, f, 0) or 0) for f in fields}
    out["program_peak_bytes"] = (out["argument_size_in_bytes"] + out["output_size_in_bytes"]
                                 + out["temp_size_in_bytes"] - out["alias_size_in_bytes"])
    return out


def device_memory() -> dict | None:
    """The allocator's statistics of device 0 (`peak_bytes_in_use` is the process's running peak)."""
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001
        return None
    if not stats:
        return None
    return {k: int(stats[k]) for k in ("bytes_in_use", "peak_bytes_in_use", "bytes_limit") if k in stats}


class MemoryPoller:
    """Samples the allocator's `bytes_in_use` every `interval_s` from a thread while a measurement runs; the largest
    value seen is that measurement's own peak (with every other live array of the process: weights, earlier rows'
    outputs). `memory_stats()["peak_bytes_in_use"]` is a running peak of the whole process that cannot be reset, so it
    only says something about a row that raised it. XLA allocates an execution's temporaries as one buffer for the
    whole execution, so sampling every few milliseconds sees it. A no-op where the backend reports no statistics."""

    def __init__(self, interval_s: float = 0.002, stats: Callable[[], dict | None] = device_memory):
        self.interval_s, self.stats = interval_s, stats
        self.max_bytes: int | None = None
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        st = self.stats()
        if st and "bytes_in_use" in st:
            v = int(st["bytes_in_use"])
            self.max_bytes = v if self.max_bytes is None else max(self.max_bytes, v)
            self.samples += 1

    def _loop(self) -> None:
        while not self._stop.wait(self.interval_s):
            self._sample()

    def __enter__(self) -> "MemoryPoller":
        self._sample()
        if self.max_bytes is not None:  # statistics exist: keep sampling in the background
            self._thread = threading.Thread(target=self._loop, name="memory-poller", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        self._sample()

    def result(self) -> dict | None:
        if self.max_bytes is None:
            return None
        return {"max_bytes_in_use": self.max_bytes, "samples": self.samples, "interval_s": self.interval_s}


def compile_timed(jitted, *args, **kwargs) -> tuple[Any, dict]:
    t0 = time.perf_counter()
    lowered = jitted.lower(*args, **kwargs)
    t1 = time.perf_counter()
    compiled = lowered.compile()
    t2 = time.perf_counter()
    return compiled, {"lower_s": t1 - t0, "compile_s": t2 - t1, "total_s": t2 - t0,
                      "memory": memory_analysis(compiled)}


def _summary(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "mean_s": statistics.fmean(times),
            "times_s": times, "reps": len(times)}


def time_calls(call: Callable[[], Any], *, warmup: int = 1, min_reps: int = 2, max_reps: int = 20,
               target_s: float = 3.0, deadline: Deadline | None = None) -> dict:
    """Median wall time of `call()` with the device synchronised after each call."""
    t = 0.0
    for _ in range(warmup):
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        t = time.perf_counter() - t0
    times: list[float] = []
    while len(times) < max_reps:
        if len(times) >= min_reps and sum(times) >= target_s:
            break
        if len(times) >= 1 and deadline is not None and deadline.remaining() < 2 * max(times[-1], t) + 20:
            break
        t0 = time.perf_counter()
        jax.block_until_ready(call())
        times.append(time.perf_counter() - t0)
    out = _summary(times)
    out["warmup"] = warmup
    out["first_call_s"] = t
    return out


def time_steps(step: Callable[[Any], Any], state: Any, *, warmup: int = 2, steps: int = 5, rounds: int = 3,
               deadline: Deadline | None = None) -> tuple[dict, Any]:
    """Per-step time of a training step `state -> (state, metrics)`; returns (summary, final state)."""
    metrics = None
    for _ in range(warmup):
        state, metrics = step(state)
    jax.block_until_ready((state, metrics))
    per_step: list[float] = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(steps):
            state, metrics = step(state)
        jax.block_until_ready((state, metrics))
        per_step.append((time.perf_counter() - t0) / steps)
        if deadline is not None and deadline.remaining() < 3 * steps * per_step[-1] + 20:
            break
    out = _summary(per_step)
    out["steps_per_round"] = steps
    out["warmup"] = warmup
    out["finite_loss"] = bool(np.isfinite(float(jax.device_get(metrics["loss"])))) if metrics else None
    return out, state


def matmul_tflops(n: int = 8192, dtype=jnp.bfloat16, reps: int = 20) -> float:
    """Measured dense matmul rate (TFLOP/s) of an n x n x n product on random data, median of `reps`."""
    ka, kb = jax.random.split(jax.random.key(0))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda x, y: x @ y)
    jax.block_until_ready(f(a, b))
    times, inner = [], 5
    for _ in range(reps):
        t0 = time.perf_counter()
        jax.block_until_ready([f(a, b) for _ in range(inner)])
        times.append((time.perf_counter() - t0) / inner)
    return 2 * n ** 3 / statistics.median(times) / 1e12
