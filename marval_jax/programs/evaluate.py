"""`--mode evaluate`: sample N images from a checkpoint, decode them, and write FID, precision/recall, class
accuracy of the independent eval classifier, seconds per image, a PNG grid and one JSON with numbers and settings.

Small grey images (the MNIST family) go through the standard FID Inception as the field does it: channel repeated
to 3, resized to 299 (see marval_jax/evaluation/inception.py). Generated 32x32 padded images are center-cropped to
`sample.crop` (28) first so they compare with the 28x28 real images.

The files read after sampling (`sample.fid_ref`, the Inception weights, `sample.classifier`) are checked before
sampling starts (`marval_jax.config_checks.check_evaluation_files`): a missing one fails in a second, not after
hours of sampling. "raw:NAME/SPLIT" references read their raw files from `data.raw_dir` ("" = the installed copy).

Multi-process (a pod): every process runs `evaluate` with the same config. Each device samples its share of every
batch, the Inception and the classifier run on the devices that hold the images, and only features / predictions
are gathered (`multihost_utils.process_allgather`), so a 50k-sample FID is split across all devices. Process 0
writes the grid, the JSON, the sample statistics `<tag>_stats.npz` and the cached reference statistics.
Reference statistics of a "raw:" source are computed once per (images, Inception weights) and cached outside the
workdir, in `$XDG_CACHE_HOME/marval_jax/fid_stats/` (~/.cache by default), so every later workdir reuses them; the
computation (about 50 minutes for 10k images on a CPU) prints a progress line every 2,000 images.
With N <= 2048 samples the FID's trace term is computed exactly from an N x N matrix (`fid.frechet_distance_few`).
Files go through etils.epath: `--out` (default <workdir>/eval), `sample.fid_ref` and the Inception weights may be
gs:// paths.

ImageReward column (`image_reward`, `image_reward_std`: mean and standard deviation over the samples): with a
configs/marval_rl.py config whose `rl.image_reward_checkpoint` names a converted ImageReward
(`python -m marval_jax.checkpoints.convert_image_reward`), or whose `rl.reward` is "image_reward", each sample is
scored against its class prompt (`rl.prompt_template` with the class names of `rl.class_names_file` or the data
set's, the RL prompts). The reward is loaded before sampling (a missing checkpoint fails at once) and runs on the
devices that hold the images; only the scores are gathered.
"""
from __future__ import annotations

import json

import jax
import numpy as np

from marval_jax import config_checks
from marval_jax.evaluation import fid as fid_lib
from marval_jax.evaluation import fid_reference
from marval_jax.evaluation.fid_reference import (  # noqa: F401  (names of this module before the move down)
    PROGRESS_EVERY, REFERENCE_BATCH, raw_kw as _raw_kw, real_images, reference_key, stats_cache_dir)
from marval_jax.evaluation.files import as_path, write_npz
from marval_jax.evaluation.grid import save_grid
from marval_jax.evaluation.inception import inception_features, load_inception, sharded_features
from marval_jax.evaluation.precision_recall import precision_recall
from marval_jax.evaluation.inception_input import inception_input, uint8_images
from marval_jax.programs.sample import Sampler, is_writer, sample_tag
from marval_jax.user_errors import UserError


def reference_stats(spec: str, inception, cache_dir: str | None = None, layout=None, inception_path: str | None = None,
                    **raw_kw) -> tuple[np.ndarray, np.ndarray]:
    """`evaluation.fid_reference.reference_stats` with this module's `real_images`, `REFERENCE_BATCH` and
    `PROGRESS_EVERY` (the cache every workdir and the live evaluation of a training share)."""
    return fid_reference.reference_stats(spec, inception, cache_dir, layout, inception_path, images_of=real_images,
                                         batch=REFERENCE_BATCH, progress_every=PROGRESS_EVERY, **raw_kw)


_crop_uint8 = jax.jit(inception_input, static_argnums=1)


class ImageRewardColumn:
    """The ImageReward column: `add(images, labels)` scores a sampled global batch against its class prompts on the
    devices that hold it (only the scores are gathered); `result()` -> {"image_reward": mean, "image_reward_std"}."""

    def __init__(self, reward, prompt_tokens, layout):
        self.layout, self.scores = layout, []
        self.params, self.tokens = layout.replicate(reward.params), layout.replicate(prompt_tokens)
        self.fn = jax.jit(reward.fn)

    def add(self, images, labels) -> np.ndarray:
        lab = self.layout.put(self.layout.pad(np.asarray(labels, np.int32), images.shape[0]))
        scores = self.layout.gather(self.fn(self.params, images, lab, self.tokens))[: len(labels)]
        self.scores.append(scores)
        return scores

    def result(self) -> dict:
        scores = np.concatenate(self.scores)
        return {"image_reward": float(np.mean(scores)), "image_reward_std": float(np.std(scores))}


