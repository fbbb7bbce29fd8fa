"""GSIM's `generator_loss` / `fake_score_loss` themselves, on a model whose every role is known in closed form.

`GaussianRoles` is an nnx.Module with the interface the losses call on a MAR (`class_embedding`, `condition`,
`head`): token data of class k is N(m_k, s_k^2 I_C) independently of the context, and `head(x, t, z)` is the exact
epsilon-prediction of that distribution diffused to chain step t,

    eps(x, t) = sigma_t (x - a_t m) / v,   v = a_t^2 s^2 + sigma_t^2,   a_t = sqrt(abar_t), sigma_t = sqrt(1 - abar_t).

Used as the generator (one head call at t_init on x ~ N(0, I), `one_step`), it is a location-scale generator with
learnable mean and scale: x0 = loc + scale x, loc = sigma_i^2 m / v_i, scale = a_i s^2 / v_i (i = t_init). Used as
the fake score with (m, s) = (loc, scale) it is the exact student score; as the teacher, the exact class / null-class
scores. Everything the tests compare against is written here from these formulas, not with the module's helpers.
"""
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import special

from marval_jax.diffusion.gaussian import GaussianDiffusion
from marval_jax.losses.gsim import make_gsim_losses
from marval_jax.models.mar import MARConfig
from tolerances import ULP_TRANSCENDENTAL, assert_close_to_scale

CHAIN = GaussianDiffusion.create("")
ABAR64 = np.asarray(CHAIN.alphas_cumprod, np.float64)
BETA64 = np.asarray(CHAIN.betas, np.float64)
# seq_len 4, token_dim 2, 2 classes (+ the null row); only the shapes and enc_len of the config are read
CFG = MARConfig(img_size=2, vae_stride=1, patch_size=1, vae_embed_dim=2, buffer_size=1, class_num=2,
                encoder_embed_dim=8, encoder_depth=1, encoder_num_heads=1, decoder_embed_dim=8, decoder_depth=1,
                decoder_num_heads=1, diffloss_d=1, diffloss_w=8)
S, C, K = CFG.seq_len, CFG.token_dim, CFG.class_num
T_INIT, T_MIN, T_MAX, HUBER_R = 760, 20, 980, 1e-5


class GaussianRoles(nnx.Module):
    """Row k < K of `mean` / `log_scale`: class k; row K: the null class."""

    def __init__(self, mean, log_scale):
        self.mean = nnx.Param(jnp.asarray(mean, jnp.float32))            # (K + 1, C)
        self.log_scale = nnx.Param(jnp.asarray(log_scale, jnp.float32))  # (K + 1,)

    def class_embedding(self, labels, batch=None):
        if labels is None:
            return jnp.broadcast_to(jax.nn.one_hot(K, K + 1), (batch, K + 1))
        return jax.nn.one_hot(labels, K + 1)

    def condition(self, tokens, mask, class_emb, *, enc_len, gen_rank=None, rng=None):
        return jnp.broadcast_to(class_emb[:, None, :], tokens.shape[:2] + class_emb.shape[-1:])

    def head(self, x, t, z):
        m = z @ self.mean[...]
        s2 = jnp.exp(2.0 * (z @ self.log_scale[...]))[:, None]
        abar = jnp.asarray(ABAR64, jnp.float32)[t][:, None]
        eps = jnp.sqrt(1.0 - abar) * (x - jnp.sqrt(abar) * m) / (abar * s2 + 1.0 - abar)
        return jnp.concatenate([eps, jnp.zeros_like(eps)], axis=-1)


TEACHER_MEAN = np.array([[0.5, -0.3], [-0.4, 0.2], [0.1, 0.0]])
TEACHER_LOG_SCALE = np.log([0.6, 0.8, 1.0])
GEN_MEAN = np.array([[0.2, 0.4], [0.3, -0.5], [0.0, 0.0]])
GEN_LOG_SCALE = np.log([1.5, 1.2, 1.0])


