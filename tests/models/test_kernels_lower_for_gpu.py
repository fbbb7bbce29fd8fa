"""The Pallas kernels lower to Triton for a GPU from this CPU-only machine: MAR-B's training step with
attention_impl "flash" and kernels "pallas" is lowered for the "cuda" platform (jax lowers Pallas kernels to Triton IR
at lowering time, so a kernel op that Triton lacks - erf, a load whose shape is not a power of two, an unsigned
compare - fails here, not on the accelerator). Nothing is compiled for, or run on, a GPU: the PTX compile and the
numbers are the device's (docs/kernels.md)."""
import dataclasses
from unittest import mock

import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from configs.mar import model_config
from marval_jax.losses.mar_loss import mar_loss
from marval_jax.models.mar import MAR, MARConfig, train_encoder_len

TRITON_CALL = "__gpu$xla.gpu.triton"


def _lowered_train_step(**fields) -> str:
    cfg = dataclasses.replace(MARConfig.from_dict(dict(model_config("base"))), **fields)
    graphdef, params = nnx.split(nnx.eval_shape(lambda: MAR(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    tokens = jax.ShapeDtypeStruct((2, cfg.seq_len, cfg.token_dim), jnp.float32)
    labels = jax.ShapeDtypeStruct((2,), jnp.int32)

    def loss(params, tokens, labels):
        return mar_loss(nnx.merge(graphdef, params), tokens, labels, jax.random.key(0), mask_ratio_min=0.7,
                        diffusion_batch_mul=4, enc_len=train_encoder_len(cfg, 0.7))[0]
    with mock.patch.object(jax, "default_backend", lambda: "gpu"):  # the kernels' "can it run here" checks
        traced = jax.jit(jax.value_and_grad(loss)).trace(params, tokens, labels)
        return traced.lower(lowering_platforms=("cuda",)).as_text()


@pytest.mark.skipif(jax.default_backend() == "gpu", reason="the GPU runs the kernels themselves (tests/kernels)")
def test_mar_b_training_step_with_both_kernels_lowers_to_triton():
    cfg = MARConfig.from_dict(dict(model_config("base")))
    blocks = cfg.encoder_depth + cfg.decoder_depth
    # per block: flash forward, its dk/dv and dq kernels, and the two LayerNorm-GEMM kernels (their backward is XLA)
    assert _lowered_train_step(attention_impl="flash", kernels="pallas").count(TRITON_CALL) == 5 * blocks
    assert _lowered_train_step(attention_impl="xla").count(TRITON_CALL) == 0  # the calls are the kernels'
