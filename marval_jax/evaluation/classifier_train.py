"""Training, saving and loading of the Fashion-MNIST / MNIST classifiers (`marval_jax.models.classifier`).

Two independent copies are trained per data set:
  * "reward": the copy whose log-probabilities are the `classifier_logprob` reward;
  * "eval":   the copy that measures class accuracy of generated images (a model optimised against the reward copy
              cannot have overfitted this one).
They use different seeds AND disjoint halves of the training split: a fixed permutation (seed `HALF_SPLIT_SEED`,
independent of the training seed) splits the training set in two, "reward" takes the first half, "eval" the second.

Training is deterministic given the seed: the initialisation, the per-epoch shuffles, the augmentation (random
shifts of up to `max_shift` pixels, the border filled with -1 = background) and dropout all come from one
`jax.random` key; batches have a fixed size (the last partial batch of an epoch is dropped; the next epoch's
shuffle uses it).

A checkpoint directory holds `params.npz` (float32 arrays named like "convs/0/kernel") and `classifier.json`
(data set, copy, seed, model config, training settings, test accuracy, the command that made it).
Command line: `python -m marval_jax.tools.train_classifier --dataset fashion_mnist --copy reward --out DIR`.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from marval_jax.checkpoints.safe_load import open_npz
from marval_jax.data.raw_datasets import load_raw
from marval_jax.evaluation.class_accuracy import class_accuracy, per_class_accuracy
from marval_jax.models.classifier import (IMAGE_SIZE, Classifier, ClassifierConfig, flatten_params,
                                          params_to_state, uint8_to_model_input)

DATASETS = ("fashion_mnist", "mnist")
COPIES = ("reward", "eval")
DEFAULT_SEEDS = {"reward": 0, "eval": 1}
DEFAULT_EPOCHS = {"fashion_mnist": 12, "mnist": 6}
HALF_SPLIT_SEED = 20240611
PARAMS_FILE = "params.npz"
META_FILE = "classifier.json"
FORMAT_VERSION = 1
WEIGHTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    dataset: str = "fashion_mnist"
    copy: str = "reward"
    seed: int = 0
    epochs: int = 12
    batch_size: int = 128
    learning_rate: float = 2e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 200
    max_shift: int = 2
    model: ClassifierConfig = ClassifierConfig(dropout=0.3)
    num_train: int | None = None  # use only the first `num_train` examples of this copy's half (tests)
    num_test: int | None = None  # evaluate on the first `num_test` test examples (None = all)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["model"] = self.model.to_dict()
        return d


def default_classifier_dir(dataset: str, copy: str) -> str:
    """Path of the committed weights for (`dataset`, `copy`)."""
    _check_choice("dataset", dataset, DATASETS)
    _check_choice("copy", copy, COPIES)
    return os.path.join(WEIGHTS_DIR, f"{dataset}_{copy}")


def _check_choice(what: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{what} must be one of {choices}, got {value!r}")


def half_indices(num_examples: int, copy: str) -> np.ndarray:
    """Indices of `copy`'s half of a training set of `num_examples` (the two halves are disjoint)."""
    _check_choice("copy", copy, COPIES)
    perm = np.random.default_rng(HALF_SPLIT_SEED).permutation(num_examples)
    half = num_examples // 2
    return np.sort(perm[:half] if copy == "reward" else perm[half:2 * half])


def load_split(dataset: str, split: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    _check_choice("dataset", dataset, DATASETS)
    return load_raw(dataset, split, data_dir)


def random_shift(images: jax.Array, rng: jax.Array, max_shift: int) -> jax.Array:
    """Shifts each (B, H, W, C) image by up to `max_shift` pixels in x and y, filling with -1 (background)."""
    if max_shift == 0:
        return images
    b, h, w, c = images.shape
    p = max_shift
    padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)), constant_values=-1.0)
    offsets = jax.random.randint(rng, (b, 2), 0, 2 * p + 1)
    return jax.vmap(lambda img, o: jax.lax.dynamic_slice(img, (o[0], o[1], 0), (h, w, c)))(padded, offsets)


