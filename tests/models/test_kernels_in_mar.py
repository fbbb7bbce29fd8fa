"""The Pallas kernels inside MAR's training step: attention_impl "flash" (the encoder's key-padding mask, the
decoder's unmasked attention) and kernels "pallas" (every block's LayerNorm -> Linear pairs), here in Pallas'
interpreter on the reference fixture's tiny MAR (2 + 2 blocks, width 64, 4 heads of 16). Without dropout the loss and
its gradients equal the XLA model's to the MAR chain's reassociation bound; with dropout (the kernel's own bits) the
step stays finite and its loss near the XLA model's."""
import dataclasses

import jax
import numpy as np
from flax import nnx

from tests.models.test_scan_blocks import BATCH, MUL, _fixture_model, _loss
from tolerances import assert_close_to_scale, assert_trees_close, mar_depth

KERNELS = dict(attention_impl="flash_interpret", kernels="pallas_interpret")


def test_training_loss_and_gradients_with_the_kernels_equal_the_xla_model():
    model, cfg, _ = _fixture_model(False)
    assert cfg.dtype == "float32" and cfg.attn_dropout == 0.0
    params = nnx.state(model, nnx.Param)
    tokens = BATCH * cfg.seq_len * MUL
    l0, g0 = jax.jit(jax.value_and_grad(_loss(cfg)))(params)
    l1, g1 = jax.jit(jax.value_and_grad(_loss(dataclasses.replace(cfg, **KERNELS))))(params)
    assert_close_to_scale(l1, l0, mar_depth(cfg) + tokens)
    assert_trees_close(g1, g0, mar_depth(cfg, grad=True, tokens=tokens))


def test_training_with_attention_dropout_through_the_flash_kernel_is_finite():
    model, cfg, _ = _fixture_model(False)
    params = nnx.state(model, nnx.Param)
    drop = dict(attn_dropout=0.1, proj_dropout=0.1)
    l0 = jax.jit(_loss(dataclasses.replace(cfg, **drop)))(params)
    l1, g1 = jax.jit(jax.value_and_grad(_loss(dataclasses.replace(cfg, **drop, **KERNELS))))(params)
    assert np.isfinite(float(l1)) and all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(g1))
    # the same keys for the masking, the noise and the projection dropout; only the attention dropout's bits differ
    # (the kernel's hash, not jax.random), which moves this random model's loss (~0.99) by ~1e-4: 5% is a sanity
    # bound (the kernel's own tests pin the dropout's statistics)
    assert abs(float(l1) - float(l0)) < 0.05 * float(l0)
