"""MARVAL-RL: direct reward backpropagation through the one-step generator's AR loop (docs/method.md section 4).

    L_RL(theta) = - reward_scale * E_{c, z, orders}[ R(decode(G_theta(z, c, K)), c) ] + reg_weight * Reg(theta)

G_theta is K masked-AR iterations of the one-step generator (one transformer pass and ONE head call at t_init per
predicted token, no CFG), sampled with random orders and input noise drawn from the loss's `rng`, differentiable
end to end: the token writes of the decode step are scatters, so the gradient reaches every parameter through the
predictor's output and through the tokens each iteration feeds the next one. `decode` (frozen tokenizer / VAE
decoder) and `R` (frozen differentiable reward) are callables supplied by the caller.

The AR loop is the decode driver (marval_jax/sampling/decode.py): a Python loop over the static-shape segments of
the schedule, each a `lax.scan` over its steps (one compiled body per segment). Switches (docs/rl.md):
  rl.num_iter        K AR iterations
  rl.backprop_steps  -1: the gradient crosses all K iterations; k >= 1: only the last k carry gradient. The first
                     K - k run on stop_gradient'ed parameters and their output tokens are stop_gradient'ed, so
                     they hold no residuals for the backward pass.
  rl.remat           jax.checkpoint around each AR iteration: only the carried tokens are kept per iteration, the
                     transformer / head activations are recomputed in the backward pass.
  rl.reward_scale    multiplies the mean reward.
  rl.regularizer     none | l2 (mean squared difference between the generator's tokens and a frozen reference
                     generator's tokens on the same orders and noise) | gsim (a caller-supplied
                     `reg_fn(graphdef, gen_params, labels, rng) -> scalar`; train/rl_task.py builds it from GSIM's
                     generator loss), times rl.reg_weight.
  rl.prompt_template stored for the reward's prompt preparation (`format_prompts`); the loss itself only sees
                     `reward_fn(images, labels)`.
  generator.trainable all | head_only: frozen parameters enter under stop_gradient, so their gradient is exactly 0
                     (`trainable_mask` gives the same split for the optimizer).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from marval_jax.diffusion.gaussian import NUM_TRAIN_TIMESTEPS
from marval_jax.losses import gsim
from marval_jax.losses.gsim import TRAINABLE, trainable_mask  # noqa: F401  (re-exported: the optimizer's mask)
from marval_jax.models.generator import T_INIT
from marval_jax.models.mar import MARConfig
from marval_jax.sampling.ar_sampler import SamplerSpec
from marval_jax.sampling.decode import decode, make_plan
from marval_jax.sampling.from_config import sampler_spec
from marval_jax.user_errors import UserError

REGULARIZERS = ("none", "gsim", "l2")

DecodeFn = Callable[[jax.Array], jax.Array]                 # tokens (B, S, C) -> images (B, H, W, C)
RewardFn = Callable[[jax.Array, jax.Array], jax.Array]      # (images, labels) -> (B,)
RegFn = Callable[[nnx.GraphDef, Any, jax.Array, jax.Array], jax.Array]  # (graphdef, params, labels, rng) -> ()
LossFn = Callable[[nnx.GraphDef, Any, Any, jax.Array, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class RLSettings:
    """The switches of sections `rl` and `generator` the loss reads (defaults: configs/marval_rl.py, docs/rl.md)."""
    num_iter: int = 64
    backprop_steps: int = -1
    remat: bool = True
    reward_scale: float = 1.0
    prompt_template: str = "a high-quality and harmonious picture of {class}"
    regularizer: str = "none"
    reg_weight: float = 0.0
    t_init: int = T_INIT    # models/generator.py's (one source of truth)
    noise_scale: float = 1.0
    trainable: str = "all"

    @classmethod
    def from_config(cls, rl_cfg: Any, generator_cfg: Any) -> "RLSettings":
        """From ConfigDicts, dicts or attribute objects; missing fields take the defaults."""
        d = cls()
        get = lambda cfg, name: _get(cfg, name, getattr(d, name))
        st = cls(num_iter=int(get(rl_cfg, "num_iter")), backprop_steps=int(get(rl_cfg, "backprop_steps")),
                 remat=bool(get(rl_cfg, "remat")),
                 reward_scale=float(get(rl_cfg, "reward_scale")), prompt_template=str(get(rl_cfg, "prompt_template")),
                 regularizer=str(get(rl_cfg, "regularizer")), reg_weight=float(get(rl_cfg, "reg_weight")),
                 t_init=_or_default(int(get(generator_cfg, "t_init")), d.t_init),
                 trainable=str(get(generator_cfg, "trainable")),
                 noise_scale=_or_default(float(get(generator_cfg, "noise_scale")), d.noise_scale))
        st.validate()
        return st

    def validate(self, seq_len: int | None = None) -> None:
        if self.trainable not in TRAINABLE:
            raise UserError(f"generator.trainable must be one of {TRAINABLE}, got {self.trainable!r}")
        if self.regularizer not in REGULARIZERS:
            raise UserError(f"rl.regularizer must be one of {REGULARIZERS}, got {self.regularizer!r}")
        if not 0 <= self.t_init <= NUM_TRAIN_TIMESTEPS - 1:
            raise UserError(f"generator.t_init must be in [0, {NUM_TRAIN_TIMESTEPS - 1}], got {self.t_init}")
        if not (math.isfinite(self.noise_scale) and self.noise_scale > 0):
            raise UserError(f"generator.noise_scale must be a finite float > 0 (the one-step input's std, as the "
                            f"student was distilled with), got {self.noise_scale}")
        if seq_len is not None and not 1 <= self.num_iter <= seq_len:
            raise UserError(f"rl.num_iter must be in [1, seq_len={seq_len}], got {self.num_iter}")
        if self.backprop_steps != -1 and not 1 <= self.backprop_steps <= self.num_iter:
            raise UserError(f"rl.backprop_steps must be -1 (all) or in [1, num_iter={self.num_iter}], "
                             f"got {self.backprop_steps}")

    @property
    def grad_start(self) -> int:
        """First AR iteration that carries gradient."""
        return 0 if self.backprop_steps == -1 else self.num_iter - self.backprop_steps


def _or_default(value, default):
    """-1 (configs/marval_rl.py's "the student's recorded value") where no student record resolved it: the default."""
    return default if value < 0 else value


def _get(cfg: Any, name: str, default: Any) -> Any:
    if cfg is None:
        return default
    return cfg.get(name, default) if hasattr(cfg, "get") else getattr(cfg, name, default)


def freeze(params, trainable: str):
    """`params` with the frozen ones under stop_gradient (exactly zero gradient; the values are unchanged)."""
    if trainable == "all":
        return params
    mask = trainable_mask(params, trainable)
    return jax.tree.map(lambda m, p: p if m else jax.lax.stop_gradient(p), mask, params)


def format_prompts(template: str, class_names: Sequence[str]) -> list[str]:
    """One prompt per class: `template` with "{class}" replaced by the class name (rl.prompt_template)."""
    if "{class}" not in template:
        raise UserError(f"rl.prompt_template must contain '{{class}}', got {template!r}")
    return [template.replace("{class}", name) for name in class_names]


def make_rl_sampler(rl_cfg: Any, generator_cfg: Any, model_cfg: MARConfig, spec: SamplerSpec | None = None):
    """Returns `sample(graphdef, params, labels (B,), rng) -> (tokens (B, S, C), orders (B, S))`.

    The one-step generator's K-iteration AR loop (the decode driver, marval_jax/sampling/decode.py, differentiable)
    with the rl.backprop_steps truncation and rl.remat; labels < 0 are the null class. `orders[:, :n]` are the
    positions still masked when n tokens remain (the last iterations write the first positions of `orders`). `spec`:
    the loop's SamplerSpec (`sampler_from_config(config, "rl")`: K = rl.num_iter, buckets = sample.num_buckets, no
    CFG); None takes rl.num_iter and SamplerSpec's default buckets. Not jitted: it is traced inside the caller's jitted loss / step.
    """
    st = RLSettings.from_config(rl_cfg, generator_cfg)
    st.validate(model_cfg.seq_len)
    if spec is None:
        spec = sampler_spec(st.num_iter, num_buckets=SamplerSpec.num_buckets, iter_field="rl.num_iter")
    if spec.cfg != 1.0:
        raise ValueError(f"the RL sampler has no CFG (the guidance is distilled into the generator), got cfg {spec.cfg}")
    plan = make_plan(spec, seq_len=model_cfg.seq_len, buffer_size=model_cfg.buffer_size,
                     token_dim=model_cfg.token_dim, differentiable=True, backprop_steps=st.backprop_steps,
                     remat=st.remat)
    predictor = gsim.onestep_predictor(st.t_init, st.noise_scale)   # the input noise the student was distilled on

    def sample(graphdef, params, labels, rng):
        labels = jnp.asarray(labels, jnp.int32)
        if labels.ndim != 1:
            raise ValueError(f"labels must be (B,), got shape {labels.shape}")
        state = decode(lambda p: nnx.merge(graphdef, p), params, labels, rng, plan, predictor)
        return state.tokens, state.order

    sample.plan = plan   # its static pieces: one compiled loop body each (benchmarks record the count)
    return sample


def make_rl_loss(rl_cfg: Any, generator_cfg: Any, model_cfg: MARConfig, decode_fn: DecodeFn, reward_fn: RewardFn,
                 reg_fn: RegFn | None = None, spec: SamplerSpec | None = None) -> LossFn:
    """Returns `loss_fn(graphdef, gen_params, ref_params, labels (B,), rng) -> (loss, metrics)`.

    `gen_params`: the generator's nnx state (`nnx.split(model)[1]`); `ref_params`: the frozen reference
    generator's state, read only when rl.regularizer == "l2" (pass None otherwise). `decode_fn(tokens) -> images`
    (NHWC, frozen), `reward_fn(images, labels) -> (B,)` (frozen, parameters closed over, e.g. `Reward.bind`),
    `reg_fn(graphdef, gen_params, labels, rng) -> scalar` for rl.regularizer == "gsim" (weighted here by
    rl.reg_weight). `spec`: the trajectory's SamplerSpec, `sampler_from_config(config, "rl")` (passed to
    `make_rl_sampler`). Metrics: loss, reward_mean, reward_std, reg. `loss_fn.settings` holds the parsed switches
    (`settings.prompt_template` for the reward's prompt preparation, see `format_prompts`), `loss_fn.plan` the AR
    loop's DecodePlan (one compiled loop body per piece).
    """
    st = RLSettings.from_config(rl_cfg, generator_cfg)
    if st.regularizer == "gsim" and reg_fn is None:
        raise ValueError("rl.regularizer='gsim' needs reg_fn(graphdef, gen_params, labels, rng) -> scalar")
    sample = make_rl_sampler(rl_cfg, generator_cfg, model_cfg, spec=spec)

    def loss_fn(graphdef, gen_params, ref_params, labels, rng):
        r_sample, r_reg = jax.random.split(rng)
        params = freeze(gen_params, st.trainable)
        tokens, _ = sample(graphdef, params, labels, r_sample)
        reward = jnp.asarray(reward_fn(decode_fn(tokens), labels), jnp.float32)
        if reward.shape != tokens.shape[:1]:
            raise ValueError(f"reward_fn must return one reward per sample, shape {tokens.shape[:1]}, "
                             f"got {reward.shape}")
        if st.regularizer == "l2":
            if ref_params is None:
                raise ValueError("rl.regularizer='l2' needs ref_params (the frozen reference generator's state)")
            ref_tokens, _ = sample(graphdef, jax.lax.stop_gradient(ref_params), labels, r_sample)  # same noise
            reg = jnp.mean(jnp.square(tokens - jax.lax.stop_gradient(ref_tokens)))
        elif st.regularizer == "gsim":
            reg = jnp.asarray(reg_fn(graphdef, params, labels, r_reg), jnp.float32)
        else:
            reg = jnp.zeros((), jnp.float32)
        loss = -st.reward_scale * jnp.mean(reward) + st.reg_weight * reg
        metrics = dict(loss=loss, reward_mean=jnp.mean(reward), reward_std=jnp.std(reward), reg=reg)
        return loss, jax.tree.map(jax.lax.stop_gradient, metrics)

    loss_fn.settings, loss_fn.plan = st, sample.plan
    return loss_fn
