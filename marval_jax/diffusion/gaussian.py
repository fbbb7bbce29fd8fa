"""Gaussian diffusion exactly as MAR's (IDDPM / DiT `gaussian_diffusion.py` + `respace.py`).

Cosine schedule over 1000 steps, epsilon prediction with learned-range variance, MSE + VB loss (the VB term in bits
with the epsilon stop-gradiented, the t = 0 discretized decoder NLL), respacing by "100" / "25,25" / "ddim50"
strings, p_mean_variance without clipping, and the reverse chain with temperature on the per-step noise only.

Schedules are computed in float64 with numpy (host constants); per-timestep lookups are cast to float32, like the
reference's `_extract_into_tensor`. The model is always called with the index in the ORIGINAL 1000-step chain
(`timestep_map`), never rescaled.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

NUM_TRAIN_TIMESTEPS = 1000


def cosine_betas(num_timesteps: int = NUM_TRAIN_TIMESTEPS, max_beta: float = 0.999) -> np.ndarray:
    def alpha_bar(s):
        return math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
    return np.array([min(1 - alpha_bar((i + 1) / num_timesteps) / alpha_bar(i / num_timesteps), max_beta)
                     for i in range(num_timesteps)], dtype=np.float64)


def space_timesteps(num_timesteps: int, section_counts: str | list[int]) -> set[int]:
    """Timesteps kept by a respacing string: "100", "10,15,20" (per equal section) or "ddimN"."""
    if isinstance(section_counts, str):
        if section_counts.startswith("ddim"):
            desired = int(section_counts[len("ddim"):])
            for stride in range(1, num_timesteps):
                if len(range(0, num_timesteps, stride)) == desired:
                    return set(range(0, num_timesteps, stride))
            raise ValueError(f"cannot create exactly {desired} steps with an integer stride")
        try:
            section_counts = [int(x) for x in section_counts.split(",")]
        except ValueError:
            raise ValueError(f"bad respacing string {section_counts!r}: use '100', '10,20' or 'ddim50'") from None
    size_per, extra = divmod(num_timesteps, len(section_counts))
    start, steps = 0, []
    for i, count in enumerate(section_counts):
        size = size_per + (1 if i < extra else 0)
        if size < count:
            raise ValueError(f"cannot divide section of {size} steps into {count}")
        stride = 1 if count <= 1 else (size - 1) / (count - 1)
        cur = 0.0
        for _ in range(count):
            steps.append(start + round(cur))
            cur += stride
        start += size
    return set(steps)


def normal_kl(mean1, logvar1, mean2, logvar2):
    return 0.5 * (-1.0 + logvar2 - logvar1 + jnp.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * jnp.exp(-logvar2))


def approx_standard_normal_cdf(x):
    return 0.5 * (1.0 + jnp.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3)))


def discretized_gaussian_log_likelihood(x, means, log_scales):
    centered = x - means
    inv_stdv = jnp.exp(-log_scales)
    cdf_plus = approx_standard_normal_cdf(inv_stdv * (centered + 1.0 / 255.0))
    cdf_min = approx_standard_normal_cdf(inv_stdv * (centered - 1.0 / 255.0))
    log_cdf_plus = jnp.log(jnp.maximum(cdf_plus, 1e-12))
    log_one_minus_cdf_min = jnp.log(jnp.maximum(1.0 - cdf_min, 1e-12))
    log_cdf_delta = jnp.log(jnp.maximum(cdf_plus - cdf_min, 1e-12))
    return jnp.where(x < -0.999, log_cdf_plus, jnp.where(x > 0.999, log_one_minus_cdf_min, log_cdf_delta))


@dataclasses.dataclass(frozen=True, eq=False)
class GaussianDiffusion:
    """A (possibly respaced) chain. Arrays are float64 numpy host constants indexed by the chain's own index."""

    betas: np.ndarray
    timestep_map: np.ndarray  # chain index -> index in the original 1000-step chain

    @classmethod
    def create(cls, respacing: str = "", num_timesteps: int = NUM_TRAIN_TIMESTEPS) -> "GaussianDiffusion":
        """MAR's `create_diffusion(respacing, noise_schedule="cosine")`; "" keeps all 1000 steps."""
        base = cosine_betas(num_timesteps)
        use = space_timesteps(num_timesteps, respacing or [num_timesteps])
        alphas_cumprod = np.cumprod(1.0 - base)
        last, betas, tmap = 1.0, [], []
        for i, ac in enumerate(alphas_cumprod):
            if i in use:
                betas.append(1 - ac / last)
                last = ac
                tmap.append(i)
        return cls(np.array(betas, np.float64), np.array(tmap, np.int64))

    def __post_init__(self):
        b = self.betas
        ac = np.cumprod(1.0 - b)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = b * (1.0 - ac_prev) / (1.0 - ac)
        derived = dict(
            alphas_cumprod=ac, alphas_cumprod_prev=ac_prev,
            sqrt_alphas_cumprod=np.sqrt(ac), sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac), sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1),
            posterior_variance=post_var,
            posterior_log_variance_clipped=np.log(np.append(post_var[1], post_var[1:])),
            posterior_mean_coef1=b * np.sqrt(ac_prev) / (1.0 - ac),
            posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(1.0 - b) / (1.0 - ac),
            log_betas=np.log(b),
        )
        for k, v in derived.items():
            object.__setattr__(self, k, v)

    @property
    def num_timesteps(self) -> int:
        return len(self.betas)

    def _get(self, name: str, t: jax.Array, ndim: int) -> jax.Array:
        vals = jnp.asarray(getattr(self, name), jnp.float32)[t]
        return vals.reshape(vals.shape + (1,) * (ndim - vals.ndim))

    # -- forward process -------------------------------------------------------------------------------------
    def q_sample(self, x0, t, noise):
        return self._get("sqrt_alphas_cumprod", t, x0.ndim) * x0 + \
            self._get("sqrt_one_minus_alphas_cumprod", t, x0.ndim) * noise

    def q_posterior_mean_variance(self, x0, xt, t):
        mean = self._get("posterior_mean_coef1", t, xt.ndim) * x0 + self._get("posterior_mean_coef2", t, xt.ndim) * xt
        return mean, self._get("posterior_variance", t, xt.ndim), self._get("posterior_log_variance_clipped", t, xt.ndim)

    def predict_xstart_from_eps(self, xt, t, eps):
        return self._get("sqrt_recip_alphas_cumprod", t, xt.ndim) * xt - \
            self._get("sqrt_recipm1_alphas_cumprod", t, xt.ndim) * eps

    def model_timesteps(self, t: jax.Array) -> jax.Array:
        """Chain index -> the index the network sees (original 1000-step chain)."""
        return jnp.asarray(self.timestep_map, jnp.int32)[t]

    # -- reverse process -------------------------------------------------------------------------------------
    def p_mean_variance(self, model_output: jax.Array, xt: jax.Array, t: jax.Array,
                        clip_denoised: bool = False) -> dict[str, jax.Array]:
        """From the head's output [eps | v] (learned range). clip_denoised clips the x0 estimate to [-1, 1] before
        the posterior mean (ADM's option for pixel data; MAR's VAE latents are unbounded, so MAR never clips)."""
        c = xt.shape[-1]
        eps, v = model_output[..., :c], model_output[..., c:]
        min_log = self._get("posterior_log_variance_clipped", t, xt.ndim)
        max_log = self._get("log_betas", t, xt.ndim)
        frac = (v + 1) / 2
        log_variance = frac * max_log + (1 - frac) * min_log
        xstart = self.predict_xstart_from_eps(xt, t, eps)
        if clip_denoised:
            xstart = jnp.clip(xstart, -1.0, 1.0)
        mean, _, _ = self.q_posterior_mean_variance(xstart, xt, t)
        return {"mean": mean, "variance": jnp.exp(log_variance), "log_variance": log_variance,
                "pred_xstart": xstart, "eps": eps}

    def training_losses(self, model_output: jax.Array, x0: jax.Array, xt: jax.Array, t: jax.Array,
                        noise: jax.Array) -> dict[str, jax.Array]:
        """Per-row MSE + VB (bits) given the head's output at (xt, t); VB trains only the variance channels."""
        c = x0.shape[-1]
        eps = model_output[..., :c]
        frozen = jnp.concatenate([jax.lax.stop_gradient(eps), model_output[..., c:]], axis=-1)
        true_mean, _, true_logvar = self.q_posterior_mean_variance(x0, xt, t)
        out = self.p_mean_variance(frozen, xt, t)
        kl = jnp.mean(normal_kl(true_mean, true_logvar, out["mean"], out["log_variance"]), axis=-1) / np.log(2.0)
        nll = -discretized_gaussian_log_likelihood(x0, out["mean"], 0.5 * out["log_variance"])
        nll = jnp.mean(nll, axis=-1) / np.log(2.0)
        vb = jnp.where(t == 0, nll, kl)
        mse = jnp.mean((noise - eps) ** 2, axis=-1)
        return {"mse": mse, "vb": vb, "loss": mse + vb}

    def p_sample_loop(self, model_fn: Callable[[jax.Array, jax.Array], jax.Array], noise: jax.Array,
                      rng: jax.Array, temperature=1.0, unroll: int = 1, clip_denoised: bool = False) -> jax.Array:
        """Reverse chain from x_T = noise (not scaled by temperature), as a compiled `fori_loop`.

        clip_denoised (pixel tokens in [-1, 1]): with a respaced chain the first step (t = 999, alpha_bar 2.4e-9)
        scales the x0 estimate's error by 1/sqrt(alpha_bar) = 2e4 and the next mean by 0.016, so an eps error of 0.2
        puts x 57 noise-sigmas off and the chain diverges (measured on the Fashion-MNIST teacher after 4k steps;
        the 1000-step chain does not need it). Clipping x0 to the data range removes that failure.

        `model_fn(x, t_model)` returns [eps | v] for the rows of x (apply CFG inside it). The per-step noise is
        multiplied by `temperature`; the last step returns the mean.
        """
        n = self.num_timesteps

        def body(i, carry):
            x, key = carry
            key, sub = jax.random.split(key)
            t = jnp.full(x.shape[:1], n - 1 - i, jnp.int32)
            out = self.p_mean_variance(model_fn(x, self.model_timesteps(t)), x, t, clip_denoised)
            z = jax.random.normal(sub, x.shape, x.dtype)
            nonzero = (t != 0).astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
            return out["mean"] + nonzero * jnp.exp(0.5 * out["log_variance"]) * z * temperature, key

        x, _ = jax.lax.fori_loop(0, n, body, (noise, rng), unroll=unroll)
        return x
