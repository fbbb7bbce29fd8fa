"""Frechet Inception Distance in the TF-FID Inception pool_3 space (2048-d), float64 throughout.

* `StatsAccumulator` streams features: float64 running sum and sum of outer products; `finalize()` gives the mean
  and the unbiased covariance (divisor N - 1, as `np.cov`, pytorch-fid and ADM's evaluator).
* `frechet_distance` is pytorch-fid's `calculate_frechet_distance`: float64 `scipy.linalg.sqrtm(sigma1 @ sigma2)`,
  retried with `eps * I` added to both covariances when the root is not finite, imaginary parts dropped when the
  diagonal's imaginary part is below 1e-3 (else a ValueError).
* Statistics files are ADM-style `.npz` with `mu` (2048,) and `sigma` (2048, 2048); ADM reference batches (which
  also hold `arr_0` images and `mu_s` / `sigma_s`) are read the same way, through their `mu` / `sigma`.

Images are 0..255 (uint8, or floats in [0, 255]); `inception.check_images` refuses other ranges with a message.
Note: with N < 2048 images the covariance is singular; FID is still defined but biased high -- compare FIDs at the
same N.
"""
from __future__ import annotations

import os

import numpy as np
from scipy import linalg

from marval_jax.checkpoints.safe_load import open_npz
from marval_jax.evaluation import inception
from marval_jax.evaluation.files import as_path, local_file, write_npz
from marval_jax.evaluation.inception import FEATURE_DIM, check_images
from marval_jax.user_errors import UserError


class StatsAccumulator:
    """Streaming float64 mean / covariance of feature batches."""

    def __init__(self, dim: int = FEATURE_DIM):
        self.dim = dim
        self.count = 0
        self.sum = np.zeros((dim,), np.float64)
        self.outer = np.zeros((dim, dim), np.float64)

    def update(self, features) -> None:
        f = np.asarray(features, np.float64)
        if f.ndim != 2 or f.shape[1] != self.dim:
            raise ValueError(f"features must be (n, {self.dim}), got {f.shape}")
        if not np.isfinite(f).all():
            raise ValueError("features contain NaN or inf")
        self.count += f.shape[0]
        self.sum += f.sum(axis=0)
        self.outer += f.T @ f

    def finalize(self) -> tuple[np.ndarray, np.ndarray]:
        if self.count < 2:
            raise ValueError(f"need at least 2 feature vectors for a covariance, got {self.count}")
        n = self.count
        mu = self.sum / n
        sigma = (self.outer - n * np.outer(mu, mu)) / (n - 1)
        return mu, (sigma + sigma.T) / 2


def statistics_from_features(features) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of a feature matrix (n, d), float64."""
    f = np.asarray(features)
    if f.ndim != 2:
        raise ValueError(f"features must be (n, d), got {f.shape}")
    acc = StatsAccumulator(f.shape[1])
    acc.update(f)
    return acc.finalize()


def compute_statistics(params, images, batch_size: int = 200,
                       chunk_batches: int = 10) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) of the Inception features of `images`: an array (N, H, W[, C]) of 0..255 values, or an iterable
    of such arrays (streamed; features are never all held). Arrays are fed `batch_size * chunk_batches` at a time."""
    acc = StatsAccumulator()
    for chunk in _chunks(images, batch_size * chunk_batches):
        acc.update(inception.inception_features(params, chunk, batch_size))
    return acc.finalize()


def _chunks(images, size):
    if isinstance(images, np.ndarray):
        for start in range(0, images.shape[0], size):
            yield images[start:start + size]
    else:
        yield from images


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
    """||mu1 - mu2||^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), float64 (pytorch-fid's recipe)."""
    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape:
        raise ValueError(f"mean vectors have different shapes: {mu1.shape} vs {mu2.shape}")
    d = mu1.shape[0]
    if sigma1.shape != (d, d) or sigma2.shape != (d, d):
        raise ValueError(f"covariances must be ({d}, {d}), got {sigma1.shape} and {sigma2.shape}")
    diff = mu1 - mu2
    covmean = linalg.sqrtm(sigma1.dot(sigma2))
    if not np.isfinite(covmean).all():
        offset = np.eye(d) * eps
        covmean = linalg.sqrtm((sigma1 + offset).dot(sigma2 + offset))
    if np.iscomplexobj(covmean):
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
            raise ValueError(f"matrix square root has an imaginary component of {np.max(np.abs(covmean.imag)):.3g}")
        covmean = covmean.real
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean))