def generator_distribution(mean, log_scale):
    """(loc, scale) of the one-step generator's x0 = loc + scale * x, x ~ N(0, I), from its head's (m, s)."""
    ai, sig2 = np.sqrt(ABAR64[T_INIT]), 1.0 - ABAR64[T_INIT]
    s2 = np.exp(2.0 * np.asarray(log_scale, np.float64))
    v = ai ** 2 * s2 + sig2
    return sig2 * np.asarray(mean, np.float64) / v[:, None], ai * s2 / v


def roles(gen_mean=GEN_MEAN, gen_log_scale=GEN_LOG_SCALE):
    """(graphdef, generator, fake = the exact student score, teacher) parameter states."""
    graphdef, gen = nnx.split(GaussianRoles(gen_mean, gen_log_scale))
    loc, scale = generator_distribution(gen_mean, gen_log_scale)
    _, fake = nnx.split(GaussianRoles(loc, np.log(scale)))
    _, teacher = nnx.split(GaussianRoles(TEACHER_MEAN, TEACHER_LOG_SCALE))
    return graphdef, gen, fake, teacher


LABELS = np.arange(64) % K
BATCH = {"tokens": jnp.asarray(np.random.default_rng(0).normal(size=(len(LABELS), S, C)), jnp.float32),
         "labels": jnp.asarray(LABELS, jnp.int32)}


# -- the true objective in closed form (float64) ------------------------------------------------------------------
def rice_mean(nu, sd):
    """E|y| for y ~ N(mu, sd^2 I_2), |mu| = nu (the Rice distribution's mean)."""
    k = nu ** 2 / (2.0 * sd ** 2)
    return sd * np.sqrt(np.pi / 2.0) * ((1.0 + k) * special.i0e(k / 2.0) + k * special.i1e(k / 2.0))


def true_objective(gen_mean, gen_log_scale, w, labels=LABELS):
    """J = mean over the batch's labels and t ~ U{T_MIN..T_MAX} of E_{x_t ~ q_t} |s_q(x_t) - s_p^w(x_t)|.

    s_q: score of the generator's diffused distribution N(a loc, v_q I); s_p^w = (1 - w) s_u + w s_c (the guided
    teacher in score units). Both affine in x_t, so y = alpha x_t + beta is isotropic Gaussian: E|y| is Rice's mean.
    The pseudo-Huber d(y) = sqrt(|y|^2 + r^2) - r differs from |y| - r by at most r^2 / (2|y|): nothing at r = 1e-5.
    """
    loc, scale = generator_distribution(gen_mean, gen_log_scale)
    t = np.arange(T_MIN, T_MAX + 1)
    a2 = ABAR64[t][:, None]
    a, sig2 = np.sqrt(a2), 1.0 - a2
    m_p, s2_p = TEACHER_MEAN, np.exp(2.0 * TEACHER_LOG_SCALE)
    out = []
    for c in range(K):
        v_q = a2 * scale[c] ** 2 + sig2
        v_c, v_u = a2 * s2_p[c] + sig2, a2 * s2_p[K] + sig2
        alpha = -1.0 / v_q + (1.0 - w) / v_u + w / v_c
        beta = a * loc[c] / v_q - a * (1.0 - w) * m_p[K] / v_u - a * w * m_p[c] / v_c      # (T, C)
        nu = np.linalg.norm(alpha * a * loc[c] + beta, axis=-1)
        sd = np.abs(alpha[:, 0]) * np.sqrt(v_q[:, 0])
        out.append(np.mean(rice_mean(nu, sd)))
    return float(np.mean(np.asarray(out)[np.asarray(labels)]))


