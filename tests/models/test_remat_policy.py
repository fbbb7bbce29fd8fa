"""model.remat_policy (models/transformer.py REMAT_POLICIES): every policy gives the MAR training loss and its
gradients of policy "none" (the tiny config of configs/mar.py, float32, dropout and label drop on), and each puts
jax.checkpoint where it says - per transformer block, with dots_saveable's saving rule, and over the diffusion
head's residual blocks for "full"."""
import dataclasses
import functools

import jax
import jax.extend
import numpy as np
import pytest
from flax import nnx

from configs import mar as mar_configs
from configs.common import with_fields
from marval_jax.losses.mar_loss import mar_loss
from marval_jax.models.factory import model_config
from marval_jax.models.mar import MAR, MARConfig, train_encoder_len
from marval_jax.models.transformer import REMAT_POLICIES
from marval_jax.user_errors import UserError
from tolerances import assert_close_to_scale, assert_trees_close, mar_depth

BASE = model_config(mar_configs.get_config("tiny"))
BATCH, MUL = 4, 2
# The rematerialised programs are compiled apart from the plain one (other fusions, other reduction orders): they
# agree to the reassociation bound of the MAR chain (forward, and backward with the weight gradients' sum over the
# batch's head rows); the loss adds its mean over those rows.
TOKENS = BATCH * BASE.seq_len * MUL
LOSS_DEPTH = mar_depth(BASE) + TOKENS
GRAD_DEPTH = mar_depth(BASE, grad=True, tokens=TOKENS)


@functools.lru_cache(maxsize=1)
def _params():
    """The tiny MAR's parameters perturbed (the head's zero-initialised output layers would zero most gradients)."""
    state = nnx.split(MAR(BASE, rngs=nnx.Rngs(0)))[1]
    flat, treedef = jax.tree_util.tree_flatten_with_path(state)
    noise = np.random.default_rng(1)
    return jax.tree_util.tree_unflatten(treedef, [x + 0.1 * noise.standard_normal(x.shape, np.float32)
                                                  for _, x in flat])


def _loss_fn(policy: str):
    return jax.value_and_grad(_loss(policy))


def _loss(policy: str):
    cfg = dataclasses.replace(BASE, remat_policy=policy)
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: MAR(cfg, rngs=nnx.Rngs(0))))
    tokens = jax.random.normal(jax.random.key(4), (BATCH, cfg.seq_len, cfg.token_dim))
    labels = jax.numpy.arange(BATCH) % cfg.class_num

    def loss(params):
        return mar_loss(nnx.merge(graphdef, params), tokens, labels, jax.random.key(6), mask_ratio_min=0.7,
                        diffusion_batch_mul=MUL, enc_len=train_encoder_len(cfg, 0.7))[0]
    return loss


@functools.lru_cache(maxsize=1)
def _reference():
    return jax.jit(_loss_fn("none"))(_params())


@pytest.mark.parametrize("policy", [p for p in REMAT_POLICIES if p != "none"])
def test_each_policy_gives_the_loss_and_gradients_of_none(policy):
    l0, g0 = _reference()
    l1, g1 = jax.jit(_loss_fn(policy))(_params())
    assert_close_to_scale(l1, l0, LOSS_DEPTH)
    assert_trees_close(g1, g0, GRAD_DEPTH)
    assert min(float(np.abs(a).max()) for a in jax.tree_util.tree_leaves(g0)) > 0  # no leaf compared to 0


def _checkpoints(policy: str) -> list:
    """The saving rule of every jax.checkpoint in the loss's jaxpr (None: nothing saveable)."""
    jaxpr = jax.make_jaxpr(_loss(policy))(_params())
    found = []

    def walk(j):
        for eqn in j.eqns:
            if eqn.primitive.name == "remat2":  # jax.checkpoint's primitive
                found.append(eqn.params.get("policy"))
            for sub in jax.extend.core.jaxprs_in_params(eqn.params):
                walk(sub)
    walk(jaxpr.jaxpr)
    return found


def test_each_policy_checkpoints_what_it_says():
    blocks = BASE.encoder_depth + BASE.decoder_depth
    assert _checkpoints("none") == []
    assert _checkpoints("per_block") == [None] * blocks
    assert _checkpoints("dots_saveable") == [jax.checkpoint_policies.dots_saveable] * blocks
    assert _checkpoints("full") == [None] * (blocks + MUL * BASE.diffloss_d)  # mar_loss: one head call per copy
    # "" follows model.remat, as configs written before remat_policy existed
    assert dataclasses.replace(BASE, remat=True).remat_mode == "per_block" and BASE.remat_mode == "none"
    assert dataclasses.replace(BASE, remat=True, remat_policy="none").remat_mode == "none"


def test_bad_policy_is_a_user_error_naming_the_field():
    cfg = with_fields(mar_configs.get_config("tiny"), {"model.remat_policy": "some"})
    with pytest.raises(UserError, match="model.remat_policy must be one of none, dots_saveable, per_block, full"):
        model_config(cfg)
    with pytest.raises(ValueError, match="remat_policy"):
        MARConfig(remat_policy="some")


def test_remat_policy_and_scan_restore_across_values():
    """A checkpoint written with one policy (or before the fields existed) restores with another: same parameters."""
    import dataclasses
    from marval_jax.checkpoints import manager
    from marval_jax.models import mar as mar_lib
    cfg = dataclasses.asdict(mar_lib.MARConfig())
    old = {k: v for k, v in cfg.items() if k not in ("remat_policy", "scan_blocks")}
    manager.check_config({"model": old}, {"model": dict(cfg, remat_policy="full", scan_blocks=True)})
    manager.check_config({"model": dict(cfg, remat_policy="dots_saveable")}, {"model": dict(cfg, remat_policy="none")})
