"""Tests for marval_jax/rewards/classifier_reward.py and the committed classifier weights."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from marval_jax.data.raw_datasets import load_raw
from marval_jax.evaluation.class_accuracy import class_accuracy, per_class_accuracy
from marval_jax.evaluation.classifier_train import (META_FILE, default_classifier_dir, load_default_classifier,
                                                    save_classifier)
from marval_jax.models.classifier import Classifier, ClassifierConfig, uint8_to_model_input
from marval_jax.rewards.classifier_reward import classifier_logprob
from marval_jax.rewards.registry import Reward, available_rewards, make_reward
from tolerances import assert_close_to_scale, classifier_depth

MIN_ACCURACY = {"fashion_mnist": 0.90, "mnist": 0.99}


def _padded_test_images(dataset, n=8):
    x, y = load_raw(dataset, "test")
    xi = uint8_to_model_input(x[:n])
    return jnp.pad(xi, ((0, 0), (2, 2), (2, 2), (0, 0)), constant_values=-1.0), jnp.asarray(y[:n])


def test_registered_and_default_is_fashion_mnist_reward_copy():
    assert "classifier_logprob" in available_rewards()
    reward = make_reward("classifier_logprob", {})
    assert isinstance(reward, Reward) and reward.name == "classifier_logprob"
    params, meta = load_default_classifier("fashion_mnist", "reward")
    for a, b in zip(jax.tree.leaves(reward.params), jax.tree.leaves(params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert meta["copy"] == "reward"


def test_reward_is_log_softmax_of_target_class():
    reward = make_reward("classifier_logprob", {"checkpoint": "marval_jax/evaluation/weights/fashion_mnist_reward",
                                                "dtype": "float32"})
    images, labels = _padded_test_images("fashion_mnist")
    # other targets than the true ones too
    targets = jnp.asarray((np.asarray(labels) + np.arange(8) % 3) % 10, jnp.int32)
    scores = jax.jit(reward.fn)(reward.params, images, targets, None)
    assert scores.shape == (8,) and scores.dtype == jnp.float32

    # Reference: the model's logits, log-softmax in float64 NumPy.
    model = nnx.merge(nnx.split(Classifier(ClassifierConfig(), rngs=nnx.Rngs(0)))[0], reward.params)
    logits = np.asarray(model(images[:, 2:30, 2:30, :]), np.float64)
    ref = logits - logits.max(-1, keepdims=True)
    ref = ref - np.log(np.exp(ref).sum(-1, keepdims=True))
    # jit vs eager logits and float64 log-softmax: the default classifier's chain bound on the log-probs' scale
    depth = classifier_depth(log_softmax=True)
    assert_close_to_scale(scores, ref[np.arange(8), np.asarray(targets)], depth)
    assert np.all(np.asarray(scores) <= 0.0)
    # Through the Reward object / bind too (eager calls of reward.fn: another program than the jit above)
    assert_close_to_scale(reward(reward.params, images, targets), scores, depth)
    assert_close_to_scale(reward.bind()(images, targets), scores, depth)


def test_gradient_wrt_images_finite_and_nonzero():
    reward = make_reward("classifier_logprob", {"dataset": "mnist"})
    images, labels = _padded_test_images("mnist", 4)
    wrong = (labels + 1) % 10  # far from saturated, so the gradient is large
    grad = jax.grad(lambda im: reward.fn(reward.params, im, wrong, None).sum())(images)
    g = np.asarray(grad)
    assert g.shape == images.shape and np.all(np.isfinite(g))
    assert np.all(np.abs(g[:, 2:30, 2:30]).reshape(4, -1).sum(-1) > 0)  # every image gets a gradient
    np.testing.assert_array_equal(g[:, :2], 0.0)  # the cropped border does not enter the reward
    # A small step along the gradient increases the reward.
    before = reward.fn(reward.params, images, wrong, None)
    after = reward.fn(reward.params, images + 1e-3 * grad / (np.abs(g).max() + 1e-12), wrong, None)
    assert np.all(np.asarray(after) > np.asarray(before))


def test_bfloat16_reward_close():
    images, labels = _padded_test_images("fashion_mnist")
    f32 = make_reward("classifier_logprob", {"dataset": "fashion_mnist"})
    bf16 = make_reward("classifier_logprob", {"dataset": "fashion_mnist", "dtype": "bfloat16"})
    a, b = f32(f32.params, images, labels), bf16(bf16.params, images, labels)
    assert b.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), atol=0.1)


def test_config_errors(tmp_path):
    with pytest.raises(ValueError, match="trained on dataset 'fashion_mnist', expected 'mnist'"):
        make_reward("classifier_logprob", {"checkpoint": default_classifier_dir("fashion_mnist", "reward"),
                                           "dataset": "mnist"})
    with pytest.raises(ValueError, match="is the 'eval' copy, expected 'reward'"):
        make_reward("classifier_logprob", {"checkpoint": default_classifier_dir("fashion_mnist", "eval")})
    with pytest.raises(FileNotFoundError, match="nowhere"):
        make_reward("classifier_logprob", {"checkpoint": str(tmp_path / "nowhere")})
    reward = make_reward("classifier_logprob", {})
    images, labels = _padded_test_images("fashion_mnist", 2)
    with pytest.raises(ValueError, match="needs labels"):
        reward(reward.params, images, None)
    with pytest.raises(ValueError, match=r"labels must be \(2,\)"):
        reward(reward.params, images, labels[:1])


def test_any_checkpoint_dir_works(tmp_path):
    cfg = ClassifierConfig(channels=(4, 8, 8), hidden=16)
    _, state = nnx.split(Classifier(cfg, rngs=nnx.Rngs(1)))
    save_classifier(str(tmp_path), state, {"dataset": "mnist", "copy": "reward", "seed": 1, "model": cfg.to_dict()})
    reward = make_reward("classifier_logprob", {"checkpoint": str(tmp_path)})
    images, labels = _padded_test_images("mnist", 3)
    np.testing.assert_allclose(np.asarray(reward(reward.params, images, labels)),
                               np.asarray(classifier_logprob(state, images, labels)), rtol=1e-6)


@pytest.mark.parametrize("dataset", ["fashion_mnist", "mnist"])
def test_committed_weights_reach_recorded_accuracy(dataset):
    x, y = load_raw(dataset, "test")
    params = {}
    for copy in ("reward", "eval"):
        path = default_classifier_dir(dataset, copy)
        assert os.path.getsize(os.path.join(path, "params.npz")) < 2 * 1024 * 1024
        params[copy], meta = load_default_classifier(dataset, copy)
        with open(os.path.join(path, META_FILE)) as f:
            assert json.load(f) == meta
        assert meta["dataset"] == dataset and meta["copy"] == copy and meta["num_test"] == 10000
        assert meta["command"] == (f"python -m marval_jax.tools.train_classifier --dataset {dataset} --copy {copy} "
                                   f"--out marval_jax/evaluation/weights/{dataset}_{copy}")
        assert meta["test_accuracy"] >= MIN_ACCURACY[dataset]
        # 1000 test images spread over the test set, and the whole test set (uint8 input and padded 32x32 input).
        sub = class_accuracy(params[copy], x[::10], y[::10])
        assert sub >= MIN_ACCURACY[dataset], (copy, sub)
        padded = jnp.pad(uint8_to_model_input(x[::10]), ((0, 0), (2, 2), (2, 2), (0, 0)), constant_values=-1.0)
        assert class_accuracy(params[copy], padded, y[::10]) == sub
        full = class_accuracy(params[copy], x, y)
        assert abs(full - meta["test_accuracy"]) <= 2e-3, (copy, full, meta["test_accuracy"])
        per_class = per_class_accuracy(params[copy], x, y)
        np.testing.assert_allclose(per_class, meta["per_class_accuracy"], atol=5e-3)
    # Two independently trained copies: different seeds, different parameters.
    assert load_default_classifier(dataset, "reward")[1]["seed"] != load_default_classifier(dataset, "eval")[1]["seed"]
    assert not np.allclose(np.asarray(params["reward"]["head"]["kernel"]), np.asarray(params["eval"]["head"]["kernel"]))
