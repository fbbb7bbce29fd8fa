"""MAR pretraining as a Task for the shared loop: state init, the jitted train step, sample grids."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from marval_jax.losses.mar_loss import mar_loss
from marval_jax.models import mar as mar_lib
from marval_jax.models.mar import MAR, MARConfig, train_encoder_len
from marval_jax.sampling import ar_sampler
from marval_jax.sampling.from_config import sampler_from_config
from marval_jax.train.loop import Task
from marval_jax.train.optimizer import ema_update, mar_optimizer
from marval_jax.train.state import TrainState


def model_config(config) -> MARConfig:
    return MARConfig(**config.model.to_dict())


def abstract_model(cfg: MARConfig):
    """(graphdef, abstract params) without allocating."""
    return nnx.split(nnx.eval_shape(lambda: MAR(cfg, rngs=nnx.Rngs(0))))


def decoder_parts(config, cfg: MARConfig):
    """(decode(params, tokens (B, S, C)) -> images NHWC in [-1, 1], params): the tokenizer's decoder as a pure function
    of its weights (None for pixel patches; the KL-16 VAE's for latents), so a jitted step can take them as an
    argument."""
    tok = config.tokenizer
    if tok.kind == "pixel_patch":
        from marval_jax.data.tokenizers import PixelPatchTokenizer
        size = cfg.grid * tok.patch_size
        patches = PixelPatchTokenizer(tok.patch_size, tok.channels, size, size)
        return (lambda params, tokens: patches.decode(tokens)), None
    if tok.kind == "vae":
        from marval_jax.checkpoints.convert_vae import vae_decoder_parts
        return vae_decoder_parts(tok, cfg)
    raise ValueError(f"tokenizer.kind must be 'pixel_patch' or 'vae', got {tok.kind!r}")


def decoder_fn(config, cfg: MARConfig):
    """tokens (B, S, C) -> images NHWC in [-1, 1] for grids (the decoder's weights closed over)."""
    decode, params = decoder_parts(config, cfg)
    return lambda tokens: decode(params, tokens)


def grid_labels(n: int, class_num: int) -> jax.Array:
    return jnp.arange(n) % class_num


def make_mar_task(config) -> Task:
    cfg = model_config(config)
    graphdef, abstract_params = abstract_model(cfg)
    tx = mar_optimizer(config.train, abstract_params)
    enc_len = train_encoder_len(cfg, config.diffusion.mask_ratio_min)
    decode = decoder_fn(config, cfg)
    tc = config.train

    def init_state(rng):
        _, params = nnx.split(MAR(cfg, rngs=nnx.Rngs(params=rng)))
        return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          ema_params=params, rng=jax.random.fold_in(rng, 1))

    def post_init(state):
        if not config.init_from:
            return state
        from marval_jax.checkpoints.params_io import load_params
        params = load_params(config.init_from, state.params, config.model.to_dict())
        return state.replace(params=params, ema_params=params, opt_state=tx.init(params))

    def train_step(state: TrainState, batch):
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

    def sample_images(state, rng):
        n = tc.grid_size ** 2
        fn = ar_sampler.make_sampler(graphdef, spec, predictor, seq_len=cfg.seq_len, buffer_size=cfg.buffer_size,
                                     token_dim=cfg.token_dim)
        return decode(fn(state.ema_params, grid_labels(n, cfg.class_num), rng))

    return Task(name="mar", init_state=init_state, train_step=train_step, logical_axes=mar_lib.LOGICAL_AXES,
                sample_images=sample_images, post_init=post_init)
