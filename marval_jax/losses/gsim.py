"""GSIM (Guided Score Implicit Matching): MARVAL's distillation objective (docs/method.md section 2, docs/gsim.md).

Two pure losses built by `make_gsim_losses` from the config, over the shared MAR graphdef and three parameter
states (generator theta, fake score phi, teacher):

  generator_loss(graphdef, gen_params, fake_params, teacher_params, batch, rng) -> (loss, metrics)
  fake_score_loss(graphdef, fake_params, gen_params, batch, rng) -> (loss, metrics)

Contexts come from real data: one MAR mask ratio per batch (truncated normal on [mask_ratio_min, 1]), a random order
per sample; the generator predicts ALL masked tokens with one head call at t_init from its own condition on the
ground-truth visible tokens and the class. x0 = visible ground truth + generated masked tokens; only the masked
tokens are diffused (x_t = sqrt(abar_t) x0 + sigma_t eps) and enter the loss. With y = (eps_p^w - eps_phi) / sigma_t:

  L1 = - d'(y) . (eps - eps_phi) / sigma_t        L2 = d(y)
  L = weight(t) * (L1 + alpha L2),  alpha = gsim.l2_weight (1), 0 when gsim.use_l2_term is False

y is in score units; gsim.weighting "sid" first scales y and the L1 residual to x0 units (`residual_scale`), "kl"
weights the score-unit terms by beta_t (`gsim_weights`; docs/gsim.md derives both).

Teacher and fake-score PARAMETERS are frozen (stop_gradient) but gradients flow through their inputs x_t, and d'(y)
is NOT stop-gradiented (`gsim.stop_grad_dprime` = True is the ablation that does): then grad(L1 + L2) is the
total derivative of E_{x_t ~ q_theta} d(s_q - s_p) when s_phi is
the student's score (tests/losses/test_gsim.py checks this in closed form).

The core math is in small pure functions over arrays (`distance_terms`, `gsim_terms`, `gsim_weights`,
`residual_scale`, `reduce_groups`, `guidance_weight`, `sample_context`, `sample_timesteps`), testable in closed
form.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from marval_jax.diffusion.gaussian import NUM_TRAIN_TIMESTEPS, GaussianDiffusion
from marval_jax.models.generator import T_INIT, one_step
from marval_jax.models.mar import MARConfig, gen_rank_from_orders, train_encoder_len
from marval_jax.sampling.schedule import ar_schedule, mask_from_orders, random_orders, sample_mask_ratio
from marval_jax.user_errors import UserError

DISTANCES = ("pseudo_huber", "l2", "squared_l2")
NORM_AXES = ("token", "image")
WEIGHTINGS = ("none", "sid", "kl")
GUIDANCE_SCHEDULES = ("constant", "linear")
TRAINABLE = ("all", "head_only")
T_SAMPLINGS = ("uniform", "logit_normal")
FAKE_INITS = ("teacher", "fresh_head")   # fake_score.init (train/distill_task.py)
HEAD_MODULE = "diffloss_net"  # parameters of the per-token diffusion head live under this name

_SAFE_SQ = 1e-30   # floor of |y|^2 for the (unsmoothed) l2 distance: keeps d'(y) finite at y = 0
_SID_MIN = 1e-5    # floor of SiD's mean |x0 - x0_teacher| (as in the SiD code)


# -- closed-form pieces -------------------------------------------------------------------------------------------
def distance_terms(sq_norm: jax.Array, distance: str, huber_r: float) -> tuple[jax.Array, jax.Array]:
    """From |y|^2 per group: (d(y), c) with d'(y) = c * y.

    pseudo_huber: d = sqrt(|y|^2 + r^2) - r, d' = y / sqrt(|y|^2 + r^2)
    l2:           d = |y|,                   d' = y / |y|
    squared_l2:   d = |y|^2,                 d' = 2 y
    """
    if distance == "pseudo_huber":
        root = jnp.sqrt(sq_norm + huber_r ** 2)
        return root - huber_r, 1.0 / root
    if distance == "l2":
        root = jnp.sqrt(jnp.maximum(sq_norm, _SAFE_SQ))
        return root, 1.0 / root
    if distance == "squared_l2":
        return sq_norm, jnp.full_like(sq_norm, 2.0)
    raise UserError(f"gsim.distance must be one of {DISTANCES}, got {distance!r}")


def _group_axes(ndim: int, norm_axes: str) -> tuple[int, ...]:
    if norm_axes == "token":
        return (ndim - 1,)
    if norm_axes == "image":
        return tuple(range(1, ndim))
    raise UserError(f"gsim.norm_axes must be one of {NORM_AXES}, got {norm_axes!r}")


def gsim_terms(eps_teacher_guided: jax.Array, eps_fake: jax.Array, eps: jax.Array, sigma: jax.Array, *,
               distance: str = "pseudo_huber", huber_r: float = 1e-5, use_l2_term: bool = True,
               norm_axes: str = "token", mask: jax.Array | None = None,
               unit_scale: jax.Array | float = 1.0, l2_weight: float = 1.0,
               stop_grad_dprime: bool = False) -> dict[str, jax.Array]:
    """Per-group GSIM terms. Arrays (B, S, C) (any (B, ..., C)); sigma broadcastable to them; mask (B, S) with
    1 = token in the loss (masked by the AR context), None = all.

    `unit_scale` (broadcastable like sigma, stop-gradiented by the caller) multiplies both residuals: 1 keeps them
    in score units; `residual_scale("sid", t)` = sigma_t^2 / sqrt(abar_t) puts them in x0 units (the distance then
    sees f_phi - f_p, the difference of the two x0-predictions).

    Groups: norm_axes "token" -> one per token, outputs (B, S); "image" -> one per sample over its masked tokens'
    channels, outputs (B,). Returns y_norm = |y|, l1, l2 = l2_weight * d(y) (zero when use_l2_term is False) and
    loss = l1 + l2. By default nothing is stop-gradiented: d'(y) keeps its gradient (see the module docstring);
    `stop_grad_dprime` puts d'(y) in L1 under stop_gradient (the SIM paper's form: same value, other gradient).
    """
    y = unit_scale * (eps_teacher_guided - eps_fake) / sigma
    g = unit_scale * (eps - eps_fake) / sigma        # s_phi(x_t) - grad log q(x_t | x0)
    if mask is not None:
        m = mask.astype(y.dtype).reshape(mask.shape + (1,) * (y.ndim - mask.ndim))
        y, g = y * m, g * m
    axes = _group_axes(y.ndim, norm_axes)
    sq = jnp.sum(y * y, axis=axes)
    d, c = distance_terms(sq, distance, huber_r)
    if stop_grad_dprime:
        l1 = -jnp.sum(jax.lax.stop_gradient(jnp.expand_dims(c, axes) * y) * g, axis=axes)
    else:
        l1 = -c * jnp.sum(y * g, axis=axes)
    l2 = l2_weight * d if use_l2_term else jnp.zeros_like(d)
    return {"y_norm": jnp.sqrt(sq), "l1": l1, "l2": l2, "loss": l1 + l2}


def gsim_weights(weighting: str, *, t: jax.Array, x0: jax.Array | None = None,
                 x0_teacher: jax.Array | None = None, norm_axes: str = "token",
                 mask: jax.Array | None = None) -> jax.Array:
    """Per-group weight of L1 + L2, stop-gradiented (docs/gsim.md "Weightings" derives each one).

    none: 1 (terms in score units).
    kl:   beta_t of the 1000-step chain, on the score-unit residual y: with squared_l2,
          sum_t 1/2 beta_t E|y_t|^2 is the discrete path-KL estimate of KL(q_0 || p_0).
    sid:  1 / max(mean |x0 - x0_teacher|, 1e-5), the mean over the group's (masked) channels: SiD's normaliser, an
          x0-unit quantity, so it weights terms whose residuals are in x0 units (`residual_scale("sid", t)`).
    t: int chain indices shaped like a group (B, S) for token, (B,) for image.
    """
    if weighting == "none":
        return jnp.ones(t.shape, jnp.float32)
    if weighting == "kl":
        return jnp.asarray(_chain().betas, jnp.float32)[t]
    if weighting == "sid":
        diff = jnp.abs(jax.lax.stop_gradient(x0 - x0_teacher))
        axes = _group_axes(diff.ndim, norm_axes)
        if mask is None:
            mean = jnp.mean(diff, axis=axes)
        else:
            m = mask.astype(diff.dtype).reshape(mask.shape + (1,) * (diff.ndim - mask.ndim))
            count = jnp.maximum(jnp.sum(jnp.broadcast_to(m, diff.shape), axis=axes), 1.0)
            mean = jnp.sum(diff * m, axis=axes) / count
        return 1.0 / jnp.maximum(mean, _SID_MIN)
    raise UserError(f"gsim.weighting must be one of {WEIGHTINGS}, got {weighting!r}")


def residual_scale(weighting: str, t: jax.Array) -> jax.Array:
    """Units of the residuals the distance sees, as a factor on the score-unit y and g (shaped like t).

    none, kl: 1 (score units). sid: sigma_t^2 / sqrt(abar_t): by Tweedie x0_hat = (x_t + sigma_t^2 s) / sqrt(abar_t),
    so sigma_t^2 / sqrt(abar_t) * (s_phi - s_p) = f_phi - f_p, the x0-prediction residual SiD's loss is written in.
    """
    if weighting in ("none", "kl"):
        return jnp.ones(t.shape, jnp.float32)
    if weighting == "sid":
        abar = jnp.asarray(_chain().alphas_cumprod, jnp.float32)[t]
        return (1.0 - abar) / jnp.sqrt(abar)
    raise UserError(f"gsim.weighting must be one of {WEIGHTINGS}, got {weighting!r}")


def reduce_groups(values: jax.Array, mask: jax.Array, norm_axes: str) -> jax.Array:
    """Average per-group values over the masked tokens and the batch.

    token: sum over masked tokens / number of masked tokens. image: each sample's value (a sum over its masked
    tokens) divided by its number of masked tokens, then the batch mean - so squared_l2 gives the same loss for both.
    """
    mask = mask.astype(jnp.float32)
    if norm_axes == "token":
        return jnp.sum(values * mask) / jnp.maximum(jnp.sum(mask), 1.0)
    if norm_axes == "image":
        return jnp.mean(values / jnp.maximum(jnp.sum(mask, axis=1), 1.0))
    raise UserError(f"gsim.norm_axes must be one of {NORM_AXES}, got {norm_axes!r}")


def guidance_weight(guidance_scale: float, schedule: str, num_visible: jax.Array | int, seq_len: int) -> jax.Array:
    """Teacher CFG scale in MAR's convention: constant w, or linear 1 + (w - 1) * visible / seq_len."""
    if schedule == "constant":
        return jnp.asarray(guidance_scale, jnp.float32)
    if schedule == "linear":
        return 1.0 + (guidance_scale - 1.0) * jnp.asarray(num_visible, jnp.float32) / seq_len
    raise UserError(f"gsim.guidance_schedule must be one of {GUIDANCE_SCHEDULES}, got {schedule!r}")


