"""Data-parallel, FSDP and data x tensor meshes give the single-device loss and gradients (8 forced CPU devices;
run in its own process by tests/run_all.sh with XLA_FLAGS=--xla_force_host_platform_device_count=8)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import common, mar as mar_configs
from marval_jax.losses.mar_loss import mar_loss
from marval_jax.models import mar as mar_lib
from marval_jax.models.mar import MAR, MARConfig, train_encoder_len
from marval_jax.parallel import mesh as mesh_lib, sharding as shd
from tolerances import assert_close_to_scale, assert_trees_close, mar_depth

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (run via tests/run_all.sh)")


def _config():
    return MARConfig(**dict(mar_configs.get_config("tiny").model.to_dict(), encoder_embed_dim=64,
                            decoder_embed_dim=64, encoder_num_heads=4, decoder_num_heads=4, diffloss_w=64))


def _setup():
    cfg = _config()
    graphdef, params = nnx.split(MAR(cfg, rngs=nnx.Rngs(0)))
    batch = {"tokens": jax.random.normal(jax.random.PRNGKey(1), (16, cfg.seq_len, cfg.token_dim)),
             "labels": jnp.arange(16) % cfg.class_num}
    enc_len = train_encoder_len(cfg, 0.7)

    def loss_fn(params, batch):
        model = nnx.merge(graphdef, params)
        return mar_loss(model, batch["tokens"], batch["labels"], jax.random.PRNGKey(2), mask_ratio_min=0.7,
                        diffusion_batch_mul=2, enc_len=enc_len, train=False)[0]
    return params, batch, jax.value_and_grad(loss_fn)


@pytest.fixture(scope="module")
def single_device():
    """(params, batch, value-and-grad function, its loss and gradients on one device): computed once for every mesh."""
    params, batch, vg = _setup()
    with jax.default_device(jax.devices()[0]):
        ref_loss, ref_grads = jax.jit(vg)(params, batch)
    return params, batch, vg, ref_loss, ref_grads


@pytest.mark.parametrize("shape", [dict(data=8, fsdp=1, tensor=1), dict(data=1, fsdp=8, tensor=1),
                                   dict(data=4, fsdp=1, tensor=2), dict(data=2, fsdp=2, tensor=2)])
def test_mesh_matches_single_device(single_device, shape):
    params, batch, vg, ref_loss, ref_grads = single_device
    mcfg = common.mesh_config(**shape)
    mesh = mesh_lib.make_mesh(mcfg)
    specs = shd.param_specs(params, mar_lib.LOGICAL_AXES, mesh, mcfg.logical_axis_rules)
    p_shd = shd.named(mesh, specs)
    b_shd = shd.batch_sharding(mesh, mcfg.logical_axis_rules)
    sharded_params = jax.device_put(params, p_shd)
    if shape["fsdp"] > 1 or shape["tensor"] > 1:  # something is really sharded
        assert any(len(x.sharding.device_set) > 1 and not x.sharding.is_fully_replicated
                   for x in jax.tree_util.tree_leaves(sharded_params))
    loss, grads = jax.jit(vg, in_shardings=(p_shd, b_shd), out_shardings=(None, p_shd))(
        sharded_params, jax.device_put(batch, b_shd))
    # The sharded program sums the batch (and FSDP / tensor-split contractions) in per-device partial sums plus an
    # all-reduce: another order than one device's, so the two agree to the reassociation bound (tests/tolerances.py)
    # of the MAR forward (+ backward) chain, the loss's mean / the weight gradients' sum over the batch's tokens.
    cfg = _config()
    tokens = batch["tokens"].shape[0] * cfg.seq_len * 2  # diffusion_batch_mul=2
    assert_close_to_scale(float(loss), float(ref_loss), mar_depth(cfg) + tokens)
    assert_trees_close(jax.device_get(grads), jax.device_get(ref_grads), mar_depth(cfg, grad=True, tokens=tokens))


def test_bad_mesh_is_a_clear_error():
    with pytest.raises(ValueError, match="needs 16 devices"):
        mesh_lib.make_mesh(common.mesh_config(data=4, fsdp=2, tensor=2))
