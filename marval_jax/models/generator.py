"""MARVAL's one-step generator parameterisation (docs/method.md section 1).

The generator is a full MAR (transformer + head) initialised from the teacher. Its head is evaluated ONCE at the
fixed timestep t_init on input noise x ~ N(0, I); the epsilon output becomes a clean token
x0 = (x - sqrt(1 - abar) eps) / sqrt(abar), abar = alpha_bar(t_init) of the 1000-step cosine chain.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from marval_jax.diffusion.gaussian import GaussianDiffusion

_TRAIN_CHAIN = GaussianDiffusion.create("")


def alpha_bar(t: int) -> float:
    return float(_TRAIN_CHAIN.alphas_cumprod[t])


def t_init_for_alpha_bar(target: float) -> int:
    """The chain index whose alpha_bar is closest to `target` (abar 0.14 gives t about 760)."""
    return int(np.argmin(np.abs(_TRAIN_CHAIN.alphas_cumprod - target)))


# The one default head timestep of the one-step generator (configs, GSIM and RL settings, sampling read it from here):
# abar(t_init) ~ 0.14, sigma ~ 2.5 in EDM units (the group's sigma_init).
T_INIT = t_init_for_alpha_bar(0.14)


def one_step(head_fn, noise: jax.Array, z: jax.Array, t_init: int) -> jax.Array:
    """head_fn(x, t, z) -> [eps | v]; returns the generated clean tokens x0 (N, C)."""
    abar = alpha_bar(t_init)
    t = jnp.full(noise.shape[:1], t_init, jnp.int32)
    eps = head_fn(noise, t, z)[:, : noise.shape[-1]]
    return (noise - np.sqrt(1.0 - abar) * eps) / np.sqrt(abar)
