"""The outer masked-AR schedule of MAR's `sample_tokens`, computed on the host, and its static-shape plan; the
random orders and masks that samplers and training losses draw (`random_orders`, `mask_from_orders`,
`sample_mask_ratio`: the one implementation every sampler and loss uses).

Per step k: mask_len = floor(S cos(pi/2 (k+1)/K)), clamped to [1, #masked - 1]; the tokens predicted are
order[mask_len_next : mask_len_now] (all remaining at the last step). Linear CFG: 1 + (cfg - 1)(S - mask_len)/S.
The schedule depends only on (S, K), so it is static: the sampler groups steps into a few segments with one static
encoder length and one static number of predicted tokens each (`plan_segments`), one compiled loop body each.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class ARSchedule:
    seq_len: int
    num_iter: int
    mask_len: np.ndarray   # (K,) tokens still masked after step k, as the reference records it (clamped >= 1)
    n_pred: np.ndarray     # (K,) tokens predicted at step k
    masked_before: np.ndarray  # (K,) tokens masked when step k starts

    def cfg(self, cfg: float, schedule: str = "linear") -> np.ndarray:
        """Guidance scale per step in MAR's convention."""
        if schedule == "linear":
            return 1 + (cfg - 1) * (self.seq_len - self.mask_len) / self.seq_len
        if schedule == "constant":
            return np.full(self.num_iter, float(cfg))
        raise ValueError(f"cfg_schedule must be 'linear' or 'constant', got {schedule!r}")


def ar_schedule(seq_len: int, num_iter: int) -> ARSchedule:
    if num_iter < 1 or num_iter > seq_len:
        raise ValueError(f"num_iter must be in [1, seq_len={seq_len}], got {num_iter}")
    masked = seq_len
    mask_len, n_pred, before = [], [], []
    for step in range(num_iter):
        ratio = np.cos(math.pi / 2.0 * (step + 1) / num_iter)
        ml = max(1.0, min(masked - 1.0, float(np.floor(seq_len * ratio))))
        pred = masked if step >= num_iter - 1 else masked - int(ml)
        before.append(masked)
        mask_len.append(ml)
        n_pred.append(pred)
        masked -= pred
    return ARSchedule(seq_len, num_iter, np.array(mask_len), np.array(n_pred, np.int64), np.array(before, np.int64))


@dataclasses.dataclass(frozen=True)
class Segment:
    start: int      # first AR step
    stop: int       # one past the last AR step
    enc_len: int    # static encoder length (buffer + visible, padded)
    pred_cap: int   # static number of head rows per sample (predicted tokens, padded)


def plan_segments(sched: ARSchedule, buffer_size: int, num_buckets: int = 4) -> list[Segment]:
    """Split the K steps into at most `num_buckets` contiguous segments by visible-token count.

    Bucket b covers visible counts up to ceil(S (b+1) / num_buckets); the encoder is padded to the bucket's top and
    the head to the segment's largest n_pred. num_buckets = 1 gives one loop body over the full length.
    """
    s = sched.seq_len
    visible = s - sched.masked_before
    tops = [int(math.ceil(s * (b + 1) / num_buckets)) for b in range(num_buckets)]
    bucket = np.array([next(i for i, top in enumerate(tops) if v <= top) for v in visible])
    segments, start = [], 0
    for k in range(1, sched.num_iter + 1):
        if k == sched.num_iter or bucket[k] != bucket[start]:
            top = min(tops[bucket[start]], s)
            segments.append(Segment(start, k, buffer_size + top, int(sched.n_pred[start:k].max())))
            start = k
    return segments


def random_orders(rng: jax.Array, batch: int, seq_len: int) -> jax.Array:
    """One uniformly random order (permutation of the S positions) per sample, (B, S) int32. Sampling generates an
    order from its end backwards; training masks its first positions (the same tokens a sampler generates last)."""
    return jnp.argsort(jax.random.uniform(rng, (batch, seq_len)), axis=1)


def mask_from_orders(orders: jax.Array, num_masked: jax.Array | int) -> tuple[jax.Array, jax.Array]:
    """(mask (B, S) float32 with 1 = masked, rank (B, S)): the first `num_masked` positions of each order masked;
    rank[b, p] is position p's index in order b."""
    rank = jnp.argsort(orders, axis=1)
    return (rank < num_masked).astype(jnp.float32), rank


def sample_mask_ratio(rng: jax.Array, mask_ratio_min: float) -> jax.Array:
    """MAR's training mask ratio, one draw (): scipy truncnorm(a=(min - 1)/0.25, b=0, loc=1, scale=0.25), i.e. a
    normal of mean 1 and std 0.25 truncated to [mask_ratio_min, 1]."""
    return 1.0 + 0.25 * jax.random.truncated_normal(rng, (mask_ratio_min - 1.0) / 0.25, 0.0)
