"""CLIP-based rewards on the embeddings of `marval_jax.models.clip.CLIP`: cosine similarity, CLIPScore, PickScore."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def normalize(emb: jax.Array, eps: float = 1e-12) -> jax.Array:
    emb = emb.astype(jnp.float32)
    return emb / jnp.maximum(jnp.linalg.norm(emb, axis=-1, keepdims=True), eps)


def cosine(image_emb: jax.Array, text_emb: jax.Array) -> jax.Array:
    """Row-wise cosine similarity of (B, P) and (B, P) (or broadcastable) embeddings -> (B,)."""
    return jnp.sum(normalize(image_emb) * normalize(text_emb), axis=-1)


def clip_score(image_emb: jax.Array, text_emb: jax.Array, *, scale: float = 100.0,
               clamp_min: float | None = 0.0) -> jax.Array:
    """`scale * max(cos, clamp_min)` (CLIPScore as torchmetrics: 100 * cos clamped at 0; the paper uses w=2.5).

    `clamp_min=None` disables the clamp (gradients then flow for anti-aligned pairs too).
    """
    cos = cosine(image_emb, text_emb)
    if clamp_min is not None:
        cos = jnp.maximum(cos, clamp_min)
    return scale * cos


def pickscore(image_emb: jax.Array, text_emb: jax.Array, logit_scale: jax.Array) -> jax.Array:
    """PickScore: `exp(logit_scale) * cos` (with PickScore_v1 weights, exp(logit_scale) = 100)."""
    return jnp.exp(jnp.asarray(logit_scale, jnp.float32)) * cosine(image_emb, text_emb)