def true_gradient(w, h=1e-6):
    """Central differences of `true_objective` in float64 (truncation ~h^2, rounding ~1e-16 / h: both < 1e-9)."""
    grads = {}
    for name, base in (("mean", GEN_MEAN), ("log_scale", GEN_LOG_SCALE)):
        g = np.zeros_like(base)
        for idx in np.ndindex(base.shape):
            up, down = base.copy(), base.copy()
            up[idx] += h
            down[idx] -= h
            args_up = (up, GEN_LOG_SCALE) if name == "mean" else (GEN_MEAN, up)
            args_down = (down, GEN_LOG_SCALE) if name == "mean" else (GEN_MEAN, down)
            g[idx] = (true_objective(*args_up, w) - true_objective(*args_down, w)) / (2 * h)
        grads[name] = g
    return grads


# -- Monte-Carlo gradient of the module's generator_loss ------------------------------------------------------------
N_CALLS = 1024


@functools.lru_cache(maxsize=None)
def loss_gradients(w, distance="pseudo_huber", mutant_seed=0):
    """Per-call gradients of generator_loss in the generator's parameters: N_CALLS independent keys, batch of 64."""
    graphdef, gen, fake, teacher = roles()
    losses = make_gsim_losses({"guidance_scale": w, "distance": distance, "huber_r": HUBER_R, "t_min": T_MIN,
                               "t_max": T_MAX, "mask_ratio_min": 0.7}, {"t_init": T_INIT}, CFG)

    @jax.jit
    def per_call(keys):
        grad = jax.grad(lambda p, k: losses.generator_loss(graphdef, p, fake, teacher, BATCH, k)[0])
        return jax.vmap(lambda k: grad(gen, k))(keys)

    g = per_call(jax.random.split(jax.random.PRNGKey(mutant_seed), N_CALLS))
    return {name: np.asarray(getattr(g, name)[...], np.float64) for name in ("mean", "log_scale")}


def _z(samples, exact):
    """(MC mean - exact) in standard errors of the MC mean, for the coordinates the generator's classes own."""
    mean, se = samples.mean(0), samples.std(0) / math.sqrt(len(samples))
    return (mean - exact)[:K] / se[:K], exact[:K] / se[:K]


@pytest.mark.parametrize("w", [1.0, 1.2])
def test_generator_loss_gradient_is_the_true_objective_gradient(w):
    """grad of generator_loss (L1 + L2, pseudo-Huber, fake = exact student score) = grad J in expectation, for a
    learnable mean AND scale, on the unguided (w = 1: no null-class pass) and the guided (w = 1.2) teacher path.

    N_CALLS independent calls: the per-call gradients are iid, so each coordinate's MC mean is ~N(exact, SE^2);
    12 coordinates (4 means + 2 scales per w), |z| < 4.5 holds with probability 1 - 1e-4 under a correct loss.
    """
    mc = loss_gradients(w)
    exact = true_gradient(w)
    for name in ("mean", "log_scale"):
        z, signal = _z(mc[name], exact[name])
        print(f"w={w} {name}: mc {mc[name].mean(0)[:K].ravel()} exact {exact[name][:K].ravel()} z {z.ravel()}")
        assert np.all(np.abs(z) < 4.5), (w, name, z)
        assert np.all(np.abs(signal) > 20.0), (w, name, signal)   # the gradient itself is resolved: power
    # the generator does not own the null row
    np.testing.assert_array_equal(mc["mean"][:, K], 0.0)


def _generator_draws(gen_mean, gen_log_scale, batch, rng):
    """The loss's random draws, in its key order (context / generator noise / t / eps): (mask, x0, t, r_eps, b), x0
    the closed-form one-step generator's tokens on the masked positions and the data elsewhere."""
    from marval_jax.losses.gsim import sample_context
    r_ctx, r_gen, r_t, r_eps = jax.random.split(rng, 4)
    tokens, labels = batch["tokens"], batch["labels"]
    b = tokens.shape[0]
    mask, _ = sample_context(r_ctx, b, S, 0.7)
    ai2 = float(ABAR64[T_INIT])
    s2 = jnp.exp(2.0 * gen_log_scale)
    loc = (1.0 - ai2) * gen_mean / (ai2 * s2 + 1.0 - ai2)[:, None]
    scale = np.sqrt(ai2) * s2 / (ai2 * s2 + 1.0 - ai2)
    noise = jax.random.normal(r_gen, (b * S, C)).reshape(b, S, C)
    x0 = jnp.where(mask[..., None] > 0.5, loc[labels][:, None] + scale[labels][:, None, None] * noise, tokens)
    t = jax.random.randint(r_t, (b,), T_MIN, T_MAX + 1)
    return mask, x0, t, r_eps, b


