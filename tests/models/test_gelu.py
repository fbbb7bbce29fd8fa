"""gelu_erf: float32 is jax.nn.gelu exactly; bf16 is the float32 GELU rounded once (PyTorch's autocast numerics)."""
import jax
import jax.numpy as jnp
import numpy as np

from marval_jax.models.transformer import gelu_erf


def test_float32_is_jax_gelu_and_bf16_rounds_once():
    x = jax.random.normal(jax.random.key(0), (4096,), jnp.float32) * 3
    np.testing.assert_array_equal(np.asarray(gelu_erf(x)), np.asarray(jax.nn.gelu(x, approximate=False)))
    xb = x.astype(jnp.bfloat16)
    once = jax.nn.gelu(xb.astype(jnp.float32), approximate=False).astype(jnp.bfloat16)
    out = gelu_erf(xb)
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(once, np.float32))
    # and it is not the op-by-op bf16 GELU (which rounds several times): they differ somewhere
    assert np.any(np.asarray(out, np.float32) != np.asarray(jax.nn.gelu(xb, approximate=False), np.float32))
