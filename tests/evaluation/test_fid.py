"""marval_jax/evaluation/fid.py: streaming float64 statistics, Frechet distance in closed form, stats files."""
import numpy as np
import pytest
from scipy import linalg

from marval_jax.evaluation import fid
from marval_jax.user_errors import UserError

D = fid.FEATURE_DIM


def _spd(rng, d, scale=1.0):
    a = rng.normal(size=(d, d))
    return scale * (a @ a.T / d + 0.1 * np.eye(d))


def test_streaming_statistics_match_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(3.0, 2.0, size=(257, 16))
    acc = fid.StatsAccumulator(16)
    for chunk in np.array_split(x, 5):
        acc.update(chunk.astype(np.float32) if chunk.shape[0] % 2 else chunk)
    mu, sigma = acc.finalize()
    x32 = np.concatenate([c.astype(np.float32).astype(np.float64) if c.shape[0] % 2 else c
                          for c in np.array_split(x, 5)])
    np.testing.assert_allclose(mu, x32.mean(0), rtol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x32, rowvar=False), rtol=1e-10, atol=1e-12)
    assert mu.dtype == sigma.dtype == np.float64


def test_frechet_distance_diagonal_gaussians_closed_form():
    rng = np.random.default_rng(1)
    d = 32
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    v1, v2 = rng.uniform(0.1, 3, d), rng.uniform(0.1, 3, d)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(v1 + v2 - 2 * np.sqrt(v1 * v2))
    assert fid.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)
    # 1-D: (m1 - m2)^2 + (s1 - s2)^2
    assert fid.frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9.0 + 1.0, rel=1e-12)


def test_frechet_distance_full_covariances_closed_form():
    """tr(S1 + S2 - 2 (S1^1/2 S2 S1^1/2)^1/2) through symmetric eigendecompositions (independent of sqrtm)."""
    rng = np.random.default_rng(2)
    d = 64
    mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
    s1, s2 = _spd(rng, d), _spd(rng, d, 2.0)

    def psd_sqrt(m):
        w, v = np.linalg.eigh(m)
        return (v * np.sqrt(np.clip(w, 0, None))) @ v.T

    r1 = psd_sqrt(s1)
    expected = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
                - 2 * np.trace(psd_sqrt(r1 @ s2 @ r1)))
    assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-9)
    assert fid.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-9)


def test_frechet_distance_from_samples_approaches_closed_form():
    rng = np.random.default_rng(3)
    d, n = 4, 200_000
    s1, s2 = _spd(rng, d), _spd(rng, d)
    mu1, mu2 = np.zeros(d), np.ones(d)
    x = rng.multivariate_normal(mu1, s1, n)
    y = rng.multivariate_normal(mu2, s2, n)
    exact = fid.frechet_distance(mu1, s1, mu2, s2)
    est = fid.frechet_distance(*fid.statistics_from_features(x), *fid.statistics_from_features(y))
    assert est == pytest.approx(exact, rel=2e-2)


def test_singular_covariances_fall_back_to_real_result():
    rng = np.random.default_rng(4)
    a = rng.normal(size=(5, 3))
    s = a @ a.T                                   # rank 3 of 5
    assert fid.frechet_distance(np.zeros(5), s, np.zeros(5), s) == pytest.approx(0.0, abs=1e-6)


def test_frechet_distance_shape_errors():
    with pytest.raises(ValueError, match="different shapes"):
        fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match="covariances"):
        fid.frechet_distance(np.zeros(3), np.eye(4), np.zeros(3), np.eye(3))


