"""Tests for marval_jax/evaluation/class_accuracy.py against NumPy argmax of the model's logits."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from marval_jax.evaluation.class_accuracy import class_accuracy, per_class_accuracy, predict
from marval_jax.models.classifier import Classifier, ClassifierConfig, uint8_to_model_input


@pytest.fixture(scope="module")
def setup():
    model = Classifier(ClassifierConfig(channels=(4, 8, 8), hidden=16), rngs=nnx.Rngs(0))
    _, state = nnx.split(model)
    u8 = np.asarray(jax.random.randint(jax.random.PRNGKey(0), (23, 28, 28), 0, 256), np.uint8)
    ref = np.asarray(jnp.argmax(model(uint8_to_model_input(u8)), -1))
    return state, u8, ref


def test_predict_batches_and_input_forms(setup):
    state, u8, ref = setup
    np.testing.assert_array_equal(predict(state, u8, batch_size=5), ref)  # 23 = 4 x 5 + a padded 3
    np.testing.assert_array_equal(predict(state, u8[..., None], batch_size=100), ref)
    x = uint8_to_model_input(u8)
    np.testing.assert_array_equal(predict(state, np.asarray(x), batch_size=7), ref)
    padded = jnp.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)), constant_values=-1.0)
    np.testing.assert_array_equal(predict(state, padded), ref)


def test_accuracy_and_per_class(setup):
    state, u8, ref = setup
    labels = ref.copy()
    labels[:5] = (labels[:5] + 1) % 10
    assert class_accuracy(state, u8, labels, batch_size=4) == pytest.approx(18 / 23)
    per = per_class_accuracy(state, u8, labels, num_classes=10)
    for c in range(10):
        mask = labels == c
        if mask.any():
            assert per[c] == pytest.approx(np.mean(ref[mask] == c))
        else:
            assert np.isnan(per[c])
    with pytest.raises(ValueError, match=r"labels must be \(N,\) with N = 23"):
        class_accuracy(state, u8, labels[:3])
