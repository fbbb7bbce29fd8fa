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


def test_clip_denoised_keeps_a_respaced_chain_from_diverging():
    """An eps error of 0.2 at t = 999 (alpha_bar 2.4e-9) throws the 100-step chain far off; clipping x0 to the
    pixel range keeps it there (the failure seen with an undertrained Fashion-MNIST head)."""
    import jax
    import jax.numpy as jnp
    from marval_jax.diffusion.gaussian import GaussianDiffusion
    d = GaussianDiffusion.create("100")
    x = jax.random.normal(jax.random.PRNGKey(0), (64, 16))
    t = jnp.full((64,), d.num_timesteps - 1)   # the first reverse step, original t = 999
    out = jnp.concatenate([x + 0.2, jnp.zeros_like(x)], axis=-1)   # the ideal eps there is ~x: 0.2 off
    off = d.p_mean_variance(out, x, t)["mean"]
    on = d.p_mean_variance(out, x, t, clip_denoised=True)["mean"]
    assert float(jnp.abs(off).min()) > 20.0   # every coordinate ~57 sigma off after one step
    assert float(jnp.abs(on).max()) < 1.0
    # the whole chain with the option stays in the data range
    final = d.p_sample_loop(lambda x, t: jnp.concatenate([x + 0.2, jnp.zeros_like(x)], -1), x,
                            jax.random.PRNGKey(1), clip_denoised=True)
    assert float(jnp.abs(final).max()) <= 1.0 + 1e-5
    # and clipping changes nothing while every x0 estimate stays inside [-1, 1]
    xt = 0.5 * jax.random.uniform(jax.random.PRNGKey(2), (8, 16), minval=-1, maxval=1)
    t = jnp.full((8,), 10)
    out = jnp.concatenate([jnp.zeros_like(xt), jnp.zeros_like(xt)], axis=-1)
    a, b = d.p_mean_variance(out, xt, t), d.p_mean_variance(out, xt, t, clip_denoised=True)
    assert float(jnp.abs(a["pred_xstart"]).max()) < 1.0
    assert jnp.array_equal(a["mean"], b["mean"])
