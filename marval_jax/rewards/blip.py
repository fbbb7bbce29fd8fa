"""ImageReward's network in Flax NNX: BLIP's ViT image encoder, a BERT text encoder with cross-attention to the image
tokens, and the MLP head on the text's first ([CLS]) token.

Parameter names mirror the released checkpoint's state dict (`ImageReward.pt`: `blip.visual_encoder.blocks.0.attn.qkv`,
`blip.text_encoder.encoder.layer.0.crossattention.self.key`, `mlp.layers.0` ...), so
`marval_jax.checkpoints.convert_image_reward` is a rename + transpose:

* image encoder (`visual_encoder`, BLIP's timm-style ViT): patch conv (with bias), `cls_token`, learned `pos_embed`,
  pre-LN blocks (`norm1`, `attn.qkv` (one D -> 3D linear), `attn.proj`, `norm2`, `mlp.fc1` / `fc2`, exact GELU), a
  final `norm` over every token; its output (B, 1 + patches, D_v) is what the text encoder attends to.
* text encoder (`text_encoder`, BLIP's med.py BertModel without pooler): word + absolute position embeddings and a
  LayerNorm (no token-type embedding), post-LN layers of bidirectional self-attention over the prompt (padding keys
  masked), cross-attention to every image token (keys / values from D_v), and the feed-forward block.
* head (`mlp`): five linears 768 -> 1024 -> 128 -> 64 -> 16 -> 1 with no activation between them (the release has
  its ReLUs commented out; its dropouts are inactive at inference), then (score - mean) / std with the release's
  constants.

`preprocess` maps generated NHWC images in [-1, 1] to the encoder's input differentiably (bicubic resize of the
shorter side, centre crop, BLIP / CLIP mean and std).

The configs (`ImageRewardConfig`, `VisionConfig`, `TextConfig`) and the release's constants are defined in the
converter, one layer below the rewards, so that it knows the parameter layout without importing this module; they
are re-exported here.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from marval_jax.checkpoints.convert_image_reward import (MAX_LENGTH, MLP_HIDDEN, SCORE_MEAN, SCORE_STD,  # noqa: F401
                                                        ImageRewardConfig, TextConfig, VisionConfig)
from marval_jax.models.clip import ACTIVATIONS, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, _layer_norm, _linear, _precision


# ----------------------------------------------------------------------------------------------- layers
def attention(q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array | None, dtype: Any) -> jax.Array:
    """Softmax attention of (B, Tq, H, Dh) queries over (B, Tk, H, Dh) keys / values; `key_mask` (B, Tk) bool
    excludes keys (padding). Returns (B, Tq, H, Dh)."""
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32,
                        precision=_precision(dtype)) * (q.shape[-1] ** -0.5)
    if key_mask is not None:
        logits = jnp.where(key_mask[:, None, None, :], logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=_precision(dtype))


class ViTAttention(nnx.Module):
    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs, dtype: Any):
        self.heads, self.dtype = heads, dtype
        self.qkv = _linear(dim, 3 * dim, rngs=rngs, dtype=dtype)
        self.proj = _linear(dim, dim, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads)
        out = attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], None, self.dtype)
        return self.proj(out.reshape(b, t, d))


class ViTMlp(nnx.Module):
    def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs, dtype: Any):
        self.fc1 = _linear(dim, hidden, rngs=rngs, dtype=dtype)
        self.fc2 = _linear(hidden, dim, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(ACTIVATIONS["gelu"](self.fc1(x)))


class ViTBlock(nnx.Module):
    """x += attn(norm1(x)); x += mlp(norm2(x))."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype: Any):
        d = cfg.hidden_size
        self.norm1 = _layer_norm(d, cfg.layer_norm_eps, rngs=rngs, dtype=dtype)
        self.attn = ViTAttention(d, cfg.num_attention_heads, rngs=rngs, dtype=dtype)
        self.norm2 = _layer_norm(d, cfg.layer_norm_eps, rngs=rngs, dtype=dtype)
        self.mlp = ViTMlp(d, cfg.intermediate_size, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x)).astype(x.dtype)
        return x + self.mlp(self.norm2(x)).astype(x.dtype)


