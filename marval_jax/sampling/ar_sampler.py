"""The masked-AR sampling loop, compiled whole: MAR's teacher sampler and MARVAL's one-step sampler.

Both share the loop of the reference `sample_tokens`: random orders, the cosine schedule of
marval_jax/sampling/schedule.py, one transformer pass per step (CFG fused into one batch of 2B rows), and a
per-token predictor for the tokens of that step:
  - `teacher_predictor`: the head's reverse chain (e.g. 100 respaced steps) with CFG inside the head as the
    reference (guided epsilon, the conditional half's own variance), temperature on the per-step noise;
  - `onestep_predictor`: one head call at t_init (MARVAL), no CFG.

Static shapes: the steps are grouped into segments (`plan_segments`), each a `lax.fori_loop` with a static encoder
length and a static number of predicted rows; invalid rows are dropped on write. No host round trip per step.
Each step re-runs the whole transformer; marval_jax/sampling/cached_sampler.py is the KV-cached variant.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from marval_jax.diffusion.gaussian import GaussianDiffusion
from marval_jax.models.generator import one_step
from marval_jax.models.mar import MAR
from marval_jax.models.transformer import cast_linear_params
from marval_jax.parallel.compiler_options import BatchJit
from marval_jax.sampling.schedule import ar_schedule, plan_segments

# predictor(model, z_cond (N, D), z_uncond (N, D) | None, cfg_scale, rng) -> tokens (N, C)
Predictor = Callable[[MAR, jax.Array, jax.Array | None, jax.Array, jax.Array], jax.Array]


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


def random_orders(rng: jax.Array, batch: int, seq_len: int) -> jax.Array:
    return jnp.argsort(jax.random.uniform(rng, (batch, seq_len)), axis=1)


def loop_inputs(model: MAR, labels: jax.Array, rng: jax.Array, seq_len: int):
    """(orders, ranks, null embedding, class embedding, loop key): shared by every sampler so that all of them draw
    the same orders from the same key. Labels < 0 mean unconditional."""
    b = labels.shape[0]
    r_order, r_loop = jax.random.split(rng)
    orders = random_orders(r_order, b, seq_len)
    rank = jnp.argsort(orders, axis=1)
    null = model.class_embedding(None, b)
    class_emb = jnp.where((labels >= 0)[:, None], model.class_embedding(jnp.maximum(labels, 0)), null)
    return orders, rank, null, class_emb, r_loop


def ar_step(model: MAR, tokens, orders, rank, class_emb, null_emb, step, rng, *, sched_arrays, enc_len: int,
            pred_cap: int, predictor: Predictor, use_cfg: bool):
    """One AR step with static (enc_len, pred_cap): returns updated tokens. Differentiable (used by RL)."""
    masked_before, n_pred, cfg_k = (a[step] for a in sched_arrays)
    mask_next = masked_before - n_pred
    mask = (rank < masked_before).astype(jnp.float32)
    b, s, _ = tokens.shape
    gen_rank = s - 1 - rank  # orders are generated from their end backwards (used by causal attention only)
    if use_cfg:
        z = model.condition(jnp.concatenate([tokens, tokens]), jnp.concatenate([mask, mask]),
                            jnp.concatenate([class_emb, null_emb]), enc_len=enc_len,
                            gen_rank=jnp.concatenate([gen_rank, gen_rank]))
        zc, zu = jnp.split(z, 2, axis=0)
    else:
        zc, zu = model.condition(tokens, mask, class_emb, enc_len=enc_len, gen_rank=gen_rank), None
    slot = jnp.arange(pred_cap)
    valid = slot[None, :] < n_pred
    pos = jnp.take_along_axis(orders, jnp.minimum(mask_next + slot, s - 1)[None, :].repeat(b, 0), axis=1)
    rows = lambda z: jnp.take_along_axis(z, pos[:, :, None], axis=1).reshape(b * pred_cap, -1)
    new = predictor(model, rows(zc), None if zu is None else rows(zu), cfg_k, rng).reshape(b, pred_cap, -1)
    pos_w = jnp.where(valid, pos, s)  # invalid rows go out of bounds and are dropped
    return tokens.at[jnp.arange(b)[:, None], pos_w].set(new.astype(tokens.dtype), mode="drop")


def make_sampler(graphdef: nnx.GraphDef, spec: SamplerSpec, predictor: Predictor, *, seq_len: int,
                 buffer_size: int, token_dim: int):
    """Returns a jitted `sample(state, labels (B,) | None-as-negative, rng) -> tokens (B, S, C)`.

    Labels < 0 mean unconditional (the null class). The whole AR loop is one XLA program.
    """
    sched = ar_schedule(seq_len, spec.num_iter)
    segments = plan_segments(sched, buffer_size, spec.num_buckets)
    use_cfg = spec.cfg != 1.0
    sched_np = (sched.masked_before.astype(np.int32), sched.n_pred.astype(np.int32),
                sched.cfg(spec.cfg, spec.cfg_schedule).astype(np.float32))

    def sample(state, labels, rng):
        model = cast_linear_params(nnx.merge(graphdef, state))  # weights in bf16 once, not at every AR step
        b = labels.shape[0]
        orders, rank, null, class_emb, r_loop = loop_inputs(model, labels, rng, seq_len)
        sched_arrays = tuple(jnp.asarray(a) for a in sched_np)
        tokens = jnp.zeros((b, seq_len, token_dim), jnp.float32)
        for seg in segments:
            def body(step, tokens, seg=seg):
                return ar_step(model, tokens, orders, rank, class_emb, null, step,
                               jax.random.fold_in(r_loop, step), sched_arrays=sched_arrays, enc_len=seg.enc_len,
                               pred_cap=seg.pred_cap, predictor=predictor, use_cfg=use_cfg)
            tokens = jax.lax.fori_loop(seg.start, seg.stop, body, tokens)
        return tokens

    return BatchJit(sample, batch_of=lambda state, labels, rng: labels.shape[0])
