"""MAR's training objective (reference `forward` + `forward_loss` + `DiffLoss.forward`) as a pure function.

Per batch: one mask ratio from the truncated normal on [mask_ratio_min, 1] (mean 1, std 0.25), one random order
per sample, the first ceil(S * ratio) positions of each order masked; label dropout; the head condition z is
repeated `diffusion_batch_mul` times, each copy with its own t ~ U{0..999} and noise; the per-token MSE + VB loss
is averaged over masked tokens only. With `attention="causal"` the model gets each position's generation rank
from the same order (the masked prefix of the order is what a sampler generates last).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from marval_jax.diffusion.gaussian import GaussianDiffusion
from marval_jax.models.mar import MAR, gen_rank_from_orders
from marval_jax.sampling.schedule import mask_from_orders, random_orders, sample_mask_ratio  # noqa: F401

TRAIN_DIFFUSION = GaussianDiffusion.create("")


def random_mask(rng: jax.Array, batch: int, seq_len: int, mask_ratio_min: float) -> tuple[jax.Array, jax.Array]:
    """(mask (B, S) float 1 = masked, orders (B, S)); every row masks the same count ceil(S * ratio)."""
    r_order, r_ratio = jax.random.split(rng)
    orders = random_orders(r_order, batch, seq_len)
    mask, _ = mask_from_orders(orders, jnp.ceil(seq_len * sample_mask_ratio(r_ratio, mask_ratio_min)))
    return mask, orders


def diffusion_loss(model: MAR, z: jax.Array, target: jax.Array, mask: jax.Array, rng: jax.Array,
                   diffusion_batch_mul: int) -> tuple[jax.Array, dict[str, jax.Array]]:
    """DiffLoss over (B, S) tokens with condition z, averaged over mask == 1.

    The reference repeats the (B*S) rows `diffusion_batch_mul` times; here each copy is its own head call on the
    (B*S) rows, which keeps the rows batch-sharded (a tile of the sharded axis would make every device run the
    head on the global batch; found by tools/scale_check).
    """
    x0, zz, m = target.reshape(-1, target.shape[-1]), z.reshape(-1, z.shape[-1]), mask.reshape(-1)
    totals = None
    for copy in range(diffusion_batch_mul):
        r_t, r_noise = jax.random.split(jax.random.fold_in(rng, copy))
        t = jax.random.randint(r_t, (x0.shape[0],), 0, TRAIN_DIFFUSION.num_timesteps)
        noise = jax.random.normal(r_noise, x0.shape, jnp.float32)
        xt = TRAIN_DIFFUSION.q_sample(x0, t, noise)
        terms = TRAIN_DIFFUSION.training_losses(model.head(xt, t, zz), x0, xt, t, noise)
        sums = {k: (v * m).sum() for k, v in terms.items()}
        totals = sums if totals is None else {k: totals[k] + sums[k] for k in sums}
    denom = jnp.maximum(m.sum(), 1.0) * diffusion_batch_mul
    avg = {k: v / denom for k, v in totals.items()}
    return avg["loss"], avg


def mar_loss(model: MAR, tokens: jax.Array, labels: jax.Array, rng: jax.Array, *, mask_ratio_min: float,
             diffusion_batch_mul: int, enc_len: int, train: bool = True) -> tuple[jax.Array, dict[str, jax.Array]]:
    b, s, _ = tokens.shape
    r_mask, r_drop, r_model, r_diff = jax.random.split(rng, 4)
    mask, orders = random_mask(r_mask, b, s, mask_ratio_min)
    gen_rank = gen_rank_from_orders(orders) if model.causal else None
    class_emb = model.class_embedding(labels)
    if train:
        class_emb = model.drop_labels(class_emb, r_drop)
    z = model.condition(tokens, mask, class_emb, enc_len=enc_len, rng=r_model if train else None, gen_rank=gen_rank)
    loss, terms = diffusion_loss(model, z, tokens, mask, r_diff, diffusion_batch_mul)
    return loss, dict(terms, mask_ratio=mask.mean())
