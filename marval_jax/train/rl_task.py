"""MARVAL-RL as a Task: reward backpropagation through K AR iterations of the one-step generator.

Labels are drawn uniformly per step from the step key. `build_step(config)` is the pure part (reads no file);
`load_frozen(config)` loads the task's `frozen` pytree: the reward (a `models.factory.Frozen`: weights and apply
function), the prompt embeddings and the tokenizer decoder, arguments of the jitted step, not constants baked into
it. `make_rl_task` first resolves the generator's t_init / noise_scale from the student's record, then both.

rl.regularizer = "gsim": the regulariser is GSIM's generator loss (`make_gsim_losses(config.rl.gsim, ...)`) on
real-data contexts, against the frozen teacher (`teacher_ckpt`) and a frozen fake score (`fake_ckpt`, "" = the
teacher); both go into `frozen["gsim"]` (`load_frozen`). Only then does the task read data (uses_data): the batch's tokens and
labels are the contexts; the RL labels are still drawn per step.
"""
from __future__ import annotations

import dataclasses
import logging

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from marval_jax.checkpoints.load import load_model_params
from marval_jax.losses.gsim import make_gsim_losses, onestep_predictor, trainable_mask
from marval_jax.losses.rl import format_prompts, make_rl_loss
from marval_jax.models import mar as mar_lib
from marval_jax.checkpoints.decoders import frozen_decoder
from marval_jax.models.factory import Frozen, abstract_model, grid_labels, model_config
from marval_jax.sampling import ar_sampler
from marval_jax.sampling.from_config import sampler_from_config
from marval_jax.train.distill_task import role_optimizer
from marval_jax.train.loop import Task
from marval_jax.train.optimizer import ema_update
from marval_jax.train.state import RLState
from marval_jax.user_errors import UserError


def class_names(config) -> list[str]:
    if config.rl.class_names_file:
        with open(config.rl.class_names_file) as f:
            names = [line.strip() for line in f if line.strip()]
    elif config.data.name in ("fashion_mnist", "mnist", "folder"):   # the data set's own (folder: sub-folders)
        from marval_jax.data.pipeline import class_names as data_class_names
        names = data_class_names(config.data)
    else:
        raise ValueError(f"rl.reward={config.rl.reward!r} needs class names for its prompts: set "
                         f"rl.class_names_file (one name per line, {config.model.class_num} lines)")
    if len(names) != config.model.class_num:
        raise ValueError(f"{len(names)} class names for {config.model.class_num} classes")
    return names


def resolve_generator(config) -> None:
    """generator.t_init / noise_scale of the run, written into `config` (so the run's checkpoints record them):
    a value >= 0 is the user's (logged where student_ckpt records another), -1 takes the student's record
    (checkpoints/params_io.recorded_generator), else configs/marval.py's defaults."""
    from marval_jax.models.generator import T_INIT
    from marval_jax.checkpoints.params_io import recorded_generator
    rec = recorded_generator(config.student_ckpt) if config.student_ckpt else None
    for field, fallback in (("t_init", T_INIT), ("noise_scale", 1.0)):
        value = config.generator[field]
        if value >= 0:
            if rec is not None and rec[field] != value:
                logging.warning("generator.%s=%s overrides the value %s recorded by student_ckpt %s", field, value,
                                rec[field], config.student_ckpt)
        else:
            value = rec[field] if rec is not None else fallback
        config.generator[field] = type(config.generator[field])(value)


def load_frozen(config) -> dict:
    """The frozen inputs, read from files: {"reward": Frozen(reward weights, reward.fn), "prompts": the class
    prompts' embeddings (text rewards) or None, "decoder": the tokenizer decoder, and with rl.regularizer="gsim"
    "gsim": {"teacher", "fake"} params}."""
    from marval_jax.rewards.registry import make_reward
    cfg = model_config(config)
    reward = make_reward(config.rl.reward, config.rl.reward_config.to_dict())
    prompt_emb = None
    if reward.prepare_fn is not None:  # text rewards: prompt embeddings computed once per run
        prompts = format_prompts(config.rl.prompt_template, class_names(config))
        prompt_emb = reward.prepare(reward.params, prompts)
    frozen = {"reward": Frozen(reward.params, reward.fn), "prompts": prompt_emb,
              "decoder": frozen_decoder(config, cfg)}
    if config.rl.regularizer == "gsim":
        if not config.teacher_ckpt:
            raise UserError("rl.regularizer='gsim' needs teacher_ckpt: the MAR teacher's checkpoint directory "
                            "(set --config.teacher_ckpt=DIR)")
        abstract_params = abstract_model(cfg)[1]
        teacher = load_model_params(config.teacher_ckpt, abstract_params, config.model.to_dict())
        fake = (load_model_params(config.fake_ckpt, abstract_params, config.model.to_dict())
                if config.fake_ckpt else teacher)
        frozen["gsim"] = {"teacher": teacher, "fake": fake}
    return frozen