def frechet_distance_few(features, mu2, sigma2) -> float:
    """`frechet_distance(mu1, sigma1, mu2, sigma2)` of the statistics of `features` (n, d) with n <= d, exactly,
    without the d x d matrix root (minutes at d = 2048 on a CPU; the 2048-d root of a rank-deficient product is also
    the inaccurate case of `sqrtm`). With A = (features - mu1) / sqrt(n - 1), sigma1 = A^T A, and the non-zero
    eigenvalues of sigma1 sigma2 are those of the symmetric positive semi-definite n x n matrix A sigma2 A^T, so
    tr (sigma1 sigma2)^(1/2) = sum of the square roots of its eigenvalues (rounding negatives clipped at 0)."""
    f = np.asarray(features, np.float64)
    mu2, sigma2 = np.asarray(mu2, np.float64), np.asarray(sigma2, np.float64)
    if f.ndim != 2 or f.shape[0] < 2 or f.shape[0] > f.shape[1]:
        raise ValueError(f"features must be (n, d) with 2 <= n <= d, got {f.shape}")
    mu1, sigma1 = statistics_from_features(f)
    a = (f - mu1) / np.sqrt(f.shape[0] - 1)
    small = a @ sigma2 @ a.T
    eig = np.linalg.eigvalsh((small + small.T) / 2)
    diff = mu1 - mu2
    return float(diff.dot(diff) + np.trace(sigma1) + np.trace(sigma2) - 2 * np.sqrt(np.maximum(eig, 0)).sum())


# ----------------------------------------------------------------------------------------------------------------
# Statistics files
# ----------------------------------------------------------------------------------------------------------------
def _check_stats(mu, sigma, where: str):
    if mu.shape != (FEATURE_DIM,) or sigma.shape != (FEATURE_DIM, FEATURE_DIM):
        raise UserError(f"{where}: expected TF-FID Inception pool_3 statistics mu ({FEATURE_DIM},) and sigma "
                         f"({FEATURE_DIM}, {FEATURE_DIM}), got mu {mu.shape} and sigma {sigma.shape} "
                         f"(statistics of another feature space cannot be compared)")
    if not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UserError(f"{where}: statistics contain NaN or inf")


def save_statistics(path: str, mu, sigma) -> str:
    """Write ADM-style statistics (`mu`, `sigma`, float64) to `path` (.npz)."""
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    _check_stats(mu, sigma, path)
    write_npz(path, mu=mu, sigma=sigma)  # local or gs://
    return path


def load_statistics(path: str) -> tuple[np.ndarray, np.ndarray]:
    """(mu, sigma) float64 from a statistics .npz or an ADM reference batch .npz (keys `mu`, `sigma`)."""
    if not as_path(path).exists():
        raise FileNotFoundError(f"statistics file {path} not found; make one with "
                                f"`python -m marval_jax.tools.fid stats --images X --out {path}`")
    with local_file(path) as local, open_npz(local, what="FID statistics") as npz:
        keys = list(npz.files)
        if "mu" not in keys or "sigma" not in keys:
            hint = (" (it holds images: compute their statistics with `python -m marval_jax.tools.fid stats "
                    f"--images {path} --out stats.npz`)") if ("arr_0" in keys or "images" in keys) else ""
            raise UserError(f"{path}: expected keys 'mu' and 'sigma', found {keys}{hint}")
        mu, sigma = np.asarray(npz["mu"], np.float64), np.asarray(npz["sigma"], np.float64)
    _check_stats(mu, sigma, path)
    return mu, sigma


def fid_from_images(params, images, ref, batch_size: int = 200) -> float:
    """FID of `images` (0..255) against `ref`: a statistics path, or a (mu, sigma) pair."""
    if isinstance(images, np.ndarray):
        check_images(images)
    mu_ref, sigma_ref = load_statistics(ref) if isinstance(ref, (str, os.PathLike)) else ref
    mu, sigma = compute_statistics(params, images, batch_size)
    return frechet_distance(mu, sigma, mu_ref, sigma_ref)