CONTEXT_LAWS = ("mar", "uniform", "inference")


def _inference_masked(seq_len: int, num_iter: int) -> np.ndarray:
    return ar_schedule(seq_len, num_iter).masked_before


def min_masked(seq_len: int, law: str, mask_ratio_min: float, num_iter: int = 64) -> int:
    """The fewest masked tokens a context of `law` can have (sets the static encoder length)."""
    if law == "mar":
        return int(math.ceil(seq_len * mask_ratio_min))
    if law == "uniform":
        return 1
    if law == "inference":
        return int(np.min(_inference_masked(seq_len, num_iter)))
    raise UserError(f"gsim.context_mask_ratio must be one of {CONTEXT_LAWS}, got {law!r}")


def sample_num_masked(rng: jax.Array, seq_len: int, law: str, mask_ratio_min: float,
                      num_iter: int = 64) -> jax.Array:
    """Masked tokens of one batch's context, () int32: "mar" ceil(S r), r ~ TruncNormal(1, 0.25) on
    [mask_ratio_min, 1]; "uniform" ceil(S r), r ~ U(0, 1), at least 1; "inference" the tokens still masked when
    step k of MAR's K = num_iter cosine schedule starts, k ~ U{0..K-1} (the contexts the sampler meets)."""
    if law == "mar":
        ratio = sample_mask_ratio(rng, mask_ratio_min)
        lo = min_masked(seq_len, law, mask_ratio_min)
        return jnp.clip(jnp.ceil(seq_len * ratio).astype(jnp.int32), lo, seq_len)
    if law == "uniform":
        r = jax.random.uniform(rng, (), jnp.float32)
        return jnp.clip(jnp.ceil(seq_len * r).astype(jnp.int32), 1, seq_len)
    if law == "inference":
        before = jnp.asarray(_inference_masked(seq_len, num_iter), jnp.int32)
        return before[jax.random.randint(rng, (), 0, num_iter)]
    raise UserError(f"gsim.context_mask_ratio must be one of {CONTEXT_LAWS}, got {law!r}")