def make_optimizer(cfg: TrainConfig, total_steps: int) -> optax.GradientTransformation:
    warmup = min(cfg.warmup_steps, max(total_steps // 10, 1))
    schedule = optax.warmup_cosine_decay_schedule(0.0, cfg.learning_rate, warmup, max(total_steps, warmup + 1),
                                                  end_value=cfg.learning_rate * 0.01)
    return optax.adamw(schedule, weight_decay=cfg.weight_decay)


def make_train_step(graphdef: nnx.GraphDef, tx: optax.GradientTransformation, max_shift: int) -> Callable:
    """Jitted `(params, opt_state, images uint8 (N,28,28), labels (N,), batch_idx (B,), key)
    -> (params, opt_state, loss)`; the batch is gathered, scaled to [-1, 1] and shifted inside the step.

    (One jitted step called from Python: XLA:CPU runs convolutions inside a `lax.scan` over steps ~20x slower.)
    """

    def loss_fn(params, x, y, rng):
        logits = nnx.merge(graphdef, params)(x, rng=rng)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def step(params, opt_state, images, labels, idx, key):
        k_shift, k_drop = jax.random.split(key)
        x = random_shift(uint8_to_model_input(images[idx]), k_shift, max_shift)
        loss, grads = jax.value_and_grad(loss_fn)(params, x, labels[idx], k_drop)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


@functools.partial(jax.jit, static_argnums=(1, 2, 3))
def epoch_batches(key: jax.Array, num_examples: int, steps: int, batch_size: int) -> tuple[jax.Array, jax.Array]:
    """(batch indices (steps, batch_size), step keys (steps, 2)) of one epoch: a fresh shuffle per epoch."""
    k_perm, k_steps = jax.random.split(key)
    perm = jax.random.permutation(k_perm, num_examples)[: steps * batch_size].reshape(steps, batch_size)
    return perm, jax.random.split(k_steps, steps)


def train_classifier(cfg: TrainConfig, *, train_data: tuple[np.ndarray, np.ndarray] | None = None,
                     test_data: tuple[np.ndarray, np.ndarray] | None = None, data_dir: str | None = None,
                     log: Callable[[str], None] | None = print) -> tuple[nnx.State, dict[str, Any]]:
    """Trains `cfg.copy` on its half of `cfg.dataset`'s training split; returns (params State, metrics).

    `train_data` / `test_data` (uint8 (N, 28, 28), int labels) replace the data set's train / test split; the
    half for `cfg.copy` is still taken from `train_data`. metrics: losses (per step), epoch_losses,
    test_accuracy, per_class_accuracy, num_train, num_test, train_seconds.
    """
    _check_choice("copy", cfg.copy, COPIES)
    log = log or (lambda s: None)
    images, labels = train_data if train_data is not None else load_split(cfg.dataset, "train", data_dir)
    if images.shape[1:] != (IMAGE_SIZE, IMAGE_SIZE):
        raise ValueError(f"training images must be (N, {IMAGE_SIZE}, {IMAGE_SIZE}) uint8, got {images.shape}")
    idx = half_indices(len(images), cfg.copy)
    if cfg.num_train is not None:
        idx = idx[: cfg.num_train]
    images, labels = jnp.asarray(images[idx], jnp.uint8), jnp.asarray(labels[idx], jnp.int32)
    steps = len(idx) // cfg.batch_size
    if steps == 0:
        raise ValueError(f"{len(idx)} training examples < batch size {cfg.batch_size}")

    key = jax.random.PRNGKey(cfg.seed)
    k_init, k_train = jax.random.split(key)
    model = Classifier(cfg.model, rngs=nnx.Rngs(params=k_init))
    graphdef, params = nnx.split(model)
    tx = make_optimizer(cfg, steps * cfg.epochs)
    opt_state = tx.init(params)
    step_fn = make_train_step(graphdef, tx, cfg.max_shift)

    t0 = time.time()
    losses = []
    for e in range(cfg.epochs):
        batches, keys = epoch_batches(jax.random.fold_in(k_train, e), len(idx), steps, cfg.batch_size)
        ep_losses = []
        for i in range(steps):
            params, opt_state, loss = step_fn(params, opt_state, images, labels, batches[i], keys[i])
            ep_losses.append(loss)
        ep_losses = np.asarray(jnp.stack(ep_losses))
        losses.append(ep_losses)
        log(f"[{cfg.dataset}/{cfg.copy}] epoch {e + 1}/{cfg.epochs}: loss {ep_losses.mean():.4f} "
            f"({time.time() - t0:.0f}s)")
    train_seconds = time.time() - t0

    test_images, test_labels = test_data if test_data is not None else load_split(cfg.dataset, "test", data_dir)
    if cfg.num_test is not None:
        test_images, test_labels = test_images[: cfg.num_test], test_labels[: cfg.num_test]
    acc = class_accuracy(params, test_images, test_labels)
    per_class = per_class_accuracy(params, test_images, test_labels, cfg.model.num_classes)
    log(f"[{cfg.dataset}/{cfg.copy}] test accuracy {acc:.4f} on {len(test_labels)} images, "
        f"train {train_seconds:.0f}s")
    all_losses = np.concatenate(losses) if losses else np.zeros((0,), np.float32)
    metrics = {"losses": all_losses, "epoch_losses": [float(l.mean()) for l in losses], "test_accuracy": acc,
               "per_class_accuracy": [float(a) for a in per_class], "num_train": int(len(idx)),
               "num_test": int(len(test_labels)), "train_seconds": float(train_seconds)}
    return params, metrics


def save_classifier(out_dir: str, params: Any, meta: dict[str, Any]) -> None:
    """Writes `params.npz` and `classifier.json` into `out_dir` (created if needed; local or gs://, through epath:
    each file encoded in memory and written once)."""
    from marval_jax.evaluation.files import as_path, write_npz  # pylint: disable=import-outside-toplevel
    out = as_path(out_dir)
    flat = {k: np.asarray(v, np.float32) for k, v in flatten_params(params).items()}
    write_npz(out / PARAMS_FILE, **flat)
    meta = dict(meta, format_version=FORMAT_VERSION)
    (out / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")


def load_classifier(path: str, dataset: str | None = None, copy: str | None = None
                    ) -> tuple[nnx.State, dict[str, Any]]:
    """Loads a classifier directory -> (params `nnx.State`, metadata dict).

    Raises FileNotFoundError when the directory or a file is missing, ValueError when `dataset` / `copy` are
    given and differ from the checkpoint's, or when the parameters do not match the recorded model config.
    """
    from marval_jax.evaluation.files import as_path, local_file  # pylint: disable=import-outside-toplevel
    if not as_path(path).is_dir():
        raise FileNotFoundError(f"classifier directory {path} not found (train one with "
                                f"`python -m marval_jax.tools.train_classifier --dataset ... --copy ... --out {path}`)")
    meta_path, params_path = as_path(path) / META_FILE, as_path(path) / PARAMS_FILE
    for p in (meta_path, params_path):
        if not p.exists():
            raise FileNotFoundError(f"classifier file {p} not found; expected {META_FILE} and {PARAMS_FILE} in {path}")
    meta = json.loads(meta_path.read_text())
    if dataset is not None and meta.get("dataset") != dataset:
        raise ValueError(f"classifier in {path} was trained on dataset {meta.get('dataset')!r}, "
                         f"expected {dataset!r}")
    if copy is not None and meta.get("copy") != copy:
        raise ValueError(f"classifier in {path} is the {meta.get('copy')!r} copy, expected {copy!r}")
    with local_file(params_path) as local, open_npz(local, what="classifier weights") as z:
        flat = {k: z[k] for k in z.files}
    config = ClassifierConfig.from_dict(meta["model"]) if "model" in meta else None
    try:
        params = params_to_state(flat, config)
    except ValueError as e:
        raise ValueError(f"{params_path}: {e}") from None
    return params, meta


def load_default_classifier(dataset: str, copy: str) -> tuple[nnx.State, dict[str, Any]]:
    """The committed weights under `marval_jax/evaluation/weights/{dataset}_{copy}/`."""
    return load_classifier(default_classifier_dir(dataset, copy), dataset=dataset, copy=copy)
