"""Deterministic, checkpointable grain input pipelines, sharded by JAX process.

Train pipeline (`make_train_dataset` / `make_train_iterator`), as MaxText's grain MapDataset pipeline::

    source -> shuffle(seed) -> repeat(None) -> random_map(preprocess, seed') -> HostRows(process block)
           -> to_iter_dataset(read threads) -> batch(global_batch_size // process_count) -> (mp_prefetch if num_workers)

* ``shuffle`` before ``repeat`` reshuffles every epoch (grain seeds epoch e with ``seed + e``); batches run across
  epoch boundaries (no example is dropped, as ``tf.data`` shuffle-repeat-batch).
* The random map (flip, posterior sample) is seeded by the global stream index, so every example of every epoch
  has its own generator whatever the process layout. Global step ``k`` always sees the stream positions
  ``[k * G, (k + 1) * G)`` (``G`` = global batch size), for any process count; process ``p`` of ``n`` holds the
  contiguous block ``[k * G + p * G / n, k * G + (p + 1) * G / n)`` (`HostRows`), so the assembled global batch is
  row for row the one-process batch (per-row random draws of a step see the same images on any layout).
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
  ``"folder"`` (your own images: ``folder_dir`` prepared at ``image_size`` by `marval_jax.data.folder_dataset`,
  built on first use in a one-process run; RGB, ADM center crop),
  ``"latent_cache"`` (moments in ``cache_dir``, see `marval_jax.data.latent_cache`).
* ``split`` (tfds slicing allowed: ``"train[:1000]"``), ``data_dir`` (None: ``$TFDS_DATA_DIR`` or
  ``~/tensorflow_datasets``), ``tfds_name`` (None: chosen by ``name``), ``image_size``, ``pad_to``, ``flip``,
  ``cache_dir``, ``latent_scale`` (0.2325), ``patch_size`` (0: images / latents; p > 0: ``"tokens"`` patchified
  as MAR), ``num_workers`` (grain worker processes, 0: in-process), ``read_threads`` (threads decoding examples in each
  process), ``prefetch`` (examples read ahead per process).
* ``in_memory`` (default True): Fashion-MNIST / MNIST are read once from their packaged raw files
  (`marval_jax.data.raw_datasets`, folder ``raw_dir``) into host memory and batched with one vectorised NumPy map
  per batch (`GatherSmallBatch`; ~2 ms per 256 images instead of ~250 ms through per-record tfds reads on two
  cores). Same stream semantics and checkpointable state; splits ``"train"`` or ``"train[a:b]"``. False: tfds.
  The in-memory path reads ``raw_dir`` only, never ``data_dir`` (the tfds records): a run config that sets
  ``data.data_dir`` with ``data.in_memory=True`` is refused before the run starts (`marval_jax.config_checks`),
  naming ``data.raw_dir`` as the field this path reads.

Bad inputs (unknown ``name``, a missing ``cache_dir``, a missing / empty / image-less ``folder_dir``, a split the
in-memory path cannot slice, fewer examples than the global batch) are `marval_jax.user_errors.UserError`s that
name the ``data.*`` field.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Any

import grain
import jax
import ml_collections
import numpy as np

from marval_jax.data import latent_cache, preprocess
from marval_jax.data.tokenizers import patchify_np
from marval_jax.user_errors import UserError

KNOWN_NAMES = ("fashion_mnist", "mnist", "imagenet2012", "folder", "latent_cache")
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
        "in_memory": True,
        "raw_dir": None,
        "folder_dir": None,
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


@dataclasses.dataclass(frozen=True)
class FlipBit(grain.transforms.RandomMap):
    """index -> (index, flip bit): the per-example draw of `SmallImageTransform`, seeded by the stream position."""

    flip: bool = False

    def random_map(self, element: Any, rng: np.random.Generator) -> np.ndarray:
        return np.array([element, int(self.flip and rng.random() < 0.5)], np.int64)


@dataclasses.dataclass(frozen=True)
class GatherSmallBatch(grain.transforms.Map):
    """A batch of (index, flip bit) rows -> the host batch, vectorised over the rows with NumPy.

    The small data sets fit in host memory, so one gather + pad (+ patchify) per batch replaces a Python call per
    example: 256-image Fashion-MNIST batches take ~2 ms instead of ~250 ms on two cores through the tfds records
    (which then starve an accelerator step of a few ms)."""

    images: np.ndarray      # uint8 (N, 28, 28)
    labels: np.ndarray      # int32 (N,)
    pad_to: int | None = 32
    patch_size: int = 0

    def map(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        rows = np.asarray(rows)
        idx = rows[:, 0] if rows.ndim == 2 else rows
        x = self.images[idx]
        if rows.ndim == 2:
            x = np.where(rows[:, 1].astype(bool)[:, None, None], x[:, :, ::-1], x)
        x = ((x.astype(np.float32) / np.float32(255.0)) - np.float32(0.5)) / np.float32(0.5)
        if self.pad_to and self.pad_to != x.shape[1]:
            lo = (self.pad_to - x.shape[1]) // 2
            hi = self.pad_to - x.shape[1] - lo
            x = np.pad(x, ((0, 0), (lo, hi), (lo, hi)), constant_values=-1.0)
        x = x[..., None]
        if self.patch_size:
            return {"tokens": patchify_np(x, self.patch_size), "labels": self.labels[idx]}
        return {"images": x, "labels": self.labels[idx]}


_SLICE = re.compile(r"^(\w+)(?:\[(-?\d*):(-?\d*)\])?$")


def parse_in_memory_split(split: str) -> tuple[str, int | None, int | None]:
    """"train" / "train[a:b]" -> ("train", a, b); anything else is a UserError naming data.split."""
    m = _SLICE.match(split.replace(" ", ""))
    if not m:
        raise UserError(f"data.split={split!r}: the in-memory split must look like 'train' or 'train[:512]' "
                        f"(integer slices only; set data.in_memory=False for tfds slicing syntax)")
    return m.group(1), int(m.group(2)) if m.group(2) else None, int(m.group(3)) if m.group(3) else None


def load_small_split(name: str, split: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Raw arrays of "train", "test" or "train[a:b]" (integer slices only) of a small data set."""
    from marval_jax.data.raw_datasets import load_raw  # pylint: disable=import-outside-toplevel
    base, lo, hi = parse_in_memory_split(split)
    images, labels = load_raw(name, base, data_dir)
    return images[lo:hi], labels[lo:hi]


