"""Tests for marval_jax/models/classifier.py: numbers against a NumPy reference forward pass."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from marval_jax.models.classifier import (Classifier, ClassifierConfig, classifier_log_probs, classifier_logits,
                                          config_from_params, flatten_params, params_to_state, prepare_images,
                                          uint8_to_model_input)
from tolerances import (EPS16, ULP_TRANSCENDENTAL, assert_close_to_scale, classifier_depth, max_abs,
                        reassociation_atol, worst_case_atol)

TINY = ClassifierConfig(channels=(4, 8, 8), hidden=16, num_classes=10)
# Roundings on the tiny classifier's chain (tests/tolerances.py): what two evaluations of it may differ by
TINY_DEPTH = classifier_depth(TINY.channels, TINY.hidden)


def _np_forward(flat, x):
    """NumPy reference: SAME 3x3 conv (cross-correlation, HWIO kernels) - relu - 2x2 max-pool, x3; dense."""
    x = np.asarray(x, np.float64)
    if x.shape[1] == 32:
        x = x[:, 2:30, 2:30, :]
    n_conv = len([k for k in flat if k.startswith("convs/") and k.endswith("kernel")])
    for i in range(n_conv):
        w = np.asarray(flat[f"convs/{i}/kernel"], np.float64)
        b = np.asarray(flat[f"convs/{i}/bias"], np.float64)
        bsz, h, wd, _ = x.shape
        xp = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
        out = np.zeros((bsz, h, wd, w.shape[-1]))
        for dy in range(3):
            for dx in range(3):
                out += np.einsum("bhwc,cd->bhwd", xp[:, dy:dy + h, dx:dx + wd, :], w[dy, dx])
        out = np.maximum(out + b, 0.0)
        h2, w2 = h // 2, wd // 2
        x = out[:, :2 * h2, :2 * w2].reshape(bsz, h2, 2, w2, 2, -1).max(axis=(2, 4))
    x = x.reshape(x.shape[0], -1)
    x = np.maximum(x @ np.asarray(flat["hidden/kernel"], np.float64) + np.asarray(flat["hidden/bias"]), 0.0)
    return x @ np.asarray(flat["head/kernel"], np.float64) + np.asarray(flat["head/bias"])


@pytest.fixture(scope="module")
def tiny():
    model = Classifier(TINY, rngs=nnx.Rngs(0))
    # Non-zero biases so that the reference checks them too.
    graphdef, state = nnx.split(model)
    state = jax.tree.map(lambda p: p + 0.05 if p.ndim == 1 else p, state)
    return graphdef, state


def _images(key, b=3, size=28):
    return jax.random.uniform(jax.random.PRNGKey(key), (b, size, size, 1), minval=-1.0, maxval=1.0)


def test_logits_match_numpy_reference(tiny):
    graphdef, state = tiny
    x = _images(1)
    logits = nnx.merge(graphdef, state)(x)
    assert logits.shape == (3, 10) and logits.dtype == jnp.float32
    ref = _np_forward(flatten_params(state), x)
    assert_close_to_scale(logits, ref, TINY_DEPTH)  # NumPy vs XLA: on the logits' scale


def test_default_architecture_param_count_and_dtype():
    model = Classifier(rngs=nnx.Rngs(0))
    _, state = nnx.split(model)
    flat = flatten_params(state)
    # conv 1->32, 32->64, 64->128 (3x3), dense 3*3*128 -> 256, 256 -> 10
    expected = (9 * 32 + 32) + (9 * 32 * 64 + 64) + (9 * 64 * 128 + 128) + (1152 * 256 + 256) + (256 * 10 + 10)
    assert sum(v.size for v in flat.values()) == expected == 390410
    assert all(v.dtype == jnp.float32 for v in flat.values())
    assert config_from_params(state) == ClassifierConfig()


def test_32px_input_is_centre_cropped(tiny):
    graphdef, state = tiny
    x = _images(2)
    padded = jnp.pad(x, ((0, 0), (2, 2), (2, 2), (0, 0)), constant_values=-1.0)
    model = nnx.merge(graphdef, state)
    # eager op-by-op calls: after the crop the same ops run on bit-identical 28x28 inputs, so bit-identical logits
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(model(padded)))
    # The border of a 32x32 image is ignored.
    noisy_border = padded.at[:, :2].set(1.0)
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(model(noisy_border)))


@pytest.mark.parametrize("shape", [(2, 28, 28), (2, 28, 28, 3), (2, 30, 30, 1), (2, 28, 32, 1)])
def test_bad_shapes_raise(tiny, shape):
    graphdef, state = tiny
    with pytest.raises(ValueError, match="NHWC grey images"):
        nnx.merge(graphdef, state)(jnp.zeros(shape))
    with pytest.raises(ValueError, match=r"got shape"):
        prepare_images(jnp.zeros(shape))


def test_functional_forms_agree(tiny):
    graphdef, state = tiny
    x = _images(3)
    ref = nnx.merge(graphdef, state)(x)
    np.testing.assert_array_equal(np.asarray(classifier_logits(state, x)), np.asarray(ref))  # the same eager ops
    pure = nnx.to_pure_dict(state)
    # one fused jit vs eager ops: two programs, the chain's reassociation bound
    assert_close_to_scale(jax.jit(classifier_logits)(pure, x), ref, TINY_DEPTH)
    lp = classifier_log_probs(state, x)
    ls_depth = classifier_depth(TINY.channels, TINY.hidden, log_softmax=True)
    assert_close_to_scale(lp, jax.nn.log_softmax(ref), ls_depth)
    # lp's error (at most the bound above, on its scale) is a relative error of exp(lp); then exp (4 ulp) and a
    # sum of 10 terms in [0, 1]: worst case (4 + 10) eps of the sum 1
    atol = reassociation_atol(ls_depth, max_abs(lp)) + worst_case_atol(ULP_TRANSCENDENTAL + TINY.num_classes, 1.0)
    np.testing.assert_allclose(np.exp(np.asarray(lp)).sum(-1), 1.0, rtol=0, atol=atol)


def test_bfloat16_compute_close_to_float32(tiny):
    _, state = tiny
    x = _images(4)
    f32 = classifier_logits(state, x)
    bf16 = classifier_logits(state, x, dtype=jnp.bfloat16)
    assert bf16.dtype == jnp.float32
    # bf16 rounds each layer's input, weights and output (3 roundings of u = 2^-8) in 5 layers, accumulating in
    # float32: the worst case 15 u of the logits' scale, against float32's negligible error
    np.testing.assert_allclose(np.asarray(bf16), np.asarray(f32), rtol=0,
                               atol=worst_case_atol(15, max_abs(f32), eps=EPS16 / 2))


def test_dropout_only_with_key():
    model = Classifier(ClassifierConfig(channels=(4, 8, 8), hidden=16, dropout=0.5), rngs=nnx.Rngs(0))
    x = _images(5)
    np.testing.assert_array_equal(np.asarray(model(x)), np.asarray(model(x, rng=None)))  # the same eager ops
    a = model(x, rng=jax.random.PRNGKey(0))
    b = model(x, rng=jax.random.PRNGKey(1))
    assert not np.allclose(np.asarray(a), np.asarray(b))


def test_params_to_state_checks_names_and_shapes(tiny):
    _, state = tiny
    flat = {k: np.asarray(v) for k, v in flatten_params(state).items()}
    rebuilt = params_to_state(flat, TINY)
    x = _images(6)
    np.testing.assert_array_equal(np.asarray(classifier_logits(rebuilt, x)), np.asarray(classifier_logits(state, x)))
    bad = dict(flat, **{"head/bias": np.zeros((7,), np.float32)})
    with pytest.raises(ValueError, match=r"head/bias: expected shape \(10,\), got \(7,\)"):
        params_to_state(bad, TINY)
    missing = {k: v for k, v in flat.items() if k != "hidden/bias"}
    with pytest.raises(ValueError, match="parameter names differ"):
        params_to_state(missing, TINY)
    with pytest.raises(ValueError, match="not classifier parameters"):
        config_from_params({"foo": np.zeros(3)})


def test_uint8_to_model_input():
    u = np.array([[[0, 255], [127, 128]]], np.uint8)
    x = uint8_to_model_input(u)
    assert x.shape == (1, 2, 2, 1) and x.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(x)[0, :, :, 0], u[0] / 127.5 - 1.0, atol=1e-7)
