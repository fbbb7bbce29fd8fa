"""marval_jax/kernels/fused_linear.py: the LayerNorm -> Linear (-> GELU) Pallas kernel in Pallas' interpreter on
CPU against its plain-JAX reference, and the reference against the model's own nnx modules.

Inputs are chosen so that each term of the computation shows: gamma = 1 + N(0, 0.2^2), beta = N(0, 0.5^2) and bias
N(0, 0.3^2) move outputs by a sizeable fraction of their scale; one row is constant (variance exactly 0: the
normalised row is exactly 0, and eps = 0 would give NaN), one row has variance ~1e-8 << eps = 1e-6 (where eps
sets the output scale); M = 37 or 38 rows, no multiple of the row tile (padding); block_n < N (several column
tiles) and K = 48 (three K chunks of 16).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from marval_jax.kernels import fused_linear
from marval_jax.kernels.fused_linear import ln_linear, ln_linear_reference, ln_linear_unsupported
from marval_jax.models.transformer import LN_EPS, dense, gelu_erf, layer_norm
from tests.tolerances import (EPS16, ULP_TRANSCENDENTAL, assert_close_to_scale, assert_trees_close, max_abs,
                             worst_case_atol)


def _inputs(lead, k, n, seed=0, x_dtype=jnp.float32):
    ks = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(ks[0], (*lead, k)) * 1.5 + 0.2
    x = x.reshape(-1, k).at[3].set(0.5).at[5].multiply(1e-4).reshape(*lead, k)  # var 0 (exact); var ~2e-8 < eps
    gamma = 1.0 + 0.2 * jax.random.normal(ks[1], (k,))
    beta = 0.5 * jax.random.normal(ks[2], (k,))
    w = jax.random.normal(ks[3], (k, n)) * k ** -0.5
    b = 0.3 * jax.random.normal(ks[4], (n,))
    return x.astype(x_dtype), gamma, beta, w, b


def _depth(k, activation):
    """Roundings on the longest chain (numerics.py's counting): LayerNorm = mean and mean of squares over K, the
    variance, rsqrt and the affine (2K + 3, as transformer_depth counts it), the dot over K, the bias add; GELU adds
    erf and three elementwise operations."""
    return 2 * k + 3 + k + 1 + (ULP_TRANSCENDENTAL + 3 if activation == "gelu" else 0)


# bfloat16: both sides round at the same points up to the dot (x and the normalised rows to bfloat16, from float32
# statistics that agree to float32 reassociation), then the XLA path rounds the product, the bias sum and (GELU) its
# output, the kernel its final value alone: at most 4 roundings of half an ulp (EPS16 / 2) of the magnitude between
# them, 2 * EPS16 * scale. The bound is twice that, worst_case_atol(4, scale, EPS16) = 4 * EPS16 * scale, for
# intermediates above the output's scale (bias cancellation, GELU's slope up to 1.13) and the rare normalised element
# whose bfloat16 rounding a float32 difference in its statistics moves. A guaranteed bound of a short chain.
BF16_ROUNDINGS = 4


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
@pytest.mark.parametrize("activation", [None, "gelu"])
def test_reference_is_the_models_layernorm_and_linear_op_for_op(dtype, activation):
    """ln_linear_reference is the model's norm -> Linear (-> gelu_erf) exactly (eager: each op runs alone, so the
    same ops give the same bits), bfloat16 input x included (the residual stream of a bfloat16 model)."""
    k, n = 48, 64
    x, gamma, beta, w, b = _inputs((37,), k, n, x_dtype=dtype)
    rngs = nnx.Rngs(0)
    norm, linear = layer_norm(k, rngs=rngs, dtype=dtype), dense(k, n, rngs=rngs, dtype=dtype)
    for var, value in ((norm.scale, gamma), (norm.bias, beta), (linear.kernel, w), (linear.bias, b)):
        var.set_value(value)
    want = linear(norm(x))
    want = gelu_erf(want) if activation == "gelu" else want
    got = ln_linear_reference(x, gamma, beta, w, b, eps=LN_EPS, activation=activation, dtype=dtype)
    assert got.dtype == want.dtype == jnp.dtype(dtype)
    np.testing.assert_array_equal(np.asarray(got, np.float32), np.asarray(want, np.float32))


@pytest.mark.parametrize("activation", [None, "gelu"])
def test_kernel_matches_reference_float32(activation):
    """(B, T, K) input, M = 2 * 19 = 38 rows in tiles of 16 (padded), 3 column tiles, 3 K chunks."""
    k, n = 48, 96
    args = _inputs((2, 19), k, n)
    kw = dict(eps=LN_EPS, activation=activation, dtype=jnp.float32)
    want = ln_linear_reference(*args, **kw)
    got = ln_linear(*args, **kw, interpret=True, block_m=16, block_n=32)
    assert got.shape == (2, 19, n) and got.dtype == jnp.float32
    assert_close_to_scale(got, want, _depth(k, activation))
    assert np.all(np.isfinite(np.asarray(got)))


@pytest.mark.parametrize("activation", [None, "gelu"])
def test_kernel_matches_reference_bfloat16(activation):
    """bfloat16 compute dtype and bfloat16 x (float32 parameters, cast as the model casts them); 37 rows, K = 32 in
    one chunk, the automatic column tile (64 = N: one tile)."""
    k, n = 32, 64
    args = _inputs((37,), k, n, seed=1, x_dtype=jnp.bfloat16)
    kw = dict(eps=LN_EPS, activation=activation, dtype=jnp.bfloat16)
    want = ln_linear_reference(*args, **kw)
    got = ln_linear(*args, **kw, interpret=True, block_m=16)
    assert got.shape == (37, n) and got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float64), np.asarray(want, np.float64), rtol=0,
                               atol=worst_case_atol(BF16_ROUNDINGS, max_abs(want), EPS16))
    assert np.all(np.isfinite(np.asarray(got, np.float32)))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16], ids=["float32", "bfloat16"])
def test_gradients_are_the_references(dtype):
    """jax.grad through the kernel (custom_vjp: the backward is the reference's vjp, recomputed) against jax.grad
    of the reference, w.r.t. x, gamma, beta, w and b: the same backward computation, so equal up to float32
    reassociation (the forward chain three times over - transformer_depth's rule - plus the weight gradient's sum
    over the M rows). Also in bfloat16: run eagerly, both sides are the same ops in the same order (bit-equal here),
    so no float32 difference exists that could move a bfloat16 rounding."""
    k, n = 48, 64
    x, gamma, beta, w, b = _inputs((2, 19), k, n, seed=2, x_dtype=dtype)
    ct = jax.random.normal(jax.random.key(3), (2, 19, n))
    kw = dict(eps=LN_EPS, activation="gelu", dtype=dtype)

    def loss(f, *args):
        return jnp.sum(f(*args, **kw).astype(jnp.float32) * ct)
    kernel = functools.partial(ln_linear, interpret=True, block_m=16, block_n=32)
    got = jax.grad(functools.partial(loss, kernel), argnums=(0, 1, 2, 3, 4))(x, gamma, beta, w, b)
    want = jax.grad(functools.partial(loss, ln_linear_reference), argnums=(0, 1, 2, 3, 4))(x, gamma, beta, w, b)
    assert [g.dtype for g in got] == [g.dtype for g in want]
    assert_trees_close(got, want, 3 * _depth(k, "gelu") + 38)


def test_jit_vmap_and_empty_input():
    """Under jit and vmap (pallas_call's batching rule) the kernel gives the eager kernel's numbers; zero rows give
    an empty (0, N) result."""
    k, n = 32, 64
    x, gamma, beta, w, b = _inputs((2, 24), k, n, seed=4)
    kw = dict(eps=LN_EPS, activation=None, dtype=jnp.float32, interpret=True, block_m=16, block_n=64)
    eager = ln_linear(x, gamma, beta, w, b, **kw)
    jitted = jax.jit(jax.vmap(lambda xi: ln_linear(xi, gamma, beta, w, b, **kw)))(x)
    assert_close_to_scale(jitted, eager, _depth(k, None))
    assert ln_linear(x[:0, :0], gamma, beta, w, b, **kw).shape == (0, 0, n)


def test_unsupported_calls_say_why_and_ln_linear_raises():
    x, w = jnp.zeros((5, 48)), jnp.zeros((48, 96))
    assert ln_linear_unsupported(x, w, interpret=True) is None
    assert ln_linear_unsupported(x, w, interpret=True, dtype=jnp.bfloat16, activation="gelu", block_n=32) is None
    if jax.default_backend() != "gpu":
        assert "not 'gpu'" in ln_linear_unsupported(x, w)
    cases = {
        "activation must be one of": dict(activation="relu"),
        "compute dtype must be": dict(dtype=jnp.float64),
        "do not match": dict(w=jnp.zeros((32, 96))),
        "not a multiple of 16": dict(x=jnp.zeros((5, 40)), w=jnp.zeros((40, 96))),
        "block_m must be a power of two": dict(block_m=48),
        "no power-of-two tile": dict(w=jnp.zeros((48, 72))),
        "dividing N=96": dict(block_n=64),
        "dividing K=48": dict(block_k=32),
    }
    for message, change in cases.items():
        args = dict(x=x, w=w, interpret=True) | change
        why = ln_linear_unsupported(args.pop("x"), args.pop("w"), **args)
        assert why is not None and message in why, (message, why)
    with pytest.raises(ValueError, match="ln_linear cannot run here: .*dividing N=96"):
        ln_linear(x, jnp.ones(48), jnp.zeros(48), w, jnp.zeros(96), interpret=True, block_n=64)
    with pytest.raises(ValueError, match="ln_linear cannot run here: .*not a multiple of 16"):
        ln_linear(jnp.zeros((5, 40)), jnp.ones(40), jnp.zeros(40), jnp.zeros((40, 96)), jnp.zeros(96), interpret=True)
    if jax.default_backend() != "gpu":
        with pytest.raises(ValueError, match="not 'gpu'"):
            ln_linear(x, jnp.ones(48), jnp.zeros(48), w, jnp.zeros(96))


def test_erf_is_xlas_float32_erf():
    """The kernel's erf (plain arithmetic: Pallas' Triton lowering has none) against lax.erf over [-6, 6], including
    the clamped tails: within a few float32 ulps of 1 (both are rational approximations of a few ulps)."""
    z = jnp.linspace(-6.0, 6.0, 20001, dtype=jnp.float32)
    assert_close_to_scale(fused_linear._erf_f32(z), jax.lax.erf(z), 2 * ULP_TRANSCENDENTAL, scale=1.0)