class PatchEmbed(nnx.Module):
    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype: Any):
        p = cfg.patch_size
        self.proj = nnx.Conv(3, cfg.hidden_size, kernel_size=(p, p), strides=(p, p), padding="VALID", dtype=dtype,
                             param_dtype=jnp.float32, precision=_precision(dtype),
                             kernel_init=nnx.initializers.normal(0.02), rngs=rngs)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        x = self.proj(pixels)
        return x.reshape(x.shape[0], -1, x.shape[-1])


class VisionTransformer(nnx.Module):
    """BLIP's ViT: normalised NHWC pixels (B, S, S, 3) -> every token after the final norm (B, 1 + (S/p)^2, D)."""

    def __init__(self, cfg: VisionConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        if cfg.image_size % cfg.patch_size:
            raise ValueError(f"ImageReward vision: image_size {cfg.image_size} is not divisible by patch_size "
                             f"{cfg.patch_size}")
        d, self.image_size, self.dtype = cfg.hidden_size, cfg.image_size, dtype
        n = (cfg.image_size // cfg.patch_size) ** 2 + 1
        self.patch_embed = PatchEmbed(cfg, rngs=rngs, dtype=dtype)
        self.cls_token = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, 1, d), jnp.float32))
        self.pos_embed = nnx.Param(0.02 * jax.random.normal(rngs.params(), (1, n, d), jnp.float32))
        self.blocks = nnx.List([ViTBlock(cfg, rngs=rngs, dtype=dtype) for _ in range(cfg.num_hidden_layers)])
        self.norm = _layer_norm(d, cfg.layer_norm_eps, rngs=rngs, dtype=dtype)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        b, h, w, c = pixels.shape
        if (h, w, c) != (self.image_size, self.image_size, 3):
            raise ValueError(f"ImageReward vision input: expected (B, {self.image_size}, {self.image_size}, 3) NHWC "
                             f"(use preprocess()), got {pixels.shape}")
        x = self.patch_embed(pixels.astype(self.dtype))
        cls = jnp.broadcast_to(self.cls_token[...].astype(x.dtype), (b, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1) + self.pos_embed[...].astype(x.dtype)
        for block in self.blocks:
            x = block(x)
        return self.norm(x)


# ----------------------------------------------------------------------------------------------- text encoder
class BertSelfAttention(nnx.Module):
    """query from the text; key / value from the text (self-attention) or the image tokens (`kv_width`)."""

    def __init__(self, dim: int, kv_width: int, heads: int, *, rngs: nnx.Rngs, dtype: Any):
        self.heads, self.dtype = heads, dtype
        self.query = _linear(dim, dim, rngs=rngs, dtype=dtype)
        self.key = _linear(kv_width, dim, rngs=rngs, dtype=dtype)
        self.value = _linear(kv_width, dim, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, context: jax.Array, key_mask: jax.Array | None) -> jax.Array:
        b, t, d = x.shape
        split = lambda y: y.reshape(*y.shape[:2], self.heads, d // self.heads)  # noqa: E731
        out = attention(split(self.query(x)), split(self.key(context)), split(self.value(context)), key_mask,
                        self.dtype)
        return out.reshape(b, t, d)


class BertSelfOutput(nnx.Module):
    """LayerNorm(dense(h) + residual): BERT's post-LN output of an attention or feed-forward block."""

    def __init__(self, din: int, dim: int, eps: float, *, rngs: nnx.Rngs, dtype: Any):
        self.dense = _linear(din, dim, rngs=rngs, dtype=dtype)
        self.LayerNorm = _layer_norm(dim, eps, rngs=rngs, dtype=dtype)  # noqa: N815  (the checkpoint's name)

    def __call__(self, h: jax.Array, residual: jax.Array) -> jax.Array:
        return self.LayerNorm(self.dense(h).astype(residual.dtype) + residual)


class BertAttention(nnx.Module):
    def __init__(self, cfg: TextConfig, kv_width: int, *, rngs: nnx.Rngs, dtype: Any):
        d = cfg.hidden_size
        self.self = BertSelfAttention(d, kv_width, cfg.num_attention_heads, rngs=rngs, dtype=dtype)
        self.output = BertSelfOutput(d, d, cfg.layer_norm_eps, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, context: jax.Array, key_mask: jax.Array | None) -> jax.Array:
        return self.output(self.self(x, context, key_mask), x)


class BertIntermediate(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype: Any):
        self.act = cfg.hidden_act
        self.dense = _linear(cfg.hidden_size, cfg.intermediate_size, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return ACTIVATIONS[self.act](self.dense(x))


class BertLayer(nnx.Module):
    """Self-attention over the prompt, cross-attention to the image tokens, feed-forward; each post-LN."""

    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype: Any):
        self.attention = BertAttention(cfg, cfg.hidden_size, rngs=rngs, dtype=dtype)
        self.crossattention = BertAttention(cfg, cfg.encoder_width, rngs=rngs, dtype=dtype)
        self.intermediate = BertIntermediate(cfg, rngs=rngs, dtype=dtype)
        self.output = BertSelfOutput(cfg.intermediate_size, cfg.hidden_size, cfg.layer_norm_eps, rngs=rngs,
                                     dtype=dtype)

    def __call__(self, x: jax.Array, mask: jax.Array, image: jax.Array) -> jax.Array:
        x = self.attention(x, x, mask)
        x = self.crossattention(x, image.astype(x.dtype), None)
        return self.output(self.intermediate(x), x)


class BertEncoder(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype: Any):
        self.layer = nnx.List([BertLayer(cfg, rngs=rngs, dtype=dtype) for _ in range(cfg.num_hidden_layers)])

    def __call__(self, x: jax.Array, mask: jax.Array, image: jax.Array) -> jax.Array:
        for layer in self.layer:
            x = layer(x, mask, image)
        return x


class BertEmbeddings(nnx.Module):
    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype: Any):
        init = nnx.initializers.normal(0.02)
        self.word_embeddings = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=jnp.float32,
                                         embedding_init=init, rngs=rngs)
        self.position_embeddings = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=dtype,
                                             param_dtype=jnp.float32, embedding_init=init, rngs=rngs)
        self.LayerNorm = _layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs=rngs, dtype=dtype)  # noqa: N815

    def __call__(self, ids: jax.Array) -> jax.Array:
        pos = self.position_embeddings.embedding[...][: ids.shape[-1]].astype(self.word_embeddings.dtype)
        return self.LayerNorm(self.word_embeddings(ids) + pos[None])


