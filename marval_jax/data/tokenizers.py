"""Tokenizers: images (NHWC, [-1, 1]) <-> token sequences (B, S, D) for MAR.

Every tokenizer has one interface (`Tokenizer`):

* ``encode(images, rng=None) -> tokens``: (B, H, W, C) float32 -> (B, seq_len, token_dim). ``rng`` is used by
  stochastic tokenizers (a VAE samples its posterior; ``rng=None`` takes the mode) and ignored by the others.
* ``decode(tokens) -> images``: the inverse, (B, seq_len, token_dim) -> (B, H, W, C).
* ``seq_len`` and ``token_dim``: the sequence shape the MAR model is built for.

All functions are pure ``jax.numpy`` (jit-able, differentiable) and make no copies of parameters.

Token order follows MAR's ``patchify``: tokens are the row-major (h, w) grid of ``p x p`` patches, and inside a
token the values are ordered (c, p, q), i.e. channel-major, as ``einsum('nchpwq->nhwcpq')`` on NCHW input.
`patchify` / `unpatchify` here take NHWC input and give exactly MAR's tokens. `patchify_np` is the NumPy twin for
grain workers (no jax in the input pipeline).

`VAETokenizer` adapts a KL VAE given as a pair of callables (``encode_fn(images) -> moments`` with the raw
``mean || logvar`` on the last axis, ``decode_fn(z) -> images``), e.g. ``marval_jax.models.vae.AutoencoderKL``'s
``lambda x: vae.encode(x).moments`` and ``vae.decode``.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np

LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0
MAR_VAE_SCALE = 0.2325


@runtime_checkable
class Tokenizer(Protocol):
    """What MAR needs from a tokenizer (see the module docstring)."""

    @property
    def seq_len(self) -> int: ...

    @property
    def token_dim(self) -> int: ...

    def encode(self, images: jax.Array, rng: jax.Array | None = None) -> jax.Array: ...

    def decode(self, tokens: jax.Array) -> jax.Array: ...


def _check_grid(shape: tuple[int, ...], p: int, what: str) -> tuple[int, int, int, int]:
    if len(shape) != 4:
        raise ValueError(f"{what}: expected NHWC (B, H, W, C), got shape {shape}")
    b, hh, ww, c = shape
    if hh % p or ww % p:
        raise ValueError(f"{what}: height and width must be multiples of patch_size {p}, got shape {shape}")
    return b, hh // p, ww // p, c


def patchify(x: jax.Array, patch_size: int) -> jax.Array:
    """(B, H, W, C) -> (B, (H/p) * (W/p), C * p * p), tokens row-major, values (c, p, q) inside a token (MAR)."""
    p = patch_size
    b, h, w, c = _check_grid(x.shape, p, "patchify")
    x = x.reshape(b, h, p, w, p, c)
    x = jnp.transpose(x, (0, 1, 3, 5, 2, 4))  # (b, h, w, c, p, q)
    return x.reshape(b, h * w, c * p * p)


def unpatchify(tokens: jax.Array, patch_size: int, height: int, width: int, channels: int) -> jax.Array:
    """Inverse of `patchify`: (B, (H/p) * (W/p), C * p * p) -> (B, H, W, C)."""
    p = patch_size
    h, w = height // p, width // p
    if tokens.ndim != 3 or tokens.shape[1:] != (h * w, channels * p * p):
        raise ValueError(f"unpatchify: expected tokens (B, {h * w}, {channels * p * p}), got shape {tokens.shape}")
    b = tokens.shape[0]
    x = tokens.reshape(b, h, w, channels, p, p)
    x = jnp.transpose(x, (0, 1, 4, 2, 5, 3))  # (b, h, p, w, q, c)
    return x.reshape(b, h * p, w * p, channels)


def patchify_np(x: np.ndarray, patch_size: int) -> np.ndarray:
    """NumPy `patchify` for one example (H, W, C) or a batch (B, H, W, C)."""
    single = x.ndim == 3
    x = x[None] if single else x
    p = patch_size
    b, h, w, c = _check_grid(x.shape, p, "patchify_np")
    out = x.reshape(b, h, p, w, p, c).transpose(0, 1, 3, 5, 2, 4).reshape(b, h * w, c * p * p)
    return out[0] if single else out


class PixelPatchTokenizer:
    """Pixels as tokens: ``p x p`` patches of an (height, width, channels) image, no parameters.

    ``seq_len = (height / p) * (width / p)``, ``token_dim = channels * p * p``; exact round trip.
    """

    def __init__(self, patch_size: int, channels: int, height: int, width: int):
        if patch_size < 1 or height % patch_size or width % patch_size:
            raise ValueError(f"PixelPatchTokenizer: height {height} and width {width} must be multiples of "
                             f"patch_size {patch_size} >= 1")
        self.patch_size = patch_size
        self.channels = channels
        self.height = height
        self.width = width

    @property
    def seq_len(self) -> int:
        return (self.height // self.patch_size) * (self.width // self.patch_size)

    @property
    def token_dim(self) -> int:
        return self.channels * self.patch_size ** 2

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (self.height, self.width, self.channels)

    def _check_images(self, images: jax.Array) -> None:
        if images.ndim != 4 or tuple(images.shape[1:]) != self.image_shape:
            raise ValueError(f"PixelPatchTokenizer.encode: expected images (B, {self.height}, {self.width}, "
                             f"{self.channels}), got shape {images.shape}")

    def encode(self, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        del rng  # deterministic
        images = jnp.asarray(images)
        self._check_images(images)
        return patchify(images, self.patch_size)

    def decode(self, tokens: jax.Array) -> jax.Array:
        return unpatchify(jnp.asarray(tokens), self.patch_size, self.height, self.width, self.channels)

    def __repr__(self) -> str:
        return (f"PixelPatchTokenizer(patch_size={self.patch_size}, channels={self.channels}, "
                f"height={self.height}, width={self.width})")


def split_moments(moments: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Raw ``mean || logvar`` (last axis) -> ``(mean, logvar clamped to [-30, 20])`` as LDM's posterior."""
    if moments.shape[-1] % 2:
        raise ValueError(f"moments need an even last axis (mean || logvar), got shape {moments.shape}")
    mean, logvar = jnp.split(moments, 2, axis=-1)
    return mean, jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)


