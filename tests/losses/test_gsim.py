"""GSIM loss: the gradient-equivalence identity in closed form, and every switch of docs/method.md section 2."""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from marval_jax.diffusion.gaussian import GaussianDiffusion, cosine_betas
from marval_jax.losses.gsim import (distance_terms, guidance_weight, gsim_terms, gsim_weights, make_gsim_losses,
                                    reduce_groups, sample_context, sample_timesteps, trainable_mask)
from marval_jax.models.mar import MAR, MARConfig
from tolerances import assert_close_to_scale, mar_depth

CHAIN = GaussianDiffusion.create("")
ABAR = np.asarray(CHAIN.alphas_cumprod)


# -- gradient equivalence (closed-form Gaussians) -----------------------------------------------------------------
# Generator x0 = mu + S_GEN * eps0 (theta = mu in R^D); teacher data N(M_P, S_P^2 I). At chain step t,
# x_t = a x0 + sigma eps with a = sqrt(abar_t), so q_t = N(a mu, v_q I) and p_t = N(a M_P, v_p I) with
# v = a^2 s^2 + sigma^2: both scores are closed form, s(x) = -(x - a m) / v, eps-prediction = -sigma s(x).
D, N_MC, S_GEN, S_P = 4, 200_000, 1.0, 0.5
MU0 = np.array([0.3, -0.2, 0.5, 0.1], np.float32)
M_P = np.array([0.0, 0.4, -0.3, 0.2], np.float32)


def _gaussian_samples(seed=0):
    k_t, k0, k1 = jax.random.split(jax.random.PRNGKey(seed), 3)
    t = jax.random.randint(k_t, (N_MC,), 20, 981)
    a = jnp.sqrt(jnp.asarray(ABAR, jnp.float32)[t])[:, None]
    sig = jnp.sqrt(1.0 - a ** 2)
    return a, sig, jax.random.normal(k0, (N_MC, D)), jax.random.normal(k1, (N_MC, D))


@functools.lru_cache(maxsize=None)
def _per_sample_grads(distance, huber_r=1e-5):
    """Per-sample gradients in mu of the surrogate L1 + L2 (via gsim_terms), of L1 alone, and of the true
    objective d(s_q - s_p) with s_q depending on the live mu (the total derivative)."""
    a, sig, eps0, eps = _gaussian_samples()

    def x_t(mu, a, sig, e0, e):
        return a * (mu + S_GEN * e0) + sig * e

    def surrogate(mu, a, sig, e0, e, use_l2_term):
        xt = x_t(mu, a, sig, e0, e)
        v_q, v_p = a ** 2 * S_GEN ** 2 + sig ** 2, a ** 2 * S_P ** 2 + sig ** 2
        eps_p = sig * (xt - a * M_P) / v_p
        eps_fake = sig * (xt - a * jax.lax.stop_gradient(mu)) / v_q   # exact student score, frozen parameters
        out = gsim_terms(eps_p[None, None], eps_fake[None, None], e[None, None], sig, distance=distance,
                         huber_r=huber_r, use_l2_term=use_l2_term)
        return out["loss"][0, 0]

    def true_objective(mu, a, sig, e0, e):
        xt = x_t(mu, a, sig, e0, e)
        v_q, v_p = a ** 2 * S_GEN ** 2 + sig ** 2, a ** 2 * S_P ** 2 + sig ** 2
        y = -(xt - a * mu) / v_q + (xt - a * M_P) / v_p                # s_q depends on the live mu
        d, _ = distance_terms(jnp.sum(y * y), distance, huber_r)
        return d

    @jax.jit
    def all_grads(mu, a, sig, e0, e):
        per = lambda f: jax.vmap(jax.grad(f), in_axes=(None, 0, 0, 0, 0))(mu, a, sig, e0, e)
        return (per(lambda *x: surrogate(*x, True)), per(lambda *x: surrogate(*x, False)), per(true_objective))

    out = all_grads(jnp.asarray(MU0), a[:, 0], sig[:, 0], eps0, eps)
    return tuple(np.asarray(o, np.float64) for o in out)


def _z_scores(g, h):
    """Paired difference of the two MC gradient means, in units of its standard error (per coordinate)."""
    diff = g - h
    return diff.mean(0) / (diff.std(0) / math.sqrt(len(diff)))


@pytest.mark.parametrize("distance", ["pseudo_huber", "squared_l2"])
def test_gradient_of_l1_plus_l2_is_gradient_of_true_objective(distance):
    g, _, h = _per_sample_grads(distance)
    z = _z_scores(g, h)
    print(f"{distance}: surrogate {g.mean(0)} true {h.mean(0)} z {z}")
    # With 200k samples each coordinate of the paired difference is ~N(0, 1) in SE units: 4 SE bounds it.
    assert np.all(np.abs(z) < 4.0), (distance, z, g.mean(0), h.mean(0))
    # the true gradient is clearly non-zero, so the test has power
    assert np.all(np.abs(h.mean(0)) / (h.std(0) / math.sqrt(len(h))) > 10.0)


@pytest.mark.parametrize("distance", ["pseudo_huber", "squared_l2"])
def test_without_l2_term_gradient_does_not_match(distance):
    _, g1, h = _per_sample_grads(distance)
    z = _z_scores(g1, h)
    print(f"{distance} without L2: L1-only {g1.mean(0)} true {h.mean(0)} z {z}")
    assert np.max(np.abs(z)) > 20.0, (distance, z)


# -- closed-form switch tests on arrays ---------------------------------------------------------------------------
def _rand(shape, seed):
    """Test data from numpy (no per-shape XLA compile)."""
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


