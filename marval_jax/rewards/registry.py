"""Differentiable rewards behind one registry.

A reward is built by name from a config and is a `Reward`:

    reward = make_reward("pickscore", {"checkpoint": "/ckpt/pickscore_jax"})
    emb = reward.prepare(reward.params, ["a photo of a cat", "a red car"])   # once, outside the train step
    scores = reward(reward.params, images, labels, emb)                       # (B,), jittable, differentiable

`reward.fn(params, images, labels, prompt_embeddings) -> (B,)` is a pure function: `params` is a pytree (the
model's `nnx.State`; the graph definition is closed over), `images` are NHWC in [-1, 1] at any resolution,
`labels` an int array (B,) or None, `prompt_embeddings` whatever `prepare` returned or None.

Prompt conventions of the CLIP rewards: `prepare` returns (N, P) text embeddings of N prompts. With `labels`,
image i is scored against prompt `labels[i]` (class-conditional models: one prompt per class); without, the
prompts align with the batch (N == B) or a single prompt is broadcast (N == 1).

Adding a reward (e.g. `marval_jax/rewards/classifier_reward.py`):

    from marval_jax.rewards.registry import Reward, register_reward

    @register_reward("classifier")
    def build(config) -> Reward:
        ...
        return Reward(name="classifier", fn=fn, params=params)

Modules listed in `KNOWN_REWARD_MODULES` are imported lazily by `make_reward`, so their rewards need no import.

Registered here:
* `clip_score`: `scale * max(cos(image, prompt), clamp_min)` (default 100 and 0, as torchmetrics' CLIPScore).
* `pickscore`: `exp(logit_scale) * cos(image, prompt)` with PickScore (CLIP-H) weights.
* `image_reward` (in `marval_jax/rewards/image_reward.py`): ImageReward's BLIP score, whose `prepare` returns the
  prompts' tokens (its text encoder attends to the image, so there is no image-free prompt embedding).

Config keys of both (a dict, an `ml_collections.ConfigDict` or any object with attributes):
`checkpoint` (directory written by `python -m marval_jax.checkpoints.convert_clip`) or `clip_config` (a
`CLIPConfig` or transformers-style dict; random weights from `seed`, for tests only); `dtype` (compute dtype,
default float32); `resize_method` ("bilinear"); `clamp_min` / `scale` (clip_score only); `bpe_path` (tokenizer
vocabulary, default open_clip's).
"""
from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

RewardFn = Callable[[Any, jax.Array, "jax.Array | None", Any], jax.Array]
PrepareFn = Callable[[Any, Any], Any]
Builder = Callable[[Any], "Reward"]

KNOWN_REWARD_MODULES: tuple[str, ...] = ("marval_jax.rewards.classifier_reward", "marval_jax.rewards.image_reward")

_REGISTRY: dict[str, Builder] = {}


@dataclasses.dataclass(frozen=True)
class Reward:
    """A built reward: `fn` (pure, jittable), its initial `params`, and an optional `prepare_fn`."""
    name: str
    fn: RewardFn
    params: Any = None
    prepare_fn: PrepareFn | None = None

    def __call__(self, params: Any, images: jax.Array, labels: jax.Array | None = None,
                 prompt_embeddings: Any = None) -> jax.Array:
        return self.fn(params, images, labels, prompt_embeddings)

    def prepare(self, params: Any, prompts: Any) -> Any:
        """Prompt embeddings, computed once (None for rewards that use no prompts)."""
        return None if self.prepare_fn is None else self.prepare_fn(params, prompts)

    def bind(self, params: Any = None, prompt_embeddings: Any = None) -> Callable[[jax.Array, Any], jax.Array]:
        """`(images, labels) -> (B,)` with params (default: `self.params`) and prompt embeddings closed over.

        Under `jax.jit` closed-over arrays become compile-time constants: fine for small models; for CLIP-H size
        rewards pass `params` through the jit boundary and call `fn` instead."""
        params = self.params if params is None else params
        return lambda images, labels=None: self.fn(params, images, labels, prompt_embeddings)


def register_reward(name: str) -> Callable[[Builder], Builder]:
    """Decorator: register `builder(config) -> Reward` under `name`."""
    def decorator(builder: Builder) -> Builder:
        old = _REGISTRY.get(name)
        if old is not None and (old.__module__, old.__qualname__) != (builder.__module__, builder.__qualname__):
            raise ValueError(f"reward {name!r} is already registered by {old.__module__}.{old.__qualname__}")
        _REGISTRY[name] = builder
        return builder
    return decorator


def _import_known() -> None:
    for module in KNOWN_REWARD_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:  # the module exists but one of its imports is missing: surface that
                raise


def available_rewards() -> list[str]:
    _import_known()
    return sorted(_REGISTRY)


def make_reward(name: str, config: Any = None) -> Reward:
    """Build the reward registered as `name` from `config`."""
    if name not in _REGISTRY:
        _import_known()
    if name not in _REGISTRY:
        raise ValueError(f"unknown reward {name!r}; registered rewards: {sorted(_REGISTRY)}")
    reward = _REGISTRY[name](config if config is not None else {})
    if not isinstance(reward, Reward):
        raise TypeError(f"builder of reward {name!r} returned {type(reward).__name__}, expected Reward")
    return reward


# ----------------------------------------------------------------------------------------------- helpers
_MISSING = object()


def config_get(config: Any, key: str, default: Any = _MISSING) -> Any:
    """`config[key]` for mappings / ConfigDicts / attribute objects; `default` when absent (an explicit None is
    returned as None)."""
    if isinstance(config, Mapping):
        value = config.get(key, _MISSING)
    elif hasattr(config, "get") and callable(config.get):
        value = config.get(key, _MISSING)
    else:
        value = getattr(config, key, _MISSING)
    if value is _MISSING:
        if default is _MISSING:
            raise ValueError(f"reward config is missing {key!r}")
        return default
    return value


