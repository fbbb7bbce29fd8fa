"""The samplers against their recorded outputs (tests/fixtures/decode_recorded.npz, made by
tests/fixtures/make_decode_fixture.py from the samplers before they became wrappers of
marval_jax/sampling/decode.py): the uncached teacher and one-step samplers and the RL sampler (tokens, orders and
gradient) bitwise on CPU; the KV-cached samplers to the reassociation bound of their chain.

Bitwise holds because the driver runs the same operations in the same order as the samplers it replaced; it is a
CPU statement (the recording was made under the suite's XLA flags, tests/conftest.py)."""
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marval_jax.tools.parity import rel_err
from tolerances import mar_depth, reassociation_atol

_SCRIPT = pathlib.Path(__file__).parents[1] / "fixtures" / "make_decode_fixture.py"
_spec = importlib.util.spec_from_file_location("make_decode_fixture", _SCRIPT)
fx = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fx)


@pytest.fixture(scope="module")
def recorded():
    with np.load(fx.OUT) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="module")
def now():
    return fx.record()


@pytest.mark.parametrize("name", ["teacher", "onestep", "rl_tokens", "rl_orders"])
def test_uncached_samplers_reproduce_recording_bitwise(recorded, now, name):
    np.testing.assert_array_equal(now[name], recorded[name])


def test_rl_gradient_reproduces_recording_bitwise(recorded, now):
    names = sorted(k for k in recorded if k.startswith("rl_grad"))
    assert names == sorted(k for k in now if k.startswith("rl_grad")) and len(names) > 20
    for k in names:
        np.testing.assert_array_equal(now[k], recorded[k], err_msg=k)


def cached_tol(num_iter: int, head_passes: int) -> float:
    """The cached samplers gather, scatter and attend over the cache in another program than the one recorded:
    they agree to the reassociation bound of the chain - num_iter AR steps, each a MAR pass and head_passes head
    passes (the whole model's depth bounds the head's) - on the samples' max-abs scale (rel_err)."""
    return reassociation_atol(num_iter * (1 + head_passes) * mar_depth(fx.CFG), 1.0)


@pytest.mark.parametrize("name,num_iter,head_passes", [("cached_exact", 7, 4), ("cached_approx", 4, 1)])
def test_cached_samplers_reproduce_recording(recorded, now, name, num_iter, head_passes):
    assert np.isfinite(now[name]).all() and np.abs(recorded[name]).max() > 1.0
    assert rel_err(now[name], recorded[name]) < cached_tol(num_iter, head_passes)
