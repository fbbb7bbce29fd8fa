"""MAR's KL-16 tokenizer: the LDM ``AutoencoderKL`` layout in Flax NNX (NHWC).

Layout (reference: ``docs/method.md`` section R5, MAR ``models/vae.py``):

* Encoder: ``conv_in`` -> per level ``num_res_blocks`` ResnetBlocks (+ one AttnBlock after each block on the
    attention levels) and a stride-2 ``downsample`` (pad right/bottom by one, 3x3 conv, no padding) on every level
    but the last -> ``mid`` (block_1, attn_1, block_2) -> ``norm_out`` -> swish -> ``conv_out`` (2 * embed_dim).
* ``quant_conv`` (1x1) gives the moments; ``mean, logvar = split(moments)``; logvar clamped to [-30, 20].
* Decoder: ``post_quant_conv`` (1x1) -> ``conv_in`` -> ``mid`` -> up levels (last to first) with
    ``num_res_blocks + 1`` ResnetBlocks, **no attention**, nearest x2 + 3x3 conv ``upsample`` on every level but
    level 0 -> ``norm_out`` -> swish -> ``conv_out`` (3 channels).

Attribute names mirror the PyTorch state_dict keys (``encoder.down[i].block[j].conv1.kernel`` <->
``encoder.down.i.block.j.conv1.weight``), so ``marval_jax.checkpoints.convert_vae`` is a path mapping.

Parameters are float32; ``dtype`` is the compute dtype. GroupNorm statistics, the attention softmax and the
returned moments / images are float32. With ``dtype=float32`` convolutions and matmuls run at
``Precision.HIGHEST`` so results do not depend on ``jax.default_matmul_precision`` (TF32 on GPUs).
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx
from flax import struct

# Sharding annotations (regex over the parameter path, logical axes). The VAE is small (66M parameters) and is
# replicated; data parallelism shards its activations only.
LOGICAL_AXES: list[tuple[str, tuple[str | None, ...]]] = []

# MAR trains on ``posterior.sample() * 0.2325`` and decodes ``tokens / 0.2325`` (1 / std of KL-16 latents on
# ImageNet, no mean shift).
VAE_SCALE = 0.2325

LOGVAR_MIN = -30.0
LOGVAR_MAX = 20.0


def _precision(dtype: Any) -> jax.lax.Precision | None:
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def swish(x: jax.Array) -> jax.Array:
    return x * jax.nn.sigmoid(x)


@struct.dataclass
class DiagonalGaussian:
    """Posterior of the encoder, NHWC. ``moments`` is the raw ``mean || logvar`` (before the clamp), which is what
    MAR's latent cache stores; ``logvar`` is clamped to [-30, 20] and ``std = exp(logvar / 2)``."""

    moments: jax.Array
    mean: jax.Array
    logvar: jax.Array
    std: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> DiagonalGaussian:
        moments = jnp.asarray(moments)
        if moments.ndim < 1 or moments.shape[-1] % 2:
            raise ValueError("DiagonalGaussian: moments need an even channel (last) axis, "
                             f"got shape {moments.shape}")
        mean, logvar = jnp.split(moments, 2, axis=-1)
        logvar = jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)
        return cls(moments=moments, mean=mean, logvar=logvar, std=jnp.exp(0.5 * logvar))

    @property
    def var(self) -> jax.Array:
        return jnp.exp(self.logvar)

    def sample(self, rng: jax.Array) -> jax.Array:
        """``mean + std * eps`` with ``eps ~ N(0, I)`` drawn from ``rng``."""
        eps = jax.random.normal(rng, self.mean.shape, self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> jax.Array:
        return self.mean

    def kl(self) -> jax.Array:
        """KL(q || N(0, I)) per sample, summed over H, W, C (as LDM)."""
        axes = tuple(range(1, self.mean.ndim))
        return 0.5 * jnp.sum(jnp.square(self.mean) + self.var - 1.0 - self.logvar, axis=axes)


class GroupNorm(nnx.Module):
    """GroupNorm over NHWC with float32 statistics (PyTorch ``nn.GroupNorm`` semantics, biased variance)."""

    def __init__(self, num_features: int, num_groups: int = 32, eps: float = 1e-6, *, dtype: Any = jnp.float32):
        if num_features % num_groups:
            raise ValueError(f"GroupNorm: {num_features} channels are not divisible into {num_groups} groups")
        self.num_groups = num_groups
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))

    def __call__(self, x: jax.Array) -> jax.Array:
        b, h, w, c = x.shape
        xf = x.astype(jnp.float32).reshape(b, h * w, self.num_groups, c // self.num_groups)
        mean = jnp.mean(xf, axis=(1, 3), keepdims=True)
        var = jnp.mean(jnp.square(xf - mean), axis=(1, 3), keepdims=True)
        y = ((xf - mean) * jax.lax.rsqrt(var + self.eps)).reshape(b, h, w, c)
        y = y * self.scale[...] + self.bias[...]
        return y.astype(self.dtype)


def _conv(cin: int, cout: int, k: int, *, stride: int = 1, padding: Any = None, dtype: Any,
          rngs: nnx.Rngs) -> nnx.Conv:
    if padding is None:
        padding = ((k // 2, k // 2), (k // 2, k // 2))
    return nnx.Conv(cin, cout, (k, k), strides=(stride, stride), padding=padding, dtype=dtype,
                    param_dtype=jnp.float32, precision=_precision(dtype), rngs=rngs)


class ResnetBlock(nnx.Module):

    def __init__(self, cin: int, cout: int, *, dtype: Any, rngs: nnx.Rngs):
        self.norm1 = GroupNorm(cin, dtype=dtype)
        self.conv1 = _conv(cin, cout, 3, dtype=dtype, rngs=rngs)
        self.norm2 = GroupNorm(cout, dtype=dtype)
        self.conv2 = _conv(cout, cout, 3, dtype=dtype, rngs=rngs)
        # Dropout is 0 in MAR's KL-16, so it is omitted.
        self.nin_shortcut = _conv(cin, cout, 1, dtype=dtype, rngs=rngs) if cin != cout else None

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        if self.nin_shortcut is not None:
            x = self.nin_shortcut(x)
        return x + h


class AttnBlock(nnx.Module):
    """Single-head spatial self-attention with 1x1 conv q, k, v, proj_out; scale C^-1/2; softmax in float32."""

    def __init__(self, c: int, *, dtype: Any, rngs: nnx.Rngs):
        self.dtype = dtype
        self.norm = GroupNorm(c, dtype=dtype)
        self.q = _conv(c, c, 1, dtype=dtype, rngs=rngs)
        self.k = _conv(c, c, 1, dtype=dtype, rngs=rngs)
        self.v = _conv(c, c, 1, dtype=dtype, rngs=rngs)
        self.proj_out = _conv(c, c, 1, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, hh, ww, c = x.shape
        h = self.norm(x)
        q = self.q(h).reshape(b, hh * ww, c)
        k = self.k(h).reshape(b, hh * ww, c)
        v = self.v(h).reshape(b, hh * ww, c)
        prec = _precision(self.dtype)
        logits = jnp.einsum("bic,bjc->bij", q, k, precision=prec, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(logits * (c ** -0.5), axis=-1).astype(v.dtype)
        out = jnp.einsum("bij,bjc->bic", weights, v, precision=prec).reshape(b, hh, ww, c)
        return x + self.proj_out(out)


class Downsample(nnx.Module):
    """Pad (0, 1) on H and W (right / bottom), then a 3x3 conv with stride 2 and no padding."""

    def __init__(self, c: int, *, dtype: Any, rngs: nnx.Rngs):
        self.conv = _conv(c, c, 3, stride=2, padding=((0, 1), (0, 1)), dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.conv(x)


class Upsample(nnx.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, c: int, *, dtype: Any, rngs: nnx.Rngs):
        self.conv = _conv(c, c, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
        return self.conv(x)


class DownLevel(nnx.Module):

    def __init__(self, cin: int, cout: int, num_res_blocks: int, use_attn: bool, use_downsample: bool, *,
                 dtype: Any, rngs: nnx.Rngs):
        blocks, attns = [], []
        for _ in range(num_res_blocks):
            blocks.append(ResnetBlock(cin, cout, dtype=dtype, rngs=rngs))
            cin = cout
            if use_attn:
                attns.append(AttnBlock(cout, dtype=dtype, rngs=rngs))
        self.block = nnx.List(blocks)
        self.attn = nnx.List(attns)
        self.downsample = Downsample(cout, dtype=dtype, rngs=rngs) if use_downsample else None


class UpLevel(nnx.Module):

    def __init__(self, cin: int, cout: int, num_blocks: int, use_upsample: bool, *, dtype: Any, rngs: nnx.Rngs):
        blocks = []
        for _ in range(num_blocks):
            blocks.append(ResnetBlock(cin, cout, dtype=dtype, rngs=rngs))
            cin = cout
        self.block = nnx.List(blocks)
        self.upsample = Upsample(cout, dtype=dtype, rngs=rngs) if use_upsample else None


class Mid(nnx.Module):

    def __init__(self, c: int, *, dtype: Any, rngs: nnx.Rngs):
        self.block_1 = ResnetBlock(c, c, dtype=dtype, rngs=rngs)
        self.attn_1 = AttnBlock(c, dtype=dtype, rngs=rngs)
        self.block_2 = ResnetBlock(c, c, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nnx.Module):

    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int,
                 attn_levels: Sequence[int], *, in_channels: int = 3, dtype: Any, rngs: nnx.Rngs):
        self.conv_in = _conv(in_channels, ch, 3, dtype=dtype, rngs=rngs)
        in_mult = (1,) + tuple(ch_mult)
        levels = []
        for i, mult in enumerate(ch_mult):
            levels.append(DownLevel(ch * in_mult[i], ch * mult, num_res_blocks, i in attn_levels,
                                    i != len(ch_mult) - 1, dtype=dtype, rngs=rngs))
        self.down = nnx.List(levels)
        c = ch * ch_mult[-1]
        self.mid = Mid(c, dtype=dtype, rngs=rngs)
        self.norm_out = GroupNorm(c, dtype=dtype)
        self.conv_out = _conv(c, 2 * z_channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv_in(x)
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn) > 0:
                    h = level.attn[j](h)
            if level.downsample is not None:
                h = level.downsample(h)
        h = self.mid(h)
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nnx.Module):

    def __init__(self, ch: int, ch_mult: Sequence[int], num_res_blocks: int, z_channels: int, *,
                 out_channels: int = 3, dtype: Any, rngs: nnx.Rngs):
        c = ch * ch_mult[-1]
        self.conv_in = _conv(z_channels, c, 3, dtype=dtype, rngs=rngs)
        self.mid = Mid(c, dtype=dtype, rngs=rngs)
        levels: list[UpLevel | None] = [None] * len(ch_mult)
        for i in reversed(range(len(ch_mult))):  # built top-down so channel counts chain; stored by level index
            levels[i] = UpLevel(c, ch * ch_mult[i], num_res_blocks + 1, i != 0, dtype=dtype, rngs=rngs)
            c = ch * ch_mult[i]
        self.up = nnx.List(levels)
        self.norm_out = GroupNorm(c, dtype=dtype)
        self.conv_out = _conv(c, out_channels, 3, dtype=dtype, rngs=rngs)

    def __call__(self, z: jax.Array) -> jax.Array:
        h = self.mid(self.conv_in(z))
        for i in reversed(range(len(self.up))):
            level = self.up[i]
            for block in level.block:
                h = block(h)
            if level.upsample is not None:
                h = level.upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


class AutoencoderKL(nnx.Module):
    """MAR's KL-16 VAE. Images are NHWC in [-1, 1]; latents are NHWC with ``embed_dim`` channels.

    Args:
        ch: base width (128 in KL-16).
        ch_mult: width multiplier per level; ``len(ch_mult) - 1`` stride-2 downsamples.
        num_res_blocks: ResnetBlocks per encoder level (the decoder uses one more).
        embed_dim: latent channels (MAR's ``z_channels == embed_dim``).
        attn_levels: encoder levels with an AttnBlock after each ResnetBlock. ``None`` follows the reference: LDM's
            ``resolution=256, attn_resolutions=(16,)`` rule, i.e. level ``i`` where ``256 // 2**i == 16`` (level 4 of
            KL-16, the last one), independent of the actual input size.
        dtype: compute dtype; parameters stay float32.
    """

    def __init__(self, ch: int = 128, ch_mult: Sequence[int] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 embed_dim: int = 16, *, attn_levels: Sequence[int] | None = None, dtype: Any = jnp.float32,
                 rngs: nnx.Rngs | None = None):
        if rngs is None:
            rngs = nnx.Rngs(0)
        ch_mult = tuple(int(m) for m in ch_mult)
        if attn_levels is None:
            attn_levels = tuple(i for i in range(len(ch_mult)) if 256 // 2 ** i == 16)
        self.ch = ch
        self.ch_mult = ch_mult
        self.num_res_blocks = num_res_blocks
        self.embed_dim = embed_dim
        self.attn_levels = tuple(int(i) for i in attn_levels)
        self.dtype = dtype
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, embed_dim, self.attn_levels, dtype=dtype, rngs=rngs)
        self.decoder = Decoder(ch, ch_mult, num_res_blocks, embed_dim, dtype=dtype, rngs=rngs)
        self.quant_conv = _conv(2 * embed_dim, 2 * embed_dim, 1, dtype=dtype, rngs=rngs)
        self.post_quant_conv = _conv(embed_dim, embed_dim, 1, dtype=dtype, rngs=rngs)

    @property
    def stride(self) -> int:
        return 2 ** (len(self.ch_mult) - 1)

    def encode(self, x: jax.Array) -> DiagonalGaussian:
        """``x``: (B, H, W, 3) NHWC in [-1, 1], H and W multiples of ``stride`` -> posterior over
        (B, H / stride, W / stride, embed_dim)."""
        x = jnp.asarray(x)
        s = self.stride
        if x.ndim != 4 or x.shape[-1] != 3 or x.shape[1] % s or x.shape[2] % s:
            raise ValueError(f"AutoencoderKL.encode: expected NHWC images (B, H, W, 3) with H, W multiples of {s}, "
                       f"got shape {x.shape}")
        h = self.encoder(x.astype(self.dtype))
        moments = self.quant_conv(h).astype(jnp.float32)
        return DiagonalGaussian.from_moments(moments)

    def decode(self, z: jax.Array) -> jax.Array:
        """``z``: (B, h, w, embed_dim) NHWC latents (unscaled) -> (B, h * stride, w * stride, 3) float32 images."""
        z = jnp.asarray(z)
        if z.ndim != 4 or z.shape[-1] != self.embed_dim:
            raise ValueError(f"AutoencoderKL.decode: expected NHWC latents (B, h, w, {self.embed_dim}), "
                       f"got shape {z.shape}")
        h = self.post_quant_conv(z.astype(self.dtype))
        return self.decoder(h).astype(jnp.float32)

    def __call__(self, x: jax.Array, rng: jax.Array | None = None) -> tuple[jax.Array, DiagonalGaussian]:
        """Reconstruction: decode a posterior sample (``rng`` given) or its mode (``rng=None``)."""
        posterior = self.encode(x)
        z = posterior.mode() if rng is None else posterior.sample(rng)
        return self.decode(z), posterior


def latents_from_moments(moments: jax.Array, rng: jax.Array | None = None, scale: float = VAE_SCALE) -> jax.Array:
    """Scaled latents from cached moments: ``sample(rng) * scale`` (MAR's training input), the mode if ``rng`` is
    None."""
    posterior = DiagonalGaussian.from_moments(moments)
    z = posterior.mode() if rng is None else posterior.sample(rng)
    return z * scale


def latents_from_images(vae: AutoencoderKL, images: jax.Array, rng: jax.Array | None = None,
                        scale: float = VAE_SCALE) -> jax.Array:
    """NHWC images in [-1, 1] -> scaled NHWC latents (a posterior sample with ``rng``, the mode without)."""
    return latents_from_moments(vae.encode(images).moments, rng, scale)


def images_from_latents(vae: AutoencoderKL, latents: jax.Array, scale: float = VAE_SCALE) -> jax.Array:
    """Scaled NHWC latents -> NHWC images (about [-1, 1]): ``decode(latents / scale)``."""
    return vae.decode(jnp.asarray(latents) / scale)
