"""Classifier reward: log-probability of the target class under the REWARD copy of the Fashion-MNIST / MNIST CNN.

    reward = make_reward("classifier_logprob", {"dataset": "fashion_mnist"})   # committed reward-copy weights
    scores = reward(reward.params, images, labels)   # (B,) = log_softmax(classifier(images))[b, labels[b]]

`images` are NHWC (B, 28|32, 28|32, 1) in [-1, 1] (32x32 is centre-cropped to 28x28, see
`marval_jax.models.classifier`); `labels` int (B,) are required; `prompt_embeddings` is ignored. The score is a
pure, differentiable function of the images (the CNN has no batch statistics); it is <= 0, and 0 means certain.

Config keys (dict, ConfigDict or attribute object):
* `checkpoint`: weights directory written by `python -m marval_jax.tools.train_classifier`; "" or absent = the
  committed default `marval_jax/evaluation/weights/{dataset}_reward`. A relative path that does not exist from
  the working directory is also tried relative to the repository root (configs name the committed weights that
  way).
* `dataset`: "fashion_mnist" or "mnist": picks the default weights ("fashion_mnist" when neither it nor
  `checkpoint` is given) and, when given, must match the checkpoint's metadata.
* `copy`: the copy the checkpoint must be, default "reward" (the "eval" copy measures accuracy and must not be
  optimised against).
* `dtype`: compute dtype, default float32 (the log-softmax is float32 whatever it is).
"""
from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp

from marval_jax.evaluation.classifier_train import default_classifier_dir, load_classifier
from marval_jax.models.classifier import classifier_log_probs
from marval_jax.rewards.registry import Reward, config_get, register_reward

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def classifier_logprob(params: Any, images: jax.Array, labels: jax.Array | None, prompt_embeddings: Any = None,
                       *, dtype: Any = jnp.float32) -> jax.Array:
    """(B,) float32 `log_softmax(logits)[b, labels[b]]` of the classifier with `params`."""
    del prompt_embeddings
    if labels is None:
        raise ValueError("reward 'classifier_logprob' needs labels (B,) with the target class of each image")
    labels = jnp.asarray(labels)
    if labels.shape != (images.shape[0],):
        raise ValueError(f"reward 'classifier_logprob': labels must be ({images.shape[0]},), got {labels.shape}")
    log_probs = classifier_log_probs(params, images, dtype=dtype)
    return jnp.take_along_axis(log_probs, labels.astype(jnp.int32)[:, None], axis=-1)[:, 0]


def resolve_checkpoint(checkpoint: str | None, dataset: str) -> str:
    if not checkpoint:
        return default_classifier_dir(dataset, "reward")
    checkpoint = os.fspath(checkpoint)
    if not os.path.isabs(checkpoint) and not os.path.exists(checkpoint):
        candidate = os.path.join(_REPO_ROOT, checkpoint)
        if os.path.exists(candidate):
            return candidate
    return checkpoint


@register_reward("classifier_logprob")
def build_classifier_logprob(config: Any) -> Reward:
    dataset = config_get(config, "dataset", None) or None
    copy = config_get(config, "copy", None) or "reward"
    dtype = jnp.dtype(config_get(config, "dtype", None) or "float32")
    path = resolve_checkpoint(config_get(config, "checkpoint", None), dataset or "fashion_mnist")
    params, _ = load_classifier(path, dataset=dataset, copy=copy)

    def fn(params, images, labels, prompt_embeddings=None):
        return classifier_logprob(params, images, labels, prompt_embeddings, dtype=dtype)

    return Reward("classifier_logprob", fn, params)
