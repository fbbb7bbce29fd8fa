"""MAR pretraining as a Task for the shared loop: state init, the jitted train step, sample grids.

`build_step(config)` is the pure part (reads no file: constructible abstractly, tools/scale_check);
`load_frozen(config)` the loaded part (the tokenizer decoder's weights for grids); `make_mar_task` both.
The model factory (`model_config`, `abstract_model`, `grid_labels`) is marval_jax/models/factory.py; the tokenizer
decoders are marval_jax/checkpoints/decoders.py.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from marval_jax.checkpoints.decoders import frozen_decoder
from marval_jax.losses.mar_loss import mar_loss
from marval_jax.models import mar as mar_lib
from marval_jax.models.factory import abstract_model, grid_labels, model_config
from marval_jax.models.mar import MAR, train_encoder_len
from marval_jax.sampling import ar_sampler
from marval_jax.sampling.from_config import sampler_from_config
from marval_jax.train.loop import Task
from marval_jax.train.optimizer import ema_update, mar_optimizer
from marval_jax.train.state import TrainState


def load_frozen(config) -> dict:
    """The run's frozen inputs, read from files: {"decoder": the tokenizer decoder (grids)}."""
    return {"decoder": frozen_decoder(config, model_config(config))}


def abstract_frozen(config) -> dict:
    """`load_frozen(config)`'s structure and shapes, no file read."""
    return {"decoder": frozen_decoder(config, model_config(config), abstract=True)}


def make_mar_task(config) -> Task:
    """`build_step(config)` with its frozen inputs loaded."""
    return dataclasses.replace(build_step(config), frozen=load_frozen(config))


def build_step(config) -> Task:
    """The pure part of MAR pretraining: state init, train step and grid sampler as functions of the config only
    (the Task's `frozen` is left to the caller: `load_frozen` or `abstract_frozen`)."""
    cfg = model_config(config)
    graphdef, abstract_params = abstract_model(cfg)
    tx = mar_optimizer(config.train, abstract_params)
    enc_len = train_encoder_len(cfg, config.diffusion.mask_ratio_min)
    tc = config.train

    def init_state(rng):
        _, params = nnx.split(MAR(cfg, rngs=nnx.Rngs(params=rng)))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          ema_params=params, rng=jax.random.fold_in(rng, 1))

    def post_init(state, fz=None):  # loads train.init_from's weights, if set (a fresh start only)
        if not config.init_from:
            return state
        from marval_jax.checkpoints.params_io import load_params
        params = load_params(config.init_from, state.params, config.model.to_dict())
        return state.replace(params=params, ema_params=params, opt_state=tx.init(params))

    def train_step(state: TrainState, batch, fz=None):  # fz: the frozen inputs (unused by the step)
        key = jax.random.fold_in(state.rng, state.step)

        def loss_fn(params):
            model = nnx.merge(graphdef, params)
            return mar_loss(model, batch["tokens"], batch["labels"], key,
                            mask_ratio_min=config.diffusion.mask_ratio_min,
                            diffusion_batch_mul=config.diffusion.diffusion_batch_mul, enc_len=enc_len)

        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = ema_update(state.ema_params, params, tc.ema_decay)
        metrics = dict(aux, loss=loss, grad_norm=optax.global_norm(grads))
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema), metrics

    spec = sampler_from_config(config, "teacher_grid")
    predictor = ar_sampler.teacher_predictor(config.sample.num_sampling_steps, config.sample.temperature,
                                             config.sample.clip_denoised)

    def sample_images(state, rng, fz):
        n = tc.grid_size ** 2
        fn = ar_sampler.make_sampler(graphdef, spec, predictor, seq_len=cfg.seq_len, buffer_size=cfg.buffer_size,
                                     token_dim=cfg.token_dim)
        return fz["decoder"](fn(state.ema_params, grid_labels(n, cfg.class_num), rng))

    return Task(name="mar", init_state=init_state, train_step=train_step, logical_axes=mar_lib.LOGICAL_AXES,
                sample_images=sample_images, post_init=post_init)
