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
