"""GSIM distillation as a Task: role-keyed state (frozen teacher, generator and fake score each with optimizer
state and EMA), alternating updates (`gsim.fake_steps_per_generator_step` fake-score updates, then one generator
update) inside one jitted step, one-step sample grids."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from marval_jax.checkpoints.load import load_model_params
from marval_jax.losses.gsim import fake_init_params, make_gsim_losses, onestep_predictor, trainable_mask
from marval_jax.models import mar as mar_lib
from marval_jax.sampling import ar_sampler
from marval_jax.train.loop import Task
from marval_jax.train.mar_task import abstract_model, decoder_fn, grid_labels, model_config
from marval_jax.train.optimizer import ema_update, make_optimizer
from marval_jax.train.state import DistillState, RoleState
from marval_jax.user_errors import UserError


def role_optimizer(role_cfg, train_cfg, trainable=None):
    return make_optimizer(role_cfg.lr, warmup_steps=train_cfg.warmup_steps, total_steps=train_cfg.num_steps,
                          schedule=train_cfg.lr_schedule, min_lr=train_cfg.min_lr, b1=role_cfg.b1, b2=role_cfg.b2,
                          eps=role_cfg.eps, weight_decay=role_cfg.weight_decay, grad_clip=role_cfg.grad_clip,
                          trainable_mask=trainable)


def make_distill_task(config) -> Task:
    cfg = model_config(config)
    graphdef, abstract_params = abstract_model(cfg)
    losses = make_gsim_losses(config.gsim, config.generator, cfg)
    gen_tx = role_optimizer(config.generator, config.train,
                            trainable_mask(abstract_params, config.generator.trainable)
                            if config.generator.trainable != "all" else None)
    fake_tx = role_optimizer(config.fake_score, config.train)
    n_fake = int(config.gsim.fake_steps_per_generator_step)
    if n_fake < 1:
        raise UserError(f"gsim.fake_steps_per_generator_step must be >= 1, got {n_fake}")
    fake_init = config.fake_score.get("init", "teacher")
    fake_init_params(abstract_params, abstract_params, fake_init)   # a bad fake_score.init fails now

    def init_state(rng):
        _, params = nnx.split(mar_lib.MAR(cfg, rngs=nnx.Rngs(params=rng)))
        return DistillState(step=jnp.zeros((), jnp.int32), teacher=params,
                            generator=RoleState(params, gen_tx.init(params), params),
                            fake=RoleState(params, fake_tx.init(params), params),
                            rng=jax.random.fold_in(rng, 1))

    def post_init(state):
        teacher = load_model_params(config.teacher_ckpt, state.teacher, config.model.to_dict())
        fake = fake_init_params(teacher, state.fake.params, fake_init)   # state.fake: the fresh MAR init
        return state.replace(teacher=teacher, generator=RoleState(teacher, gen_tx.init(teacher), teacher),
                             fake=RoleState(fake, fake_tx.init(fake), fake))

    def update(role: RoleState, tx, loss_fn, ema_decay):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(role.params)
        updates, opt_state = tx.update(grads, role.opt_state, role.params)
        params = optax.apply_updates(role.params, updates)
        ema = ema_update(role.ema_params, params, ema_decay) if ema_decay > 0 else params
        return RoleState(params, opt_state, ema), loss, aux, optax.global_norm(grads)

    def train_step(state: DistillState, batch):
        key = jax.random.fold_in(state.rng, state.step)
        fake = state.fake
        for i in range(n_fake):
            k = jax.random.fold_in(key, i)
            fake, f_loss, f_aux, f_gn = update(
                fake, fake_tx, lambda p: losses.fake_score_loss(graphdef, p, state.generator.params, batch, k),
                config.fake_score.ema_decay)
        k = jax.random.fold_in(key, n_fake)
        gen, g_loss, g_aux, g_gn = update(
            state.generator, gen_tx,
            lambda p: losses.generator_loss(graphdef, p, fake.params, state.teacher, batch, k),
            config.generator.ema_decay)
        metrics = {**{f"gen/{a}": v for a, v in g_aux.items()}, **{f"fake/{a}": v for a, v in f_aux.items()},
                   "loss": g_loss, "fake_loss": f_loss, "gen/grad_norm": g_gn, "fake/grad_norm": f_gn}
        return state.replace(step=state.step + 1, generator=gen, fake=fake), metrics

    decode = decoder_fn(config, cfg)
    tc = config.train
    spec = ar_sampler.SamplerSpec(num_iter=tc.sample_num_iter, num_buckets=config.sample.num_buckets)

    def sample_images(state, rng):
        predictor = onestep_predictor(losses.settings.t_init, losses.settings.noise_scale)
        fn = ar_sampler.make_sampler(graphdef, spec, predictor,
                                     seq_len=cfg.seq_len, buffer_size=cfg.buffer_size, token_dim=cfg.token_dim)
        return decode(fn(state.generator.ema_params, grid_labels(tc.grid_size ** 2, cfg.class_num), rng))

    return Task(name="distill", init_state=init_state, train_step=train_step, logical_axes=mar_lib.LOGICAL_AXES,
                sample_images=sample_images, post_init=post_init)
