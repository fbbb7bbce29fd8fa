"""The outer masked-AR schedule of MAR's `sample_tokens`, computed on the host, and its static-shape plan.

Per step k: mask_len = floor(S cos(pi/2 (k+1)/K)), clamped to [1, #masked - 1]; the tokens predicted are
order[mask_len_next : mask_len_now] (all remaining at the last step). Linear CFG: 1 + (cfg - 1)(S - mask_len)/S.
The schedule depends only on (S, K), so it is static: the sampler groups steps into a few segments with one static
encoder length and one static number of predicted tokens each (`plan_segments`), one compiled loop body each.
"""
from __future__ import annotations

import dataclasses
import math

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