def test_squared_l2_is_sid_alpha_half_and_no_l2_term_is_sid_alpha_one():
    b, s, c = 3, 5, 4
    t = jnp.array([100, 500, 900])
    a = jnp.sqrt(jnp.asarray(ABAR, jnp.float32)[t])[:, None, None]
    sig = jnp.sqrt(1.0 - a ** 2)
    x0, eps, f_p, f_phi = (_rand((b, s, c), i) for i in range(4))    # x0-predictions of teacher / fake
    xt = a * x0 + sig * eps
    eps_p, eps_phi = (xt - a * f_p) / sig, (xt - a * f_phi) / sig

    def sid(alpha):  # SiD's loss in x0-space, (1 - alpha)|f_p - f_phi|^2 + (f_p - f_phi).(f_phi - x0), per token
        return ((1 - alpha) * jnp.sum((f_p - f_phi) ** 2, -1) + jnp.sum((f_p - f_phi) * (f_phi - x0), -1)) \
            * (a[..., 0] ** 2 / sig[..., 0] ** 4)

    full = gsim_terms(eps_p, eps_phi, eps, sig, distance="squared_l2")
    np.testing.assert_allclose(full["loss"], 2 * sid(0.5), rtol=2e-4, atol=1e-4)
    no_l2 = gsim_terms(eps_p, eps_phi, eps, sig, distance="squared_l2", use_l2_term=False)
    np.testing.assert_allclose(no_l2["loss"], 2 * sid(1.0), rtol=2e-4, atol=1e-4)
    np.testing.assert_array_equal(no_l2["l2"], 0.0)
    np.testing.assert_allclose(full["loss"] - no_l2["loss"], full["l2"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("distance", ["pseudo_huber", "l2", "squared_l2"])
def test_distance_values_and_derivatives(distance):
    y = _rand((7, 3), 0) * 0.1
    sq = jnp.sum(y * y, -1)
    d, c = distance_terms(sq, distance, 0.05)
    ref = {"pseudo_huber": jnp.sqrt(sq + 0.05 ** 2) - 0.05, "l2": jnp.sqrt(sq), "squared_l2": sq}[distance]
    np.testing.assert_allclose(d, ref, rtol=1e-6)
    grad = jax.vmap(jax.grad(lambda v: distance_terms(jnp.sum(v * v), distance, 0.05)[0]))(y)
    np.testing.assert_allclose(c[:, None] * y, grad, rtol=1e-5, atol=1e-7)   # d'(y) = c * y


def test_norm_axes_image_vs_token():
    b, s, c = 2, 6, 3
    eps_p, eps_f, eps = (_rand((b, s, c), i) for i in range(3))
    sig = jnp.array([0.5, 0.9])[:, None, None]
    mask = jnp.array([[1, 1, 0, 1, 0, 0], [1, 1, 1, 1, 1, 0]], jnp.float32)
    y = (eps_p - eps_f) / sig * mask[..., None]
    g = (eps - eps_f) / sig * mask[..., None]
    tok = gsim_terms(eps_p, eps_f, eps, sig, distance="l2", norm_axes="token", mask=mask)
    img = gsim_terms(eps_p, eps_f, eps, sig, distance="l2", norm_axes="image", mask=mask)
    assert tok["loss"].shape == (b, s) and img["loss"].shape == (b,)
    ny_tok = jnp.linalg.norm(y, axis=-1)
    ny_img = jnp.sqrt(jnp.sum(y ** 2, axis=(1, 2)))
    np.testing.assert_allclose(tok["y_norm"], ny_tok, rtol=1e-5)
    np.testing.assert_allclose(img["y_norm"], ny_img, rtol=1e-5)
    # image: d = |y_img|, L1 = -(y / |y_img|).g summed over the image's masked tokens
    np.testing.assert_allclose(img["l1"], -jnp.sum(y * g, axis=(1, 2)) / ny_img, rtol=1e-5)
    np.testing.assert_allclose(img["l2"], ny_img, rtol=1e-5)
    l_img = reduce_groups(img["loss"], mask, "image")
    np.testing.assert_allclose(l_img, jnp.mean((img["l1"] + ny_img) / mask.sum(1)), rtol=1e-5)
    l_tok = reduce_groups(tok["loss"], mask, "token")
    np.testing.assert_allclose(l_tok, jnp.sum(tok["loss"] * mask) / mask.sum(), rtol=1e-5)
    assert abs(float(l_img - l_tok)) > 1e-3     # the l2 / pseudo-Huber distances differ between the groupings
    # squared_l2 is additive over tokens, so both groupings give the same loss
    sq_t = gsim_terms(eps_p, eps_f, eps, sig, distance="squared_l2", norm_axes="token", mask=mask)
    sq_i = gsim_terms(eps_p, eps_f, eps, sig, distance="squared_l2", norm_axes="image", mask=mask)
    # (the same per-sample masked count, as in training: one mask ratio per batch)
    mask_eq = jnp.array([[1, 1, 0, 1, 0, 0], [0, 1, 1, 0, 1, 0]], jnp.float32)
    sq_t = gsim_terms(eps_p, eps_f, eps, sig, distance="squared_l2", norm_axes="token", mask=mask_eq)
    sq_i = gsim_terms(eps_p, eps_f, eps, sig, distance="squared_l2", norm_axes="image", mask=mask_eq)
    np.testing.assert_allclose(reduce_groups(sq_t["loss"], mask_eq, "token"),
                               reduce_groups(sq_i["loss"], mask_eq, "image"), rtol=1e-5)


def test_weightings_on_known_inputs():
    t = jnp.array([[20, 500], [760, 980]])
    np.testing.assert_array_equal(gsim_weights("none", t=t), 1.0)
    # kl: beta_t of the cosine schedule (the weight of a score-unit residual), computed here from the formula;
    # test_gsim_gaussian.py checks it against an exact KL
    betas = cosine_betas(1000)
    np.testing.assert_allclose(gsim_weights("kl", t=t), betas[np.asarray(t)], rtol=1e-5)
    # sid: 1 / mean |x0 - x0_teacher| over the group (token: channels; image: the masked channels)
    x0 = jnp.array([[[1.0, 2.0], [0.0, 0.0], [3.0, 3.0]]])                    # (1, 3, 2)
    x0t = jnp.array([[[0.0, 0.0], [0.0, 0.0], [2.0, 4.0]]])
    mask = jnp.array([[1.0, 1.0, 0.0]])
    w_tok = gsim_weights("sid", t=t, x0=x0, x0_teacher=x0t, norm_axes="token")
    np.testing.assert_allclose(w_tok, [[1 / 1.5, 1 / 1e-5, 1.0]], rtol=1e-6)    # floor 1e-5 on the mean
    w_img = gsim_weights("sid", t=t, x0=x0, x0_teacher=x0t, norm_axes="image", mask=mask)
    np.testing.assert_allclose(w_img, [1 / 0.75], rtol=1e-6)                    # (1 + 2 + 0 + 0) / 4
    # weights carry no gradient
    gw = jax.grad(lambda v: jnp.sum(gsim_weights("sid", t=t, x0=v, x0_teacher=x0t, norm_axes="token")))(x0)
    np.testing.assert_array_equal(gw, 0.0)


def test_guidance_weight_schedules():
    assert float(guidance_weight(1.2, "constant", 10, 64)) == pytest.approx(1.2)
    np.testing.assert_allclose(guidance_weight(3.0, "linear", jnp.array([0, 16, 64]), 64), [1.0, 1.5, 3.0])
    with pytest.raises(ValueError, match="guidance_schedule"):
        guidance_weight(1.2, "cosine", 1, 4)


def test_contexts_are_the_schedule_modules_masks():
    """sample_context draws through sampling/schedule.py (the one implementation of MAR's orders, masks and mask
    ratio), bitwise what the earlier inline code drew for the same keys (argsort of uniforms; truncated normal)."""
    from marval_jax.sampling import schedule
    s, b = 16, 5
    for i in range(4):
        rng = jax.random.PRNGKey(i)
        mask, n, rank = sample_context(rng, b, s, 0.7, return_gen_rank=True)
        r_ratio, r_order = jax.random.split(rng)
        # the earlier inline draw, written out
        ratio = jax.random.truncated_normal(r_ratio, (0.7 - 1.0) / 0.25, 0.0, (), jnp.float32) * 0.25 + 1.0
        n_old = jnp.clip(jnp.ceil(s * ratio).astype(jnp.int32), math.ceil(s * 0.7), s)
        orders = jnp.argsort(jax.random.uniform(r_order, (b, s)), axis=1)
        mask_old = (jnp.argsort(orders, axis=1) < n_old).astype(jnp.float32)
        assert int(n) == int(n_old)
        np.testing.assert_array_equal(mask, mask_old)
        np.testing.assert_array_equal(schedule.sample_mask_ratio(r_ratio, 0.7), ratio)
        np.testing.assert_array_equal(mask, schedule.mask_from_orders(schedule.random_orders(r_order, b, s), n)[0])
        # the causal generation rank follows the same order: masked positions last
        assert np.all(np.asarray(rank)[np.asarray(mask) > 0.5].min() >= s - int(n))


def test_context_and_timestep_sampling():
    s, lo = 16, math.ceil(16 * 0.7)
    seen = set()
    for i in range(40):
        mask, n = sample_context(jax.random.PRNGKey(i), 5, s, 0.7)
        n = int(n)
        assert lo <= n <= s
        np.testing.assert_array_equal(mask.sum(1), n)       # one ratio per batch
        seen.add(n)
    assert len(seen) > 2
    t = sample_timesteps(jax.random.PRNGKey(0), (20000,), 20, 980)
    assert int(t.min()) == 20 and int(t.max()) == 980


# -- switches through the full losses on a tiny MAR ---------------------------------------------------------------
CFG = MARConfig(img_size=8, vae_stride=2, patch_size=1, vae_embed_dim=3, encoder_embed_dim=16, encoder_depth=1,
                encoder_num_heads=2, decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2, buffer_size=2,
                class_num=3, diffloss_d=1, diffloss_w=16, attn_dropout=0.0, proj_dropout=0.0)


@pytest.fixture(scope="module")
def tiny():
    """(graphdef, gen, fake, teacher params, batch): three different random MARs with non-zero head outputs."""
    graphdef, base = nnx.split(MAR(CFG, rngs=nnx.Rngs(0)))

    def perturb(seed):
        leaves, tree = jax.tree.flatten(base)
        return jax.tree.unflatten(tree, [x + 0.1 * _rand(x.shape, 100 * seed + i) for i, x in enumerate(leaves)])

    batch = {"tokens": _rand((3, CFG.seq_len, CFG.token_dim), 7), "labels": jnp.array([0, 2, 1], jnp.int32)}
    return graphdef, perturb(1), perturb(2), perturb(3), batch


# Defaults of these tests: guidance_scale 1 (the teacher runs on B rows like the other roles), so op-by-op (eager)
# executables are shared between settings; a jit would compile every setting anew (tens of seconds on 2 CPUs).
UNGUIDED = {"guidance_scale": 1.0}


def _gen_loss(tiny, gsim=None, generator=None, rng=0, teacher=None):
    graphdef, gen, fake, tch, batch = tiny
    losses = make_gsim_losses({**UNGUIDED, **(gsim or {})}, generator or {}, CFG)
    return losses.generator_loss(graphdef, gen, fake, tch if teacher is None else teacher, batch,
                                 jax.random.PRNGKey(rng))


def _with_null(params, seed):
    """The same parameters with a different null-class embedding (fake_latent)."""
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    tree = jax.tree.structure(params)
    return jax.tree.unflatten(tree, [v + _rand(v.shape, seed) if "fake_latent" in jax.tree_util.keystr(p) else v
                                     for p, v in leaves])


def test_guidance_scale_one_is_the_unguided_teacher(tiny):
    tch = tiny[3]
    l1, m1 = _gen_loss(tiny, {"guidance_scale": 1.0})
    l1b, _ = _gen_loss(tiny, {"guidance_scale": 1.0}, teacher=_with_null(tch, 11))
    assert float(l1) == float(l1b)                          # the null-class branch does not enter
    assert float(m1["guidance"]) == 1.0
    # the guided path is continuous at w = 1 and depends on the null class for w != 1
    l_near, _ = _gen_loss(tiny, {"guidance_scale": 1.0 + 1e-4})
    np.testing.assert_allclose(l_near, l1, rtol=1e-3, atol=1e-4)
    l2a, _ = _gen_loss(tiny, {"guidance_scale": 2.0})
    l2b, _ = _gen_loss(tiny, {"guidance_scale": 2.0}, teacher=_with_null(tch, 11))
    assert abs(float(l2a) - float(l2b)) > 1e-4
    assert abs(float(l2a) - float(l1)) > 1e-4


def test_guidance_schedule_linear_in_the_loss(tiny):
    for rng in range(3):
        _, m = _gen_loss(tiny, {"guidance_scale": 3.0, "guidance_schedule": "linear"}, rng=rng)
        visible = CFG.seq_len - float(m["num_masked"])
        assert float(m["guidance"]) == pytest.approx(1 + 2.0 * visible / CFG.seq_len, rel=1e-6)
        assert CFG.seq_len * 0.7 <= float(m["num_masked"]) <= CFG.seq_len


def test_use_l2_term_false_drops_l2(tiny):
    l_on, m_on = _gen_loss(tiny, {"use_l2_term": True})
    l_off, m_off = _gen_loss(tiny, {"use_l2_term": False})
    assert float(m_off["l2"]) == 0.0 and float(m_on["l2"]) > 0.0
    np.testing.assert_allclose(m_off["l1"], m_on["l1"], rtol=1e-6)
    np.testing.assert_allclose(l_off, m_off["l1"], rtol=1e-6)
    np.testing.assert_allclose(l_on, m_on["l1"] + m_on["l2"], rtol=1e-5)


def test_weighting_and_t_range_in_the_loss(tiny):
    _, m = _gen_loss(tiny, {"weighting": "none"})
    assert float(m["weight"]) == 1.0
    # a single timestep: the kl weight is that step's beta
    _, m = _gen_loss(tiny, {"weighting": "kl", "t_min": 500, "t_max": 500})
    assert float(m["t_lo"]) == 500 and float(m["t_hi"]) == 500
    assert float(m["weight"]) == pytest.approx(CHAIN.betas[500], rel=1e-5)
    _, m_s = _gen_loss(tiny, {"weighting": "sid"})
    _, m_n = _gen_loss(tiny, {"weighting": "none"})
    assert float(m_s["weight"]) > 0 and float(m_s["weight"]) != 1.0
    # sid measures the residual in x0 units: |y| scaled by sigma_t^2 / sqrt(abar_t) (one t: a single factor)
    _, m_s = _gen_loss(tiny, {"weighting": "sid", "t_min": 500, "t_max": 500})
    _, m_n = _gen_loss(tiny, {"weighting": "none", "t_min": 500, "t_max": 500})
    np.testing.assert_allclose(m_s["y_abs"], m_n["y_abs"] * (1 - ABAR[500]) / np.sqrt(ABAR[500]), rtol=1e-5)
    for rng in range(5):
        _, m = _gen_loss(tiny, {"t_min": 300, "t_max": 310}, rng=rng)
        assert 300 <= float(m["t_lo"]) <= float(m["t_hi"]) <= 310


def test_all_distances_and_norms_are_finite_and_distinct(tiny):
    values = {}
    for distance in ("pseudo_huber", "l2", "squared_l2"):
        for norm_axes in ("token", "image"):
            loss, m = _gen_loss(tiny, {"distance": distance, "norm_axes": norm_axes})
            assert np.isfinite(float(loss)) and np.isfinite(float(m["y_abs"]))
            values[distance, norm_axes] = float(loss)
    # squared_l2 is additive over tokens (same masked count per sample): token and image agree
    assert values["squared_l2", "token"] == pytest.approx(values["squared_l2", "image"], rel=1e-4)
    assert values["l2", "token"] != pytest.approx(values["l2", "image"], rel=1e-3)
    # r = 1e-5 makes the pseudo-Huber distance the l2 distance up to r
    assert values["pseudo_huber", "token"] == pytest.approx(values["l2", "token"], rel=1e-3)


def _abs_sums(tree):
    return {jax.tree_util.keystr(p): float(jnp.sum(jnp.abs(g))) for p, g in jax.tree_util.tree_flatten_with_path(tree)[0]}


def test_trainable_head_only_and_frozen_roles(tiny):
    graphdef, gen, fake, tch, batch = tiny
    rng = jax.random.PRNGKey(0)
    mask = trainable_mask(gen, "head_only")
    assert all(jax.tree.leaves(trainable_mask(gen, "all")))
    paths = [(jax.tree_util.keystr(p), m) for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]]
    assert all(m == ("diffloss_net" in p) for p, m in paths) and any(m for _, m in paths)
    # trainable "all": every role's gradient in one call; teacher and fake parameters are frozen
    losses = make_gsim_losses(UNGUIDED, {"trainable": "all"}, CFG)
    g_gen, g_fake, g_tch = jax.grad(lambda *p: losses.generator_loss(graphdef, *p, batch, rng)[0],
                                    (0, 1, 2))(gen, fake, tch)
    assert max(_abs_sums(g_fake).values()) == 0.0 and max(_abs_sums(g_tch).values()) == 0.0
    sums = _abs_sums(g_gen)
    assert sum(v for p, v in sums.items() if "diffloss_net" not in p) > 0
    assert sum(v for p, v in sums.items() if "diffloss_net" in p) > 0
    # head_only: the transformer (everything outside diffloss_net) gets exactly zero gradient
    losses = make_gsim_losses(UNGUIDED, {"trainable": "head_only"}, CFG)
    sums = _abs_sums(jax.grad(lambda p: losses.generator_loss(graphdef, p, fake, tch, batch, rng)[0])(gen))
    assert sum(v for p, v in sums.items() if "diffloss_net" not in p) == 0.0
    assert sum(v for p, v in sums.items() if "diffloss_net" in p) > 0
    # the fake score loss trains phi only (generator samples are stop-gradiented)
    (lf, mf), (gf, gg) = jax.value_and_grad(lambda f, g: losses.fake_score_loss(graphdef, f, g, batch, rng),
                                            (0, 1), has_aux=True)(fake, gen)
    assert max(_abs_sums(gg).values()) == 0.0 and sum(_abs_sums(gf).values()) > 0
    np.testing.assert_allclose(lf, mf["mse"] + mf["vb"], rtol=1e-5)


@pytest.mark.parametrize("noise_scale", [1.0, 0.5])
def test_fake_score_loss_is_mar_diffusion_loss_on_masked_generator_tokens(tiny, noise_scale):
    """...on the generator's one-step tokens from x ~ N(0, noise_scale^2 I) (generator.noise_scale)."""
    graphdef, gen, fake, _, batch = tiny
    losses = make_gsim_losses(UNGUIDED, {"t_init": 700, "noise_scale": noise_scale}, CFG)
    rng = jax.random.PRNGKey(3)
    loss, _ = losses.fake_score_loss(graphdef, fake, gen, batch, rng)
    # recompute by hand with the same key usage
    from marval_jax.models.generator import one_step
    r_ctx, r_gen, r_t, r_eps = jax.random.split(rng, 4)
    b, s, c = batch["tokens"].shape
    mask, _ = sample_context(r_ctx, b, s, 0.7)
    g, f = nnx.merge(graphdef, gen), nnx.merge(graphdef, fake)
    enc_len = losses.enc_len
    zg = g.condition(batch["tokens"], mask, g.class_embedding(batch["labels"]), enc_len=enc_len)
    x_gen = one_step(g.head, noise_scale * jax.random.normal(r_gen, (b * s, c)), zg.reshape(b * s, -1), 700)
    t = jax.random.randint(r_t, (b * s,), 0, 1000)
    eps = jax.random.normal(r_eps, (b * s, c))
    xt = CHAIN.q_sample(x_gen, t, eps)
    zf = f.condition(batch["tokens"], mask, f.class_embedding(batch["labels"]), enc_len=enc_len)
    per = CHAIN.training_losses(f.head(xt, t, zf.reshape(b * s, -1)), x_gen, xt, t, eps)["loss"]
    ref = jnp.sum(per * mask.reshape(-1)) / mask.sum()
    # two programs of one expression: the generator's forward and one-step head, the fake's head, the diffusion
    # loss (32 ops and a mean over token_dim) and the masked mean over b*s tokens (tests/tolerances.py)
    assert_close_to_scale(loss, ref, 2 * mar_depth(CFG) + CFG.token_dim + 32 + b * s)


def test_bad_settings_fail_early():
    """Config errors are UserErrors (one `error:` line at the CLI) naming the field."""
    from marval_jax.user_errors import UserError
    for gsim, generator, field in (({"distance": "huber"}, {}, "gsim.distance"),
                                   ({"t_min": 900, "t_max": 100}, {}, "gsim.t_min"),
                                   ({}, {"trainable": "encoder"}, "generator.trainable"),
                                   ({"trainable": "head_only"}, {}, "unknown gsim fields"),
                                   ({"t_sampling": "beta"}, {}, "gsim.t_sampling"),
                                   ({"t_sampling": "logit_normal", "t_logit_std": 0.0}, {}, "gsim.t_logit_std"),
                                   ({"on_policy_fraction": 1.5}, {}, "gsim.on_policy_fraction"),
                                   ({"on_policy_fraction": 0.5, "on_policy_num_iter": 0}, {},
                                    "gsim.on_policy_num_iter"),
                                   ({"weighting": "sim"}, {}, "gsim.weighting"),
                                   ({}, {"t_init": 1000}, "generator.t_init")):
        with pytest.raises(UserError, match=field):
            make_gsim_losses(gsim, generator, CFG)


@pytest.mark.parametrize("variant", ["tiny", "fmnist", "base", "large", "huge"])
def test_marval_configs_build_the_losses_with_the_documented_defaults(variant):
    from configs import marval
    from marval_jax.models.generator import alpha_bar
    cfg = marval.get_config(variant)
    losses = make_gsim_losses(cfg.gsim, cfg.generator, MARConfig.from_dict(cfg.model.to_dict()))
    st = losses.settings
    assert (st.distance, st.huber_r, st.use_l2_term, st.norm_axes, st.t_min, st.t_max, st.weighting,
            st.guidance_scale, st.guidance_schedule, st.mask_ratio_min, st.trainable) == \
        ("pseudo_huber", 1e-5, True, "token", 20, 980, "none", 1.2, "constant", 0.7, "all")
    assert abs(alpha_bar(st.t_init) - 0.14) < 2e-3 and 740 <= st.t_init <= 770
    assert cfg.gsim.fake_steps_per_generator_step == 1 and cfg.sample.sampler == "onestep"
    lr = 5e-5 if variant == "fmnist" else 1e-5  # the 2.2M-parameter fmnist model takes a larger step (its config)
    for role in (cfg.generator, cfg.fake_score):
        assert (role.lr, role.b1, role.b2, role.weight_decay, role.grad_clip) == (lr, 0.0, 0.999, 0.0, 1.0)
    assert cfg.train.lr == cfg.generator.lr
    assert cfg.generator.ema_decay == 0.999 and cfg.teacher_ckpt == ""
    with pytest.raises(AttributeError):
        cfg.gsim.distanse = "l2"     # locked: typos are errors


def test_causal_mar_roles_condition_in_the_contexts_generation_order(tiny):
    """attention="causal": the context's generation rank (masked positions last) reaches every role's condition, so
    GSIM runs on a causal MAR (it raised for a missing gen_rank before) and equals the hand computation with that
    rank; the bidirectional loss on the same weights differs."""
    import dataclasses
    from marval_jax.models.generator import one_step
    _, gen, fake, tch, batch = tiny
    ccfg = dataclasses.replace(CFG, attention="causal")
    graphdef = nnx.split(MAR(ccfg, rngs=nnx.Rngs(0)))[0]
    b, s, c = batch["tokens"].shape
    r_ctx = jax.random.PRNGKey(5)
    mask, n, rank = sample_context(r_ctx, b, s, 0.7, return_gen_rank=True)
    np.testing.assert_array_equal(mask, sample_context(r_ctx, b, s, 0.7)[0])
    for i in range(b):  # the visible positions were generated before every masked one
        assert int(rank[i][mask[i] < 0.5].max(initial=-1)) < int(rank[i][mask[i] > 0.5].min())
        assert sorted(np.asarray(rank[i]).tolist()) == list(range(s))

    losses = make_gsim_losses(UNGUIDED, {"t_init": 700}, ccfg)
    rng = jax.random.PRNGKey(3)
    loss, _ = losses.fake_score_loss(graphdef, fake, gen, batch, rng)
    r_ctx, r_gen, r_t, r_eps = jax.random.split(rng, 4)
    mask, _, rank = sample_context(r_ctx, b, s, 0.7, return_gen_rank=True)
    g, f = nnx.merge(graphdef, gen), nnx.merge(graphdef, fake)
    zg = g.condition(batch["tokens"], mask, g.class_embedding(batch["labels"]), enc_len=losses.enc_len,
                     gen_rank=rank)
    x_gen = one_step(g.head, jax.random.normal(r_gen, (b * s, c)), zg.reshape(b * s, -1), 700)
    t = jax.random.randint(r_t, (b * s,), 0, 1000)
    eps = jax.random.normal(r_eps, (b * s, c))
    xt = CHAIN.q_sample(x_gen, t, eps)
    zf = f.condition(batch["tokens"], mask, f.class_embedding(batch["labels"]), enc_len=losses.enc_len,
                     gen_rank=rank)
    per = CHAIN.training_losses(f.head(xt, t, zf.reshape(b * s, -1)), x_gen, xt, t, eps)["loss"]
    np.testing.assert_allclose(loss, jnp.sum(per * mask.reshape(-1)) / mask.sum(), rtol=1e-5)
    bidir, _ = make_gsim_losses(UNGUIDED, {"t_init": 700}, CFG).fake_score_loss(tiny[0], fake, gen, batch, rng)
    assert abs(float(bidir) - float(loss)) > 1e-6

    guided = make_gsim_losses({"guidance_scale": 2.0}, {}, ccfg)
    gl, metrics = guided.generator_loss(graphdef, gen, fake, tch, batch, jax.random.PRNGKey(4))
    assert np.isfinite(float(gl)) and float(metrics["guidance"]) == 2.0


@pytest.mark.parametrize("norm_axes", ["token", "image"])
def test_stop_grad_dprime_keeps_the_value_and_drops_the_dprime_gradient(norm_axes):
    """squared_l2: L1 = -2 y.g with y = (eps_p - eps_f)/sigma, g = (eps - eps_f)/sigma. d L1 / d eps_f is
    2 (y + g)/sigma with d'(y) = 2y differentiated and 2 y/sigma with it held (only g moves); same value."""
    b, s, c = 2, 3, 4
    sig = jnp.asarray([[[0.3]], [[0.9]]], jnp.float32)
    eps_p, eps_f, eps = (_rand((b, s, c), 10 + i) for i in range(3))
    y, g = (eps_p - eps_f) / sig, (eps - eps_f) / sig

    def l1(ef, stop):
        return jnp.sum(gsim_terms(eps_p, ef, eps, sig, distance="squared_l2", norm_axes=norm_axes,
                                  stop_grad_dprime=stop)["l1"])

    np.testing.assert_allclose(l1(eps_f, True), l1(eps_f, False), rtol=1e-6)
    # float32 sums of 24 products of O(1 / 0.3^2) terms: relative error ~ 24 * 6e-8
    np.testing.assert_allclose(jax.grad(l1)(eps_f, True), 2 * y / sig, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(jax.grad(l1)(eps_f, False), 2 * (y + g) / sig, rtol=1e-5, atol=1e-5)


def test_l2_weight_is_alpha_and_sids_alpha_maps_to_it():
    """L = L1 + alpha L2; with squared_l2, L1 + alpha L2 = 2 SiD(1 - alpha / 2), so SiD's alpha 1.2 is alpha -0.4."""
    b, s, c = 3, 5, 4
    t = jnp.array([100, 500, 900])
    a = jnp.sqrt(jnp.asarray(ABAR, jnp.float32)[t])[:, None, None]
    sig = jnp.sqrt(1.0 - a ** 2)
    x0, eps, f_p, f_phi = (_rand((b, s, c), i) for i in range(4))
    xt = a * x0 + sig * eps
    eps_p, eps_phi = (xt - a * f_p) / sig, (xt - a * f_phi) / sig
    sid = lambda alpha: ((1 - alpha) * jnp.sum((f_p - f_phi) ** 2, -1) + jnp.sum((f_p - f_phi) * (f_phi - x0), -1)) \
        * (a[..., 0] ** 2 / sig[..., 0] ** 4)
    terms = lambda **kw: gsim_terms(eps_p, eps_phi, eps, sig, distance="squared_l2", **kw)
    np.testing.assert_allclose(terms(l2_weight=-0.4)["loss"], 2 * sid(1.2), rtol=2e-4, atol=1e-4)
    np.testing.assert_allclose(terms(l2_weight=-0.4)["l2"], -0.4 * terms()["l2"], rtol=1e-6)
    np.testing.assert_array_equal(terms(l2_weight=3.0, use_l2_term=False)["l2"], 0.0)   # the shorthand wins


def test_l2_weight_and_stop_grad_dprime_in_the_loss(tiny):
    graphdef, gen, fake, tch, batch = tiny
    _, m1 = _gen_loss(tiny)
    l25, m25 = _gen_loss(tiny, {"l2_weight": 2.5})
    np.testing.assert_allclose(m25["l2"], 2.5 * m1["l2"], rtol=1e-5)
    np.testing.assert_allclose(m25["l1"], m1["l1"], rtol=1e-6)
    np.testing.assert_allclose(l25, m25["l1"] + m25["l2"], rtol=1e-5)
    rng = jax.random.PRNGKey(0)
    grads = {}
    for stop in (False, True):
        losses = make_gsim_losses({**UNGUIDED, "stop_grad_dprime": stop}, {}, CFG)
        (loss, _), grads[stop] = jax.value_and_grad(
            lambda p: losses.generator_loss(graphdef, p, fake, tch, batch, rng), has_aux=True)(gen)
        grads[stop, "loss"] = loss
    np.testing.assert_allclose(grads[True, "loss"], grads[False, "loss"], rtol=1e-6)
    diff = sum(float(jnp.sum(jnp.abs(a - b))) for a, b in zip(jax.tree.leaves(grads[True]),
                                                                 jax.tree.leaves(grads[False])))
    total = sum(float(jnp.sum(jnp.abs(a))) for a in jax.tree.leaves(grads[False]))
    assert diff > 1e-2 * total   # the dropped d'(y) path is a large part of the gradient, not rounding


def test_onestep_predictor_scales_the_input_noise(tiny):
    """The sampler's predictor uses generator.noise_scale like the losses; scale 1 is ar_sampler's predictor."""
    from marval_jax.losses.gsim import onestep_predictor
    from marval_jax.models.generator import one_step
    from marval_jax.sampling import ar_sampler
    graphdef, gen, _, _, _ = tiny
    model = nnx.merge(graphdef, gen)
    zc, rng = _rand((6, CFG.decoder_embed_dim), 5), jax.random.PRNGKey(4)
    np.testing.assert_array_equal(onestep_predictor(700)(model, zc, None, 1.0, rng),
                                  ar_sampler.onestep_predictor(700)(model, zc, None, 1.0, rng))
    noise = jax.random.normal(rng, (6, CFG.token_dim), jnp.float32)
    np.testing.assert_allclose(onestep_predictor(700, 0.5)(model, zc, None, 1.0, rng),
                               one_step(model.head, 0.5 * noise, zc, 700), rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="noise_scale"):
        make_gsim_losses({}, {"noise_scale": 0.0}, CFG)


def test_context_mask_ratio_laws():
    """Counts of masked tokens per law over 2000 keys (tolerances: 4 standard errors of a mean / frequency)."""
    from marval_jax.losses.gsim import min_masked, sample_num_masked
    from marval_jax.sampling.schedule import ar_schedule
    s, n = 16, 2000
    keys = jax.random.split(jax.random.PRNGKey(0), n)
    draw = lambda law, k=64: np.asarray(jax.vmap(lambda r: sample_num_masked(r, s, law, 0.7, k))(keys))
    mar = draw("mar")
    assert mar.min() >= math.ceil(0.7 * s) == min_masked(s, "mar", 0.7) and mar.max() == s
    uni = draw("uniform")    # ceil(S U(0, 1)): uniform on 1..S
    assert uni.min() == 1 == min_masked(s, "uniform", 0.7) and uni.max() == s
    assert abs(uni.mean() - (s + 1) / 2) < 4 * math.sqrt((s * s - 1) / 12 / n)
    before = ar_schedule(s, 4).masked_before         # [16, 14, 11, 6]: masked when each of the K = 4 steps starts
    inf = draw("inference", 4)
    assert set(inf.tolist()) == set(before.tolist()) and min_masked(s, "inference", 0.7, 4) == before.min()
    for v in before:
        assert abs(np.mean(inf == v) - 0.25) < 4 * math.sqrt(0.25 * 0.75 / n)
    mask, k = sample_context(keys[0], 5, s, 0.7, law="uniform")
    np.testing.assert_array_equal(mask.sum(1), int(k))
    with pytest.raises(ValueError, match="context_mask_ratio"):
        make_gsim_losses({"context_mask_ratio": "beta"}, {}, CFG)
    with pytest.raises(ValueError, match="context_num_iter"):
        make_gsim_losses({"context_mask_ratio": "inference", "context_num_iter": CFG.seq_len + 1}, {}, CFG)


def test_context_mask_ratio_in_the_loss(tiny):
    """The law reaches the generator's contexts: the loss's num_masked is the law's draw for its context key (a key
    where both laws give fewer masked tokens than MAR's law allows), and the encoder length fits it."""
    from marval_jax.sampling.schedule import ar_schedule
    s, lo = CFG.seq_len, math.ceil(0.7 * CFG.seq_len)
    for law, extra in (("uniform", {}), ("inference", {"context_num_iter": 4})):
        losses = make_gsim_losses({**UNGUIDED, "context_mask_ratio": law, **extra}, {}, CFG)
        fewest = 1 if law == "uniform" else int(ar_schedule(s, 4).masked_before.min())
        assert losses.enc_len == CFG.buffer_size + s - fewest
        for i in range(50):
            r_ctx = jax.random.split(jax.random.PRNGKey(i), 4)[0]
            expected = int(sample_context(r_ctx, 3, s, 0.7, law=law, num_iter=extra.get("context_num_iter", 64))[1])
            if expected < lo:
                break
        assert expected < lo
        _, m = _gen_loss(tiny, {"context_mask_ratio": law, **extra}, rng=i)
        assert int(m["num_masked"]) == expected


def test_t_sampling_laws():
    """logit_normal against its formula on the same key, and its mass above the range's midpoint: Phi(mean / std)
    within 5 standard errors of a frequency over 20000 draws; the range bounds both laws."""
    from scipy.stats import norm
    key = jax.random.PRNGKey(3)
    t = np.asarray(sample_timesteps(key, (20000,), 20, 980, "logit_normal", 1.0, 0.5))
    u = 1.0 / (1.0 + np.exp(-(1.0 + 0.5 * np.asarray(jax.random.normal(key, (20000,), jnp.float32), np.float64))))
    expected = np.clip(20 + np.floor(u * 961), 20, 980)
    assert np.mean(t == expected) > 0.999   # float32 sigmoid vs float64: a floor boundary may differ by one step
    assert np.max(np.abs(t - expected)) <= 1
    p = norm.cdf(1.0 / 0.5)
    assert abs(np.mean(t >= 500) - p) < 5 * np.sqrt(p * (1 - p) / 20000)
    uni = np.asarray(sample_timesteps(key, (20000,), 20, 980, "uniform"))
    assert abs(np.mean(uni >= 500) - 481 / 961) < 5 * np.sqrt(0.25 / 20000)
    assert t.min() >= 20 and t.max() <= 980


def test_t_sampling_in_the_loss(tiny):
    """gsim.t_sampling reaches the generator loss: logit means of -8 / +8 pin every t to the range's ends."""
    _, lo = _gen_loss(tiny, {"t_sampling": "logit_normal", "t_logit_mean": -8.0, "t_logit_std": 0.01})
    _, hi = _gen_loss(tiny, {"t_sampling": "logit_normal", "t_logit_mean": 8.0, "t_logit_std": 0.01})
    assert float(lo["t_lo"]) == float(lo["t_hi"]) == 20 and float(hi["t_lo"]) == float(hi["t_hi"]) == 980


def test_guided_fake_score(tiny):
    """gsim.guided_fake_score: the fake score's null-class branch enters the loss (only then), and the switch is a
    no-op without teacher guidance (w = 1)."""
    graphdef, gen, fake, tch, batch = tiny
    other = _with_null(fake, 13)

    def loss(fake_params, **gsim):
        losses = make_gsim_losses(gsim, {}, CFG)
        return float(losses.generator_loss(graphdef, gen, fake_params, tch, batch, jax.random.PRNGKey(0))[0])
    assert loss(fake, guidance_scale=2.0) == loss(other, guidance_scale=2.0)
    on = loss(fake, guidance_scale=2.0, guided_fake_score=True)
    assert abs(on - loss(other, guidance_scale=2.0, guided_fake_score=True)) > 1e-4
    assert abs(on - loss(fake, guidance_scale=2.0)) > 1e-4
    assert loss(fake, guidance_scale=1.0, guided_fake_score=True) == loss(fake, guidance_scale=1.0)


def test_on_policy_fraction_replaces_the_context_tokens(tiny):
    """gsim.on_policy_fraction 2/3 of a batch of 3: samples 0 and 1 take their context tokens from the generator's
    rollouts (their data tokens no longer matter), sample 2 keeps its data tokens; fraction 0 uses all of them."""
    graphdef, gen, fake, tch, batch = tiny
    built = {f: make_gsim_losses({**UNGUIDED, "on_policy_fraction": f}, {}, CFG) for f in (0.0, 2 / 3)}

    def loss(frac, changed):
        shift = np.zeros(batch["tokens"].shape, np.float32)
        shift[changed] = 1.0
        tokens = batch["tokens"] + shift
        losses = built[frac]   # one rollout sampler compile per setting
        return float(losses.generator_loss(graphdef, gen, fake, tch, {**batch, "tokens": tokens},
                                           jax.random.PRNGKey(0))[0])
    ref = loss(2 / 3, [])
    assert loss(2 / 3, [0, 1]) == ref
    assert abs(loss(2 / 3, [2]) - ref) > 1e-6
    assert abs(loss(0.0, [0]) - loss(0.0, [])) > 1e-6


def test_fake_init_params(tiny):
    """fake_score.init: "teacher" copies the teacher; "fresh_head" keeps the teacher's transformer and takes every
    diffloss_net leaf from the fresh init."""
    from marval_jax.losses.gsim import HEAD_MODULE, fake_init_params
    from marval_jax.user_errors import UserError
    _, fresh, _, tch, _ = tiny
    assert fake_init_params(tch, fresh, "teacher") is tch
    out = fake_init_params(tch, fresh, "fresh_head")
    n_head = 0
    for (path, o), t, f in zip(jax.tree_util.tree_flatten_with_path(out)[0], jax.tree.leaves(tch),
                               jax.tree.leaves(fresh)):
        is_head = HEAD_MODULE in jax.tree_util.keystr(path)
        n_head += is_head
        np.testing.assert_array_equal(o, f if is_head else t)
    assert 0 < n_head < len(jax.tree.leaves(out))
    with pytest.raises(UserError, match="fake_score.init"):
        fake_init_params(tch, fresh, "shared")


def test_student_cfg_guides_the_one_head_call(tiny):
    """sample.cfg != 1 for the one-step sampler: eps_u + w (eps_c - eps_u) at the same input, i.e. the x0's
    combine as x0_u + w (x0_c - x0_u) (the one-step map is affine in eps); w = 1 is the conditional sample.
    Bound: float32 rounding of a few O(1) terms (x0 ~ |x| / sqrt(abar) ~ 3) - 1e-5 is ~100 eps of that scale."""
    from marval_jax.losses.gsim import onestep_predictor
    graphdef, gen, _, _, _ = tiny
    model = nnx.merge(graphdef, gen)
    zc, zu, rng = _rand((6, CFG.decoder_embed_dim), 5), _rand((6, CFG.decoder_embed_dim), 6), jax.random.PRNGKey(4)
    pred = onestep_predictor(700, 0.8)
    x_c, x_u = pred(model, zc, None, 1.0, rng), pred(model, zu, None, 1.0, rng)
    np.testing.assert_allclose(pred(model, zc, zu, jnp.float32(1.5), rng), x_u + 1.5 * (x_c - x_u),
                               rtol=0, atol=1e-5)
    np.testing.assert_allclose(pred(model, zc, zu, jnp.float32(1.0), rng), x_c, rtol=0, atol=1e-5)
    assert float(jnp.max(jnp.abs(x_c - x_u))) > 1e-3   # the branches differ: the check has power


def test_numeric_switches_traced_share_one_program(tiny):
    """Under `traced_switches` the real-valued switches are arguments of the program, not constants: two settings
    that differ only in them lower to the same program (one compile for an ablation over them), and give the loss
    the settings give as constants, up to the rounding of constant folding."""
    from marval_jax.losses.gsim import settings_from_config, switch_values, traced_switches
    graphdef, gen, fake, tch, batch = tiny
    rng = jax.random.PRNGKey(0)
    runs = {"a": {"guidance_scale": 1.2, "l2_weight": 1.0, "huber_r": 1e-5, "t_min": 20},
            "b": {"guidance_scale": 2.0, "l2_weight": 0.0, "huber_r": 1e-3, "t_min": 100}}
    texts, losses = {}, {}
    for name, gsim in runs.items():
        gl = make_gsim_losses(gsim, {"noise_scale": 0.8 if name == "b" else 1.0}, CFG)
        values = switch_values(settings_from_config(gsim, {"noise_scale": 0.8 if name == "b" else 1.0}, CFG))

        def traced(sw, gl=gl):
            with traced_switches(sw):
                return gl.generator_loss(graphdef, gen, fake, tch, batch, rng)[0]

        texts[name] = jax.jit(traced).lower(values).as_text()
        texts[name, "const"] = jax.jit(lambda gl=gl: gl.generator_loss(graphdef, gen, fake, tch, batch, rng)[0]
                                       ).lower().as_text()
        losses[name] = (float(jax.jit(traced)(values)), float(gl.generator_loss(graphdef, gen, fake, tch, batch,
                                                                                   rng)[0]))
    assert texts["a"] == texts["b"]
    assert texts["a", "const"] != texts["b", "const"]
    for traced_loss, const_loss in losses.values():
        # one MAR pass per role and the mean over the batch's tokens: the reassociation bound of that chain
        assert_close_to_scale(traced_loss, const_loss, mar_depth(CFG) + batch["tokens"].size)
    assert abs(losses["a"][0] - losses["b"][0]) > 1e-3 * abs(losses["a"][0])   # the values did reach the loss