def sample_context(rng: jax.Array, batch: int, seq_len: int, mask_ratio_min: float, *,
                   return_gen_rank: bool = False, law: str = "mar", num_iter: int = 64):
    """One number of masked tokens per batch (`sample_num_masked` of `law`), a random order per sample:
    (mask (B, S) float32 with 1 = masked, num_masked ()),
    and with `return_gen_rank` also each position's generation rank (B, S) int32 in that order
    (`models.mar.gen_rank_from_orders`: the masked positions come last), which a causal MAR needs."""
    r_ratio, r_order = jax.random.split(rng)
    num_masked = sample_num_masked(r_ratio, seq_len, law, mask_ratio_min, num_iter)
    orders = random_orders(r_order, batch, seq_len)
    mask, _ = mask_from_orders(orders, num_masked)
    if return_gen_rank:
        return mask, num_masked, gen_rank_from_orders(orders)
    return mask, num_masked


def sample_timesteps(rng: jax.Array, shape: tuple[int, ...], t_min: int, t_max: int, law: str = "uniform",
                     logit_mean: float = 0.0, logit_std: float = 1.0) -> jax.Array:
    """Integer timesteps in [t_min, t_max] (inclusive; the bounded range) of the 1000-step chain.

    uniform:      U{t_min..t_max}.
    logit_normal: t_min + floor(u (t_max - t_min + 1)), u = sigmoid(logit_mean + logit_std n), n ~ N(0, 1) (SD3's
                  law on the range: mean 0 concentrates on its middle, mean > 0 on the noisy end)."""
    if law == "uniform":
        return jax.random.randint(rng, shape, t_min, t_max + 1, jnp.int32)
    if law == "logit_normal":
        u = jax.nn.sigmoid(logit_mean + logit_std * jax.random.normal(rng, shape, jnp.float32))
        t = t_min + jnp.floor(u * (t_max - t_min + 1)).astype(jnp.int32)
        return jnp.clip(t, t_min, t_max)
    raise UserError(f"gsim.t_sampling must be one of {T_SAMPLINGS}, got {law!r}")