def make_rl_task(config) -> Task:
    """The generator's settings resolved from the student's record, then `build_step(config)` with its frozen
    inputs loaded."""
    resolve_generator(config)
    frozen = load_frozen(config)
    return dataclasses.replace(build_step(config), frozen=frozen)


def build_step(config) -> Task:
    """The pure part of RL: init, step and grid sampler as functions of the config only; the step, post_init and
    sampler take the frozen inputs (`load_frozen`, or abstract ones of the same structure) as their last
    argument."""
    cfg = model_config(config)
    graphdef, abstract_params = abstract_model(cfg)
    use_gsim = config.rl.regularizer == "gsim"
    gsim = make_gsim_losses(config.rl.gsim, config.generator, cfg) if use_gsim else None
    spec = sampler_from_config(config, "rl")

    def loss_with(fz, batch=None):
        """The RL loss over the frozen inputs `fz` (traced arguments inside the step); `batch` holds the GSIM
        regulariser's contexts."""
        decode = lambda tokens: fz["decoder"](tokens)  # noqa: E731
        reward_fn = lambda images, labels=None: fz["reward"](images, labels, fz["prompts"])  # noqa: E731
        reg_fn = None
        if use_gsim:
            def reg_fn(gd, params, labels, rng):   # labels: the RL step's; GSIM uses the batch's own with its tokens
                ctx = {"tokens": batch["tokens"], "labels": batch["labels"]}
                return gsim.generator_loss(gd, params, fz["gsim"]["fake"], fz["gsim"]["teacher"], ctx, rng)[0]
        return make_rl_loss(config.rl, config.generator, cfg, decode, reward_fn, reg_fn=reg_fn, spec=spec)

    settings = loss_with(None).settings  # config errors now, not at the first step's trace
    tx = role_optimizer(config.generator, config.train,
                        trainable_mask(abstract_params, config.generator.trainable)
                        if config.generator.trainable != "all" else None)
    tc = config.train

    def init_state(rng):
        _, params = nnx.split(mar_lib.MAR(cfg, rngs=nnx.Rngs(params=rng)))
        return RLState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params), ema_params=params,
                       ref_params=params, rng=jax.random.fold_in(rng, 1))

    def post_init(state, fz):  # the student's weights (student_ckpt; ref_ckpt's for the reference), a fresh start
        student = load_model_params(config.student_ckpt, state.params, config.model.to_dict())
        ref = load_model_params(config.ref_ckpt, state.params, config.model.to_dict()) if config.ref_ckpt else student
        return state.replace(params=student, opt_state=tx.init(student), ema_params=student, ref_params=ref)

    def train_step(state: RLState, batch, fz):
        loss_fn = loss_with(fz, batch)
        key = jax.random.fold_in(state.rng, state.step)
        r_lab, r_loss = jax.random.split(key)
        # derived from the batch-sharded input so the trajectory stays batch-sharded (a fresh randint array is
        # replicated, and every device would sample the global batch; found by tools/scale_check)
        labels = (batch["labels"] + jax.random.randint(r_lab, batch["labels"].shape, 0, cfg.class_num)) % cfg.class_num
        (loss, aux), grads = jax.value_and_grad(
            lambda p: loss_fn(graphdef, p, state.ref_params, labels, r_loss), has_aux=True)(state.params)
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        ema = ema_update(state.ema_params, params, config.generator.ema_decay)
        metrics = dict(aux, loss=loss, grad_norm=optax.global_norm(grads))
        return state.replace(step=state.step + 1, params=params, opt_state=opt_state, ema_params=ema), metrics

    def sample_images(state, rng, fz):
        predictor = onestep_predictor(settings.t_init, settings.noise_scale)
        fn = ar_sampler.make_sampler(graphdef, spec, predictor,
                                     seq_len=cfg.seq_len, buffer_size=cfg.buffer_size, token_dim=cfg.token_dim)
        return fz["decoder"](fn(state.ema_params, grid_labels(tc.grid_size ** 2, cfg.class_num), rng))

    return Task(name="rl", init_state=init_state, train_step=train_step, logical_axes=mar_lib.LOGICAL_AXES,
                sample_images=sample_images, post_init=post_init, uses_data=use_gsim,
                frozen_sharded=("gsim",))
