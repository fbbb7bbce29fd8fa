"""KL-VAE latents as MAR tokens: the decoder used for grids, evaluation and rewards when tokenizer.kind = "vae".

tokens (B, S, 16 p^2) -> unpatchify (MAR's channel order) -> latents / scale -> VAE decode -> images NHWC [-1, 1].
"""
from __future__ import annotations

import jax.numpy as jnp
from flax import nnx

from marval_jax.models.mar import MARConfig, unpatchify
from marval_jax.user_errors import UserError


def vae_decoder_parts(tok_cfg, mar_cfg: MARConfig):
    """(decode(params, tokens) -> NHWC images, params): the KL-16 decoder as a pure function of its weights, for jitted
    steps that take the weights as an argument (closed over, they would be baked into the program as constants).
    tok_cfg: tokenizer config (vae_ckpt: kl16.ckpt / .safetensors / .npz; scale; trust_pickle, default False: a .ckpt
    is read with torch.load(weights_only=True), and fully unpickled, which can run code from the file, only when
    tokenizer.trust_pickle is True)."""
    if not tok_cfg.vae_ckpt:
        raise UserError("tokenizer.kind='vae' needs tokenizer.vae_ckpt (MAR's kl16.ckpt or a converted .npz)")
    from marval_jax.checkpoints.convert_vae import load_vae
    trust = bool(getattr(tok_cfg, "trust_pickle", False))
    graphdef, state = nnx.split(load_vae(tok_cfg.vae_ckpt, trust_pickle=trust,
                                         trust_hint="tokenizer.trust_pickle=True in the config"))
    return vae_decode_fn(graphdef, float(tok_cfg.scale), mar_cfg), state


def vae_decode_fn(graphdef, scale: float, mar_cfg: MARConfig):
    """decode(params, tokens (B, S, C)) -> images NHWC: unpatchify, unscale, the VAE's decoder."""
    def decode(params, tokens):
        latents = unpatchify(tokens, mar_cfg.patch_size, mar_cfg.vae_embed_dim)  # NCHW
        z = jnp.transpose(latents, (0, 2, 3, 1)) / scale
        return nnx.merge(graphdef, params).decode(z)
    return decode


def make_vae_decoder(tok_cfg, mar_cfg: MARConfig):
    """tokens -> images with the weights closed over (grids and small programs)."""
    decode, params = vae_decoder_parts(tok_cfg, mar_cfg)
    return lambda tokens: decode(params, tokens)
