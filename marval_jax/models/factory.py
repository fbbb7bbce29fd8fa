"""The model factory every program shares: the MARConfig of a run config, the abstract model (graph definition and
parameter shapes, nothing allocated; what the converters and loaders fill), the tokenizer's decoder as a pure
function of its weights, and `Frozen`, a frozen model as a pytree (weights as leaves, its apply function static).

Nothing here reads a file unless asked to load weights (`decoder_parts`, `frozen_decoder(abstract=False)`).
"""
from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx

from marval_jax.models.mar import MAR, MARConfig


def model_config(config) -> MARConfig:
    """The MARConfig of a run config's `model` section."""
    return MARConfig(**config.model.to_dict())


def abstract_model(cfg: MARConfig):
    """(graphdef, abstract params) without allocating: the structure converters and checkpoint loaders fill."""
    return nnx.split(nnx.eval_shape(lambda: MAR(cfg, rngs=nnx.Rngs(0))))


def grid_labels(n: int, class_num: int) -> jax.Array:
    """Labels of an n-image sample grid: the classes in turn."""
    return jnp.arange(n) % class_num


@flax.struct.dataclass
class Frozen:
    """A frozen model as a pytree: `params` are its leaves (arguments of a jitted step, replicated, never closed
    over), `fn(params, *args)` its pure apply function (static: part of the tree structure). `Frozen(...)(*args)`
    applies it. With abstract params (ShapeDtypeStructs) it describes the input without any weight."""
    params: Any
    fn: Callable = flax.struct.field(pytree_node=False)

    def __call__(self, *args):
        return self.fn(self.params, *args)


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
    from marval_jax.models.vae_tokenizer import vae_decoder_parts
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
