"""FID reference statistics: `sample.fid_ref`, a statistics .npz or a raw data set ("raw:NAME/SPLIT") whose
Inception statistics (and, for precision / recall, features) are computed once and cached for every workdir.

Shared by `--mode evaluate` (programs/evaluate.py) and the live evaluation of a training run (train/live_eval.py),
so both read and write the same cache: `$XDG_CACHE_HOME/marval_jax/fid_stats/` (~/.cache by default), one file per
(reference images, Inception weights). The computation (about 50 minutes for 10k images on a CPU) prints a progress
line every `progress_every` batches. Multi-process: every process takes the same branch (process 0's view of the
cache, broadcast), the features may be split over a layout's devices, and process 0 writes the file.
"""
from __future__ import annotations

import hashlib
import os
import time

import jax
import numpy as np

from marval_jax.evaluation import fid as fid_lib
from marval_jax.evaluation.files import as_path, local_file, write_npz
from marval_jax.evaluation.inception import DEFAULT_NPZ, inception_features
from marval_jax.user_errors import UserError

REFERENCE_BATCH = 200        # images per Inception call while computing reference statistics
PROGRESS_EVERY = 10          # ... and one progress line per this many calls


def real_images(spec: str, raw_dir: str | None = None) -> np.ndarray:
    """'raw:NAME/SPLIT' -> uint8 (N, 28, 28, 1), read from `raw_dir` (None: the installed copy)."""
    from marval_jax.data.raw_datasets import load_raw
    if not spec.startswith("raw:") or "/" not in spec:
        raise UserError(f"sample.fid_ref: a real image source must look like 'raw:fashion_mnist/test', got {spec!r}")
    name, split = spec[4:].split("/", 1)
    return load_raw(name, split, raw_dir)[0][..., None]


def raw_kw(config) -> dict:
    """{"raw_dir": data.raw_dir} when the config sets one, else {} (the installed copy)."""
    raw_dir = config.get("data", {}).get("raw_dir", "") if hasattr(config, "get") else ""
    return {"raw_dir": raw_dir} if raw_dir else {}


def stats_cache_dir() -> str:
    """Where raw-data reference statistics are cached, shared by every workdir: $XDG_CACHE_HOME/marval_jax/fid_stats
    (default ~/.cache/marval_jax/fid_stats)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "marval_jax", "fid_stats")


def reference_key(spec: str, images: np.ndarray, inception_path: str | None) -> str:
    """The cache name of a reference's statistics: a hash of the spec, of the reference images themselves (so another
    raw_dir, split or subset never reads a stale file) and of the Inception weights file's bytes."""
    h = hashlib.sha256()
    h.update(spec.encode())
    h.update(str(images.shape).encode())
    h.update(np.ascontiguousarray(images).tobytes())
    weights = as_path(os.path.expanduser(inception_path or DEFAULT_NPZ))
    h.update(weights.read_bytes() if weights.exists() else str(weights).encode())
    return h.hexdigest()[:16]


def _cache_file(kind: str, spec: str, images: np.ndarray, inception_path: str | None, cache_dir: str | None):
    """`<cache_dir>/fid_<kind>_<spec as a name>_<reference_key>.npz`: one file per images + Inception weights."""
    name = spec.replace(":", "_").replace("/", "_")
    key = reference_key(spec, images, inception_path)
    return as_path(cache_dir or stats_cache_dir()) / f"fid_{kind}_{name}_{key}.npz"


def _load_features(path) -> np.ndarray:
    """The float64 features of a cache file written by `reference_features`; a clear error for one that cannot be
    read (it is a cache: deleting it recomputes it)."""
    try:
        with local_file(path) as local, np.load(local) as npz:
            return np.asarray(npz["features"], np.float64)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"cached reference features {path} cannot be read ({type(e).__name__}: {e}); delete the "
                        "file and it is computed again") from None


def reference_features(spec: str, inception, cache_dir: str | None = None, layout=None,
                       inception_path: str | None = None, *, num: int = 0, images_of=real_images,
                       batch: int = REFERENCE_BATCH, **raw) -> np.ndarray:
    """Inception features (N, 2048, float64 as `inception_features` gives them) of a raw data set's first `num`
    images (0: all), which precision / recall compare against: computed once and cached beside the statistics as
    `fid_feat_<name>_<key>.npz`, so the processes of one machine (students side by side, each results run) do not
    each spend the Inception pass on them. Multi-process as `reference_stats`: process 0's view of the cache,
    process 0 writes."""
    images = images_of(spec, **raw)
    images = images[:num] if num else images
    path = _cache_file("feat", spec, images, inception_path, cache_dir)
    if agreed(path.exists()):
        return _load_features(path)
    writer = jax.process_index() == 0
    if writer:
        print(f"FID reference {spec}: computing Inception features of {len(images)} images once (cached in {path})",
              flush=True)
    features = inception_features(inception, images, batch, layout=layout)
    if writer:   # float32 on disk: the network computes in float32, so the float64 features convert back exactly
        write_npz(path, features=features.astype(np.float32))
    return features


def reference_stats(spec: str, inception, cache_dir: str | None = None, layout=None, inception_path: str | None = None,
                    *, images_of=real_images, batch: int = REFERENCE_BATCH, progress_every: int = PROGRESS_EVERY,
                    **raw) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of `sample.fid_ref`: a statistics .npz, or a raw data set's statistics (`images_of(spec, **raw)`),
    computed once (split over `layout`'s devices, a progress line every `progress_every` batches of `batch`) and
    cached by process 0 as `<cache_dir>/fid_ref_<name>_<reference_key>.npz` (cache_dir None: `stats_cache_dir()`,
    shared by all workdirs). Every process takes the same branch: the cache's existence is process 0's answer,
    broadcast (the computation is a collective every process must enter)."""
    if spec.endswith(".npz"):
        return fid_lib.load_statistics(spec)
    images = images_of(spec, **raw)
    path = _cache_file("ref", spec, images, inception_path, cache_dir)
    writer = jax.process_index() == 0
    if agreed(path.exists()):
        if writer:
            print(f"FID reference {spec}: cached statistics {path}", flush=True)
        return fid_lib.load_statistics(path)
    features = _cache_file("feat", spec, images, inception_path, cache_dir)
    if agreed(features.exists()):   # the same images' cached features: their statistics, no Inception pass
        mu, sigma = fid_lib.statistics_from_features(_load_features(features))
        if writer:
            print(f"FID reference {spec}: statistics of the cached features {features}", flush=True)
            fid_lib.save_statistics(path, mu, sigma)
        return mu, sigma
    acc = fid_lib.StatsAccumulator()
    chunk, start = batch * progress_every, time.time()
    if writer:
        print(f"FID reference {spec}: computing Inception statistics of {len(images)} images once (cached in "
              f"{path})", flush=True)
    for lo in range(0, len(images), chunk):
        acc.update(inception_features(inception, images[lo:lo + chunk], batch, layout=layout))
        done, elapsed = min(lo + chunk, len(images)), time.time() - start
        if writer:
            print(f"FID reference {spec}: {done}/{len(images)} images, {elapsed:.0f} s, about "
                  f"{elapsed / done * (len(images) - done):.0f} s left", flush=True)
    mu, sigma = acc.finalize()
    if writer:
        path.parent.mkdir(parents=True, exist_ok=True)
        fid_lib.save_statistics(path, mu, sigma)
    return mu, sigma


def agreed(flag: bool) -> bool:
    """Process 0's `flag` on every process."""
    if jax.process_count() == 1:
        return flag
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return bool(multihost_utils.broadcast_one_to_all(np.asarray(flag)))
