"""CLIP (ViT image tower + causal text tower) in Flax NNX, numerically matching transformers' `CLIPModel`.

Parameter names mirror transformers' state dict (`vision_model/encoder/layers/0/self_attn/q_proj/kernel` ...), so
`marval_jax.checkpoints.convert_clip` is a rename + transpose. PickScore is a CLIP-H fine-tune and uses the same
module.

* image tower: patch conv (no bias), class embedding, learned positions, `pre_layrnorm`, pre-LN encoder layers,
  `post_layernorm` on the class token, `visual_projection` (no bias).
* text tower: token + position embeddings, causal pre-LN encoder layers, `final_layer_norm`, pooled at the EOS
  token as transformers does: `argmax(ids)` for legacy configs whose `eos_token_id == 2`, otherwise the first
  position holding `eos_token_id`; then `text_projection` (no bias).
* activations: `quick_gelu` (x * sigmoid(1.702 x), OpenAI models), `gelu` (exact erf, LAION models),
  `gelu_new` / `gelu_pytorch_tanh` / `gelu_fast` (tanh approximation).

Images: `preprocess(images)` takes NHWC in [-1, 1] (the generators' range), resizes (differentiably, antialiased)
to the model resolution and applies CLIP's mean / std; `encode_image` takes the result. Embeddings returned by
`encode_image` / `encode_text` are un-normalised projections, as transformers' `get_*_features`; the scores built on
them (CLIPScore, PickScore) are in `marval_jax.rewards.clip`.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

ACTIVATIONS = {
    "quick_gelu": lambda x: x * jax.nn.sigmoid(1.702 * x),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
    "gelu_new": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_pytorch_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu_fast": lambda x: jax.nn.gelu(x, approximate=True),
}

# Frozen reward model: replicated by default; these rules allow tensor-parallel sharding of the big matrices.
LOGICAL_AXES: list[tuple[str, tuple[str | None, ...]]] = [
    (r".*/(q_proj|k_proj|v_proj|fc1)/kernel", ("embed", "mlp")),
    (r".*/(q_proj|k_proj|v_proj|fc1)/bias", ("mlp",)),
    (r".*/(out_proj|fc2)/kernel", ("mlp", "embed")),
    (r".*token_embedding/embedding", ("vocab", "embed")),
]


# ----------------------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class CLIPTextConfig:
    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407


@dataclasses.dataclass(frozen=True)
class CLIPVisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5


def _sub_config(cls, d: Mapping[str, Any] | None, what: str):
    d = dict(d or {})
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {k: d[k] for k in names if k in d and d[k] is not None}
    for key in ("image_size", "patch_size"):
        v = kwargs.get(key)
        if isinstance(v, (list, tuple)):
            if len(set(v)) != 1:
                raise ValueError(f"{what}.{key}: only square sizes are supported, got {v}")
            kwargs[key] = int(v[0])
    if isinstance(kwargs.get("eos_token_id"), (list, tuple)):
        kwargs["eos_token_id"] = int(kwargs["eos_token_id"][0])
    cfg = cls(**kwargs)
    if cfg.hidden_act not in ACTIVATIONS:
        raise ValueError(f"{what}.hidden_act: expected one of {sorted(ACTIVATIONS)}, got {cfg.hidden_act!r}")
    if cfg.hidden_size % cfg.num_attention_heads:
        raise ValueError(f"{what}: hidden_size {cfg.hidden_size} is not divisible by "
                         f"num_attention_heads {cfg.num_attention_heads}")
    return cfg


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
    text: CLIPTextConfig = dataclasses.field(default_factory=CLIPTextConfig)
    vision: CLIPVisionConfig = dataclasses.field(default_factory=CLIPVisionConfig)
    projection_dim: int = 512
    logit_scale_init_value: float = 2.6592
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD

    @classmethod
    def from_hf_dict(cls, d: Mapping[str, Any]) -> CLIPConfig:
        """From a transformers `CLIPConfig.to_dict()` / `config.json` (legacy `*_config_dict` keys honoured).

        Missing fields take transformers' defaults. Also accepts the output of `to_dict` (keys `text`, `vision`).
        """
        d = dict(d)
        if "text" in d or "vision" in d:
            text, vision = d.pop("text", None), d.pop("vision", None)
        else:
            text = {**(d.get("text_config") or {}), **(d.get("text_config_dict") or {})}
            vision = {**(d.get("vision_config") or {}), **(d.get("vision_config_dict") or {})}
        kwargs = {}
        for key in ("projection_dim", "logit_scale_init_value"):
            if d.get(key) is not None:
                kwargs[key] = d[key]
        for key in ("image_mean", "image_std"):
            if d.get(key) is not None:
                if len(d[key]) != 3:
                    raise ValueError(f"{key}: expected 3 values, got {d[key]}")
                kwargs[key] = tuple(float(v) for v in d[key])
        return cls(text=_sub_config(CLIPTextConfig, text, "text_config"),
                   vision=_sub_config(CLIPVisionConfig, vision, "vision_config"), **kwargs)

    @classmethod
    def from_json(cls, path: str) -> CLIPConfig:
        if os.path.isdir(path):
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"CLIP config not found: {path}")
        with open(path) as f:
            return cls.from_hf_dict(json.load(f))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------- layers
def _precision(dtype: Any) -> jax.lax.Precision | None:
    return jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None


def _linear(din: int, dout: int, *, rngs: nnx.Rngs, dtype: Any, use_bias: bool = True, std: float = 0.02
            ) -> nnx.Linear:
    return nnx.Linear(din, dout, use_bias=use_bias, dtype=dtype, param_dtype=jnp.float32,
                      precision=_precision(dtype), kernel_init=nnx.initializers.normal(std),
                      bias_init=nnx.initializers.zeros_init(), rngs=rngs)


def _layer_norm(dim: int, eps: float, *, rngs: nnx.Rngs, dtype: Any) -> nnx.LayerNorm:
    return nnx.LayerNorm(dim, epsilon=eps, dtype=dtype, param_dtype=jnp.float32, use_fast_variance=False,
                         rngs=rngs)


class CLIPAttention(nnx.Module):
    def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.num_heads, self.head_dim, self.dtype = num_heads, dim // num_heads, dtype
        self.q_proj = _linear(dim, dim, rngs=rngs, dtype=dtype)
        self.k_proj = _linear(dim, dim, rngs=rngs, dtype=dtype)
        self.v_proj = _linear(dim, dim, rngs=rngs, dtype=dtype)
        self.out_proj = _linear(dim, dim, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        b, t, d = x.shape
        shape = (b, t, self.num_heads, self.head_dim)
        q, k, v = (p(x).reshape(shape) for p in (self.q_proj, self.k_proj, self.v_proj))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32,
                            precision=_precision(self.dtype)) * (self.head_dim ** -0.5)
        if mask is not None:
            logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", probs, v, precision=_precision(self.dtype)).reshape(b, t, d)
        return self.out_proj(out)


class CLIPMLP(nnx.Module):
    def __init__(self, dim: int, hidden: int, act: str, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.act = act
        self.fc1 = _linear(dim, hidden, rngs=rngs, dtype=dtype)
        self.fc2 = _linear(hidden, dim, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(ACTIVATIONS[self.act](self.fc1(x)))


class CLIPEncoderLayer(nnx.Module):
    """x += attn(layer_norm1(x)); x += mlp(layer_norm2(x))."""

    def __init__(self, cfg: CLIPTextConfig | CLIPVisionConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        d = cfg.hidden_size
        self.layer_norm1 = _layer_norm(d, cfg.layer_norm_eps, rngs=rngs, dtype=dtype)
        self.self_attn = CLIPAttention(d, cfg.num_attention_heads, rngs=rngs, dtype=dtype)
        self.layer_norm2 = _layer_norm(d, cfg.layer_norm_eps, rngs=rngs, dtype=dtype)
        self.mlp = CLIPMLP(d, cfg.intermediate_size, cfg.hidden_act, rngs=rngs, dtype=dtype)

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        x = x + self.self_attn(self.layer_norm1(x), mask).astype(x.dtype)
        return x + self.mlp(self.layer_norm2(x)).astype(x.dtype)


class CLIPEncoder(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig | CLIPVisionConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.layers = nnx.List([CLIPEncoderLayer(cfg, rngs=rngs, dtype=dtype)
                                for _ in range(cfg.num_hidden_layers)])

    def __call__(self, x: jax.Array, mask: jax.Array | None = None) -> jax.Array:
        for layer in self.layers:
            x = layer(x, mask)
        return x


class CLIPVisionEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        d, p = cfg.hidden_size, cfg.patch_size
        if cfg.image_size % p:
            raise ValueError(f"image_size {cfg.image_size} is not divisible by patch_size {p}")
        self.image_size, self.patch_size, self.num_channels = cfg.image_size, p, cfg.num_channels
        self.num_positions = (cfg.image_size // p) ** 2 + 1
        self.class_embedding = nnx.Param(jax.random.normal(rngs.params(), (d,), jnp.float32) * d ** -0.5)
        self.patch_embedding = nnx.Conv(cfg.num_channels, d, kernel_size=(p, p), strides=(p, p), padding="VALID",
                                        use_bias=False, dtype=dtype, param_dtype=jnp.float32,
                                        precision=_precision(dtype),
                                        kernel_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.position_embedding = nnx.Embed(self.num_positions, d, dtype=dtype, param_dtype=jnp.float32,
                                            embedding_init=nnx.initializers.normal(0.02), rngs=rngs)
        self.dtype = dtype

    def __call__(self, pixels: jax.Array) -> jax.Array:
        b, h, w, c = pixels.shape
        if (h, w, c) != (self.image_size, self.image_size, self.num_channels):
            raise ValueError(f"CLIP vision input: expected (B, {self.image_size}, {self.image_size}, "
                             f"{self.num_channels}) NHWC (use preprocess()), got {pixels.shape}")
        x = self.patch_embedding(pixels.astype(self.dtype))
        x = x.reshape(b, -1, x.shape[-1])
        cls = jnp.broadcast_to(self.class_embedding[...].astype(x.dtype), (b, 1, x.shape[-1]))
        x = jnp.concatenate([cls, x], axis=1)
        return x + self.position_embedding.embedding[...].astype(x.dtype)[None]


class CLIPVisionTransformer(nnx.Module):
    def __init__(self, cfg: CLIPVisionConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        d = cfg.hidden_size
        self.embeddings = CLIPVisionEmbeddings(cfg, rngs=rngs, dtype=dtype)
        self.pre_layrnorm = _layer_norm(d, cfg.layer_norm_eps, rngs=rngs, dtype=dtype)  # (sic) as transformers
        self.encoder = CLIPEncoder(cfg, rngs=rngs, dtype=dtype)
        self.post_layernorm = _layer_norm(d, cfg.layer_norm_eps, rngs=rngs, dtype=dtype)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """Normalised NHWC pixels -> pooled (class token, post-LN) features (B, hidden)."""
        x = self.encoder(self.pre_layrnorm(self.embeddings(pixels)))
        return self.post_layernorm(x[:, 0])


class CLIPTextEmbeddings(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        init = nnx.initializers.normal(0.02)
        self.token_embedding = nnx.Embed(cfg.vocab_size, cfg.hidden_size, dtype=dtype, param_dtype=jnp.float32,
                                         embedding_init=init, rngs=rngs)
        self.position_embedding = nnx.Embed(cfg.max_position_embeddings, cfg.hidden_size, dtype=dtype,
                                            param_dtype=jnp.float32, embedding_init=init, rngs=rngs)

    def __call__(self, ids: jax.Array) -> jax.Array:
        t = ids.shape[-1]
        return self.token_embedding(ids) + self.position_embedding.embedding[...][:t].astype(
            self.token_embedding.dtype)[None]


class CLIPTextTransformer(nnx.Module):
    def __init__(self, cfg: CLIPTextConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.max_len, self.eos_token_id, self.vocab_size = cfg.max_position_embeddings, cfg.eos_token_id, cfg.vocab_size
        self.embeddings = CLIPTextEmbeddings(cfg, rngs=rngs, dtype=dtype)
        self.encoder = CLIPEncoder(cfg, rngs=rngs, dtype=dtype)
        self.final_layer_norm = _layer_norm(cfg.hidden_size, cfg.layer_norm_eps, rngs=rngs, dtype=dtype)

    def __call__(self, ids: jax.Array) -> jax.Array:
        """Token ids (B, T), T <= max_position_embeddings -> pooled (EOS position) features (B, hidden)."""
        if ids.ndim != 2 or ids.shape[-1] > self.max_len:
            raise ValueError(f"CLIP text input: expected token ids (B, T<={self.max_len}), got {ids.shape}")
        if not jnp.issubdtype(ids.dtype, jnp.integer):
            raise ValueError(f"CLIP text input: expected integer token ids, got {ids.dtype}")
        t = ids.shape[-1]
        causal = jnp.tril(jnp.ones((t, t), bool))[None, None]
        x = self.final_layer_norm(self.encoder(self.embeddings(ids), causal))
        if self.eos_token_id == 2:  # legacy configs (before transformers PR #24773): EOS is the largest id
            pos = jnp.argmax(ids, axis=-1)
        else:
            pos = jnp.argmax((ids == self.eos_token_id).astype(jnp.int32), axis=-1)
        return jnp.take_along_axis(x, pos[:, None, None], axis=1)[:, 0]


class CLIP(nnx.Module):
    """`CLIPModel`: `encode_image(preprocess(images))`, `encode_text(ids)`, `logit_scale`."""

    def __init__(self, config: CLIPConfig, *, rngs: nnx.Rngs, dtype: Any = jnp.float32):
        self.config = config
        p = config.projection_dim
        self.text_model = CLIPTextTransformer(config.text, rngs=rngs, dtype=dtype)
        self.vision_model = CLIPVisionTransformer(config.vision, rngs=rngs, dtype=dtype)
        self.visual_projection = _linear(config.vision.hidden_size, p, use_bias=False, rngs=rngs, dtype=dtype,
                                         std=config.vision.hidden_size ** -0.5)
        self.text_projection = _linear(config.text.hidden_size, p, use_bias=False, rngs=rngs, dtype=dtype,
                                       std=config.text.hidden_size ** -0.5)
        self.logit_scale = nnx.Param(jnp.asarray(config.logit_scale_init_value, jnp.float32))

    def encode_image(self, pixels: jax.Array) -> jax.Array:
        """Preprocessed NHWC pixels (see `preprocess`) -> un-normalised image embeddings (B, projection_dim)."""
        return self.visual_projection(self.vision_model(pixels)).astype(jnp.float32)

    def encode_text(self, token_ids: jax.Array) -> jax.Array:
        """Token ids (B, T) from `clip_tokenizer` -> un-normalised text embeddings (B, projection_dim)."""
        return self.text_projection(self.text_model(jnp.asarray(token_ids))).astype(jnp.float32)

    def embed_images(self, images: jax.Array) -> jax.Array:
        """NHWC images in [-1, 1], any size -> `encode_image(preprocess(images))`."""
        cfg = self.config
        return self.encode_image(preprocess(images, cfg.vision.image_size, mean=cfg.image_mean, std=cfg.image_std))


# ----------------------------------------------------------------------------------------------- functions
def preprocess(images: jax.Array, size: int, *, mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD,
               method: str = "bilinear", antialias: bool = True) -> jax.Array:
    """NHWC images in [-1, 1] -> CLIP input (B, size, size, 3), differentiable.

    Resizes the shorter side to `size` (antialiased `jax.image.resize`), centre-crops the longer side (as CLIP's
    resize + centre crop; for square images just a resize), maps to [0, 1] and normalises with `mean` / `std`.
    CLIP's own pipeline resizes with bicubic on uint8 PIL images; pass `method="bicubic"` to be closer to it.
    """
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"preprocess: expected NHWC RGB images (B, H, W, 3), got {images.shape}")
    b, h, w, c = images.shape
    x = images.astype(jnp.float32)
    scale = size / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    if (nh, nw) != (h, w):
        x = jax.image.resize(x, (b, nh, nw, c), method=method, antialias=antialias)
    top, left = (nh - size) // 2, (nw - size) // 2
    x = x[:, top:top + size, left:left + size]
    x = (x + 1.0) * 0.5
    return (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)


def init_clip(config: CLIPConfig, seed: int = 0, dtype: Any = jnp.float32) -> CLIP:
    """A randomly initialised CLIP (tests; real weights come from `checkpoints.convert_clip.load_clip`)."""
    return CLIP(config, rngs=nnx.Rngs(seed), dtype=dtype)


def random_params(config: CLIPConfig, seed: int = 0) -> nnx.State:
    """Random float32 params for `CLIP(config)` drawn with numpy (no XLA compile; for tests and smoke runs):
    LayerNorm scale 1 / bias 0, `logit_scale` at its init value, other weights N(0, 0.02^2)."""
    graphdef, abstract = nnx.split(nnx.eval_shape(lambda: CLIP(config, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(seed)
    out = []
    for path, var in nnx.to_flat_state(abstract):
        leaf, shape = str(path[-1]), tuple(var.shape)
        if leaf == "logit_scale":
            value = np.full(shape, config.logit_scale_init_value, np.float32)
        elif leaf == "scale":
            value = np.ones(shape, np.float32)
        elif leaf == "bias":
            value = np.zeros(shape, np.float32)
        else:
            value = (0.02 * rng.standard_normal(shape)).astype(np.float32)
        out.append((path, var.replace(jnp.asarray(value))))
    return nnx.from_flat_state(out)


def num_params(model: CLIP) -> int:
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
