"""models/transformer.run_blocks with per-block remat: the same values and gradients as without, also when the
blocks are merged from parameters that a `lax.scan` body closes over (the RL AR loop with rl.remat off), which
`nnx.remat` of the merged block refused to trace."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from marval_jax.models.transformer import Block, init_kv_cache, run_blocks
from tolerances import assert_close_to_scale, assert_trees_close, transformer_depth

DIM, HEADS, DEPTH = 16, 2, 2
# The plain and the rematerialised program are compiled apart: XLA fuses and orders their reductions differently
# (and differently per ISA), so they agree to the reassociation bound of tests/tolerances.py, not bit for bit.
# A gradient element near zero from cancellation is off by a few eps * max|leaf|, i.e. by ~1e-4 of itself: the
# bound is on the leaf's scale, never per element. Roundings on the longest chain: 3 scan steps of the 2 blocks
# over 5 keys, backward included, plus the weight gradients' sum over 3 steps x 2 x 5 tokens.
GRAD_DEPTH = transformer_depth(DIM, 5, 3 * DEPTH, heads=HEADS, mlp_ratio=2.0, grad=True, tokens=3 * 2 * 5)
# the loss: the same forward chain, tanh per step, then a sum of squares over 2 x 5 x DIM
LOSS_DEPTH = transformer_depth(DIM, 5, 3 * DEPTH, heads=HEADS, mlp_ratio=2.0) + 3 * 4 + 2 * 5 * DIM
# one forward pass of the 2 blocks over 4 (or a 6-slot cache of) keys
FWD_DEPTH = transformer_depth(DIM, 6, DEPTH, heads=HEADS, mlp_ratio=2.0)


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
    l0, g0 = jax.jit(jax.value_and_grad(lambda p: _scan_loss(graphdef, p, x0, False, rng)))(params)
    l1, g1 = jax.jit(jax.value_and_grad(lambda p: _scan_loss(graphdef, p, x0, True, rng)))(params)
    assert_close_to_scale(l1, l0, LOSS_DEPTH)
    assert_trees_close(g1, g0, GRAD_DEPTH)
    assert min(float(jnp.abs(a).max()) for a in jax.tree_util.tree_leaves(g0)) > 0  # no leaf compared to 0


def test_remat_with_kv_cache_and_return_kv():
    graphdef, params = _blocks()
    blocks = nnx.merge(graphdef, params)
    x = jax.random.normal(jax.random.key(2), (2, 4, DIM))
    # eager op-by-op calls: with and without jax.checkpoint (traced and compiled as one program) - not bit equal
    y0, kv0 = run_blocks(blocks, x, remat=False, return_kv=True)
    y1, kv1 = run_blocks(blocks, x, remat=True, return_kv=True)
    assert_close_to_scale(y1, y0, FWD_DEPTH)
    assert_trees_close(kv1, kv0, FWD_DEPTH)
    caches = [init_kv_cache(2, 6, HEADS, DIM // HEADS) for _ in range(DEPTH)]
    pos = jnp.broadcast_to(jnp.arange(4), (2, 4))
    y0, c0 = run_blocks(blocks, x, caches=caches, cache_positions=pos, remat=False)
    y1, c1 = run_blocks(blocks, x, caches=caches, cache_positions=pos, remat=True)
    assert_close_to_scale(y1, y0, FWD_DEPTH)
    assert_trees_close(c1, c0, FWD_DEPTH)
