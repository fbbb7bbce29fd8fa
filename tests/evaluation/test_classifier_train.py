"""Tests for marval_jax/evaluation/classifier_train.py and the CLI marval_jax/tools/train_classifier.py."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marval_jax.evaluation.classifier_train import (META_FILE, PARAMS_FILE, TrainConfig, default_classifier_dir,
                                                    half_indices, load_classifier, load_split, random_shift,
                                                    save_classifier, train_classifier)
from marval_jax.models.classifier import ClassifierConfig, classifier_logits, flatten_params
from marval_jax.tools import train_classifier as cli
from tolerances import assert_close_to_scale, classifier_depth

TINY_MODEL = ClassifierConfig(channels=(4, 8, 8), hidden=32, dropout=0.1)


@pytest.fixture(scope="module")
def fmnist():
    train = load_split("fashion_mnist", "train")
    test = load_split("fashion_mnist", "test")
    return train, (test[0][:200], test[1][:200])


def _flat_np(params):
    return {k: np.asarray(v) for k, v in flatten_params(params).items()}


def test_halves_are_disjoint_fixed_and_cover():
    r, e = half_indices(60000, "reward"), half_indices(60000, "eval")
    assert len(r) == len(e) == 30000
    assert len(np.intersect1d(r, e)) == 0
    np.testing.assert_array_equal(np.union1d(r, e), np.arange(60000))
    np.testing.assert_array_equal(r, half_indices(60000, "reward"))  # independent of any training seed
    with pytest.raises(ValueError, match="copy must be one of"):
        half_indices(10, "both")


def test_random_shift_is_a_shift_with_background_fill():
    x = jax.random.uniform(jax.random.PRNGKey(0), (16, 6, 6, 1), minval=0.0, maxval=1.0)
    y = np.asarray(random_shift(x, jax.random.PRNGKey(1), 2))
    xn = np.asarray(x)
    seen = set()
    for i in range(16):
        padded = np.pad(xn[i], ((2, 2), (2, 2), (0, 0)), constant_values=-1.0)
        matches = [(dy, dx) for dy in range(5) for dx in range(5)
                   if np.array_equal(padded[dy:dy + 6, dx:dx + 6], y[i])]
        assert matches, f"image {i} is not a shift of its input by <= 2 px"
        seen.add(matches[0])
    assert len(seen) > 1
    np.testing.assert_array_equal(np.asarray(random_shift(x, jax.random.PRNGKey(1), 0)), xn)


def test_tiny_training_is_bitwise_reproducible_and_loss_decreases(fmnist):
    train, test = fmnist
    cfg = TrainConfig(dataset="fashion_mnist", copy="reward", seed=3, epochs=4, batch_size=64, num_train=512,
                      model=TINY_MODEL, warmup_steps=4, learning_rate=3e-3)
    p1, m1 = train_classifier(cfg, train_data=train, test_data=test, log=None)
    p2, m2 = train_classifier(cfg, train_data=train, test_data=test, log=None)
    f1, f2 = _flat_np(p1), _flat_np(p2)
    assert f1.keys() == f2.keys()
    for k in f1:
        np.testing.assert_array_equal(f1[k], f2[k], err_msg=k)
    np.testing.assert_array_equal(m1["losses"], m2["losses"])
    assert m1["losses"].shape == (4 * 8,)
    assert m1["epoch_losses"][-1] < m1["epoch_losses"][0] - 0.3, m1["epoch_losses"]
    assert m1["num_train"] == 512 and m1["num_test"] == 200
    assert m1["test_accuracy"] > 0.2  # 10 classes, chance is 0.1

    # Another seed, or the other copy (other half of the data), gives other parameters.
    p3, _ = train_classifier(TrainConfig(**{**cfg.__dict__, "seed": 4, "epochs": 1}), train_data=train,
                             test_data=test, log=None)
    p4, _ = train_classifier(TrainConfig(**{**cfg.__dict__, "copy": "eval", "epochs": 1}), train_data=train,
                             test_data=test, log=None)
    p1b, _ = train_classifier(TrainConfig(**{**cfg.__dict__, "epochs": 1}), train_data=train, test_data=test,
                              log=None)
    k = "head/kernel"
    assert not np.array_equal(_flat_np(p3)[k], _flat_np(p1b)[k])
    assert not np.array_equal(_flat_np(p4)[k], _flat_np(p1b)[k])


def test_cli_same_seed_same_parameters(tmp_path):
    """The command with the default model, 512 examples, 1 epoch, run twice: identical parameters and JSON."""
    metas = []
    for name in ("a", "b"):
        out = tmp_path / name
        metas.append(cli.main(["--dataset", "fashion_mnist", "--copy", "eval", "--out", str(out), "--seed", "7",
                               "--epochs", "1", "--num-train", "512", "--num-test", "100"]))
    za, zb = np.load(tmp_path / "a" / PARAMS_FILE), np.load(tmp_path / "b" / PARAMS_FILE)
    assert sorted(za.files) == sorted(zb.files) and len(za.files) == 10
    for k in za.files:
        np.testing.assert_array_equal(za[k], zb[k], err_msg=k)
    meta = json.loads((tmp_path / "a" / META_FILE).read_text())
    assert meta["dataset"] == "fashion_mnist" and meta["copy"] == "eval" and meta["seed"] == 7
    assert meta["command"].startswith("python -m marval_jax.tools.train_classifier --dataset fashion_mnist")
    assert meta["test_accuracy"] == metas[1]["test_accuracy"] and 0.0 <= meta["test_accuracy"] <= 1.0
    params, meta2 = load_classifier(str(tmp_path / "a"), dataset="fashion_mnist", copy="eval")
    assert meta2["seed"] == 7
    assert classifier_logits(params, jnp.zeros((2, 32, 32, 1))).shape == (2, 10)


def test_save_load_roundtrip_and_errors(tmp_path):
    from flax import nnx
    from marval_jax.models.classifier import Classifier

    model = Classifier(TINY_MODEL, rngs=nnx.Rngs(0))
    _, state = nnx.split(model)
    out = tmp_path / "clf"
    save_classifier(str(out), state, {"dataset": "mnist", "copy": "reward", "seed": 0,
                                      "model": TINY_MODEL.to_dict()})
    params, meta = load_classifier(str(out), dataset="mnist", copy="reward")
    assert meta["format_version"] == 1
    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 28, 28, 1), minval=-1, maxval=1)
    # the loaded and the built model run as other programs: the chain's bound (tests/tolerances.py)
    assert_close_to_scale(classifier_logits(params, x), model(x),
                          classifier_depth(TINY_MODEL.channels, TINY_MODEL.hidden))

    with pytest.raises(FileNotFoundError, match="nowhere"):
        load_classifier(str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="trained on dataset 'mnist', expected 'fashion_mnist'"):
        load_classifier(str(out), dataset="fashion_mnist")
    with pytest.raises(ValueError, match="is the 'reward' copy, expected 'eval'"):
        load_classifier(str(out), copy="eval")
    # Parameters that do not match the recorded architecture.
    meta_path = out / META_FILE
    m = json.loads(meta_path.read_text())
    m["model"]["hidden"] = 64
    meta_path.write_text(json.dumps(m))
    with pytest.raises(ValueError, match=r"params.npz: classifier parameter .*: expected shape"):
        load_classifier(str(out))
    os.remove(out / PARAMS_FILE)
    with pytest.raises(FileNotFoundError, match="params.npz"):
        load_classifier(str(out))
    with pytest.raises(ValueError, match="dataset must be one of"):
        default_classifier_dir("cifar10", "reward")
