"""KL-VAE latents as MAR tokens: the decode function used for grids, evaluation and rewards when tokenizer.kind =
"vae" (loading the weights from a file is checkpoints/convert_vae.vae_decoder_parts).

tokens (B, S, 16 p^2) -> unpatchify (MAR's channel order) -> latents / scale -> VAE decode -> images NHWC [-1, 1].
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from marval_jax.models.mar import MARConfig, unpatchify


def vae_decode_fn(graphdef, scale: float, mar_cfg: MARConfig):
    """decode(params, tokens (B, S, C)) -> images NHWC: unpatchify, unscale, the VAE's decoder."""
    def decode(params, tokens):
        latents = unpatchify(tokens, mar_cfg.patch_size, mar_cfg.vae_embed_dim)  # NCHW
        z = jnp.transpose(latents, (0, 2, 3, 1)) / scale
        return nnx.merge(graphdef, params).decode(z)
    return decode
