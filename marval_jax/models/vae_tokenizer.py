"""KL-VAE latents as MAR tokens: the decoder used for grids, evaluation and rewards when tokenizer.kind = "vae".

tokens (B, S, 16 p^2) -> unpatchify (MAR's channel order) -> latents / scale -> VAE decode -> images NHWC [-1, 1].
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from marval_jax.models.mar import MARConfig, unpatchify


def make_vae_decoder(tok_cfg, mar_cfg: MARConfig):
    """tok_cfg: tokenizer config (vae_ckpt: kl16.ckpt / .safetensors / .npz; scale)."""
    if not tok_cfg.vae_ckpt:
        raise ValueError("tokenizer.kind='vae' needs tokenizer.vae_ckpt (MAR's kl16.ckpt or a converted .npz)")
    from marval_jax.checkpoints.convert_vae import load_vae
    vae = load_vae(tok_cfg.vae_ckpt)
    graphdef, state = nnx.split(vae)
    scale = float(tok_cfg.scale)

    def decode(tokens):
        latents = unpatchify(tokens, mar_cfg.patch_size, mar_cfg.vae_embed_dim)  # NCHW
        z = jnp.transpose(latents, (0, 2, 3, 1)) / scale
        return nnx.merge(graphdef, state).decode(z)

    return decode
