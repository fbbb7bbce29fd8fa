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


def test_plan_refuses_what_the_driver_cannot_do():
    """The KV-cached decode is inference only; the RL loop has no CFG; truncation splits the pieces at K - k."""
    from marval_jax.losses.rl import make_rl_sampler
    from marval_jax.sampling.ar_sampler import SamplerSpec
    from marval_jax.sampling.decode import CachePolicy, make_plan
    kw = dict(seq_len=16, buffer_size=2, token_dim=4)
    with pytest.raises(ValueError, match="inference only"):
        make_plan(SamplerSpec(num_iter=4), policy="exact", differentiable=True, **kw)
    with pytest.raises(ValueError, match="no CFG"):
        make_rl_sampler(fx.RL, fx.GEN, fx.CFG, SamplerSpec(num_iter=4, cfg=2.0))
    assert CachePolicy.parse("none").kind == "none"
    plan = make_plan(SamplerSpec(num_iter=7, num_buckets=1), differentiable=True, backprop_steps=2, **kw)
    assert [(p.start, p.stop, p.grad) for p in plan.pieces] == [(0, 5, False), (5, 7, True)]