def select_prompt_embeddings(prompt_embeddings: Any, labels: jax.Array | None, batch: int, reward: str
                             ) -> jax.Array:
    """(B, P) text embeddings for a batch: `emb[labels]`, or `emb` aligned with the batch / broadcast from 1."""
    if prompt_embeddings is None:
        raise ValueError(f"reward {reward!r} needs prompt_embeddings = reward.prepare(params, prompts)")
    emb = jnp.asarray(prompt_embeddings)
    if emb.ndim != 2:
        raise ValueError(f"reward {reward!r}: prompt_embeddings must be (N, P), got {emb.shape}")
    if labels is not None:
        labels = jnp.asarray(labels)
        if labels.shape != (batch,):
            raise ValueError(f"reward {reward!r}: labels must be ({batch},), got {labels.shape}")
        return emb[labels]
    if emb.shape[0] == batch:
        return emb
    if emb.shape[0] == 1:
        return jnp.broadcast_to(emb, (batch, emb.shape[1]))
    raise ValueError(f"reward {reward!r}: without labels, prompt_embeddings must have 1 or {batch} rows "
                     f"(the batch), got {emb.shape}")


def _build_clip(config: Any, name: str):
    """(graphdef, params, clip config) from `checkpoint` or `clip_config` + `seed`."""
    from flax import nnx

    from marval_jax.models.clip import CLIP, CLIPConfig, random_params

    dtype = jnp.dtype(config_get(config, "dtype", None) or "float32")
    checkpoint = config_get(config, "checkpoint", None)
    if checkpoint is not None:
        from marval_jax.checkpoints.convert_clip import load_clip_params
        clip_config, params = load_clip_params(str(checkpoint))
    else:
        clip_config = config_get(config, "clip_config", None)
        if clip_config is None:
            raise ValueError(f"reward {name!r} needs `checkpoint` (a directory written by python -m "
                             "marval_jax.checkpoints.convert_clip) or `clip_config` (random weights, tests)")
        if not isinstance(clip_config, CLIPConfig):
            clip_config = CLIPConfig.from_hf_dict(dict(clip_config))
        params = random_params(clip_config, int(config_get(config, "seed", None) or 0))
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: CLIP(clip_config, rngs=nnx.Rngs(0), dtype=dtype)))
    return graphdef, params, clip_config


def _clip_prepare(graphdef, clip_config, config: Any) -> PrepareFn:
    from flax import nnx

    context_length = clip_config.text.max_position_embeddings
    bpe_path = config_get(config, "bpe_path", None)

    @jax.jit
    def encode(params, ids):
        return nnx.merge(graphdef, params).encode_text(ids)

    def prepare(params: Any, prompts: Sequence[str] | np.ndarray) -> jax.Array:
        if isinstance(prompts, str):
            prompts = [prompts]
        if isinstance(prompts, (list, tuple)) and all(isinstance(p, str) for p in prompts):
            from marval_jax.rewards.clip_tokenizer import get_tokenizer
            ids = get_tokenizer(bpe_path)(prompts, context_length)
        else:
            ids = np.asarray(prompts)
            if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
                raise ValueError(f"prompts must be strings or int token ids (N, T), got {ids.dtype} {ids.shape}")
        if ids.size and int(ids.max()) >= clip_config.text.vocab_size:
            raise ValueError(f"token id {int(ids.max())} is outside the text vocabulary "
                             f"({clip_config.text.vocab_size} ids)")
        return encode(params, jnp.asarray(ids, jnp.int32))

    return prepare


@register_reward("clip_score")
def build_clip_score(config: Any) -> Reward:
    from flax import nnx

    from marval_jax.models.clip import preprocess
    from marval_jax.rewards.clip import clip_score

    graphdef, params, cc = _build_clip(config, "clip_score")
    scale = float(config_get(config, "scale", 100.0))
    clamp_min = config_get(config, "clamp_min", 0.0)  # None (or "none" from a command line): no clamp
    clamp_min = None if clamp_min is None or str(clamp_min).lower() == "none" else float(clamp_min)
    method = config_get(config, "resize_method", None) or "bilinear"

    def fn(params, images, labels, prompt_embeddings):
        txt = select_prompt_embeddings(prompt_embeddings, labels, images.shape[0], "clip_score")
        model = nnx.merge(graphdef, params)
        img = model.encode_image(preprocess(images, cc.vision.image_size, mean=cc.image_mean, std=cc.image_std,
                                            method=method))
        return clip_score(img, txt, scale=scale, clamp_min=clamp_min)

    return Reward("clip_score", fn, params, _clip_prepare(graphdef, cc, config))


@register_reward("pickscore")
def build_pickscore(config: Any) -> Reward:
    from flax import nnx

    from marval_jax.models.clip import preprocess
    from marval_jax.rewards.clip import pickscore

    graphdef, params, cc = _build_clip(config, "pickscore")
    method = config_get(config, "resize_method", None) or "bilinear"

    def fn(params, images, labels, prompt_embeddings):
        txt = select_prompt_embeddings(prompt_embeddings, labels, images.shape[0], "pickscore")
        model = nnx.merge(graphdef, params)
        img = model.encode_image(preprocess(images, cc.vision.image_size, mean=cc.image_mean, std=cc.image_std,
                                            method=method))
        return pickscore(img, txt, model.logit_scale[...])

    return Reward("pickscore", fn, params, _clip_prepare(graphdef, cc, config))