def onestep_predictor(t_init: int, noise_scale: float = 1.0):
    """The AR sampler's predictor of the one-step generator (`sampling.ar_sampler` Predictor signature): one head
    call at t_init on x ~ N(0, noise_scale^2 I), as in training (`generator.noise_scale`). Student CFG (sample.cfg
    != 1: the sampler passes the null-class condition zu) guides that one call: eps = eps_u + w (eps_c - eps_u) on
    the same x, i.e. x0 = x0_u + w (x0_c - x0_u). Without zu (cfg 1, the default) it is `ar_sampler.onestep_predictor`
    for noise_scale 1."""
    def predict(model, zc, zu, cfg_scale, rng):
        noise = noise_scale * jax.random.normal(rng, (zc.shape[0], model.cfg.token_dim), jnp.float32)
        if zu is None:
            return one_step(model.head, noise, zc, t_init)
        n, c = zc.shape[0], model.cfg.token_dim

        def guided(x, t, z):
            out = model.head(jnp.concatenate([x, x]), jnp.concatenate([t, t]), z)
            eps_c, eps_u = out[:n, :c], out[n:, :c]
            return eps_u + cfg_scale * (eps_c - eps_u)
        return one_step(guided, noise, jnp.concatenate([zc, zu]), t_init)

    return predict


def trainable_mask(params: Any, trainable: str) -> Any:
    """Pytree of bools like `params`: True where the optimizer may update the generator.

    "all": everything; "head_only": only parameters under `diffloss_net` (the per-token head).
    """
    if trainable not in TRAINABLE:
        raise UserError(f"generator.trainable must be one of {TRAINABLE}, got {trainable!r}")

    def name(k):
        return getattr(k, "key", getattr(k, "name", getattr(k, "idx", None)))

    return jax.tree_util.tree_map_with_path(
        lambda path, _: trainable == "all" or any(name(k) == HEAD_MODULE for k in path), params)


def fake_init_params(teacher: Any, fresh: Any, init: str) -> Any:
    """The fake score's initial parameters (fake_score.init): "teacher" a copy of the teacher; "fresh_head" the
    teacher's transformer with the per-token head (`diffloss_net`) taken from `fresh` (a newly initialised MAR)."""
    if init not in FAKE_INITS:
        raise UserError(f"fake_score.init must be one of {FAKE_INITS}, got {init!r}")
    if init == "teacher":
        return teacher
    head = trainable_mask(teacher, "head_only")
    return jax.tree.map(lambda h, t, f: f if h else t, head, teacher, fresh)


_CHAIN = GaussianDiffusion.create("")  # the 1000-step cosine training chain (host constants)


def _chain() -> GaussianDiffusion:
    return _CHAIN