def test_statistics_roundtrip_and_adm_reference_batch(tmp_path):
    rng = np.random.default_rng(5)
    mu, sigma = rng.normal(size=D), np.eye(D) * 2.0
    path = fid.save_statistics(str(tmp_path / "stats.npz"), mu, sigma)
    mu2, sigma2 = fid.load_statistics(path)
    np.testing.assert_array_equal(mu2, mu)
    np.testing.assert_array_equal(sigma2, sigma)
    adm = str(tmp_path / "VIRTUAL_ref.npz")    # ADM reference batches: images + pool and spatial statistics
    np.savez(adm, arr_0=np.zeros((2, 8, 8, 3), np.uint8), mu=mu.astype(np.float32), sigma=sigma,
             mu_s=np.zeros(2023), sigma_s=np.eye(3))
    mu3, sigma3 = fid.load_statistics(adm)
    assert mu3.dtype == np.float64 and mu3.shape == (D,) and sigma3.shape == (D, D)


def test_statistics_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="tools.fid stats"):
        fid.load_statistics(str(tmp_path / "missing.npz"))
    wrong = str(tmp_path / "wrong.npz")
    np.savez(wrong, mu=np.zeros(64), sigma=np.eye(64))
    with pytest.raises(UserError, match="2048"):      # a user's file: one `error:` line through run_cli
        fid.load_statistics(wrong)
    images_only = str(tmp_path / "images.npz")
    np.savez(images_only, arr_0=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(UserError, match="holds images"):
        fid.load_statistics(images_only)
    with pytest.raises(ValueError, match="2048"):
        fid.save_statistics(str(tmp_path / "x.npz"), np.zeros(10), np.eye(10))


def test_fid_from_images_rejects_bad_ranges_before_running_the_network():
    ref = (np.zeros(D), np.eye(D))
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        fid.fid_from_images(None, np.random.default_rng(0).uniform(-1, 1, (4, 28, 28)).astype(np.float32), ref)
    with pytest.raises(ValueError, match="shape"):
        fid.fid_from_images(None, np.zeros((4, 28, 28, 2), np.uint8), ref)


def test_accumulator_errors():
    acc = fid.StatsAccumulator(8)
    with pytest.raises(ValueError, match=r"\(n, 8\)"):
        acc.update(np.zeros((3, 9)))
    acc.update(np.zeros((1, 8)))
    with pytest.raises(ValueError, match="at least 2"):
        acc.finalize()
    with pytest.raises(ValueError, match="NaN"):
        acc.update(np.full((2, 8), np.nan))


def test_sqrtm_reference_agrees_on_random_case():
    """frechet_distance's trace term equals scipy's sqrtm of the product (sanity of the formula used)."""
    rng = np.random.default_rng(6)
    s1, s2 = _spd(rng, 10), _spd(rng, 10)
    tr = np.trace(linalg.sqrtm(s1 @ s2).real)
    assert fid.frechet_distance(np.zeros(10), s1, np.zeros(10), s2) == pytest.approx(
        np.trace(s1) + np.trace(s2) - 2 * tr, rel=1e-12)


def test_frechet_distance_few_is_the_full_formula():
    """N <= d samples: the N x N eigenvalue path equals pytorch-fid's d x d sqrtm recipe (d = 64 keeps the root
    fast). sigma1 sigma2 is rank-deficient, where sqrtm is accurate only to about sqrt(eps64 * |sigma1 sigma2|) per
    zero eigenvalue (the root of a rounding-sized eigenvalue): d of them bound the trace's difference."""
    from marval_jax.evaluation import fid as fid_lib
    rng = np.random.default_rng(0)
    few, many = rng.normal(size=(20, 64)), rng.normal(size=(500, 64)) * 1.3 + 0.2
    mu1, s1 = fid_lib.statistics_from_features(few)
    mu2, s2 = fid_lib.statistics_from_features(many)
    full = fid_lib.frechet_distance(mu1, s1, mu2, s2)
    bound = 2 * 64 * np.sqrt(np.finfo(np.float64).eps * np.abs(s1 @ s2).max())
    assert abs(fid_lib.frechet_distance_few(few, mu2, s2) - full) <= bound
    assert abs(fid_lib.frechet_distance_few(few, mu2, s2 * 1.01) - full) > bound   # the test can tell