# -- the loss value and gradient against a reimplementation from the formulas --------------------------------------
def reference_generator_loss(gen_mean, gen_log_scale, fake, teacher, batch, rng, *, w, weighting, distance,
                             use_l2_term=True):
    """generator_loss written from docs/gsim.md's equations on the closed-form roles (same random draws: the key is
    split into context / generator noise / t / eps as the loss does; the context is `sample_context`'s)."""
    mask, x0, t, r_eps, b = _generator_draws(gen_mean, gen_log_scale, batch, rng)
    labels = batch["labels"]
    eps = jax.random.normal(r_eps, (b, S, C))
    abar = jnp.asarray(ABAR64, jnp.float32)[t][:, None, None]
    a, sig2 = jnp.sqrt(abar), 1.0 - abar
    xt = a * x0 + jnp.sqrt(sig2) * eps

    def score(params, k):   # exact score of N(m_k, s_k^2) diffused to t
        m, ls = params["mean"][...][k][:, None], params["log_scale"][...][k][:, None, None]
        return -(xt - a * m) / (abar * jnp.exp(2.0 * ls) + sig2)

    null = jnp.full_like(labels, K)
    s_p = (1.0 - w) * score(teacher, null) + w * score(teacher, labels)
    s_phi = score(fake, labels)
    unit = sig2 / a if weighting == "sid" else jnp.ones_like(a)    # sid: residuals in x0 units
    y = unit * (s_phi - s_p)                                        # = f_phi - f_p for sid
    g = unit * (s_phi + eps / jnp.sqrt(sig2))                       # s_phi - grad log q(x_t | x0); = f_phi - x0 for sid
    sq = jnp.sum(y * y, -1)
    if distance == "squared_l2":
        d, dprime = sq, 2.0 * y
    else:
        root = jnp.sqrt(sq + HUBER_R ** 2)
        d, dprime = root - HUBER_R, y / root[..., None]
    per_token = -jnp.sum(dprime * g, -1) + (d if use_l2_term else 0.0)
    if weighting == "kl":
        per_token = per_token * jnp.asarray(BETA64, jnp.float32)[t][:, None]
    if weighting == "sid":
        f_p = (xt + sig2 * s_p) / a
        norm = jnp.maximum(jnp.mean(jnp.abs(jax.lax.stop_gradient(x0 - f_p)), -1), 1e-5)
        per_token = per_token / norm
    return jnp.sum(per_token * mask) / jnp.sum(mask)


