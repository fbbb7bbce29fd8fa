"""Optimizers as MAR trains: AdamW with weight decay on exactly the reference's set, global-norm clipping, and a
linear warmup followed by a constant or cosine learning rate (updated per step)."""
from __future__ import annotations

import optax

from marval_jax.tree_paths import path_str
import jax


def learning_rate(train_cfg) -> float:
    """MAR's rule lr = blr * global_batch / 256 unless `lr` > 0."""
    return float(train_cfg.lr) if train_cfg.lr > 0 else float(train_cfg.blr) * train_cfg.global_batch_size / 256


def lr_schedule(peak: float, warmup_steps: int, total_steps: int, kind: str = "constant", min_lr: float = 0.0):
    warm = optax.linear_schedule(0.0, peak, max(warmup_steps, 1))
    if kind == "constant":
        rest = optax.constant_schedule(peak)
    elif kind == "cosine":
        rest = optax.cosine_decay_schedule(peak, max(total_steps - warmup_steps, 1), alpha=min_lr / peak if peak else 0)
    else:
        raise ValueError(f"lr_schedule must be 'constant' or 'cosine', got {kind!r}")
    return optax.join_schedules([warm, rest], [warmup_steps])


def mar_decay_mask(params):
    """The reference's `add_weight_decay`: ndim > 1, not a bias, not in the diffusion head."""
    def decay(path, leaf):
        name = path_str(path)
        return leaf.ndim > 1 and not name.endswith("bias") and "diffloss" not in name
    return jax.tree_util.tree_map_with_path(decay, params)


def make_optimizer(peak_lr: float, *, warmup_steps: int, total_steps: int, schedule: str = "constant",
                   min_lr: float = 0.0, b1: float = 0.9, b2: float = 0.95, eps: float = 1e-8,
                   weight_decay: float = 0.0, grad_clip: float = 0.0, decay_mask=None,
                   trainable_mask=None) -> optax.GradientTransformation:
    """Clip -> AdamW; `trainable_mask` (pytree of bools) freezes the rest (zero updates, no moments kept)."""
    parts = []
    if grad_clip > 0:
        parts.append(optax.clip_by_global_norm(grad_clip))
    sched = lr_schedule(peak_lr, warmup_steps, total_steps, schedule, min_lr)
    parts.append(optax.adamw(sched, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))
    tx = optax.chain(*parts)
    if trainable_mask is not None:
        labels = jax.tree_util.tree_map(lambda m: "train" if m else "freeze", trainable_mask)
        tx = optax.multi_transform({"train": tx, "freeze": optax.set_to_zero()}, labels)
    return tx


def mar_optimizer(train_cfg, params) -> optax.GradientTransformation:
    return make_optimizer(learning_rate(train_cfg), warmup_steps=train_cfg.warmup_steps,
                          total_steps=train_cfg.num_steps, schedule=train_cfg.lr_schedule, min_lr=train_cfg.min_lr,
                          b1=train_cfg.b1, b2=train_cfg.b2, eps=train_cfg.eps, weight_decay=train_cfg.weight_decay,
                          grad_clip=train_cfg.grad_clip, decay_mask=mar_decay_mask(params))


def ema_update(ema, params, decay: float):
    """MAR's EMA: ema = decay * ema + (1 - decay) * params after every step, no warmup or bias correction."""
    return jax.tree_util.tree_map(lambda e, p: e * decay + (1.0 - decay) * p, ema, params)
