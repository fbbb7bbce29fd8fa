"""Small CNN classifier for 28x28 / 32x32 grey images (Fashion-MNIST, MNIST), used as a reward and for evaluation.

Layout: three 3x3 convolutions (channels 32, 64, 128 by default), each followed by ReLU and a 2x2 max-pool
(28 -> 14 -> 7 -> 3), then Dense(hidden) - ReLU - dropout - Dense(num_classes). There is no normalisation layer
and so no batch statistics: with parameters fixed, the logits are a pure, differentiable function of the images,
which is what a reward needs.

Input is NHWC with one channel, values in [-1, 1] (uint8 `v` maps to `v / 127.5 - 1`, see `uint8_to_model_input`).
Images of 32x32 are centre-cropped to 28x28: our generators make 32x32 images by padding the 28x28 originals with
2 pixels of -1 on every side, so the crop recovers the original frame.

Parameters are float32; the compute dtype is the `dtype` argument; logits are returned in float32.
`classifier_logits(params, images)` is the pure functional form: `params` is the `nnx.State` from
`nnx.split(model)` (or its `nnx.to_pure_dict`), and the architecture is read back from the parameter shapes.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

IMAGE_SIZE = 28
PADDED_IMAGE_SIZE = 32

# Every parameter is small: replicate all of them (one `None` per dimension).
LOGICAL_AXES = [
    (r"convs/\d+/kernel", (None, None, None, None)),
    (r"(convs/\d+|hidden|head)/bias", (None,)),
    (r"(hidden|head)/kernel", (None, None)),
]


@dataclasses.dataclass(frozen=True)
class ClassifierConfig:
    channels: tuple[int, ...] = (32, 64, 128)
    hidden: int = 256
    num_classes: int = 10
    dropout: float = 0.0  # only active when a dropout key is passed (training)

    def to_dict(self) -> dict[str, Any]:
        return {"channels": list(self.channels), "hidden": self.hidden, "num_classes": self.num_classes,
                "dropout": self.dropout}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ClassifierConfig":
        return cls(channels=tuple(int(c) for c in d["channels"]), hidden=int(d["hidden"]),
                   num_classes=int(d["num_classes"]), dropout=float(d.get("dropout", 0.0)))


def _spatial_after_pools(size: int, num_pools: int) -> int:
    for _ in range(num_pools):
        size //= 2
    return size


def _max_pool_2x2(x: jax.Array) -> jax.Array:
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


def _dropout(x: jax.Array, rate: float, rng: jax.Array | None) -> jax.Array:
    """Inverted dropout with an explicit key; identity when `rng` is None or rate is 0."""
    if rng is None or rate == 0.0:
        return x
    keep = jax.random.bernoulli(rng, 1.0 - rate, x.shape)
    return jnp.where(keep, x / (1.0 - rate), jnp.zeros_like(x))


def prepare_images(images: jax.Array) -> jax.Array:
    """Checks NHWC grey input and centre-crops 32x32 to 28x28; returns (B, 28, 28, 1)."""
    shape = tuple(images.shape)
    if len(shape) != 4 or shape[-1] != 1 or shape[1] != shape[2] or shape[1] not in (IMAGE_SIZE, PADDED_IMAGE_SIZE):
        raise ValueError(f"classifier expects NHWC grey images of shape (B, 28, 28, 1) or (B, 32, 32, 1) "
                         f"with values in [-1, 1], got shape {shape}")
    if shape[1] == PADDED_IMAGE_SIZE:
        m = (PADDED_IMAGE_SIZE - IMAGE_SIZE) // 2
        images = images[:, m:m + IMAGE_SIZE, m:m + IMAGE_SIZE, :]
    return images


def uint8_to_model_input(images: np.ndarray | jax.Array) -> jax.Array:
    """uint8 (N, 28, 28) or (N, 28, 28, 1) in [0, 255] -> float32 NHWC in [-1, 1]."""
    x = jnp.asarray(images)
    if x.ndim == 3:
        x = x[..., None]
    return x.astype(jnp.float32) / 127.5 - 1.0


class Classifier(nnx.Module):
    """conv-relu-pool x3 -> dense-relu-dropout -> dense; `__call__(images, rng=None)` -> float32 logits (B, K)."""

    def __init__(self, config: ClassifierConfig = ClassifierConfig(), *, dtype: Any = jnp.float32,
                 rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        chans = (1,) + tuple(config.channels)
        self.convs = nnx.List([
            nnx.Conv(cin, cout, kernel_size=(3, 3), padding="SAME", dtype=dtype, param_dtype=jnp.float32,
                     rngs=rngs)
            for cin, cout in zip(chans[:-1], chans[1:])])
        side = _spatial_after_pools(IMAGE_SIZE, len(config.channels))
        if side < 1:
            raise ValueError(f"{len(config.channels)} conv/pool stages shrink a {IMAGE_SIZE}x{IMAGE_SIZE} image "
                             f"to nothing; use at most 4")
        self.hidden = nnx.Linear(side * side * chans[-1], config.hidden, dtype=dtype, param_dtype=jnp.float32,
                                 rngs=rngs)
        self.head = nnx.Linear(config.hidden, config.num_classes, dtype=dtype, param_dtype=jnp.float32,
                               rngs=rngs)

    def __call__(self, images: jax.Array, rng: jax.Array | None = None) -> jax.Array:
        x = prepare_images(images).astype(self.dtype)
        for conv in self.convs:
            x = _max_pool_2x2(jax.nn.relu(conv(x)))
        x = x.reshape(x.shape[0], -1)
        x = jax.nn.relu(self.hidden(x))
        x = _dropout(x, self.config.dropout, rng)
        return self.head(x).astype(jnp.float32)


# ---------------------------------------------------------------------------------------------------------------
# Functional form.

def flatten_params(params: Any) -> dict[str, jax.Array]:
    """`nnx.State` or pure dict -> {"convs/0/kernel": array, ...} (the names used in checkpoints)."""
    pure = nnx.to_pure_dict(params) if isinstance(params, nnx.State) else params
    leaves, _ = jax.tree_util.tree_flatten_with_path(pure)
    out = {}
    for path, leaf in leaves:
        out["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)] = leaf
    return out


def config_from_params(params: Any, dropout: float = 0.0) -> ClassifierConfig:
    """Reads the architecture back from parameter shapes."""
    flat = flatten_params(params)
    try:
        n = len([k for k in flat if k.startswith("convs/") and k.endswith("/kernel")])
        channels = tuple(int(flat[f"convs/{i}/kernel"].shape[-1]) for i in range(n))
        hidden = int(flat["hidden/kernel"].shape[-1])
        num_classes = int(flat["head/kernel"].shape[-1])
    except KeyError as e:
        raise ValueError(f"not classifier parameters: missing {e}; got keys {sorted(flat)}") from None
    if n == 0:
        raise ValueError(f"not classifier parameters: no convs/*/kernel; got keys {sorted(flat)}")
    return ClassifierConfig(channels=channels, hidden=hidden, num_classes=num_classes, dropout=dropout)


def abstract_classifier(config: ClassifierConfig, dtype: Any = jnp.float32) -> tuple[nnx.GraphDef, nnx.State]:
    """(graphdef, abstract state of ShapeDtypeStructs) without allocating parameters."""
    model = nnx.eval_shape(lambda: Classifier(config, dtype=dtype, rngs=nnx.Rngs(0)))
    return nnx.split(model)


@functools.lru_cache(maxsize=32)
def _graphdef(config: ClassifierConfig, dtype_name: str) -> nnx.GraphDef:
    return abstract_classifier(config, jnp.dtype(dtype_name))[0]


def params_to_state(params: Any, config: ClassifierConfig | None = None) -> nnx.State:
    """Pure dict (or State) -> `nnx.State` matching `Classifier(config)`, checking every name and shape."""
    config = config or config_from_params(params)
    _, state = abstract_classifier(config)
    expected = flatten_params(state)
    got = flatten_params(params)
    if set(expected) != set(got):
        raise ValueError(f"classifier parameter names differ: expected {sorted(expected)}, got {sorted(got)}")
    for k, v in expected.items():
        if tuple(got[k].shape) != tuple(v.shape):
            raise ValueError(f"classifier parameter {k}: expected shape {tuple(v.shape)}, "
                             f"got {tuple(got[k].shape)}")
    pure = nnx.to_pure_dict(state)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(pure)
    names = ["/".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path) for path, _ in leaves]
    pure = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(got[n], jnp.float32) for n in names])
    nnx.replace_by_pure_dict(state, pure)
    return state


def classifier_logits(params: Any, images: jax.Array, *, dtype: Any = jnp.float32,
                      rng: jax.Array | None = None, dropout: float = 0.0) -> jax.Array:
    """Pure forward pass: `params` (State or pure dict), images NHWC (B, 28|32, 28|32, 1) in [-1, 1] -> logits."""
    config = config_from_params(params, dropout=dropout)
    if isinstance(params, nnx.State):
        state = params
    else:
        state = params_to_state(params, config)
    graphdef = _graphdef(config, jnp.dtype(dtype).name)
    return nnx.merge(graphdef, state)(images, rng=rng)


def classifier_log_probs(params: Any, images: jax.Array, *, dtype: Any = jnp.float32) -> jax.Array:
    """float32 log-softmax over classes, (B, K)."""
    return jax.nn.log_softmax(classifier_logits(params, images, dtype=dtype).astype(jnp.float32), axis=-1)
