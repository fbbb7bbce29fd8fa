"""`--mode evaluate`: sample N images from a checkpoint, decode them, and write FID, precision/recall, class
accuracy of the independent eval classifier, seconds per image, a PNG grid and one JSON with numbers and settings.

Small grey images (the MNIST family) go through the standard FID Inception as the field does it: channel repeated
to 3, resized to 299 (see marval_jax/evaluation/inception.py). Generated 32x32 padded images are center-cropped to
`sample.crop` (28) first so they compare with the 28x28 real images.

The files read after sampling (`sample.fid_ref`, the Inception weights, `sample.classifier`) are checked before
sampling starts (`marval_jax.config_checks.check_evaluation_files`): a missing one fails in a second, not after
hours of sampling. "raw:NAME/SPLIT" references read their raw files from `data.raw_dir` ("" = the installed copy).
"""
from __future__ import annotations

import json
import os

import numpy as np

from marval_jax import config_checks
from marval_jax.evaluation import fid as fid_lib
from marval_jax.evaluation.grid import save_grid, to_uint8
from marval_jax.evaluation.inception import inception_features, load_inception
from marval_jax.evaluation.precision_recall import precision_recall
from marval_jax.sampling.sample_run import generate, sample_tag
from marval_jax.user_errors import UserError


def center_crop(images: np.ndarray, size: int) -> np.ndarray:
    if not size or images.shape[1] == size:
        return images
    if images.shape[1] < size:
        raise UserError(f"sample.crop={size} is larger than the {images.shape[1]}px images; use 0 or <= "
                        f"{images.shape[1]}")
    o = (images.shape[1] - size) // 2
    return images[:, o:o + size, o:o + size]


def real_images(spec: str, raw_dir: str | None = None) -> np.ndarray:
    """'raw:NAME/SPLIT' -> uint8 (N, 28, 28, 1), read from `raw_dir` (None: the installed copy)."""
    from marval_jax.data.raw_datasets import load_raw
    if not spec.startswith("raw:") or "/" not in spec:
        raise UserError(f"sample.fid_ref: a real image source must look like 'raw:fashion_mnist/test', got {spec!r}")
    name, split = spec[4:].split("/", 1)
    return load_raw(name, split, raw_dir)[0][..., None]


def _raw_kw(config) -> dict:
    raw_dir = config.get("data", {}).get("raw_dir", "") if hasattr(config, "get") else ""
    return {"raw_dir": raw_dir} if raw_dir else {}


def reference_stats(spec: str, inception, cache_dir: str, **raw_kw) -> tuple[np.ndarray, np.ndarray]:
    if spec.endswith(".npz"):
        return fid_lib.load_statistics(spec)
    path = os.path.join(cache_dir, "fid_ref_" + spec.replace(":", "_").replace("/", "_") + ".npz")
    if os.path.exists(path):
        return fid_lib.load_statistics(path)
    mu, sigma = fid_lib.compute_statistics(inception, real_images(spec, **raw_kw))
    fid_lib.save_statistics(path, mu, sigma)
    return mu, sigma


def evaluate(config, workdir: str, out: str = "", ckpt: str = "") -> dict:
    sc = config.sample
    config_checks.check_evaluation_files(config)  # fid_ref, Inception weights, classifier: before sampling
    raw_kw = _raw_kw(config)
    source = ckpt or config.get("init_from", "") or workdir
    images, labels, timing = generate(config, source)
    uint8 = center_crop(to_uint8(images), sc.crop)
    inception = load_inception(sc.inception or None)
    feats = inception_features(inception, uint8)
    mu, sigma = fid_lib.statistics_from_features(feats)
    out = out or os.path.join(workdir, "eval")
    os.makedirs(out, exist_ok=True)
    ref_mu, ref_sigma = reference_stats(sc.fid_ref, inception, out, **raw_kw)
    report = {"source": source, "settings": sc.to_dict(), "num_images": int(len(images)), **timing,
              "fid": fid_lib.frechet_distance(mu, sigma, ref_mu, ref_sigma)}
    if sc.pr_num_real > 0 and sc.fid_ref.startswith("raw:"):
        real = real_images(sc.fid_ref, **raw_kw)[: sc.pr_num_real]
        report.update({k: v for k, v in precision_recall(inception_features(inception, real), feats).items()})
    dataset = config.data.name
    if (sc.classifier or dataset in ("fashion_mnist", "mnist")) and int(np.min(labels)) >= 0:
        from marval_jax.evaluation.class_accuracy import class_accuracy
        from marval_jax.evaluation.classifier_train import load_classifier, load_default_classifier
        params, meta = (load_classifier(sc.classifier) if sc.classifier
                        else load_default_classifier(dataset, "eval"))
        report["class_accuracy"] = class_accuracy(params, images, labels)
        report["classifier"] = {k: meta.get(k) for k in ("dataset", "copy", "seed", "test_accuracy")}
    tag = sample_tag(config)
    save_grid(os.path.join(out, f"{tag}.png"), images[:100])
    with open(os.path.join(out, f"{tag}.json"), "w") as f:
        json.dump(report, f, indent=1, default=float)
    print(json.dumps({k: v for k, v in report.items() if k != "settings"}, default=float), flush=True)
    return report
