"""MAR's latent cache (``main_cache.py``): encode a split once, train on posterior samples of the stored moments.

Writing (`build_latent_cache`): every example of an image source (center-cropped, **not** flipped, in source
order) is encoded twice, as is and flipped left-right (MAR flips the *image*: the latent of a flipped image is
not a flipped latent). ``encode_fn(images (B, H, W, 3) in [-1, 1]) -> moments (B, h, w, 2 * C)`` returns the raw
VAE ``mean || logvar`` (last axis, NHWC, logvar not clamped), e.g.
``jax.jit(lambda x: vae.encode(x).moments)`` for `marval_jax.models.vae.AutoencoderKL`. Images and their flips go
through one call, so ``encode_fn`` sees a fixed batch of ``2 * batch_size`` (the last batch is padded).

Files in ``cache_dir``: ``<split>.array_record-NNNNN-of-MMMMM`` (one msgpack record per example: ``moments``,
``moments_flip`` as float32 (h, w, 2C), ``label``) and ``<split>.json`` (metadata: example count, shard files and
lengths, moments shape). Shards are contiguous ranges of the source; with several processes, process ``p`` writes
the shards ``s`` with ``s % process_count == p``; ``barrier`` (e.g. ``multihost_utils.sync_global_devices``) is
called once every process's shards are written, then process 0 writes the metadata, and ``barrier`` again, so the
metadata (which readers look for first) exists only once every shard does.

``cache_dir`` is an etils.epath path: local or ``gs://``. ArrayRecord's reader and writer open local files only
(a ``gs://`` path blocks in its C++ file layer), so for a remote ``cache_dir`` each shard is written to a local
temporary file and uploaded, and `open_latent_cache` copies the shards to ``local_dir`` (default
``$TMPDIR/marval_latent_cache/<name of the remote dir>``) before reading, reusing a copy of the same size.

Reading (`open_latent_cache` + `SampleLatents`): a random-access source for ``grain.MapDataset.source`` and a
``grain`` random map that, per example and from grain's per-example generator, picks ``moments_flip`` with
probability ``flip_prob`` (MAR: 0.5), clamps logvar to [-30, 20], samples ``mean + exp(logvar / 2) * eps`` and
multiplies by ``scale`` (KL-16: 0.2325). The output is ``{"latents": float32 (h, w, C), "labels": int32}``.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import grain
import msgpack
import numpy as np
from etils import epath

from marval_jax.data.tokenizers import LOGVAR_MAX, LOGVAR_MIN, MAR_VAE_SCALE, patchify_np

FORMAT_VERSION = 1


def _pack_array(x: np.ndarray) -> dict[str, Any]:
    x = np.ascontiguousarray(x, dtype=np.float32)
    return {"shape": list(x.shape), "dtype": "float32", "data": x.tobytes()}


def _unpack_array(d: dict[str, Any]) -> np.ndarray:
    return np.frombuffer(d["data"], dtype=np.dtype(d["dtype"])).reshape(d["shape"])


def encode_record(moments: np.ndarray, moments_flip: np.ndarray, label: int) -> bytes:
    """One cache record (msgpack bytes)."""
    return msgpack.packb({"moments": _pack_array(moments), "moments_flip": _pack_array(moments_flip),
                          "label": int(label)}, use_bin_type=True)


def decode_record(data: bytes) -> dict[str, Any]:
    """Cache record -> ``{"moments", "moments_flip": float32 (h, w, 2C), "label": int32}`` (read-only arrays)."""
    d = msgpack.unpackb(data, raw=False)
    return {"moments": _unpack_array(d["moments"]), "moments_flip": _unpack_array(d["moments_flip"]),
            "label": np.int32(d["label"])}


def _is_remote(path) -> bool:
    return "://" in os.fspath(path)


def shard_path(cache_dir: str, split: str, shard: int, num_shards: int) -> str:
    return os.fspath(epath.Path(cache_dir) / f"{split}.array_record-{shard:05d}-of-{num_shards:05d}")


def metadata_path(cache_dir: str, split: str) -> str:
    return os.fspath(epath.Path(cache_dir) / f"{split}.json")


def _upload(local: str, remote: str) -> None:
    with open(local, "rb") as src, epath.Path(remote).open("wb") as dst:
        shutil.copyfileobj(src, dst, 16 << 20)


def _download(remote: epath.Path, local: str) -> None:
    with remote.open("rb") as src, open(local + ".tmp", "wb") as dst:
        shutil.copyfileobj(src, dst, 16 << 20)
    os.replace(local + ".tmp", local)


def _shard_bounds(n: int, num_shards: int) -> list[tuple[int, int]]:
    edges = [n * s // num_shards for s in range(num_shards + 1)]
    return list(zip(edges[:-1], edges[1:]))


def _encode_batch(images, encode_fn: Callable[[np.ndarray], Any], batch_size: int) -> tuple[np.ndarray, np.ndarray]:
    """(moments, moments of the mirrored images) of one batch, float32 (b, h, w, 2C). A short last batch is padded
    with copies of its last image so every call has one compiled shape; the padding is dropped."""
    images = np.asarray(images, np.float32)
    b = images.shape[0]
    if images.ndim != 4:
        raise ValueError(f"build_latent_cache: images must be (B, H, W, C), got shape {images.shape}")
    if b < batch_size:
        images = np.concatenate([images, np.repeat(images[-1:], batch_size - b, axis=0)])
    both = np.asarray(encode_fn(np.concatenate([images, images[:, :, ::-1]])), np.float32)
    if both.shape[0] != 2 * images.shape[0] or both.ndim != 4 or both.shape[-1] % 2:
        raise ValueError(f"build_latent_cache: encode_fn must map (B, H, W, C) to moments (B, h, w, 2C); "
                         f"got {both.shape} for input batch {2 * images.shape[0]}")
    return both[:b], both[images.shape[0]: images.shape[0] + b]


def _write_metadata(meta_file: epath.Path, metadata: dict, remote: bool) -> None:
    """Readers open the metadata first, so it appears whole: one object write (atomic on GCS) or a local rename."""
    if remote:
        meta_file.write_text(json.dumps(metadata, indent=2))
    else:
        tmp = meta_file.with_name(meta_file.name + ".tmp")
        tmp.write_text(json.dumps(metadata, indent=2))
        tmp.replace(meta_file)


def build_latent_cache(image_source: Sequence[dict[str, Any]] | grain.MapDataset,
                       encode_fn: Callable[[np.ndarray], Any], cache_dir: str, split: str, *,
                       batch_size: int = 128, num_shards: int | None = None, process_index: int = 0,
                       process_count: int = 1, num_threads: int = 8,
                       progress: Callable[[int, int], None] | None = None,
                       barrier: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Encode ``image_source`` (examples ``{"image": float32 (H, W, 3) in [-1, 1], "label": int}``) into
    ``cache_dir``; returns the metadata. See the module docstring for the format and the multi-process split.

    ``num_shards`` defaults to ``process_count``. ``progress(done, total)`` is called after each batch.
    ``barrier(name)`` must be given when ``process_count > 1`` (every process calls it twice).
    """
    from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=import-outside-toplevel

    ds = image_source if isinstance(image_source, grain.MapDataset) else grain.MapDataset.source(image_source)
    n = len(ds)
    if n == 0:
        raise ValueError("build_latent_cache: the image source is empty")
    if process_count > 1 and barrier is None:
        raise ValueError("build_latent_cache: several processes need a barrier (multihost_utils.sync_global_devices)")
    num_shards = num_shards or process_count
    remote = _is_remote(cache_dir)
    epath.Path(cache_dir).mkdir(parents=True, exist_ok=True)
    staging = tempfile.mkdtemp(prefix="marval_latent_cache_") if remote else None
    bounds = _shard_bounds(n, num_shards)
    moments_shape: list[int] | None = None
    done = 0
    for shard in range(process_index, num_shards, process_count):
        start, stop = bounds[shard]
        path = shard_path(cache_dir, split, shard, num_shards)
        local = os.path.join(staging, os.path.basename(path)) if remote else path
        writer = ArrayRecordWriter(local + ".tmp", "group_size:1")
        batches = ds[start:stop].batch(batch_size, drop_remainder=False).to_iter_dataset(
            grain.ReadOptions(num_threads=num_threads, prefetch_buffer_size=2 * num_threads))
        for batch in batches:
            moments, moments_flip = _encode_batch(batch["image"], encode_fn, batch_size)
            b = moments.shape[0]
            moments_shape = list(moments.shape[1:])
            labels = np.asarray(batch["label"]).reshape(-1)
            for i in range(b):
                writer.write(encode_record(moments[i], moments_flip[i], int(labels[i])))
            done += b
            if progress is not None:
                progress(done, n)
        writer.close()
        if remote:
            _upload(local + ".tmp", path)
            os.remove(local + ".tmp")
        else:
            os.replace(path + ".tmp", path)
    if staging:
        shutil.rmtree(staging, ignore_errors=True)
    if barrier is not None:
        barrier("latent_cache_shards_written")
    metadata = {
        "format_version": FORMAT_VERSION,
        "split": split,
        "num_examples": n,
        "num_shards": num_shards,
        "files": [os.path.basename(shard_path(cache_dir, split, s, num_shards)) for s in range(num_shards)],
        "shard_lengths": [b - a for a, b in bounds],
        "moments_shape": moments_shape,
        "layout": "NHWC; last axis = mean || logvar (raw, unclamped); moments_flip = encode(image[:, ::-1])",
    }
    if process_index == 0:
        _write_metadata(epath.Path(metadata_path(cache_dir, split)), metadata, remote)
    if barrier is not None:
        barrier("latent_cache_metadata_written")
    return metadata