class BertModel(nnx.Module):
    """The text encoder: token ids (B, T) + attention mask (B, T) + image tokens -> hidden states (B, T, D)."""

    def __init__(self, cfg: TextConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.max_len, self.vocab_size = cfg.max_position_embeddings, cfg.vocab_size
        self.embeddings = BertEmbeddings(cfg, rngs=rngs, dtype=dtype)
        self.encoder = BertEncoder(cfg, rngs=rngs, dtype=dtype)

    def __call__(self, ids: jax.Array, mask: jax.Array, image: jax.Array) -> jax.Array:
        if ids.ndim != 2 or ids.shape[-1] > self.max_len or not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"ImageReward text input: expected integer token ids (B, T<={self.max_len}), got "
                             f"{ids.dtype} {ids.shape}")
        if mask.shape != ids.shape:
            raise ValueError(f"ImageReward text input: attention mask {mask.shape} does not match ids {ids.shape}")
        return self.encoder(self.embeddings(ids), mask.astype(bool), image)


# ----------------------------------------------------------------------------------------------- the reward model
class RewardHead(nnx.Module):
    """The release's MLP: linears through `hidden` widths to one output, no activation between them."""

    def __init__(self, din: int, hidden: tuple[int, ...], *, rngs: nnx.Rngs, dtype: Any):
        widths = (din, *hidden, 1)
        self.layers = nnx.List([_linear(a, b, rngs=rngs, dtype=dtype, std=1.0 / (din + 1))
                                for a, b in zip(widths[:-1], widths[1:])])

    def __call__(self, x: jax.Array) -> jax.Array:
        for layer in self.layers:
            x = layer(x)
        return x[..., 0]


