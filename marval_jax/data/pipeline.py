"""Deterministic, checkpointable grain input pipelines, sharded by JAX process.

Train pipeline (`make_train_dataset` / `make_train_iterator`), as MaxText's grain MapDataset pipeline::

    source -> shuffle(seed) -> repeat(None) -> random_map(preprocess, seed') -> [process_index::process_count]
           -> to_iter_dataset(read threads) -> batch(global_batch_size // process_count) -> (mp_prefetch if num_workers)

* ``shuffle`` before ``repeat`` reshuffles every epoch (grain seeds epoch e with ``seed + e``); batches run across
  epoch boundaries (no example is dropped, as ``tf.data`` shuffle-repeat-batch).
* The random map (flip, posterior sample) is seeded by the global stream index, so every example of every epoch
  has its own generator whatever the process layout; host shards are strided slices of that stream. Global step
  ``k`` therefore always sees the stream positions ``[k * G, (k + 1) * G)`` (``G`` = global batch size), for any
  process count: the process layout changes only which host holds which rows.
* The iterator is a ``grain.DatasetIterator``: ``get_state()`` / ``set_state()`` (a small JSON-able dict) make a
  restored run see exactly the batches it would have seen. `save_iterator_state` / `restore_iterator_state` write
  it as ``process_<i>-of-<n>.json`` (grain's naming). With orbax, save it next to the model state with grain's
  handler: ``ocp.args.Composite(state=ocp.args.StandardSave(state), data=grain.checkpoint.CheckpointSave(it))``
  and restore with ``data=grain.checkpoint.CheckpointRestore(it)`` (register ``"data":
  grain.checkpoint.CheckpointHandler()`` in the manager's ``item_handlers``).

Host batches are dicts of NumPy arrays ``{"images" | "latents" | "tokens": float32, "labels": int32}``;
`make_global_batch` assembles global ``jax.Array``s with ``jax.make_array_from_process_local_data``.

Data config (`default_config`), an ``ml_collections.ConfigDict``:

* ``name``: ``"fashion_mnist"`` | ``"mnist"`` (tfds ``<name>_local``, 28x28 grey padded to ``pad_to``),
  ``"imagenet2012"`` (tfds ``imagenet2012`` or ``imagenet2012_local``, ADM center crop to ``image_size``),
  ``"latent_cache"`` (moments in ``cache_dir``, see `marval_jax.data.latent_cache`).
* ``split`` (tfds slicing allowed: ``"train[:1000]"``), ``data_dir`` (None: ``$TFDS_DATA_DIR`` or
  ``~/tensorflow_datasets``), ``tfds_name`` (None: chosen by ``name``), ``image_size``, ``pad_to``, ``flip``,
  ``cache_dir``, ``latent_scale`` (0.2325), ``patch_size`` (0: images / latents; p > 0: ``"tokens"`` patchified
  as MAR), ``num_workers`` (grain worker processes, 0: in-process), ``read_threads`` (threads decoding examples in each
  process), ``prefetch`` (examples read ahead per process).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import grain
import jax
import ml_collections
import numpy as np

from marval_jax.data import latent_cache, preprocess, tfds_builders
from marval_jax.data.tokenizers import patchify_np

KNOWN_NAMES = ("fashion_mnist", "mnist", "imagenet2012", "latent_cache")
_SMALL_DEFAULT_SIZE = {"fashion_mnist": 28, "mnist": 28}


def default_config(**overrides: Any) -> ml_collections.ConfigDict:
    """Data config with every field the pipeline reads; ``overrides`` replace defaults."""
    config = ml_collections.ConfigDict({
        "name": "fashion_mnist",
        "split": "train",
        "data_dir": None,
        "tfds_name": None,
        "image_size": 256,
        "pad_to": 32,
        "flip": False,
        "cache_dir": None,
        "latent_scale": 0.2325,
        "patch_size": 0,
        "num_workers": 0,
        "read_threads": 8,
        "prefetch": 64,
    })
    config.update(overrides)
    return config


def _get(config: Any, key: str, default: Any = None) -> Any:
    return config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)


def _finish(out: np.ndarray, key: str, label: Any, patch_size: int) -> dict[str, np.ndarray]:
    if patch_size:
        return {"tokens": patchify_np(out, patch_size), "labels": np.int32(label)}
    return {key: out, "labels": np.int32(label)}


@dataclasses.dataclass(frozen=True)
class SmallImageTransform(grain.transforms.RandomMap):
    """tfds record (28x28x1 uint8) -> ``{"images": float32 (pad_to, pad_to, 1) in [-1, 1], "labels"}``."""

    pad_to: int | None = 32
    flip: bool = False
    patch_size: int = 0

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        out = preprocess.preprocess_small(element["image"], self.pad_to, rng if self.flip else None)
        return _finish(out, "images", element["label"], self.patch_size)


@dataclasses.dataclass(frozen=True)
class ImageNetTransform(grain.transforms.RandomMap):
    """tfds record (JPEG bytes) -> ``{"images": float32 (size, size, 3) in [-1, 1], "labels"}`` (ADM crop)."""

    image_size: int = 256
    flip: bool = True
    patch_size: int = 0

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, np.ndarray]:
        out = preprocess.preprocess_imagenet(element["image"], self.image_size, rng if self.flip else None)
        return _finish(out, "images", element["label"], self.patch_size)


def make_source(config: Any, *, train: bool = True) -> tuple[Any, grain.transforms.RandomMap]:
    """``(random-access source, per-example random map)`` for the data config. ``train=False`` turns flips off."""
    name = _get(config, "name")
    split = _get(config, "split", "train")
    data_dir = _get(config, "data_dir")
    flip = bool(_get(config, "flip", False)) and train
    patch_size = int(_get(config, "patch_size", 0) or 0)
    if name in ("fashion_mnist", "mnist"):
        source = tfds_builders.open_source(_get(config, "tfds_name") or f"{name}_local", split, data_dir)
        return source, SmallImageTransform(pad_to=_get(config, "pad_to", 32), flip=flip, patch_size=patch_size)
    if name == "imagenet2012":
        import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
        tfds_name = _get(config, "tfds_name") or tfds_builders.resolve_imagenet_name(data_dir)
        source = tfds_builders.open_source(tfds_name, split, data_dir,
                                           decoders={"image": tfds.decode.SkipDecoding()})
        return source, ImageNetTransform(image_size=_get(config, "image_size", 256), flip=flip,
                                         patch_size=patch_size)
    if name == "latent_cache":
        cache_dir = _get(config, "cache_dir")
        if not cache_dir:
            raise ValueError("data config name='latent_cache' needs cache_dir")
        source, _ = latent_cache.open_latent_cache(os.path.expanduser(cache_dir), split)
        return source, latent_cache.SampleLatents(scale=float(_get(config, "latent_scale", 0.2325)),
                                                  flip_prob=0.5 if flip else 0.0, patch_size=patch_size)
    raise ValueError(f"unknown data set name {name!r} in the data config; known: {', '.join(KNOWN_NAMES)}")


def derive_seeds(seed: int, n: int = 2) -> list[int]:
    """``n`` independent 32-bit seeds from one integer seed (grain needs seeds in [0, 2**32))."""
    return [int(s) for s in np.random.SeedSequence(int(seed)).generate_state(n, dtype=np.uint32)]


def host_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise ValueError(f"global_batch_size {global_batch_size} must be a positive multiple of the process "
                         f"count {process_count}")
    return global_batch_size // process_count


def _read_options(config: Any) -> grain.ReadOptions:
    threads = int(_get(config, "read_threads", 8) or 0)
    return grain.ReadOptions(num_threads=threads, prefetch_buffer_size=max(threads, int(_get(config, "prefetch", 64))))


def _mp_prefetch(ds: grain.IterDataset, config: Any) -> grain.IterDataset:
    workers = int(_get(config, "num_workers", 0) or 0)
    if workers > 0:
        from absl import flags  # pylint: disable=import-outside-toplevel
        if not flags.FLAGS.is_parsed():  # grain's workers read absl flags; outside absl.app, use the defaults
            flags.FLAGS.mark_as_parsed()
        ds = ds.mp_prefetch(grain.MultiprocessingOptions(num_workers=workers))
    return ds


def make_train_dataset(config: Any, global_batch_size: int, seed: int, process_index: int | None = None,
                       process_count: int | None = None) -> grain.IterDataset:
    """Infinite, shuffled-per-epoch, per-process dataset of host batches (see the module docstring)."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    local = host_batch_size(global_batch_size, process_count)
    source, transform = make_source(config, train=True)
    if len(source) < global_batch_size:
        raise ValueError(f"data set {_get(config, 'name')!r} split {_get(config, 'split')!r} has {len(source)} "
                         f"examples, fewer than the global batch {global_batch_size}")
    shuffle_seed, map_seed = derive_seeds(seed)
    ds = grain.MapDataset.source(source).shuffle(seed=shuffle_seed).repeat(None)
    ds = ds.random_map(transform, seed=map_seed)
    ds = ds[process_index::process_count].to_iter_dataset(_read_options(config))  # threads decode examples
    return _mp_prefetch(ds.batch(local, drop_remainder=True), config)