def sid_published(gen_mean, gen_log_scale, fake, teacher, batch, rng, *, w, alpha):
    """SiD's generator loss (Zhou et al. 2024, the released sid_loss.py) in x0 units, per token here:
    (f_p - f_phi) . ((f_p - x0) - alpha (f_p - f_phi)) / mean|x0 - f_p| (normaliser detached), mean over masked tokens.
    """
    mask, x0, t, r_eps, b = _generator_draws(gen_mean, gen_log_scale, batch, rng)
    labels = batch["labels"]
    abar = jnp.asarray(ABAR64, jnp.float32)[t][:, None, None]
    xt = jnp.sqrt(abar) * x0 + jnp.sqrt(1.0 - abar) * jax.random.normal(r_eps, (b, S, C))

    def denoiser(params, k):   # Tweedie: E[x0 | x_t] of N(m_k, s_k^2) = m + a s^2 (x_t - a m) / v
        m, ls = params["mean"][...][k][:, None], params["log_scale"][...][k][:, None, None]
        s2k = jnp.exp(2.0 * ls)
        return m + jnp.sqrt(abar) * s2k * (xt - jnp.sqrt(abar) * m) / (abar * s2k + 1.0 - abar)

    f_p = (1.0 - w) * denoiser(teacher, jnp.full_like(labels, K)) + w * denoiser(teacher, labels)
    f_phi = denoiser(fake, labels)
    norm = jnp.maximum(jnp.mean(jnp.abs(jax.lax.stop_gradient(x0 - f_p)), -1), 1e-5)
    per_token = jnp.sum((f_p - f_phi) * ((f_p - x0) - alpha * (f_p - f_phi)), -1) / norm
    return jnp.sum(per_token * mask) / jnp.sum(mask)


def _gen_value_and_grad(settings, rng):
    graphdef, gen, fake, teacher = roles()
    losses = make_gsim_losses({"huber_r": HUBER_R, "t_min": T_MIN, "t_max": T_MAX, **settings},
                              {"t_init": T_INIT}, CFG)
    return jax.jit(jax.value_and_grad(
        lambda p: losses.generator_loss(graphdef, p, fake, teacher, BATCH, rng)[0]))(gen)


# Two float32 programs of one expression (tests/tolerances.py): per token ~20 dependent operations (the guided
# teacher, x_t, the residual, the distance) of which 4 transcendentals (exp of the log-scale, sqrt, the distance's
# sqrt, the weighting's division counted as one), then the mean over <= 256 tokens; the gradient runs the chain
# back (x3) and sums over the tokens. Value on its own scale, each gradient leaf on max|leaf|.
FWD_DEPTH = 20 + 4 * ULP_TRANSCENDENTAL + 256
GRAD_DEPTH = 3 * FWD_DEPTH + 256


def _assert_value_and_grad(val, grad, ref_val, ref_grad):
    assert_close_to_scale(val, ref_val, FWD_DEPTH)
    assert_close_to_scale(grad["mean"][...], ref_grad[0], GRAD_DEPTH)
    assert_close_to_scale(grad["log_scale"][...], ref_grad[1], GRAD_DEPTH)


@pytest.mark.parametrize("w,weighting,distance", [
    (1.0, "none", "pseudo_huber"), (1.2, "none", "pseudo_huber"), (1.2, "kl", "squared_l2"),
    (1.2, "sid", "pseudo_huber"), (1.2, "sid", "squared_l2")])
def test_generator_loss_value_and_gradient_match_the_formulas(w, weighting, distance):
    """Value AND gradient (in the generator's mean and scale) of generator_loss equal the reimplementation for the
    same key: the weighting's units (kl: beta_t on score units; sid: x0-unit residual / mean|x0 - f_p|), the guided
    teacher (gradient through x_t into both branches) and d'(y) with its gradient are pinned deterministically."""
    rng = jax.random.PRNGKey(5)
    val, grad = _gen_value_and_grad({"guidance_scale": w, "weighting": weighting, "distance": distance}, rng)
    _, _, fake, teacher = roles()
    ref_val, ref_grad = jax.value_and_grad(
        lambda m, ls: reference_generator_loss(m, ls, fake, teacher, BATCH, rng, w=w, weighting=weighting,
                                               distance=distance), (0, 1))(
        jnp.asarray(GEN_MEAN, jnp.float32), jnp.asarray(GEN_LOG_SCALE, jnp.float32))
    _assert_value_and_grad(val, grad, ref_val, ref_grad)


