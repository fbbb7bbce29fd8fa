"""The samplers against their recorded outputs (tests/fixtures/decode_recorded.npz, made by
tests/fixtures/make_decode_fixture.py from the samplers before they became wrappers of
marval_jax/sampling/decode.py): every sampler's samples and the RL sampler's gradient to the reassociation bound of
their chain, the RL sampler's orders (integers drawn from the keys alone) exactly.

Not bitwise: the driver runs the same operations in the same order as the samplers it replaced, but XLA's CPU code
depends on the machine's vector units (on an AVX-512 host the one-step samples differ from the recording by 4e-8
of their scale, the teacher's by 1.4e-6), so a recording made on one x86-64 machine is matched on another only to
the rounding of its chain."""
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


def chain_tol(num_iter: int, head_passes: int) -> float:
    """The reassociation bound of a sampler's chain - num_iter AR steps, each a MAR pass and head_passes head passes
    (the whole model's depth bounds the head's) - on the samples' max-abs scale (rel_err). The cached samplers
    also gather, scatter and attend over the cache in another program than the one recorded."""
    return reassociation_atol(num_iter * (1 + head_passes) * mar_depth(fx.CFG), 1.0)


@pytest.mark.parametrize("name,num_iter,head_passes", [("teacher", 7, 4), ("onestep", 4, 1), ("rl_tokens", 4, 1)])
def test_uncached_samplers_reproduce_recording(recorded, now, name, num_iter, head_passes):
    assert np.isfinite(now[name]).all() and np.abs(recorded[name]).max() > 1.0
    assert rel_err(now[name], recorded[name]) < chain_tol(num_iter, head_passes)


def test_rl_orders_reproduce_recording_exactly(recorded, now):
    np.testing.assert_array_equal(now["rl_orders"], recorded["rl_orders"])


def test_rl_gradient_reproduces_recording(recorded, now):
    """Each gradient leaf on its own scale, to twice the forward chain's bound: the bound of four times its depth,
    which covers docs/testing.md's count for a gradient (three chains and the weight gradient's sum)."""
    names = sorted(k for k in recorded if k.startswith("rl_grad"))
    assert names == sorted(k for k in now if k.startswith("rl_grad")) and len(names) > 20
    for k in names:
        assert np.abs(recorded[k]).max() > 0, k
        assert rel_err(now[k], recorded[k]) < 2 * chain_tol(fx.RL["num_iter"], 1), k


@pytest.mark.parametrize("name,num_iter,head_passes", [("cached_exact", 7, 4), ("cached_approx", 4, 1)])
def test_cached_samplers_reproduce_recording(recorded, now, name, num_iter, head_passes):
    assert np.isfinite(now[name]).all() and np.abs(recorded[name]).max() > 1.0
    assert rel_err(now[name], recorded[name]) < chain_tol(num_iter, head_passes)


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