class LatentCacheSource:
    """Random-access source of decoded cache records (``len``, ``[i]``, ``__getitems__``), picklable."""

    def __init__(self, paths: Sequence[str]):
        self._paths = list(paths)
        self._source = grain.sources.ArrayRecordDataSource(self._paths)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict[str, Any]:
        return decode_record(self._source[index])

    def __getitems__(self, indices: Sequence[int]) -> list[dict[str, Any]]:
        return [decode_record(r) for r in self._source.__getitems__(indices)]

    def __repr__(self) -> str:
        return f"LatentCacheSource({len(self._paths)} files)"


def default_local_dir(cache_dir: str) -> str:
    """Where a remote cache's shards are copied: per remote dir, under the system's temporary directory."""
    name = hashlib.sha256(os.fspath(cache_dir).rstrip("/").encode()).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "marval_latent_cache", name)


def open_latent_cache(cache_dir: str, split: str,
                      local_dir: str | None = None) -> tuple[LatentCacheSource, dict[str, Any]]:
    """The cache written by `build_latent_cache`: ``(source, metadata)``; one clear error if it is incomplete.
    A remote ``cache_dir`` (gs://...) is first copied to ``local_dir`` (see the module docstring)."""
    meta_file = epath.Path(metadata_path(cache_dir, split))
    if not meta_file.is_file():
        raise FileNotFoundError(f"latent cache: {meta_file} not found; build the cache of split {split!r} into "
                                f"{cache_dir!r} first (marval_jax.data.latent_cache.build_latent_cache)")
    metadata = json.loads(meta_file.read_text())
    if metadata.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"latent cache {meta_file}: format_version {metadata.get('format_version')}, "
                         f"expected {FORMAT_VERSION}")
    paths = [epath.Path(cache_dir) / name for name in metadata["files"]]
    missing = [os.fspath(p) for p in paths if not p.is_file()]
    if missing:
        raise FileNotFoundError(f"latent cache {cache_dir!r} is incomplete: missing {missing} "
                                f"(did every process finish writing?)")
    if _is_remote(cache_dir):
        local_dir = local_dir or default_local_dir(cache_dir)
        os.makedirs(local_dir, exist_ok=True)
        local_paths = []
        for p in paths:
            local = os.path.join(local_dir, p.name)
            if not (os.path.isfile(local) and os.path.getsize(local) == p.stat().length):
                _download(p, local)
            local_paths.append(local)
        paths = local_paths
    source = LatentCacheSource([os.fspath(p) for p in paths])
    if len(source) != metadata["num_examples"]:
        raise ValueError(f"latent cache {cache_dir!r}: {len(source)} records, metadata says "
                         f"{metadata['num_examples']}")
    return source, metadata


