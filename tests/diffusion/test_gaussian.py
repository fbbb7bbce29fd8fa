"""Respacing and the reverse chain (the per-tensor numbers are checked against the fixture by the parity tool)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marval_jax.diffusion.gaussian import GaussianDiffusion, space_timesteps


def test_respacing_strings():
    assert sorted(space_timesteps(1000, "100"))[:8] == [0, 10, 20, 30, 40, 50, 61, 71]
    assert max(space_timesteps(1000, "100")) == 999 and len(space_timesteps(1000, "100")) == 100
    assert space_timesteps(1000, "ddim50") == set(range(0, 1000, 20))
    assert len(space_timesteps(1000, "10,20")) == 30
    with pytest.raises(ValueError):
        space_timesteps(1000, "fast")
    with pytest.raises(ValueError):
        space_timesteps(1000, "ddim600")


def test_respaced_chain_keeps_alpha_bar():
    full, sp = GaussianDiffusion.create(""), GaussianDiffusion.create("25")
    np.testing.assert_allclose(sp.alphas_cumprod, full.alphas_cumprod[sp.timestep_map])
    assert abs(sp.betas[-1] - 0.99999) < 1e-4


def test_temperature_scales_only_the_per_step_noise():
    d = GaussianDiffusion.create("10")
    model = lambda x, t: jnp.concatenate([0.1 * x, jnp.zeros_like(x)], axis=-1)
    noise = jax.random.normal(jax.random.PRNGKey(0), (4, 3))
    cold = d.p_sample_loop(model, noise, jax.random.PRNGKey(1), temperature=0.0)
    cold2 = d.p_sample_loop(model, noise, jax.random.PRNGKey(7), temperature=0.0)
    warm = d.p_sample_loop(model, noise, jax.random.PRNGKey(1), temperature=1.0)
    np.testing.assert_allclose(cold, cold2, rtol=1e-6)  # temperature 0: the start noise is kept, steps are means
    assert float(jnp.abs(cold - warm).max()) > 1e-3