def make_source(config: Any, *, train: bool = True) -> tuple[Any, grain.transforms.RandomMap]:
    """``(random-access source, per-example random map)`` for the data config. ``train=False`` turns flips off."""
    name = _get(config, "name")
    split = _get(config, "split", "train")
    data_dir = _get(config, "data_dir")
    flip = bool(_get(config, "flip", False)) and train
    patch_size = int(_get(config, "patch_size", 0) or 0)
    # tensorflow_datasets only where records are read (the in-memory path and latent caches do not need it)
    from marval_jax.data import tfds_builders  # pylint: disable=import-outside-toplevel
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
    if name == "folder":
        from marval_jax.data import folder_dataset  # pylint: disable=import-outside-toplevel
        source = folder_dataset.open_folder_source(config)
        return source, ImageNetTransform(image_size=_get(config, "image_size", 256), flip=flip, patch_size=patch_size)
    if name == "latent_cache":
        cache_dir = _get(config, "cache_dir")
        if not cache_dir:
            raise UserError("data.name='latent_cache' needs cache_dir: set data.cache_dir to the latent cache "
                            "folder written by python -m marval_jax.tools.cache_latents")
        source, _ = latent_cache.open_latent_cache(os.path.expanduser(cache_dir), split)
        return source, latent_cache.SampleLatents(scale=float(_get(config, "latent_scale", 0.2325)),
                                                  flip_prob=0.5 if flip else 0.0, patch_size=patch_size)
    raise UserError(f"unknown data set name {name!r} (data.name); known: {', '.join(KNOWN_NAMES)}")


def class_names(config: Any) -> list[str] | None:
    """The data set's class names in label order (Fashion-MNIST / MNIST: their published names; folder: the class
    sub-folders of the prepared set), or None where none are known here (ImageNet, latent caches)."""
    name = _get(config, "name")
    if name in ("fashion_mnist", "mnist"):
        from marval_jax.data.raw_datasets import FASHION_MNIST_CLASSES, MNIST_CLASSES  # pylint: disable=import-outside-toplevel
        return list(FASHION_MNIST_CLASSES if name == "fashion_mnist" else MNIST_CLASSES)
    if name == "folder":
        from marval_jax.data import folder_dataset  # pylint: disable=import-outside-toplevel
        return folder_dataset.class_names(config)
    return None


def derive_seeds(seed: int, n: int = 2) -> list[int]:
    """``n`` independent 32-bit seeds from one integer seed (grain needs seeds in [0, 2**32))."""
    return [int(s) for s in np.random.SeedSequence(int(seed)).generate_state(n, dtype=np.uint32)]


