"""model.kernels: a transformer block with its LayerNorm -> Linear pairs through the fused Pallas kernel
(kernels/fused_linear.py, here in Pallas' interpreter) computes what the XLA block computes, forward and backward,
and MARConfig / the checkpoint check treat the field as a way of computing, not an architecture."""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from marval_jax.checkpoints import manager
from marval_jax.models import mar as mar_lib
from marval_jax.models import transformer as T
from tests.tolerances import EPS16, assert_close_to_scale, max_abs, transformer_depth, worst_case_atol

DIM, HEADS, SEQ = 32, 2, 12


def _blocks(dtype):
    """Two blocks of the same parameters: the XLA one and the kernel one (the kernels field is not a parameter)."""
    xla = T.Block(DIM, HEADS, rngs=nnx.Rngs(0), dtype=dtype, attn_drop=0.0, proj_drop=0.0)
    fused = T.Block(DIM, HEADS, rngs=nnx.Rngs(1), dtype=dtype, attn_drop=0.0, proj_drop=0.0,
                    kernels="pallas_interpret")
    nnx.update(fused, nnx.state(xla))
    # non-trivial LayerNorm affine parameters and biases, so a kernel that drops one of them shows
    state = nnx.state(xla, nnx.Param)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(7), len(leaves))
    leaves = [leaf + 0.1 * jax.random.normal(k, leaf.shape, leaf.dtype) for leaf, k in zip(leaves, keys)]
    state = jax.tree.unflatten(tree, leaves)
    nnx.update(xla, state)
    nnx.update(fused, state)
    return xla, fused


def test_float32_block_matches_the_xla_block_forward_and_backward():
    xla, fused = _blocks(jnp.float32)
    x = jax.random.normal(jax.random.key(3), (2, SEQ, DIM), jnp.float32)
    want, _ = xla(x)
    got, _ = fused(x)
    depth = transformer_depth(DIM, SEQ, 1, heads=HEADS)
    assert_close_to_scale(got, want, depth)
    gx_want = jax.grad(lambda x: xla(x)[0].sum())(x)
    gx_got = jax.grad(lambda x: fused(x)[0].sum())(x)
    assert_close_to_scale(gx_got, gx_want, transformer_depth(DIM, SEQ, 1, heads=HEADS, grad=True))


def test_bfloat16_block_is_within_bf16_rounding_of_the_xla_block():
    """bf16 compute: the kernel rounds the Linear once (bias on the float32 accumulator) where nnx.Linear rounds
    twice, and evaluates GELU before that rounding; each such difference is one bf16 rounding of a value that the
    rest of the block (attention, proj, fc2, two residual adds) carries through ~8 more bf16 roundings, so the bound
    is worst_case_atol(16, scale, EPS16): twice that count, on the output's scale."""
    xla, fused = _blocks(jnp.bfloat16)
    x = jax.random.normal(jax.random.key(4), (2, SEQ, DIM), jnp.float32)
    want = np.asarray(xla(x)[0], np.float64)
    got = np.asarray(fused(x)[0], np.float64)
    np.testing.assert_allclose(got, want, rtol=0, atol=worst_case_atol(16, max_abs(want), EPS16))
    assert not np.array_equal(got, np.asarray(x, np.float64))  # the block did something


def test_kernels_field_is_checked_and_not_architectural():
    with pytest.raises(ValueError, match="kernels must be one of"):
        mar_lib.MARConfig(kernels="triton")
    with pytest.raises(ValueError, match="kernels must be one of"):
        T.Block(DIM, HEADS, rngs=nnx.Rngs(0), kernels="fused")
    # a run config's typo is one UserError naming the field (models/factory.model_config), not a traceback
    from configs import mar as mar_configs
    from configs.common import with_fields
    from marval_jax.models.factory import model_config
    from marval_jax.user_errors import UserError
    for field, value in (("kernels", "triton"), ("attention_impl", "flash2")):
        with pytest.raises(UserError, match=f"model.{field} must be one of xla, "):
            model_config(with_fields(mar_configs.get_config("tiny"), {f"model.{field}": value}))
    saved = {"model": dataclasses.asdict(mar_lib.MARConfig())}
    current = {"model": dataclasses.asdict(mar_lib.MARConfig(kernels="pallas"))}
    manager.check_config(saved, current)  # restores across it: the parameters are the same


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the CPU refusal")
def test_pallas_kernels_refuse_off_gpu():
    blk = T.Block(DIM, HEADS, rngs=nnx.Rngs(0), kernels="pallas")
    with pytest.raises(ValueError, match="ln_linear cannot run here: the backend is 'cpu'"):
        blk(jnp.ones((1, 4, DIM)))