# -- the losses ---------------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class GSIMSettings:
    distance: str = "pseudo_huber"
    huber_r: float = 1e-5
    use_l2_term: bool = True
    norm_axes: str = "token"
    t_min: int = 20
    t_max: int = 980
    weighting: str = "none"
    guidance_scale: float = 1.2
    guidance_schedule: str = "constant"
    mask_ratio_min: float = 0.7
    context_mask_ratio: str = "mar"
    context_num_iter: int = 64
    stop_grad_dprime: bool = False
    l2_weight: float = 1.0
    t_sampling: str = "uniform"
    t_logit_mean: float = 0.0
    t_logit_std: float = 1.0
    guided_fake_score: bool = False
    on_policy_fraction: float = 0.0
    on_policy_num_iter: int = 4
    t_init: int = T_INIT                        # models/generator.py's (abar ~ 0.14; one source of truth)
    trainable: str = "all"
    noise_scale: float = 1.0                    # the one-step input x ~ N(0, noise_scale^2 I) (generator section)

    def validate(self, model_cfg: MARConfig) -> None:
        for field, allowed in (("distance", DISTANCES), ("norm_axes", NORM_AXES), ("weighting", WEIGHTINGS),
                               ("guidance_schedule", GUIDANCE_SCHEDULES), ("trainable", TRAINABLE),
                               ("t_sampling", T_SAMPLINGS)):
            if getattr(self, field) not in allowed:
                section = "generator" if field in _GENERATOR_FIELDS else "gsim"
                raise UserError(f"{section}.{field} must be one of {allowed}, got {getattr(self, field)!r}")
        if not 0 <= self.t_min <= self.t_max <= NUM_TRAIN_TIMESTEPS - 1:
            raise UserError(f"need 0 <= gsim.t_min <= gsim.t_max <= {NUM_TRAIN_TIMESTEPS - 1}, "
                             f"got {self.t_min}, {self.t_max}")
        if not 0 <= self.t_init <= NUM_TRAIN_TIMESTEPS - 1:
            raise UserError(f"generator.t_init must be in [0, {NUM_TRAIN_TIMESTEPS - 1}], got {self.t_init}")
        if self.context_mask_ratio not in CONTEXT_LAWS:
            raise UserError(f"gsim.context_mask_ratio must be one of {CONTEXT_LAWS}, got {self.context_mask_ratio!r}")
        if self.context_mask_ratio == "inference" and not 1 <= self.context_num_iter <= model_cfg.seq_len:
            raise UserError(f"gsim.context_num_iter must be in [1, seq_len={model_cfg.seq_len}] for "
                             f"context_mask_ratio='inference', got {self.context_num_iter}")
        if not 0.0 < self.mask_ratio_min <= 1.0:
            raise UserError(f"gsim.mask_ratio_min must be in (0, 1], got {self.mask_ratio_min}")
        if not (math.isfinite(self.noise_scale) and self.noise_scale > 0):
            raise UserError(f"generator.noise_scale must be a finite float > 0, got {self.noise_scale}")
        if not math.isfinite(self.l2_weight):
            raise UserError(f"gsim.l2_weight must be a finite float, got {self.l2_weight}")
        if not (math.isfinite(self.t_logit_std) and self.t_logit_std > 0 and math.isfinite(self.t_logit_mean)):
            raise UserError(f"gsim.t_logit_std must be a finite float > 0 and gsim.t_logit_mean finite, got "
                            f"{self.t_logit_std}, {self.t_logit_mean}")
        if not 0.0 <= self.on_policy_fraction <= 1.0:
            raise UserError(f"gsim.on_policy_fraction must be in [0, 1], got {self.on_policy_fraction}")
        if self.on_policy_fraction > 0 and not 1 <= self.on_policy_num_iter <= model_cfg.seq_len:
            raise UserError(f"gsim.on_policy_num_iter must be in [1, seq_len={model_cfg.seq_len}], "
                            f"got {self.on_policy_num_iter}")
        if self.huber_r <= 0 and self.distance == "pseudo_huber":
            raise UserError(f"gsim.huber_r must be > 0, got {self.huber_r}")


@dataclasses.dataclass(frozen=True)
class GSIMLosses:
    settings: GSIMSettings
    model_cfg: MARConfig
    enc_len: int
    generator_loss: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]
    fake_score_loss: Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


_LOOP_FIELDS = ("fake_steps_per_generator_step",)   # gsim fields read by the training loop, not by the losses
_GENERATOR_FIELDS = ("t_init", "trainable", "noise_scale")   # settings read from the generator section


def _keys(cfg: Any) -> list[str]:
    if cfg is None:
        return []
    return list(cfg.keys()) if hasattr(cfg, "keys") else [k for k in vars(cfg) if not k.startswith("_")]


def _get(cfg: Any, name: str, default: Any) -> Any:
    if cfg is None:
        return default
    return cfg.get(name, default) if hasattr(cfg, "get") else getattr(cfg, name, default)


def settings_from_config(gsim_cfg: Any, generator_cfg: Any, model_cfg: MARConfig) -> GSIMSettings:
    """The validated GSIMSettings of config sections `gsim` and `generator` (missing fields: the defaults)."""
    defaults = GSIMSettings()
    known = {f.name for f in dataclasses.fields(GSIMSettings)} - set(_GENERATOR_FIELDS) | set(_LOOP_FIELDS)
    unknown = sorted(set(_keys(gsim_cfg)) - known)
    if unknown:
        raise UserError(f"unknown gsim fields {unknown}; known: {sorted(known)}")
    kw = {f.name: _get(gsim_cfg, f.name, getattr(defaults, f.name)) for f in dataclasses.fields(GSIMSettings)
          if f.name not in _GENERATOR_FIELDS}
    kw["t_init"] = int(_get(generator_cfg, "t_init", defaults.t_init))
    kw["trainable"] = _get(generator_cfg, "trainable", defaults.trainable)
    kw["noise_scale"] = float(_get(generator_cfg, "noise_scale", defaults.noise_scale))
    st = GSIMSettings(**{**kw, "t_min": int(kw["t_min"]), "t_max": int(kw["t_max"]),
                         "huber_r": float(kw["huber_r"]), "guidance_scale": float(kw["guidance_scale"]),
                         "mask_ratio_min": float(kw["mask_ratio_min"]), "use_l2_term": bool(kw["use_l2_term"]),
                         "context_num_iter": int(kw["context_num_iter"]),
                         "stop_grad_dprime": bool(kw["stop_grad_dprime"]), "l2_weight": float(kw["l2_weight"]),
                         "t_logit_mean": float(kw["t_logit_mean"]), "t_logit_std": float(kw["t_logit_std"]),
                         "guided_fake_score": bool(kw["guided_fake_score"]),
                         "on_policy_fraction": float(kw["on_policy_fraction"]),
                         "on_policy_num_iter": int(kw["on_policy_num_iter"])})
    st.validate(model_cfg)
    return st