class ImageReward(nnx.Module):
    """`encode_image(preprocess(images))` -> image tokens; `score(tokens, ids, mask)` -> normalised reward (B,)."""

    def __init__(self, config: ImageRewardConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.config = config
        self.visual_encoder = VisionTransformer(config.vision, rngs=rngs, dtype=dtype)
        self.text_encoder = BertModel(config.text, rngs=rngs, dtype=dtype)
        self.mlp = RewardHead(config.text.hidden_size, config.mlp_hidden, rngs=rngs, dtype=dtype)

    def encode_image(self, pixels: jax.Array) -> jax.Array:
        """Preprocessed NHWC pixels -> image tokens (B, 1 + patches, D_v)."""
        return self.visual_encoder(pixels)

    def text_features(self, image_tokens: jax.Array, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """The text encoder's first ([CLS]) token attending to the image tokens (B, D), float32."""
        return self.text_encoder(jnp.asarray(ids), jnp.asarray(mask), image_tokens)[:, 0].astype(jnp.float32)

    def score(self, image_tokens: jax.Array, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """(mlp([CLS] features) - mean) / std, (B,) float32."""
        raw = self.mlp(self.text_features(image_tokens, ids, mask)).astype(jnp.float32)
        return (raw - self.config.score_mean) / self.config.score_std

    def __call__(self, images: jax.Array, ids: jax.Array, mask: jax.Array, *, method: str = "bicubic") -> jax.Array:
        """NHWC images in [-1, 1] (any size; 1 or 3 channels) and tokenized prompts -> ImageReward (B,)."""
        cfg = self.config
        pixels = preprocess(images, cfg.vision.image_size, mean=cfg.image_mean, std=cfg.image_std, method=method)
        return self.score(self.encode_image(pixels), ids, mask)


# ----------------------------------------------------------------------------------------------- functions
def preprocess(images: jax.Array, size: int, *, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
               method: str = "bicubic") -> jax.Array:
    """NHWC images in [-1, 1] -> the ViT's input (B, size, size, 3), differentiable w.r.t. the pixels.

    As the release's transform: the shorter side resized to `size` (bicubic, antialiased when shrinking, as PIL),
    a centre crop, [0, 1], then (x - mean) / std. One-channel images are repeated to RGB. The release resizes uint8
    PIL images (rounded to 1/255 and clipped after the resize); this keeps floats, so it is differentiable."""
    if images.ndim != 4 or images.shape[-1] not in (1, 3):
        raise ValueError(f"ImageReward preprocess: expected NHWC images (B, H, W, 1 or 3), got {images.shape}")
    x = images.astype(jnp.float32)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    b, h, w, c = x.shape
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        x = jax.image.resize(x, (b, nh, nw, c), method=method, antialias=True)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = (x[:, top:top + size, left:left + size] + 1.0) * 0.5
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def abstract_model(config: ImageRewardConfig, dtype: Any = jnp.float32):
    """(graphdef, abstract state) of `ImageReward(config)`, without allocating or compiling."""
    return nnx.split(nnx.eval_shape(lambda: ImageReward(config, rngs=nnx.Rngs(0), dtype=dtype)))


def random_params(config: ImageRewardConfig, seed: int = 0, std: float = 0.02) -> nnx.State:
    """Random float32 params drawn with numpy (tests and smoke runs; no compile): LayerNorm scale 1 + N(0, std^2),
    other weights and biases N(0, std^2)."""
    _, abstract = abstract_model(config)
    rng = np.random.default_rng(seed)
    out = []
    for path, var in nnx.to_flat_state(abstract):
        noise = std * rng.standard_normal(tuple(var.shape))
        value = 1.0 + noise if str(path[-1]) == "scale" else noise
        out.append((path, var.replace(jnp.asarray(value, jnp.float32))))
    return nnx.from_flat_state(out)