def image_reward_column(config, layout, labels: np.ndarray) -> ImageRewardColumn | None:
    """The ImageReward column, or None when the config names no ImageReward (`rl.image_reward_checkpoint`, or
    `rl.reward == "image_reward"` with its `rl.reward_config`). `labels`: every sample's class (its prompt is the
    class prompt, so unconditional samples are refused)."""
    rl = config.get("rl", None) if hasattr(config, "get") else None
    if rl is None:
        return None
    if rl.get("image_reward_checkpoint", ""):
        reward_config = {"checkpoint": rl.image_reward_checkpoint}
    elif rl.get("reward", "") == "image_reward":
        reward_config = rl.reward_config.to_dict()
    else:
        return None
    if int(np.min(labels)) < 0:
        raise UserError("the ImageReward column scores each sample against its class prompt: set sample.labels to "
                        "'cycle' or 'random' (not 'uncond'), or leave rl.image_reward_checkpoint empty")
    from marval_jax.losses.rl import format_prompts
    from marval_jax.rewards.registry import make_reward
    from marval_jax.train.rl_task import class_names
    reward = make_reward("image_reward", reward_config)
    tokens = reward.prepare(reward.params, format_prompts(rl.prompt_template, class_names(config)))
    return ImageRewardColumn(reward, tokens, layout)


def evaluate(config, workdir: str, out: str = "", ckpt: str = "") -> dict:
    """Every process runs this with the same config (a pod's hosts): sampling, the Inception and the classifier run
    split over the global mesh's batch axes; features and predictions are gathered to every process (so each holds
    the same statistics); process 0 writes the files."""
    sc = config.sample
    config_checks.check_evaluation_files(config)  # fid_ref, Inception weights, classifier: before sampling
    raw_kw = _raw_kw(config)
    source = ckpt or config.get("init_from", "") or workdir
    sampler = Sampler(config, source, profile_dir=workdir)
    layout = sampler.layout
    inception = load_inception(sc.inception or None)
    features_of = sharded_features(inception, layout)
    dataset = config.data.name
    classify = None
    if (sc.classifier or dataset in ("fashion_mnist", "mnist")) and int(np.min(sampler.labels)) >= 0:
        from marval_jax.evaluation.class_accuracy import predict_sharded
        from marval_jax.evaluation.classifier_train import load_classifier, load_default_classifier
        cls_params, cls_meta = (load_classifier(sc.classifier) if sc.classifier
                                else load_default_classifier(dataset, "eval"))
        classify = predict_sharded(cls_params, layout)
    image_reward = image_reward_column(config, layout, sampler.labels)
    crop = int(sc.crop)
    feats, preds, grid = [], [], []
    for images, lab, n in sampler.batches():
        if crop and images.shape[1] < crop:
            raise UserError(f"sample.crop={crop} is larger than the {images.shape[1]}px images; use 0 or <= "
                            f"{images.shape[1]}")
        feats.append(features_of(_crop_uint8(images, crop if crop != images.shape[1] else 0))[:n])
        if classify is not None:
            preds.append(classify(images)[:n])
        if image_reward is not None:
            image_reward.add(images, lab)
        if sum(len(g) for g in grid) < 100:
            grid.append(layout.gather(uint8_images(images))[:n])
    feats = np.concatenate(feats)
    mu, sigma = fid_lib.statistics_from_features(feats)
    out = as_path(out or as_path(workdir) / "eval")
    if is_writer():
        out.mkdir(parents=True, exist_ok=True)
    ref_mu, ref_sigma = reference_stats(sc.fid_ref, inception, layout=layout, inception_path=sc.inception or None,
                                         **raw_kw)
    fid = (fid_lib.frechet_distance_few(feats, ref_mu, ref_sigma) if len(feats) <= feats.shape[1]
           else fid_lib.frechet_distance(mu, sigma, ref_mu, ref_sigma))
    report = {"source": source, "settings": sc.to_dict(), "num_images": int(len(feats)), **sampler.timing,
              "fid": fid}
    if sc.pr_num_real > 0 and sc.fid_ref.startswith("raw:"):
        real = real_images(sc.fid_ref, **raw_kw)[: sc.pr_num_real]
        report.update(precision_recall(inception_features(inception, real, layout=layout), feats))
    if classify is not None:
        report["class_accuracy"] = float(np.mean(np.concatenate(preds) == sampler.labels))
        report["classifier"] = {k: cls_meta.get(k) for k in ("dataset", "copy", "seed", "test_accuracy")}
    if image_reward is not None:
        report.update(image_reward.result())
    if is_writer():
        tag = sample_tag(config)
        save_grid(out / f"{tag}.png", np.concatenate(grid)[:100].astype(np.float32) / 127.5 - 1.0)
        write_npz(out / f"{tag}_stats.npz", mu=mu, sigma=sigma)
        (out / f"{tag}.json").write_text(json.dumps(report, indent=1, default=float))
        print(json.dumps({k: v for k, v in report.items() if k != "settings"}, default=float), flush=True)
    return report