def context_encoder_len(st: GSIMSettings, model_cfg: MARConfig) -> int:
    """The static encoder length of the contexts of `gsim.context_mask_ratio` (buffer + most visible tokens)."""
    s = model_cfg.seq_len
    if st.context_mask_ratio == "mar":
        return train_encoder_len(model_cfg, st.mask_ratio_min)
    return model_cfg.buffer_size + s - min_masked(s, st.context_mask_ratio, st.mask_ratio_min, st.context_num_iter)


# Real-valued switches the losses can read as traced scalars instead of compile-time constants: variants that differ
# only in these share one compiled step when the caller passes them through the jit boundary (`switch_values`,
# `traced_switches`; tools/ablate.py does). Every other switch (and guidance_scale 1 vs not 1, which drops the
# null-class branch) changes the program's structure. t_init stays a constant: the one-step update's sqrt(abar)
# are host numbers (models/generator.one_step).
NUMERIC_SWITCHES = {"l2_weight": jnp.float32, "guidance_scale": jnp.float32, "huber_r": jnp.float32,
                    "t_min": jnp.int32, "t_max": jnp.int32, "t_logit_mean": jnp.float32, "t_logit_std": jnp.float32,
                    "noise_scale": jnp.float32}
_TRACED_SWITCHES: contextvars.ContextVar = contextvars.ContextVar("gsim_traced_switches", default=None)


def switch_values(st: GSIMSettings) -> dict[str, np.ndarray]:
    """The NUMERIC_SWITCHES of `st` as 0-d arrays (float32 / int32): what a caller passes as a jit argument."""
    return {name: np.asarray(getattr(st, name), dtype) for name, dtype in NUMERIC_SWITCHES.items()}


@contextlib.contextmanager
def traced_switches(values: dict[str, Any]):
    """While tracing inside this context, the losses of `make_gsim_losses` read the NUMERIC_SWITCHES from `values`
    (the caller's jit arguments: tracers) instead of their settings' constants. Same values, same result up to the
    rounding of constant folding; one compiled program for every value."""
    token = _TRACED_SWITCHES.set(dict(values))
    try:
        yield
    finally:
        _TRACED_SWITCHES.reset(token)


def _numeric(st: GSIMSettings) -> dict[str, Any]:
    traced = _TRACED_SWITCHES.get()
    return traced if traced is not None else {name: getattr(st, name) for name in NUMERIC_SWITCHES}


def _role_eps(model, tokens, mask, labels, rank, xt_rows, t_rows, *, w, guided: bool, enc_len: int):
    """A frozen role's epsilon on the masked tokens' x_t rows (B S, C): with the class, or under CFG (guided: the
    class and the null class on the same visible tokens, eps_u + w (eps_c - eps_u))."""
    b, c = tokens.shape[0], tokens.shape[2]
    if not guided:
        z = model.condition(tokens, mask, model.class_embedding(labels), enc_len=enc_len, gen_rank=rank)
        return model.head(xt_rows, t_rows, z.reshape(xt_rows.shape[0], -1))[:, :c]
    z = model.condition(jnp.concatenate([tokens, tokens]), jnp.concatenate([mask, mask]),
                        jnp.concatenate([model.class_embedding(labels), model.class_embedding(None, b)]),
                        enc_len=enc_len, gen_rank=None if rank is None else jnp.concatenate([rank, rank]))
    out = model.head(jnp.concatenate([xt_rows] * 2), jnp.concatenate([t_rows] * 2), z.reshape(2 * xt_rows.shape[0], -1))
    eps_c, eps_u = jnp.split(out[:, :c], 2, axis=0)
    return eps_u + w * (eps_c - eps_u)


