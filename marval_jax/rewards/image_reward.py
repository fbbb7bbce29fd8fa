"""ImageReward (Xu et al. 2023) as a differentiable reward: `rl.reward=image_reward` and an evaluation column.

    reward = make_reward("image_reward", {"checkpoint": "/ckpt/image_reward_jax"})
    tokens = reward.prepare(reward.params, ["a photo of a cat", "a red car"])   # once, outside the train step
    scores = reward(reward.params, images, labels, tokens)                      # (B,), jittable, differentiable

The score of an image and a prompt is the release's: BLIP's ViT encodes the image (preprocessed in JAX: bicubic
resize of the shorter side to 224, centre crop, CLIP mean / std), the BERT text encoder reads the prompt (WordPiece,
padded to 35 tokens) with cross-attention to every image token, the MLP head maps its first ([CLS]) token to one
number, and (number - 0.16717362830052426) / 1.0333394966054072 is the reward (`marval_jax/rewards/blip.py`).

Unlike CLIP's, the text encoder depends on the image, so `prepare` cannot embed the prompts: it returns their
tokens, packed as one int32 array (N, 2 * max_length) = [ids | attention mask], which selects per image like the
CLIP rewards' embeddings (`labels[i]`, aligned with the batch, or one prompt broadcast).

Config keys: `checkpoint` (a directory written by `python -m marval_jax.checkpoints.convert_image_reward`: weights,
config and the BERT vocabulary) or `image_reward_config` (an `ImageRewardConfig` or its dict; random weights from
`seed`, for tests); `vocab_path` (default `<checkpoint>/vocab.txt`); `dtype` (compute dtype, default float32);
`resize_method` ("bicubic", as the release).
"""
from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from marval_jax.checkpoints.convert_image_reward import VOCAB_FILE, load_image_reward_arrays
from marval_jax.rewards.blip import ImageReward, ImageRewardConfig, abstract_model, random_params
from marval_jax.rewards.registry import Reward, config_get, register_reward, select_prompt_embeddings
from marval_jax.user_errors import UserError


def params_from_arrays(config: ImageRewardConfig, arrays: Mapping[str, np.ndarray]) -> nnx.State:
    """{'/'-joined NNX path: array} -> the param state of `ImageReward(config)` (every parameter, each shape)."""
    _, abstract = abstract_model(config)
    out, missing, bad = [], [], []
    for path, var in nnx.to_flat_state(abstract):
        key = "/".join(map(str, path))
        if key not in arrays:
            missing.append(key)
        elif tuple(np.shape(arrays[key])) != tuple(var.shape):
            bad.append(f"{key}: expected {tuple(var.shape)}, got {np.shape(arrays[key])}")
        else:
            out.append((path, var.replace(jnp.asarray(arrays[key], jnp.float32))))
    extra = sorted(set(arrays) - {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(abstract)})
    if missing or bad or extra:
        raise UserError(f"ImageReward arrays do not match the module: missing {missing}, unexpected {extra}, "
                        f"mis-shaped {bad}")
    return nnx.from_flat_state(out)


def load_image_reward(path: str, dtype: Any = jnp.float32) -> ImageReward:
    """The `ImageReward` module with converted weights (float32 params; compute `dtype`)."""
    config, arrays = load_image_reward_arrays(path)
    graphdef, _ = abstract_model(config, dtype)
    return nnx.merge(graphdef, params_from_arrays(config, arrays))


def pack_tokens(ids: np.ndarray, mask: np.ndarray) -> jax.Array:
    """(N, T) ids and mask -> (N, 2T) int32 [ids | mask], the form `prepare` returns."""
    return jnp.concatenate([jnp.asarray(ids, jnp.int32), jnp.asarray(mask, jnp.int32)], axis=-1)


def unpack_tokens(tokens: jax.Array) -> tuple[jax.Array, jax.Array]:
    t = tokens.shape[-1] // 2
    return tokens[..., :t], tokens[..., t:]


def _build(config: Any) -> tuple[Any, nnx.State, ImageRewardConfig, str | None]:
    """(graphdef, params, model config, vocabulary path) from `checkpoint` or `image_reward_config` + `seed`."""
    dtype = jnp.dtype(config_get(config, "dtype", None) or "float32")
    checkpoint = config_get(config, "checkpoint", None)
    vocab = config_get(config, "vocab_path", None)
    if checkpoint:
        cfg, arrays = load_image_reward_arrays(str(checkpoint))
        params = params_from_arrays(cfg, arrays)
        vocab = vocab or os.path.join(str(checkpoint), VOCAB_FILE)
    else:
        cfg = config_get(config, "image_reward_config", None)
        if cfg is None:
            raise UserError("reward 'image_reward' needs `checkpoint` (rl.reward_config.checkpoint: a directory "
                            "written by python -m marval_jax.checkpoints.convert_image_reward) or "
                            "`image_reward_config` (random weights, tests)")
        if not isinstance(cfg, ImageRewardConfig):
            cfg = ImageRewardConfig.from_dict(dict(cfg))
        params = random_params(cfg, int(config_get(config, "seed", None) or 0))
    graphdef, _ = abstract_model(cfg, dtype)
    return graphdef, params, cfg, vocab


def _prepare(cfg: ImageRewardConfig, vocab: str | None):
    def prepare(params: Any, prompts: str | Sequence[str] | np.ndarray) -> jax.Array:
        del params
        if isinstance(prompts, str):
            prompts = [prompts]
        if isinstance(prompts, (list, tuple)) and all(isinstance(p, str) for p in prompts):
            if not vocab:
                raise UserError("reward 'image_reward' needs a BERT vocabulary for text prompts: set `vocab_path` "
                                "or use a converted `checkpoint` (it holds vocab.txt)")
            from marval_jax.rewards.bert_tokenizer import get_tokenizer
            ids, mask = get_tokenizer(str(vocab))(list(prompts), cfg.max_length)
        else:
            ids = np.asarray(prompts)
            if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer) or ids.shape[1] > cfg.max_length:
                raise UserError(f"prompts must be strings or int token ids (N, T<={cfg.max_length}), got "
                                f"{ids.dtype} {ids.shape}")
            mask = (ids != 0).astype(np.int32)   # BERT's [PAD] is id 0
        if ids.size and int(ids.max()) >= cfg.text.vocab_size:
            raise UserError(f"token id {int(ids.max())} is outside the text vocabulary ({cfg.text.vocab_size} ids)")
        return pack_tokens(ids, mask)

    return prepare


@register_reward("image_reward")
def build_image_reward(config: Any) -> Reward:
    graphdef, params, cfg, vocab = _build(config)
    method = config_get(config, "resize_method", None) or "bicubic"

    def fn(params, images, labels, prompt_tokens):
        tokens = select_prompt_embeddings(prompt_tokens, labels, images.shape[0], "image_reward")
        ids, mask = unpack_tokens(tokens)
        return nnx.merge(graphdef, params)(images, ids, mask, method=method)

    return Reward("image_reward", fn, params, _prepare(cfg, vocab))