@pytest.mark.parametrize("use_l2_term,alpha", [(True, 0.5), (False, 1.0)])
def test_sid_weighting_is_sids_published_loss(use_l2_term, alpha):
    """weighting="sid" with squared_l2 is 2 x SiD's released generator loss with alpha = 0.5 (alpha = 1 without
    L2): the residual in x0 units, f_phi - f_p = sigma_t^2 / sqrt(abar_t) (s_phi - s_p), and SiD's normaliser."""
    rng = jax.random.PRNGKey(6)
    val, grad = _gen_value_and_grad({"guidance_scale": 1.2, "weighting": "sid", "distance": "squared_l2",
                                     "use_l2_term": use_l2_term}, rng)
    _, _, fake, teacher = roles()
    ref_val, ref_grad = jax.value_and_grad(
        lambda m, ls: 2.0 * sid_published(m, ls, fake, teacher, BATCH, rng, w=1.2, alpha=alpha), (0, 1))(
        jnp.asarray(GEN_MEAN, jnp.float32), jnp.asarray(GEN_LOG_SCALE, jnp.float32))
    _assert_value_and_grad(val, grad, ref_val, ref_grad)


# -- kl: the exact KL of two Gaussians -----------------------------------------------------------------------------
def test_kl_weighting_sums_to_the_exact_kl_of_two_gaussians():
    """With squared_l2, sum_t 1/2 gsim_weights("kl", t) E|s_q,t - s_p,t|^2 over the 1000-step chain estimates
    KL(q_0 || p_0) = 1/2 int beta(tau) E|grad log q_tau - grad log p_tau|^2 dtau (+ KL(q_T || p_T)).

    q_0 = N(1, 0.6^2), p_0 = N(-0.5, 1): KL = 1.3158; the beta_t-weighted sum is 1.3097 (the old beta_t / sigma_t^2
    weight gave 16.9). Tolerance from the discretisation, not fitted: step t spans dlambda_t = -log(1 - beta_t) of
    lambda = -log abar, on which the integrand moves by at most |h_t - h_{t-1}|, so
    |sum - KL| <= sum |dlambda_t - beta_t| h_t + sum dlambda_t |h_t - h_{t-1}| + KL(q_T || p_T)   (= 0.0095 here).
    """
    from marval_jax.losses.gsim import gsim_weights
    mq, sq, mp, sp = 1.0, 0.6, -0.5, 1.0

    def kl(m1, s1, m2, s2):
        return np.log(s2 / s1) + (s1 ** 2 + (m1 - m2) ** 2) / (2 * s2 ** 2) - 0.5

    def half_sq_residual(abar):   # 1/2 E_{q_t} |s_q - s_p|^2, both scores affine in x_t
        a = np.sqrt(abar)
        v_q, v_p = abar * sq ** 2 + 1 - abar, abar * sp ** 2 + 1 - abar
        slope, offset = -1 / v_q + 1 / v_p, a * mq / v_q - a * mp / v_p
        return 0.5 * ((slope * a * mq + offset) ** 2 + slope ** 2 * v_q)

    t = np.arange(1000)
    h = half_sq_residual(ABAR64)
    weight = np.asarray(gsim_weights("kl", t=jnp.asarray(t)), np.float64)
    estimate = float(np.sum(weight * h))
    exact = kl(mq, sq, mp, sp)
    dlam = -np.log1p(-BETA64)
    h_prev = np.concatenate([[half_sq_residual(1.0)], h[:-1]])
    a_t, abar_t = np.sqrt(ABAR64[-1]), ABAR64[-1]
    kl_end = kl(a_t * mq, np.sqrt(abar_t * sq ** 2 + 1 - abar_t), a_t * mp, np.sqrt(abar_t * sp ** 2 + 1 - abar_t))
    tol = np.sum(np.abs(dlam - BETA64) * h) + np.sum(dlam * np.abs(h - h_prev)) + kl_end
    print(f"KL {exact:.4f} weighted sum {estimate:.4f} tolerance {tol:.4f}")
    assert abs(estimate - exact) <= tol, (estimate, exact, tol)
    assert tol < 0.01 * exact   # the bound is tight enough to mean something


