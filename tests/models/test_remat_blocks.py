"""model.remat_blocks: only the first N blocks of a stack run under the remat policy. run_blocks gives the plain
stack's values, gradients and returned keys/values for every N, unrolled and scanned (a partial stack runs as two
scans whose keys continue the block index, so dropout is the same), and puts exactly N checkpoints in the program."""
import jax
import jax.extend
import jax.numpy as jnp
import pytest
from flax import nnx

from configs import mar as mar_configs
from configs.common import with_fields
from marval_jax.models.factory import model_config
from marval_jax.models.mar import MARConfig
from marval_jax.models.transformer import Block, run_blocks
from marval_jax.user_errors import UserError
from tolerances import assert_close_to_scale, assert_trees_close, transformer_depth

DIM, HEADS, DEPTH = 16, 2, 3
# compiled apart from the plain program (other fusions and reduction orders): the reassociation bound of the stack
# over 5 keys, backward included, plus the weight gradients' sum over 2 x 5 tokens
FWD_DEPTH = transformer_depth(DIM, 5, DEPTH, heads=HEADS, mlp_ratio=2.0)
GRAD_DEPTH = transformer_depth(DIM, 5, DEPTH, heads=HEADS, mlp_ratio=2.0, grad=True, tokens=2 * 5)
LOSS_DEPTH = FWD_DEPTH + 2 * 5 * DIM


def _setup():
    graphdef, params = nnx.split(nnx.List([Block(DIM, HEADS, 2.0, attn_drop=0.1, proj_drop=0.1, rngs=nnx.Rngs(i))
                                           for i in range(DEPTH)]))
    return graphdef, params, jax.random.normal(jax.random.key(0), (2, 5, DIM)), jax.random.key(1)


def _loss(graphdef, x, rng, **kw):
    def loss(params):
        y, kv = run_blocks(nnx.merge(graphdef, params), x, rng=rng, return_kv=True, **kw)
        return jnp.sum(jnp.square(y)), (y, kv)
    return loss


def _has_matmul(j) -> bool:
    return any(e.primitive.name == "dot_general" or any(_has_matmul(s) for s in jax.extend.core.jaxprs_in_params(
        e.params)) for e in j.eqns)


def _checkpoints(fn, *args) -> int:
    """Checkpoints of whole blocks (with matmuls inside), not the LayerNorm / GELU ones of a scan body."""
    count = 0

    def walk(j):
        nonlocal count
        for eqn in j.eqns:
            count += eqn.primitive.name == "remat2" and any(
                _has_matmul(s) for s in jax.extend.core.jaxprs_in_params(eqn.params))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)
    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return count


@pytest.mark.parametrize("scan", [False, True])
def test_partial_remat_is_the_plain_stack_with_n_checkpoints(scan):
    graphdef, params, x, rng = _setup()
    plain = _loss(graphdef, x, rng, scan=scan)
    (l0, (y0, kv0)), g0 = jax.jit(jax.value_and_grad(plain, has_aux=True))(params)
    for n in (0, 1, 2, -1, 7):
        fn = _loss(graphdef, x, rng, scan=scan, remat="dots_saveable", remat_blocks=n)
        (l1, (y1, kv1)), g1 = jax.jit(jax.value_and_grad(fn, has_aux=True))(params)
        assert_close_to_scale(l1, l0, LOSS_DEPTH)
        assert_close_to_scale(y1, y0, FWD_DEPTH)
        assert_trees_close(kv1, kv0, FWD_DEPTH)
        assert_trees_close(g1, g0, GRAD_DEPTH)
        n_remat = DEPTH if n in (-1, 7) else n
        # unrolled: one checkpoint per rematerialised block; scanned: one in the body of the policy's scan
        assert _checkpoints(fn, params) == (min(n_remat, 1) if scan else n_remat), n
    assert _checkpoints(plain, params) == 0


def test_scanned_partial_stack_keeps_the_unrolled_dropout_keys():
    """Two scans (policy on blocks 0-1, none on block 2) give the unrolled loop's dropout masks: without the key
    offset the third block would reuse block 0's key and the outputs would differ by O(1)."""
    graphdef, params, x, rng = _setup()
    blocks = nnx.merge(graphdef, params)
    y_loop, _ = run_blocks(blocks, x, rng=rng)
    y_scan, _ = run_blocks(blocks, x, rng=rng, scan=True, remat="per_block", remat_blocks=2)
    assert_close_to_scale(y_scan, y_loop, FWD_DEPTH)


def test_bad_remat_blocks_is_refused():
    graphdef, params, x, _ = _setup()
    with pytest.raises(ValueError, match="remat_blocks must be >= 0 or -1"):
        run_blocks(nnx.merge(graphdef, params), x, remat="full", remat_blocks=-2)
    with pytest.raises(ValueError, match="remat_blocks must be an integer >= 0 or -1"):
        MARConfig(remat_blocks=-3)
    cfg = with_fields(mar_configs.get_config("tiny"), {"model.remat_blocks": -5})
    with pytest.raises(UserError, match="model.remat_blocks must be an integer >= 0 or -1"):
        model_config(cfg)