def host_batch_size(global_batch_size: int, process_count: int) -> int:
    if global_batch_size <= 0 or global_batch_size % process_count:
        raise UserError(f"train.global_batch_size={global_batch_size} must be a positive multiple of the process "
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


class HostRows(grain.MapDataset):
    """Process ``p``'s rows of every global batch: element ``j`` is stream position ``(j // L) * G + p * L + j % L``
    (``G`` the global batch, ``L = G / process_count``). Each process holds one contiguous block of each global
    batch, the block its devices hold in the batch sharding when the mesh lists devices in process order (CPU and
    GPU hosts, `jax.make_mesh`): the global batch assembled by `make_global_batch` is then row for row the
    one-process batch, so a run gives the same numbers whatever the process count."""

    _MUTATES_ELEMENT_SPEC = False

    def __init__(self, parent: grain.MapDataset, global_batch_size: int, process_index: int, process_count: int):
        super().__init__(parent)
        self._global = global_batch_size
        self._local = host_batch_size(global_batch_size, process_count)
        self._start = process_index * self._local
        self._length = (len(parent) // global_batch_size) * self._local

    def __len__(self) -> int:
        return self._length

    def _index(self, j: int) -> int:
        return (j // self._local) * self._global + self._start + j % self._local

    def __getitem__(self, index):
        if isinstance(index, slice):
            return self.slice(index)
        return self._parent[self._index(index)]

    def _getitems(self, indices):
        return self._parent._getitems([self._index(j) for j in indices])  # pylint: disable=protected-access

    def __str__(self) -> str:
        return f"HostRows[block {self._start // self._local} of {self._global // self._local}]"


def make_train_dataset(config: Any, global_batch_size: int, seed: int, process_index: int | None = None,
                       process_count: int | None = None) -> grain.IterDataset:
    """Infinite, shuffled-per-epoch, per-process dataset of host batches (see the module docstring)."""
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} not in [0, {process_count})")
    local = host_batch_size(global_batch_size, process_count)
    if _get(config, "name") in _SMALL_DEFAULT_SIZE and _get(config, "in_memory", False):
        return _small_in_memory_dataset(config, local, global_batch_size, seed, process_index, process_count)
    source, transform = make_source(config, train=True)
    if len(source) < global_batch_size:
        raise UserError(f"data.split={_get(config, 'split')!r} of {_get(config, 'name')!r} has {len(source)} "
                        f"examples, fewer than the global batch {global_batch_size} (train.global_batch_size)")
    shuffle_seed, map_seed = derive_seeds(seed)
    ds = grain.MapDataset.source(source).shuffle(seed=shuffle_seed).repeat(None)
    ds = ds.random_map(transform, seed=map_seed)
    ds = HostRows(ds, global_batch_size, process_index, process_count).to_iter_dataset(
        _read_options(config))  # threads decode examples
    return _mp_prefetch(ds.batch(local, drop_remainder=True), config)


def _small_in_memory_dataset(config: Any, local: int, global_batch_size: int, seed: int, process_index: int,
                             process_count: int) -> grain.IterDataset:
    """The same stream as the record pipeline (shuffle per epoch, repeat, per-position random draw, host block of
    each global batch, batch), but over indices into arrays held in memory, with one vectorised map per batch."""
    name = _get(config, "name")
    images, labels = load_small_split(name, _get(config, "split", "train"), _get(config, "raw_dir"))
    if len(images) < global_batch_size:
        raise UserError(f"data.split={_get(config, 'split')!r} of {name!r} has {len(images)} examples, fewer "
                        f"than the global batch {global_batch_size} (train.global_batch_size)")
    shuffle_seed, map_seed = derive_seeds(seed)
    ds = grain.MapDataset.range(len(images)).shuffle(seed=shuffle_seed).repeat(None)
    if _get(config, "flip", False):
        ds = ds.random_map(FlipBit(flip=True), seed=map_seed)
    ds = HostRows(ds, global_batch_size, process_index, process_count).batch(local, drop_remainder=True)
    ds = ds.map(GatherSmallBatch(images, labels, pad_to=_get(config, "pad_to", 32),
                                 patch_size=int(_get(config, "patch_size", 0) or 0)))
    # threads build the next batches while the accelerator runs the current step
    threads = min(int(_get(config, "read_threads", 8) or 0), 4)
    return _mp_prefetch(ds.to_iter_dataset(grain.ReadOptions(num_threads=threads, prefetch_buffer_size=2 * threads)),
                        config)


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
