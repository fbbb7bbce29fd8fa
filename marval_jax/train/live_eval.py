"""Live evaluation of a training run: FID (+ precision / recall, + class accuracy) every `train.eval_every` steps.

`train.eval_every=N` (0 = off) and `train.eval_samples=M`: after every N-th step (and the last one) the loop draws M
images from the trained state with the task's own sampler (`Task.sample_images`: the MAR teacher's grid sampler,
the distilled one-step generator, the RL generator; grids of `train.grid_size**2` images, labels
`models.factory.grid_labels`; the last grid's surplus is dropped) and scores them as `--mode evaluate` does:
centre-crop to `sample.crop`, Inception pool features, FID against `sample.fid_ref` (exact N x N trace term up to
2048 images), precision / recall against `sample.pr_num_real` real images (raw: references), class accuracy of the
eval classifier (`sample.classifier`, or the committed one of an MNIST-family data set). The numbers go to the
run's writers (metrics.jsonl, TensorBoard, stdout, W&B) as `eval/fid`, `eval/precision`, `eval/recall`,
`eval/class_accuracy`, `eval/seconds`; `tools/ablate.py` reads the `eval/fid` curve.

Loaded once per run, before the first step (a missing file fails then, not after hours of training): the Inception
weights (`sample.inception`), the reference statistics (`evaluation.fid_reference`: the cache `--mode evaluate`
fills, shared by every workdir), the real features of precision / recall and the classifier. The sampler, the
crop and the Inception are each compiled once. Every evaluation draws the same keys, so the curve moves with the
model, not with the draw.

Sharding: the images come out of the sampler split over the training mesh's batch axes (the layout of
`--mode evaluate`, over the mesh the state lives on), the Inception and the classifier run on the devices holding
them, and only features and predictions are gathered. Several processes: every process runs every evaluation
(the calls are collectives); only process 0's writers write. The host waits for the device only inside an
evaluation step.
"""
from __future__ import annotations

import functools
import math
import time

import jax
import numpy as np

from marval_jax.evaluation import fid as fid_lib
from marval_jax.evaluation import fid_reference
from marval_jax.evaluation.inception import inception_features, load_inception, sharded_features
from marval_jax.evaluation.inception_input import inception_input
from marval_jax.evaluation.precision_recall import precision_recall
from marval_jax.models.factory import grid_labels
from marval_jax.parallel.global_batches import GlobalBatches
from marval_jax.user_errors import UserError

EVAL_KEY = 0x7E57  # fold_in of the run's key: the evaluation keys, the same at every evaluation
MNIST_FAMILY = ("fashion_mnist", "mnist")


def enabled(tc) -> bool:
    """Whether `train.eval_every` asks for live evaluation (0: off); a negative value or eval_samples < 1 is refused."""
    every, num = int(tc.get("eval_every", 0)), int(tc.get("eval_samples", 0))
    if every < 0:
        raise UserError(f"train.eval_every={every}: give a number of steps > 0, or 0 for no live evaluation")
    if every and num < 1:
        raise UserError(f"train.eval_samples={num}: live evaluation (train.eval_every={every}) needs >= 1 image")
    return every > 0


def check(config) -> bool:
    """`enabled(config.train)`, and with live evaluation on, a reference to score against (`sample.fid_ref`); the
    loop asks before anything is built."""
    if not enabled(config.train):
        return False
    if not config.sample.fid_ref:
        raise UserError(f"train.eval_every={config.train.eval_every} needs sample.fid_ref: a statistics .npz (mu, "
                        f"sigma) or raw:NAME/SPLIT, e.g. --config.sample.fid_ref=raw:fashion_mnist/test")
    return True


def due(tc, done: int) -> bool:
    """Evaluate after step `done`: every `train.eval_every` steps and after the last one."""
    every = int(tc.get("eval_every", 0))
    return every > 0 and (done % every == 0 or done == int(tc.num_steps))


def _classifier(config):
    """(params, meta) of the eval classifier: sample.classifier, else the committed one of an MNIST-family data set,
    else None (no class accuracy)."""
    from marval_jax.evaluation.classifier_train import load_classifier, load_default_classifier
    sc = config.sample
    if sc.classifier:
        return load_classifier(sc.classifier)
    if config.data.name in MNIST_FAMILY:
        return load_default_classifier(config.data.name, "eval")
    return None


class LiveEval:
    """Built once per run (`__call__` per evaluation): `LiveEval(config, task, mesh, rules, rng)(state, *frozen)` ->
    {"eval/fid": ..., ...}."""

    def __init__(self, config, task, mesh, rules, rng):
        tc, sc = config.train, config.sample
        check(config)
        if task.sample_images is None:
            raise UserError(f"train.eval_every: the {task.name} task has no sampler to evaluate; set it to 0")
        self.layout = layout = GlobalBatches.over(mesh, rules)
        self.per_call = int(tc.grid_size) ** 2
        if self.per_call % layout.ways:
            raise UserError(f"train.eval_every: a sample grid of train.grid_size**2 = {self.per_call} images does not "
                            f"split over the {layout.ways} batch devices; use a grid_size whose square they divide")
        self.num = int(tc.eval_samples)
        self.calls = math.ceil(self.num / self.per_call)
        self.key = jax.random.fold_in(rng, EVAL_KEY)
        inception = load_inception(sc.inception or None)         # once per run
        self.ref = fid_reference.reference_stats(sc.fid_ref, inception, inception_path=sc.inception or None,
                                                 images_of=fid_reference.real_images, **fid_reference.raw_kw(config))
        self.real_features = None
        if sc.pr_num_real > 0 and sc.fid_ref.startswith("raw:"):
            self.real_features = fid_reference.reference_features(
                sc.fid_ref, inception, inception_path=sc.inception or None, num=sc.pr_num_real,
                images_of=fid_reference.real_images, **fid_reference.raw_kw(config))
        self.features_of = sharded_features(inception, layout)
        self.to_uint8 = jax.jit(functools.partial(inception_input, crop=int(sc.crop)),
                                out_shardings=layout.sharding(4))
        self.sample = jax.jit(task.sample_images, out_shardings=layout.sharding(4))
        classifier = _classifier(config)
        self.classify, self.labels = None, None
        if classifier is not None:
            from marval_jax.evaluation.class_accuracy import predict_sharded
            self.classify = predict_sharded(classifier[0], layout)
            self.labels = np.tile(np.asarray(grid_labels(self.per_call, config.model.class_num)),
                                  self.calls)[: self.num]

    def __call__(self, state, *frozen) -> dict:
        t0 = time.time()
        feats, preds = [], []
        for i in range(self.calls):
            images = self.sample(state, jax.random.fold_in(self.key, i), *frozen)
            feats.append(self.features_of(self.to_uint8(images)))
            if self.classify is not None:
                preds.append(self.classify(images))
        feats = np.concatenate(feats)[: self.num]
        mu_ref, sigma_ref = self.ref
        if len(feats) <= feats.shape[1]:
            fid = fid_lib.frechet_distance_few(feats, mu_ref, sigma_ref)
        else:
            fid = fid_lib.frechet_distance(*fid_lib.statistics_from_features(feats), mu_ref, sigma_ref)
        out = {"eval/fid": float(fid)}
        if self.real_features is not None:
            pr = precision_recall(self.real_features, feats)
            out.update({"eval/precision": pr["precision"], "eval/recall": pr["recall"]})
        if self.classify is not None:
            out["eval/class_accuracy"] = float(np.mean(np.concatenate(preds)[: self.num] == self.labels))
        out["eval/seconds"] = time.time() - t0
        return out