def _generator_metrics(loss, terms, weight, red, x_gen, mask, w, num_masked, t) -> dict[str, jax.Array]:
    m3 = mask[:, :, None]
    n_el = jnp.maximum(jnp.sum(mask) * x_gen.shape[-1], 1.0)
    gen_mean = jnp.sum(x_gen * m3) / n_el
    gen_std = jnp.sqrt(jnp.maximum(jnp.sum(((x_gen - gen_mean) * m3) ** 2) / n_el, 0.0))
    metrics = {
        "loss": loss, "l1": red(weight * terms["l1"]), "l2": red(weight * terms["l2"]),
        "y_abs": red(terms["y_norm"]), "weight": red(weight), "gen_mean": gen_mean, "gen_std": gen_std,
        "guidance": w, "num_masked": num_masked.astype(jnp.float32),
        "t_lo": jnp.min(t).astype(jnp.float32), "t_hi": jnp.max(t).astype(jnp.float32),
    }
    return jax.tree.map(jax.lax.stop_gradient, metrics)


def _context_fn(st: GSIMSettings, model_cfg: MARConfig) -> Callable:
    """`contexts(batch, rng, graphdef, gen_params) -> (tokens, labels, mask, num_masked, rank or None)`: the
    batch's tokens (the first on_policy_fraction of them replaced by the generator's own rollouts), one context of
    `gsim.context_mask_ratio` per batch and, for a causal MAR, each position's generation rank."""
    s, c = model_cfg.seq_len, model_cfg.token_dim
    causal = model_cfg.attention == "causal"  # every role conditions causally in the context's generation order
    rollout_fns = {}

    def rollout(graphdef, gen_params, labels, rng):
        """The generator's own K = on_policy_num_iter-step one-step AR samples (no gradient, no host round trip)."""
        from marval_jax.sampling import ar_sampler
        from marval_jax.sampling.from_config import sampler_spec
        if graphdef not in rollout_fns:   # one jitted sampler per graphdef (eager callers compile it once)
            spec = sampler_spec(st.on_policy_num_iter, iter_field="gsim.on_policy_num_iter")
            rollout_fns[graphdef] = ar_sampler.make_sampler(
                graphdef, spec, onestep_predictor(st.t_init, st.noise_scale), seq_len=s,
                buffer_size=model_cfg.buffer_size, token_dim=c)
        fn = rollout_fns[graphdef]
        return jax.lax.stop_gradient(fn(jax.lax.stop_gradient(gen_params), labels, rng))

    def contexts(batch, rng, graphdef=None, gen_params=None):
        tokens = jnp.asarray(batch["tokens"], jnp.float32)
        labels = jnp.asarray(batch["labels"], jnp.int32)
        if tokens.ndim != 3 or tokens.shape[1:] != (s, c):
            raise ValueError(f"batch['tokens'] must be (B, {s}, {c}), got {tokens.shape}")
        if labels.shape != tokens.shape[:1]:
            raise ValueError(f"batch['labels'] must be ({tokens.shape[0]},), got {labels.shape}")
        n_on = int(round(st.on_policy_fraction * tokens.shape[0]))
        if n_on > 0:   # on-policy: the first n_on samples' tokens are the generator's rollouts of their labels
            own = rollout(graphdef, gen_params, labels[:n_on], jax.random.fold_in(rng, 7))
            tokens = tokens.at[:n_on].set(own.astype(tokens.dtype))
        mask, num_masked, rank = sample_context(rng, tokens.shape[0], s, st.mask_ratio_min, return_gen_rank=True,
                                                law=st.context_mask_ratio, num_iter=st.context_num_iter)
        return tokens, labels, mask, num_masked, rank if causal else None

    return contexts