def sample_moments_np(moments: np.ndarray, rng: np.random.Generator, scale: float = MAR_VAE_SCALE) -> np.ndarray:
    """NumPy posterior sample ``(mean + exp(clamp(logvar) / 2) * eps) * scale`` (float32)."""
    mean, logvar = np.split(np.asarray(moments, np.float32), 2, axis=-1)
    logvar = np.clip(logvar, LOGVAR_MIN, LOGVAR_MAX)
    eps = rng.standard_normal(mean.shape, dtype=np.float32)
    return ((mean + np.exp(np.float32(0.5) * logvar) * eps) * np.float32(scale)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class SampleLatents(grain.transforms.RandomMap):
    """Cache record -> ``{"latents": float32 (h, w, C), "labels": int32}`` (or ``"tokens"`` if ``patch_size``)."""

    scale: float = MAR_VAE_SCALE
    flip_prob: float = 0.5
    patch_size: int = 0

    def random_map(self, element: dict[str, Any], rng: np.random.Generator) -> dict[str, Any]:
        use_flip = rng.random() < self.flip_prob
        moments = element["moments_flip"] if use_flip else element["moments"]
        latents = sample_moments_np(moments, rng, self.scale)
        if self.patch_size:
            return {"tokens": patchify_np(latents, self.patch_size), "labels": np.int32(element["label"])}
        return {"latents": latents, "labels": np.int32(element["label"])}
