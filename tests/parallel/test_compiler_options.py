"""Batch-dependent compiler options: cuBLAS GEMMs (no Triton GEMM fusions) for large-batch GPU programs only."""
import jax
import jax.numpy as jnp
import numpy as np

from marval_jax.parallel import compiler_options as co


def test_only_large_batches_on_gpu_get_the_option():
    assert co.gpu_compiler_options(co.LARGE_BATCH, backend="gpu") == {"xla_gpu_enable_triton_gemm": False}
    assert co.gpu_compiler_options(256, backend="gpu") == {"xla_gpu_enable_triton_gemm": False}
    assert co.gpu_compiler_options(co.LARGE_BATCH - 1, backend="gpu") == {}
    assert co.gpu_compiler_options(None, backend="gpu") == {}
    assert co.gpu_compiler_options(256, backend="cpu") == {} and co.gpu_compiler_options(256, backend="tpu") == {}


def test_batch_jit_keeps_one_jit_per_option_set_and_lowers(monkeypatch):
    """Each option set gets its own jax.jit (and its own compile); the same options share one; lower() works."""
    seen = []

    def options(batch, backend=None):
        seen.append(batch)
        return {"xla_cpu_enable_fast_math": False} if batch >= 4 else {}

    monkeypatch.setattr(co, "gpu_compiler_options", options)
    f = co.BatchJit(lambda w, x: jnp.tanh(x @ w), batch_of=lambda w, x: x.shape[0])
    w = jnp.ones((3, 2))
    for b in (1, 2, 4, 8):
        x = jnp.arange(3.0 * b).reshape(b, 3)
        np.testing.assert_allclose(f(w, x), np.tanh(np.asarray(x) @ np.asarray(w)), rtol=1e-6)
    assert seen == [1, 2, 4, 8] and len(f._jits) == 2
    assert f.lower(w, jnp.ones((8, 3))).compile()(w, jnp.ones((8, 3))).shape == (8, 2)
    assert len(f._jits) == 2
    jax.block_until_ready(f(w, jnp.ones((8, 3))))


def test_jit_options_wraps_the_options_for_jax_jit(monkeypatch):
    assert co.jit_options(256) == {}  # CPU: nothing passed
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert co.jit_options(256) == {"compiler_options": {"xla_gpu_enable_triton_gemm": False}}
    assert co.jit_options(1) == {} and co.jit_options(None) == {}


def test_batch_jit_inside_another_jit_passes_no_options(monkeypatch):
    """GSIM's on-policy rollout calls the sampler's BatchJit inside the jitted train step; jax refuses
    compiler_options on a nested jit (a ValueError on GPU at batch >= LARGE_BATCH, found by the fmnist_l ablation on
    an H100), so the nested call must go without them and give the same numbers."""
    monkeypatch.setattr(co, "gpu_compiler_options", lambda batch, backend=None: {"xla_cpu_enable_fast_math": False})
    f = co.BatchJit(lambda w, x: jnp.tanh(x @ w), batch_of=lambda w, x: x.shape[0])
    w, x = jnp.ones((3, 2)), jnp.arange(12.0).reshape(4, 3)
    outer = jax.jit(lambda w, x: f(w, x) * 2.0)
    np.testing.assert_allclose(outer(w, x), 2.0 * np.tanh(np.asarray(x) @ np.asarray(w)), rtol=1e-6)
    np.testing.assert_allclose(f(w, x), np.tanh(np.asarray(x) @ np.asarray(w)), rtol=1e-6)  # top level: options
    assert set(f._jits) == {None, (("xla_cpu_enable_fast_math", False),)}