# -- the fake score's loss in closed form --------------------------------------------------------------------------
FAKE_MEAN = np.array([[0.0, 0.1], [0.2, 0.0], [0.0, 0.0]])
FAKE_LOG_SCALE = np.log([0.9, 0.7, 1.0])


def fake_mse_closed_form(fake_mean, fake_log_scale):
    """E over t ~ U{0..999}, x0 ~ the generator, eps of mean_c (eps - eps_phi(x_t))^2, eps_phi the head with the
    fake's (m_f, s_f): eps - eps_phi = eps (1 - sig^2/v_f) - sig a scale n / v_f - sig a (loc - m_f) / v_f."""
    loc, scale = generator_distribution(GEN_MEAN, GEN_LOG_SCALE)
    abar = ABAR64[:, None]
    a, sig = np.sqrt(abar), np.sqrt(1.0 - abar)
    out = []
    for c in range(K):
        v_f = abar * np.exp(2.0 * fake_log_scale[c]) + sig ** 2
        per_t = ((1 - sig ** 2 / v_f) ** 2 + (sig * a * scale[c] / v_f) ** 2
                 + np.mean((sig * a * (loc[c] - fake_mean[c]) / v_f) ** 2, axis=-1, keepdims=True))
        out.append(np.mean(per_t))
    return float(np.mean(np.asarray(out)[LABELS]))


def test_fake_score_loss_is_the_denoising_loss_of_the_generators_samples():
    """fake_score_loss's epsilon-MSE and its gradient in the fake's (m, s) against the closed form over the
    generator's distribution (MC over N_CALLS keys; |z| < 4.5 for 7 quantities). The VB term trains only the
    variance channels, which the closed-form head does not have, so the gradient is the MSE's."""
    graphdef, gen, _, _ = roles()
    _, fake = nnx.split(GaussianRoles(FAKE_MEAN, FAKE_LOG_SCALE))
    losses = make_gsim_losses({"guidance_scale": 1.0}, {"t_init": T_INIT}, CFG)

    @jax.jit
    def per_call(keys):
        f = jax.value_and_grad(lambda p, k: losses.fake_score_loss(graphdef, p, gen, BATCH, k), has_aux=True)
        return jax.vmap(lambda k: f(fake, k))(keys)

    (_, metrics), grads = per_call(jax.random.split(jax.random.PRNGKey(9), N_CALLS))
    mse = metrics["mse"]
    mse = np.asarray(mse, np.float64)
    exact = fake_mse_closed_form(FAKE_MEAN, FAKE_LOG_SCALE)
    z = (mse.mean() - exact) / (mse.std() / math.sqrt(N_CALLS))
    print(f"fake mse: mc {mse.mean():.5f} exact {exact:.5f} z {z:.2f}")
    assert abs(z) < 4.5
    h = 1e-6
    for name, base in (("mean", FAKE_MEAN), ("log_scale", FAKE_LOG_SCALE)):
        g = np.asarray(getattr(grads, name)[...], np.float64)
        for idx in np.ndindex(base[:K].shape):
            up, down = base.copy(), base.copy()
            up[idx] += h
            down[idx] -= h
            args = ((up, FAKE_LOG_SCALE), (down, FAKE_LOG_SCALE)) if name == "mean" else \
                ((FAKE_MEAN, up), (FAKE_MEAN, down))
            exact_g = (fake_mse_closed_form(*args[0]) - fake_mse_closed_form(*args[1])) / (2 * h)
            zg = (g[(slice(None),) + idx].mean() - exact_g) / (g[(slice(None),) + idx].std() / math.sqrt(N_CALLS))
            print(f"  d mse / d {name}{idx}: mc {g[(slice(None),) + idx].mean():.5f} exact {exact_g:.5f} z {zg:.2f}")
            assert abs(zg) < 4.5, (name, idx, zg)