def sample_latents(moments: jax.Array, rng: jax.Array | None, scale: float = MAR_VAE_SCALE) -> jax.Array:
    """``(mean + exp(logvar / 2) * eps) * scale``; the mode ``mean * scale`` when ``rng`` is None."""
    mean, logvar = split_moments(jnp.asarray(moments))
    if rng is None:
        return mean * scale
    eps = jax.random.normal(rng, mean.shape, mean.dtype)
    return (mean + jnp.exp(0.5 * logvar) * eps) * scale


class VAETokenizer:
    """A KL VAE as a tokenizer (MAR: KL-16, ``scale = 0.2325``, ``patch_size = 1``).

    ``encode_fn(images (B, H, W, C_img)) -> moments (B, H/s, W/s, 2 * latent_channels)`` (raw mean || logvar) or a
    ``(mean, logvar)`` pair; ``decode_fn(z (B, H/s, W/s, latent_channels)) -> images``. Tokens are the posterior
    sample (mode if ``rng`` is None) times ``scale``, patchified with ``patch_size``; `decode` divides by ``scale``.
    """

    def __init__(self, encode_fn: Callable[[jax.Array], jax.Array | tuple[jax.Array, jax.Array]],
                 decode_fn: Callable[[jax.Array], jax.Array], *, latent_channels: int, stride: int,
                 height: int, width: int, scale: float = MAR_VAE_SCALE, patch_size: int = 1):
        if height % (stride * patch_size) or width % (stride * patch_size):
            raise ValueError(f"VAETokenizer: height {height} and width {width} must be multiples of "
                             f"stride * patch_size = {stride * patch_size}")
        self.encode_fn = encode_fn
        self.decode_fn = decode_fn
        self.latent_channels = latent_channels
        self.stride = stride
        self.height = height
        self.width = width
        self.scale = scale
        self.patch_size = patch_size

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        return (self.height // self.stride, self.width // self.stride, self.latent_channels)

    @property
    def seq_len(self) -> int:
        h, w, _ = self.latent_shape
        return (h // self.patch_size) * (w // self.patch_size)

    @property
    def token_dim(self) -> int:
        return self.latent_channels * self.patch_size ** 2

    def latents_to_tokens(self, latents: jax.Array) -> jax.Array:
        """Scaled latents (B, h, w, C) (e.g. from the latent cache) -> tokens."""
        return patchify(jnp.asarray(latents), self.patch_size)

    def tokens_to_latents(self, tokens: jax.Array) -> jax.Array:
        h, w, c = self.latent_shape
        return unpatchify(jnp.asarray(tokens), self.patch_size, h, w, c)

    def encode(self, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        out = self.encode_fn(images)
        moments = jnp.concatenate(out, axis=-1) if isinstance(out, (tuple, list)) else out
        expected = self.latent_shape[:2] + (2 * self.latent_channels,)
        if tuple(moments.shape[1:]) != expected:
            raise ValueError(f"VAETokenizer: encode_fn must return moments (B, {expected[0]}, {expected[1]}, "
                             f"{expected[2]}), got shape {moments.shape}")
        return self.latents_to_tokens(sample_latents(moments, rng, self.scale))

    def decode(self, tokens: jax.Array) -> jax.Array:
        return self.decode_fn(self.tokens_to_latents(tokens) / self.scale)
