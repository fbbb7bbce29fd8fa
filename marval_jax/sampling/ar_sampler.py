"""The masked-AR samplers as programs: MAR's teacher sampler and MARVAL's one-step sampler, jitted.

Both are the decode driver of marval_jax/sampling/decode.py (the loop of the reference `sample_tokens`: random
orders, the cosine schedule, one transformer pass per step with CFG fused into one batch of 2B rows, static-shape
segments) with a per-token predictor for the tokens of each step:
  - `teacher_predictor`: the head's reverse chain (e.g. 100 respaced steps) with CFG inside the head as the
    reference (guided epsilon, the conditional half's own variance), temperature on the per-step noise;
  - `onestep_predictor`: one head call at t_init (MARVAL), no CFG.
`make_sampler(..., policy=...)` takes the driver's cache policy: "none" re-runs the whole transformer every step;
"exact" / ("approx", r, R) are the KV-cached variants (marval_jax/sampling/cached_sampler.py). The spec of a
sampler is built from a config by marval_jax/sampling/from_config.py.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from marval_jax.diffusion.gaussian import GaussianDiffusion
from marval_jax.models.generator import one_step
from marval_jax.models.transformer import cast_linear_params
from marval_jax.parallel.compiler_options import BatchJit
from marval_jax.sampling.decode import CachePolicy, Predictor, decode, make_plan
from marval_jax.sampling.schedule import random_orders  # noqa: F401  (re-exported: the samplers' orders)


def teacher_predictor(num_sampling_steps: str = "100", temperature: float = 1.0,
                      clip_denoised: bool = False) -> Predictor:
    """MAR's head chain. clip_denoised: x0 estimates clipped to [-1, 1] (pixel tokens; see GaussianDiffusion)."""
    diffusion = GaussianDiffusion.create(num_sampling_steps)

    def predict(model, zc, zu, cfg_scale, rng):
        c = model.cfg.token_dim
        r_noise, r_chain = jax.random.split(rng)
        noise = jax.random.normal(r_noise, (zc.shape[0], c), jnp.float32)
        if zu is None:
            def model_fn(x, t):
                return model.head(x, t, zc)
        else:
            z2 = jnp.concatenate([zc, zu], axis=0)

            def model_fn(x, t):
                out = model.head(jnp.concatenate([x, x], 0), jnp.concatenate([t, t], 0), z2)
                cond, uncond = jnp.split(out, 2, axis=0)
                eps = uncond[:, :c] + cfg_scale * (cond[:, :c] - uncond[:, :c])
                return jnp.concatenate([eps, cond[:, c:]], axis=1)
        return diffusion.p_sample_loop(model_fn, noise, r_chain, temperature, clip_denoised=clip_denoised)

    return predict


def onestep_predictor(t_init: int) -> Predictor:
    def predict(model, zc, zu, cfg_scale, rng):
        del zu, cfg_scale  # guidance is distilled into the generator
        noise = jax.random.normal(rng, (zc.shape[0], model.cfg.token_dim), jnp.float32)
        return one_step(model.head, noise, zc, t_init)

    return predict


@dataclasses.dataclass(frozen=True)
class SamplerSpec:
    num_iter: int = 64
    cfg: float = 1.0
    cfg_schedule: str = "linear"
    num_buckets: int = 4
    # the decode driver's KV-cache policy (sample.kv_cache, sampling/from_config.py); make_sampler uses it unless
    # given another policy
    cache: CachePolicy = CachePolicy("none")


def make_sampler(graphdef: nnx.GraphDef, spec: SamplerSpec, predictor: Predictor, *, seq_len: int,
                 buffer_size: int, token_dim: int, policy=None):
    """Returns a jitted `sample(state, labels (B,), rng) -> tokens (B, S, C)`.

    Labels < 0 mean unconditional (the null class). The whole AR loop is one XLA program. policy: the decode
    driver's cache policy ("none", "exact" for causal models, ("approx", r, R) for bidirectional ones); None takes
    the spec's (`spec.cache`, from sample.kv_cache for the sampling programs).
    """
    plan = make_plan(spec, seq_len=seq_len, buffer_size=buffer_size, token_dim=token_dim, policy=policy)

    def sample(state, labels, rng):
        # weights in bf16 once, not at every AR step; the merge inside each step is free
        cast_graphdef, cast_state = nnx.split(cast_linear_params(nnx.merge(graphdef, state)))
        return decode(lambda p: nnx.merge(cast_graphdef, p), cast_state, labels, rng, plan, predictor).tokens

    return BatchJit(sample, batch_of=lambda state, labels, rng: labels.shape[0])
