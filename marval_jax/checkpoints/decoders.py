"""The tokenizer's decoder (tokens -> images) as a pure function of its weights, for grids, sampling and rewards:
pixel patches need no weights; the KL-16 VAE's are read from tokenizer.vae_ckpt (checkpoints/convert_vae.py), or
described by shapes only (`frozen_decoder(abstract=True)`: step building and the scale check read no file).
"""
from __future__ import annotations

from flax import nnx

from marval_jax.models.factory import Frozen
from marval_jax.models.mar import MARConfig


def _pixel_patch_decoder(tok, cfg: MARConfig):
    from marval_jax.data.tokenizers import PixelPatchTokenizer
    size = cfg.grid * tok.patch_size
    patches = PixelPatchTokenizer(tok.patch_size, tok.channels, size, size)
    return lambda params, tokens: patches.decode(tokens)


def _check_kind(tok) -> None:
    if tok.kind not in ("pixel_patch", "vae"):
        from marval_jax.user_errors import UserError
        raise UserError(f"tokenizer.kind must be 'pixel_patch' or 'vae', got {tok.kind!r}")


def decoder_parts(config, cfg: MARConfig):
    """(decode(params, tokens (B, S, C)) -> images NHWC in [-1, 1], params): the tokenizer's decoder as a pure function
    of its weights (None for pixel patches; the KL-16 VAE's, read from tokenizer.vae_ckpt, for latents), so a jitted
    step can take them as an argument."""
    tok = config.tokenizer
    _check_kind(tok)
    if tok.kind == "pixel_patch":
        return _pixel_patch_decoder(tok, cfg), None
    from marval_jax.checkpoints.convert_vae import vae_decoder_parts
    return vae_decoder_parts(tok, cfg)


def decoder_fn(config, cfg: MARConfig):
    """tokens (B, S, C) -> images NHWC in [-1, 1] (the decoder's weights closed over: small programs, grids)."""
    decode, params = decoder_parts(config, cfg)
    return lambda tokens: decode(params, tokens)


def frozen_decoder(config, cfg: MARConfig, *, abstract: bool = False) -> Frozen:
    """The tokenizer's decoder as a `Frozen`. abstract: the VAE's architecture from the config (tokenizer.vae_ch,
    vae_ch_mult), weight shapes only, no file read; else its weights from tokenizer.vae_ckpt."""
    tok = config.tokenizer
    _check_kind(tok)
    if tok.kind == "pixel_patch" or not abstract:
        return Frozen(*reversed(decoder_parts(config, cfg)))
    from marval_jax.models.vae import AutoencoderKL
    from marval_jax.models.vae_tokenizer import vae_decode_fn
    vae = nnx.eval_shape(lambda: AutoencoderKL(ch=tok.vae_ch, ch_mult=tuple(tok.vae_ch_mult),
                                               embed_dim=cfg.vae_embed_dim, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(vae)
    return Frozen(params, vae_decode_fn(graphdef, float(tok.scale), cfg))
