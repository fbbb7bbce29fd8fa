"""MAR's per-token diffusion head `SimpleMLPAdaLN` (models/diffloss.py of the reference).

y = time_embed(t) + cond_embed(c); d AdaLN residual MLP blocks; a final AdaLN layer whose output is
[epsilon (C) | learned-range variance value v (C)]. t is the integer index in the 1000-step chain.
Init: xavier / bias 0, time-embed MLP normal(0.02), zero adaLN output layers and final linear (output 0 at init).
"""
from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from marval_jax.models.transformer import dense, layer_norm

FREQ_DIM = 256


def timestep_embedding(t: jax.Array, dim: int = FREQ_DIM, max_period: float = 10000.0) -> jax.Array:
    """Sinusoid [cos | sin] of the integer timestep, as the reference (cos first)."""
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = t.astype(jnp.float32)[:, None] * freqs[None]
    return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def modulate(x, shift, scale):
    return x * (1 + scale) + shift


class ResBlock(nnx.Module):
    def __init__(self, width: int, *, rngs: nnx.Rngs, dtype: Any):
        zero = nnx.initializers.zeros_init()
        self.in_ln = layer_norm(width, rngs=rngs, dtype=dtype)
        self.mlp_0 = dense(width, width, rngs=rngs, dtype=dtype)
        self.mlp_2 = dense(width, width, rngs=rngs, dtype=dtype)
        self.adaLN_modulation_1 = dense(width, 3 * width, rngs=rngs, dtype=dtype, kernel_init=zero)

    def __call__(self, x, y):
        shift, scale, gate = jnp.split(self.adaLN_modulation_1(jax.nn.silu(y)), 3, axis=-1)
        h = modulate(self.in_ln(x), shift, scale)
        h = self.mlp_2(jax.nn.silu(self.mlp_0(h)))
        return x + gate * h


class FinalLayer(nnx.Module):
    def __init__(self, width: int, out_channels: int, *, rngs: nnx.Rngs, dtype: Any):
        zero = nnx.initializers.zeros_init()
        self.norm_final = layer_norm(width, rngs=rngs, dtype=dtype, affine=False)
        self.adaLN_modulation_1 = dense(width, 2 * width, rngs=rngs, dtype=dtype, kernel_init=zero)
        self.linear = dense(width, out_channels, rngs=rngs, dtype=dtype, kernel_init=zero)

    def __call__(self, x, y):
        shift, scale = jnp.split(self.adaLN_modulation_1(jax.nn.silu(y)), 2, axis=-1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


class SimpleMLPAdaLN(nnx.Module):
    def __init__(self, in_channels: int, width: int, cond_dim: int, depth: int, *, rngs: nnx.Rngs,
                 dtype: Any = jnp.float32):
        normal = nnx.initializers.normal(0.02)
        self.in_channels = in_channels
        self.time_embed_0 = dense(FREQ_DIM, width, rngs=rngs, dtype=dtype, kernel_init=normal)
        self.time_embed_2 = dense(width, width, rngs=rngs, dtype=dtype, kernel_init=normal)
        self.cond_embed = dense(cond_dim, width, rngs=rngs, dtype=dtype)
        self.input_proj = dense(in_channels, width, rngs=rngs, dtype=dtype)
        self.res_blocks = nnx.List([ResBlock(width, rngs=rngs, dtype=dtype) for _ in range(depth)])
        self.final_layer = FinalLayer(width, 2 * in_channels, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, t: jax.Array, c: jax.Array) -> jax.Array:
        """x (N, C) noisy token, t (N,) index in the 1000-step chain, c (N, D) condition -> (N, 2C) float32."""
        temb = self.time_embed_2(jax.nn.silu(self.time_embed_0(timestep_embedding(t))))
        y = temb + self.cond_embed(c)
        h = self.input_proj(x)
        for block in self.res_blocks:
            h = block(h, y)
        return self.final_layer(h, y).astype(jnp.float32)

    def forward_with_cfg(self, x: jax.Array, t: jax.Array, c: jax.Array, cfg_scale) -> jax.Array:
        """The reference's CFG: run [x_half; x_half] with c = [cond; uncond]; guided epsilon for both halves,
        each half's own variance channels."""
        half = x[: x.shape[0] // 2]
        out = self(jnp.concatenate([half, half], axis=0), t, c)
        eps, rest = out[:, : self.in_channels], out[:, self.in_channels:]
        cond_eps, uncond_eps = jnp.split(eps, 2, axis=0)
        half_eps = uncond_eps + cfg_scale * (cond_eps - uncond_eps)
        return jnp.concatenate([jnp.concatenate([half_eps, half_eps], axis=0), rest], axis=1)
