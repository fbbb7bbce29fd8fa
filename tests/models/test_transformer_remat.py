"""models/transformer.run_blocks with per-block remat: the same values and gradients as without, also when the
blocks are merged from parameters that a `lax.scan` body closes over (the RL AR loop with rl.remat off), which
`nnx.remat` of the merged block refused to trace."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from marval_jax.models.transformer import Block, init_kv_cache, run_blocks

DIM, HEADS, DEPTH = 16, 2, 2
# The plain and the rematerialised loss are two compiled programs. At the suite's LLVM -O0 (tests/conftest.py) their
# gradients differ by up to ~1e-4 relative in single elements, beyond the 1e-5 below: these jits keep XLA's defaults.
DEFAULT_COMPILE = {"xla_backend_optimization_level": 3, "xla_llvm_disable_expensive_passes": False}


def _blocks():
    blocks = nnx.List([Block(DIM, HEADS, 2.0, attn_drop=0.1, proj_drop=0.1, rngs=nnx.Rngs(i)) for i in range(DEPTH)])
    return nnx.split(blocks)


def _scan_loss(graphdef, params, x0, remat, rng):
    """Three iterations of a scan whose body merges the blocks from the closed-over parameters."""
    def body(x, i):
        r = None if rng is None else jax.random.fold_in(rng, i)
        y, _ = run_blocks(nnx.merge(graphdef, params), x, rng=r, remat=remat)
        return jnp.tanh(y), None

    x, _ = jax.lax.scan(body, x0, jnp.arange(3))
    return jnp.sum(jnp.square(x))


@pytest.mark.parametrize("with_rng", [False, True])  # with a key: dropout inside the rematerialised blocks
def test_remat_inside_scan_closure_same_value_and_gradients(with_rng):
    graphdef, params = _blocks()
    x0 = jax.random.normal(jax.random.key(0), (2, 5, DIM))
    rng = jax.random.key(1) if with_rng else None
    l0, g0 = jax.jit(jax.value_and_grad(lambda p: _scan_loss(graphdef, p, x0, False, rng)),
                     compiler_options=DEFAULT_COMPILE)(params)
    l1, g1 = jax.jit(jax.value_and_grad(lambda p: _scan_loss(graphdef, p, x0, True, rng)),
                     compiler_options=DEFAULT_COMPILE)(params)
    np.testing.assert_allclose(l1, l0, rtol=1e-6)
    flat0, flat1 = jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)
    assert len(flat0) == len(flat1) > 0
    for a, b in zip(flat0, flat1):
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)
    assert max(float(jnp.abs(a).max()) for a in flat0) > 0


def test_remat_with_kv_cache_and_return_kv():
    graphdef, params = _blocks()
    blocks = nnx.merge(graphdef, params)
    x = jax.random.normal(jax.random.key(2), (2, 4, DIM))
    y0, kv0 = run_blocks(blocks, x, remat=False, return_kv=True)
    y1, kv1 = run_blocks(blocks, x, remat=True, return_kv=True)
    np.testing.assert_allclose(y1, y0, rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(kv0), jax.tree_util.tree_leaves(kv1)):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)
    caches = [init_kv_cache(2, 6, HEADS, DIM // HEADS) for _ in range(DEPTH)]
    pos = jnp.broadcast_to(jnp.arange(4), (2, 4))
    y0, c0 = run_blocks(blocks, x, caches=caches, cache_positions=pos, remat=False)
    y1, c1 = run_blocks(blocks, x, caches=caches, cache_positions=pos, remat=True)
    np.testing.assert_allclose(y1, y0, rtol=1e-6, atol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(c0), jax.tree_util.tree_leaves(c1)):
        np.testing.assert_allclose(b, a, rtol=1e-6, atol=1e-6)