def make_gsim_losses(gsim_cfg: Any, generator_cfg: Any, model_cfg: MARConfig) -> GSIMLosses:
    """Build the two losses from config sections `gsim` and `generator` (ConfigDicts or dicts; missing fields take
    the defaults of docs/method.md section 2) and the shared MAR architecture."""
    st = settings_from_config(gsim_cfg, generator_cfg, model_cfg)
    chain = _chain()
    s, c = model_cfg.seq_len, model_cfg.token_dim
    enc_len = context_encoder_len(st, model_cfg)
    use_guidance = st.guidance_scale != 1.0

    contexts = _context_fn(st, model_cfg)

    def generate(gen, tokens, labels, mask, rank, rng):
        """Generator's one-step tokens for every position (only masked ones are used) and x0."""
        b = tokens.shape[0]
        z = gen.condition(tokens, mask, gen.class_embedding(labels), enc_len=enc_len, gen_rank=rank)
        if st.trainable == "head_only":
            z = jax.lax.stop_gradient(z)
        noise = _numeric(st)["noise_scale"] * jax.random.normal(rng, (b * s, c), jnp.float32)
        x_gen = one_step(gen.head, noise, z.reshape(b * s, -1), st.t_init).reshape(b, s, c)
        x0 = jnp.where(mask[:, :, None] > 0.5, x_gen, tokens)
        return x_gen, x0

    def generator_loss(graphdef, gen_params, fake_params, teacher_params, batch, rng):
        num = _numeric(st)
        gen = nnx.merge(graphdef, gen_params)
        fake = nnx.merge(graphdef, jax.lax.stop_gradient(fake_params))
        teacher = nnx.merge(graphdef, jax.lax.stop_gradient(teacher_params))
        r_ctx, r_gen, r_t, r_eps = jax.random.split(rng, 4)
        tokens, labels, mask, num_masked, rank = contexts(batch, r_ctx, graphdef, gen_params)
        b = tokens.shape[0]
        x_gen, x0 = generate(gen, tokens, labels, mask, rank, r_gen)
        t = sample_timesteps(r_t, (b,), num["t_min"], num["t_max"], st.t_sampling, num["t_logit_mean"],
                             num["t_logit_std"])                       # one t per sample
        t_tok = jnp.broadcast_to(t[:, None], (b, s))
        eps = jax.random.normal(r_eps, x0.shape, jnp.float32)
        xt = chain.q_sample(x0, t, eps)
        sigma = jnp.asarray(chain.sqrt_one_minus_alphas_cumprod, jnp.float32)[t][:, None, None]
        w = guidance_weight(num["guidance_scale"], st.guidance_schedule, s - num_masked, s)
        role = functools.partial(_role_eps, tokens=tokens, mask=mask, labels=labels, rank=rank,
                                 xt_rows=xt.reshape(b * s, c), t_rows=t_tok.reshape(-1), w=w, enc_len=enc_len)
        eps_p = role(teacher, guided=use_guidance).reshape(b, s, c)   # the teacher's (guided) epsilon
        eps_f = role(fake, guided=st.guided_fake_score and use_guidance).reshape(b, s, c)   # guided: same w, x_t
        unit = jax.lax.stop_gradient(residual_scale(st.weighting, t))[:, None, None]
        terms = gsim_terms(eps_p, eps_f, eps, sigma, distance=st.distance, huber_r=num["huber_r"],
                           use_l2_term=st.use_l2_term, norm_axes=st.norm_axes, mask=mask, unit_scale=unit,
                           l2_weight=num["l2_weight"], stop_grad_dprime=st.stop_grad_dprime)
        t_group = t_tok if st.norm_axes == "token" else t
        x0_teacher = chain.predict_xstart_from_eps(xt, t, eps_p) if st.weighting == "sid" else None
        weight = jax.lax.stop_gradient(gsim_weights(st.weighting, t=t_group, x0=x0, x0_teacher=x0_teacher,
                                                    norm_axes=st.norm_axes, mask=mask))
        red = lambda v: reduce_groups(v, mask, st.norm_axes)
        loss = red(weight * terms["loss"])
        return loss, _generator_metrics(loss, terms, weight, red, x_gen, mask, w, num_masked, t)

    def fake_score_loss(graphdef, fake_params, gen_params, batch, rng):
        gen = nnx.merge(graphdef, jax.lax.stop_gradient(gen_params))
        fake = nnx.merge(graphdef, fake_params)
        r_ctx, r_gen, r_t, r_eps = jax.random.split(rng, 4)
        tokens, labels, mask, _, rank = contexts(batch, r_ctx, graphdef, gen_params)
        b = tokens.shape[0]
        _, x0 = generate(gen, tokens, labels, mask, rank, r_gen)
        x0 = jax.lax.stop_gradient(x0)
        t = sample_timesteps(r_t, (b * s,), 0, NUM_TRAIN_TIMESTEPS - 1)   # per token, as MAR
        eps = jax.random.normal(r_eps, (b * s, c), jnp.float32)
        x0r = x0.reshape(b * s, c)
        xt = chain.q_sample(x0r, t, eps)
        class_emb = fake.class_embedding(labels)
        if st.guided_fake_score:   # its null-class branch is used: train it by MAR's label dropout
            class_emb = fake.drop_labels(class_emb, jax.random.fold_in(r_ctx, 11))
        z = fake.condition(tokens, mask, class_emb, enc_len=enc_len, gen_rank=rank)
        out = fake.head(xt, t, z.reshape(b * s, -1))
        terms = chain.training_losses(out, x0r, xt, t, eps)
        mrow = mask.reshape(-1)
        red = lambda v: jnp.sum(v * mrow) / jnp.maximum(jnp.sum(mrow), 1.0)
        loss = red(terms["loss"])
        return loss, {"loss": jax.lax.stop_gradient(loss), "mse": jax.lax.stop_gradient(red(terms["mse"])),
                      "vb": jax.lax.stop_gradient(red(terms["vb"]))}

    return GSIMLosses(st, model_cfg, enc_len, generator_loss, fake_score_loss)
