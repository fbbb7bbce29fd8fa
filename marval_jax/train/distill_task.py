"""GSIM distillation as a Task: role-keyed state (generator and fake score, each with optimizer state and EMA),
alternating updates (`gsim.fake_steps_per_generator_step` fake-score updates, then one generator update) inside one
jitted step, one-step sample grids.

`build_step(config)` is the pure part (reads no file); `load_frozen(config)` loads the frozen inputs: the teacher
(teacher_ckpt) and the tokenizer decoder. The teacher is an input of every step (the Task's `frozen`), not
state: a distillation checkpoint holds the generator, the fake score and the step counter and key only, and a
resumed run reads the teacher from teacher_ckpt again (docs/checkpoints.md). `post_init` (a fresh start only)
initialises the generator and the fake score from the frozen teacher.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from marval_jax.checkpoints.load import load_model_params
from marval_jax.losses.gsim import fake_init_params, make_gsim_losses, onestep_predictor, trainable_mask
from marval_jax.models import mar as mar_lib
from marval_jax.checkpoints.decoders import frozen_decoder
from marval_jax.models.factory import abstract_model, grid_labels, model_config
from marval_jax.sampling import ar_sampler
from marval_jax.sampling.from_config import sampler_from_config
from marval_jax.train.loop import Task
from marval_jax.train.optimizer import ema_update, make_optimizer
from marval_jax.train.state import DistillState, RoleState
from marval_jax.user_errors import UserError


def role_optimizer(role_cfg, train_cfg, trainable=None):
    return make_optimizer(role_cfg.lr, warmup_steps=train_cfg.warmup_steps, total_steps=train_cfg.num_steps,
                          schedule=train_cfg.lr_schedule, min_lr=train_cfg.min_lr, b1=role_cfg.b1, b2=role_cfg.b2,
                          eps=role_cfg.eps, weight_decay=role_cfg.weight_decay, grad_clip=role_cfg.grad_clip,
                          trainable_mask=trainable)


def load_frozen(config) -> dict:
    """The frozen inputs, read from files: {"teacher": teacher_ckpt's params, "decoder": the tokenizer decoder}."""
    cfg = model_config(config)
    if not config.teacher_ckpt:
        raise UserError("distillation needs teacher_ckpt: the MAR teacher's checkpoint directory "
                        "(set --config.teacher_ckpt=DIR)")
    teacher = load_model_params(config.teacher_ckpt, abstract_model(cfg)[1], config.model.to_dict())
    return {"teacher": teacher, "decoder": frozen_decoder(config, cfg)}


def abstract_frozen(config) -> dict:
    """`load_frozen(config)`'s structure and shapes, no file read."""
    cfg = model_config(config)
    return {"teacher": abstract_model(cfg)[1], "decoder": frozen_decoder(config, cfg, abstract=True)}


def make_distill_task(config) -> Task:
    """`build_step(config)` with its frozen inputs (teacher, decoder) loaded."""
    return dataclasses.replace(build_step(config), frozen=load_frozen(config))


def build_step(config) -> Task:
    """The pure part of GSIM distillation: init, step and grid sampler as functions of the config only; the step,
    post_init and sampler take the frozen inputs (`load_frozen` / `abstract_frozen`) as their last argument."""
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
        return DistillState(step=jnp.zeros((), jnp.int32),
                            generator=RoleState(params, gen_tx.init(params), params),
                            fake=RoleState(params, fake_tx.init(params), params),
                            rng=jax.random.fold_in(rng, 1))

    def post_init(state, fz):
        teacher = fz["teacher"]
        fake = fake_init_params(teacher, state.fake.params, fake_init)   # state.fake: the fresh MAR init
        return state.replace(generator=RoleState(teacher, gen_tx.init(teacher), teacher),
                             fake=RoleState(fake, fake_tx.init(fake), fake))

    def update(role: RoleState, tx, loss_fn, ema_decay):
        (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(role.params)
        updates, opt_state = tx.update(grads, role.opt_state, role.params)
        params = optax.apply_updates(role.params, updates)
        ema = ema_update(role.ema_params, params, ema_decay) if ema_decay > 0 else params
        return RoleState(params, opt_state, ema), loss, aux, optax.global_norm(grads)

    def train_step(state: DistillState, batch, fz):
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
            lambda p: losses.generator_loss(graphdef, p, fake.params, fz["teacher"], batch, k),
            config.generator.ema_decay)
        metrics = {**{f"gen/{a}": v for a, v in g_aux.items()}, **{f"fake/{a}": v for a, v in f_aux.items()},
                   "loss": g_loss, "fake_loss": f_loss, "gen/grad_norm": g_gn, "fake/grad_norm": f_gn}
        return state.replace(step=state.step + 1, generator=gen, fake=fake), metrics

    tc = config.train
    spec = sampler_from_config(config, "onestep_grid")
    predictor = onestep_predictor(losses.settings.t_init, losses.settings.noise_scale)

    def sample_images(state, rng, fz):
        fn = ar_sampler.make_sampler(graphdef, spec, predictor,
                                     seq_len=cfg.seq_len, buffer_size=cfg.buffer_size, token_dim=cfg.token_dim)
        return fz["decoder"](fn(state.generator.ema_params, grid_labels(tc.grid_size ** 2, cfg.class_num), rng))

    return Task(name="distill", init_state=init_state, train_step=train_step, logical_axes=mar_lib.LOGICAL_AXES,
                sample_images=sample_images, post_init=post_init, frozen_sharded=("teacher",))