def make_train_iterator(config: Any, global_batch_size: int, seed: int, process_index: int | None = None,
                        process_count: int | None = None) -> grain.DatasetIterator:
    """Checkpointable iterator over this process's share of each global batch (``get_state`` / ``set_state``)."""
    return iter(make_train_dataset(config, global_batch_size, seed, process_index, process_count))


@dataclasses.dataclass(frozen=True)
class _PadBatch(grain.transforms.Map):
    """Pad a short final batch to ``size`` rows (zeros) and add ``"mask"`` (True for real rows)."""

    size: int

    def map(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        n = len(batch["labels"])
        out = {k: np.concatenate([v, np.zeros((self.size - n,) + v.shape[1:], v.dtype)]) if n < self.size else v
               for k, v in batch.items()}
        out["mask"] = np.arange(self.size) < n
        return out


def make_eval_iterator(config: Any, global_batch_size: int, process_index: int | None = None,
                       process_count: int | None = None) -> grain.DatasetIterator:
    """One ordered pass without flips (FID statistics, evaluation): process ``i`` reads the strided rows
    ``i::process_count``; every host yields the same number of full-size batches, padded at the end with zeros
    and ``"mask" == False`` (as big_vision)."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    local = host_batch_size(global_batch_size, process_count)
    source, transform = make_source(config, train=False)
    full = grain.MapDataset.source(source).random_map(transform, seed=0)
    steps = -(-len(full) // global_batch_size)
    ds = full[process_index::process_count].batch(local, drop_remainder=False).map(_PadBatch(local))
    if len(ds) < steps:  # hosts with fewer rows get all-masked batches so that every host runs `steps` steps
        empty = {k: np.zeros((local,) + np.shape(v), np.asarray(v).dtype) for k, v in full[0].items()}
        empty["mask"] = np.zeros((local,), bool)
        ds = grain.MapDataset.concatenate([ds, grain.MapDataset.source([empty] * (steps - len(ds)))])
    return iter(_mp_prefetch(ds.to_iter_dataset(_read_options(config)), config))


def image_source_for_cache(config: Any) -> grain.MapDataset:
    """Source order, center crop, no flip: ``{"image": float32 (H, W, C), "label"}`` for `build_latent_cache`."""
    source, transform = make_source(config, train=False)
    if int(_get(config, "patch_size", 0) or 0):
        raise ValueError("image_source_for_cache: set patch_size=0 (the cache stores VAE moments of images)")
    return grain.MapDataset.source(source).random_map(_CacheExample(transform), seed=0)


@dataclasses.dataclass(frozen=True)
class _CacheExample(grain.transforms.RandomMap):
    inner: grain.transforms.RandomMap

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        out = self.inner.random_map(element, rng)
        return {"image": out["images"], "label": out["labels"]}


def make_global_batch(host_batch: Any, sharding: Any) -> Any:
    """Host batch (pytree of NumPy arrays, leading axis = this process's rows) -> global ``jax.Array``s.

    ``sharding`` is one ``jax.sharding.Sharding`` for every leaf (e.g. ``NamedSharding(mesh, P("data"))``) or a
    pytree of shardings matching ``host_batch``. The global leading axis is ``process_count`` times the host's.
    """
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), host_batch)
    return jax.tree.map(lambda x, s: jax.make_array_from_process_local_data(s, np.asarray(x)), host_batch, sharding)


def _state_file(directory: str, process_index: int, process_count: int) -> str:
    return os.path.join(directory, f"process_{process_index}-of-{process_count}.json")


def save_iterator_state(iterator: grain.DatasetIterator, directory: str, process_index: int | None = None,
                        process_count: int | None = None) -> str:
    """Write ``iterator.get_state()`` as JSON (grain's ``process_<i>-of-<n>.json``); returns the path."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    os.makedirs(directory, exist_ok=True)
    path = _state_file(directory, process_index, process_count)
    with open(path + ".tmp", "w") as f:
        json.dump(iterator.get_state(), f, indent=2)
    os.replace(path + ".tmp", path)
    return path


def restore_iterator_state(iterator: grain.DatasetIterator, directory: str, process_index: int | None = None,
                           process_count: int | None = None) -> grain.DatasetIterator:
    """``iterator.set_state`` from `save_iterator_state`'s file; the iterator must come from the same config,
    batch size, seed and process layout."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    path = _state_file(directory, process_index, process_count)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"iterator state {path} not found (saved with a different process count?)")
    with open(path) as f:
        iterator.set_state(json.load(f))
    return iterator
