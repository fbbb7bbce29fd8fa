"""Class accuracy of images under a classifier (`marval_jax.models.classifier`).

`images` are either uint8 (N, 28, 28) / (N, 28, 28, 1) in [0, 255] (raw data sets) or float NHWC
(N, 28|32, 28|32, 1) in [-1, 1] (generator outputs; 32x32 is centre-cropped). `params` is the classifier
`nnx.State` (e.g. from `load_classifier`) or its pure dict. Evaluation runs in jitted batches of `batch_size`
(the last batch is padded, so only two shapes are compiled). `predict_sharded` classifies a global batch already
split over a mesh's batch axes (every process of a multi-process run calls it; the predictions are gathered).
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from marval_jax.models.classifier import classifier_logits, uint8_to_model_input

_logits_jit = jax.jit(classifier_logits)


def _as_model_input(images: Any) -> jax.Array:
    dtype = images.dtype if hasattr(images, "dtype") else np.asarray(images).dtype
    if dtype == np.uint8:
        return uint8_to_model_input(images)
    return jnp.asarray(images, jnp.float32)


def predict(params: Any, images: Any, batch_size: int = 1000) -> np.ndarray:
    """Predicted class per image, int32 (N,)."""
    x = _as_model_input(images)
    n = x.shape[0]
    preds = []
    for start in range(0, n, batch_size):
        chunk = x[start:start + batch_size]
        pad = batch_size - chunk.shape[0] if n > batch_size else 0
        if pad:
            chunk = jnp.concatenate([chunk, jnp.repeat(chunk[-1:], pad, axis=0)])
        p = np.asarray(jnp.argmax(_logits_jit(params, chunk), axis=-1), np.int32)
        preds.append(p[: p.shape[0] - pad])
    return np.concatenate(preds) if preds else np.zeros((0,), np.int32)


def predict_sharded(params: Any, layout):
    """`predict(images) -> int32 (N,)` for global float NHWC batches in [-1, 1] split over `layout`'s batch axes
    (`programs.sample.GlobalBatches`): classifier weights replicated once, predictions gathered."""
    state = layout.replicate(params)
    fn = jax.jit(lambda p, x: jnp.argmax(classifier_logits(p, x), axis=-1).astype(jnp.int32),
                 in_shardings=(layout.replicated, layout.sharding(4)), out_shardings=layout.sharding(1))
    return lambda images: layout.gather(fn(state, images))


def _check_labels(images: Any, labels: Any) -> np.ndarray:
    labels = np.asarray(labels).astype(np.int64)
    if labels.ndim != 1 or labels.shape[0] != np.shape(images)[0]:
        raise ValueError(f"labels must be (N,) with N = {np.shape(images)[0]} images, got shape {labels.shape}")
    return labels


def class_accuracy(params: Any, images: Any, labels: Any, batch_size: int = 1000) -> float:
    """Fraction of images whose predicted class equals `labels`."""
    labels = _check_labels(images, labels)
    if labels.shape[0] == 0:
        raise ValueError("class_accuracy needs at least one image")
    return float(np.mean(predict(params, images, batch_size) == labels))


def per_class_accuracy(params: Any, images: Any, labels: Any, num_classes: int = 10,
                       batch_size: int = 1000) -> np.ndarray:
    """Accuracy among the images of each class, float64 (num_classes,); NaN for classes with no image."""
    labels = _check_labels(images, labels)
    correct = predict(params, images, batch_size) == labels
    out = np.full((num_classes,), np.nan)
    for c in range(num_classes):
        mask = labels == c
        if mask.any():
            out[c] = correct[mask].mean()
    return out
