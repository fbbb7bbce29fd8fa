"""marval_jax/evaluation/precision_recall.py on toy point clouds with known answers and a brute-force reference."""
import numpy as np
import pytest
from scipy.spatial.distance import cdist

from marval_jax.evaluation import precision_recall as pr


def _line(xs):
    xs = np.asarray(xs, np.float64)
    return np.stack([xs, np.zeros_like(xs)], axis=1)


def test_knn_radii_on_a_line():
    # k=3 neighbours of 0 are 1, 2, 3 -> radius 3; interior points have 3rd neighbour at distance 2.
    radii = pr.knn_radii(_line(range(10)), k=3, batch_size=4)
    np.testing.assert_allclose(radii, [3, 2, 2, 2, 2, 2, 2, 2, 2, 3])


def test_precision_on_a_line_known_answer():
    real = _line(range(10))
    fake = _line([-2.5, 4.5, 12.5, 20.0])        # in (ball of 0, r=3), in, out (9 has r=3), out
    out = pr.precision_recall(real, fake, k=3)
    assert out["precision"] == 0.5
    assert out["recall"] == 1.0                  # fake radii are 22.5 / 15.5 / 15 / 22.5: they cover 0..9
    assert (out["k"], out["num_real"], out["num_fake"]) == (3, 10, 4)


def test_mode_collapse_gives_full_precision_half_recall():
    rng = np.random.default_rng(0)
    mode_a = rng.normal(0, 1, (50, 8))
    mode_b = rng.normal(100, 1, (50, 8))
    real = np.concatenate([mode_a, mode_b])
    out = pr.precision_recall(real, mode_a.copy(), k=3, batch_size=16)
    assert out["precision"] == 1.0 and out["recall"] == 0.5


def test_identical_and_disjoint_sets():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 5))
    same = pr.precision_recall(x, x)
    assert same["precision"] == 1.0 and same["recall"] == 1.0
    far = pr.precision_recall(x, x + 1000.0)
    assert far["precision"] == 0.0 and far["recall"] == 0.0


def _brute_force(real, fake, k):
    def radii(x):
        d = cdist(x, x)
        return np.sort(d, axis=1)[:, k]
    r_real, r_fake = radii(real), radii(fake)
    d = cdist(fake, real)
    precision = np.mean((d <= r_real[None, :]).any(axis=1))
    recall = np.mean((d.T <= r_fake[None, :]).any(axis=1))
    return precision, recall


@pytest.mark.parametrize("k, batch_size", [(3, 7), (3, 4096), (5, 13)])
def test_matches_brute_force_reference(k, batch_size):
    rng = np.random.default_rng(2)
    real = rng.normal(size=(120, 16))
    fake = 1.3 * rng.normal(size=(90, 16)) + 0.4
    out = pr.precision_recall(real, fake, k=k, batch_size=batch_size)
    p, r = _brute_force(real, fake, k)
    assert 0 < p < 1 and 0 < r < 1
    assert out["precision"] == pytest.approx(p, abs=1e-12) and out["recall"] == pytest.approx(r, abs=1e-12)


def test_errors():
    x = np.zeros((3, 4))
    with pytest.raises(ValueError, match="k must"):
        pr.knn_radii(x, k=3)
    with pytest.raises(ValueError, match="dimensions differ"):
        pr.precision_recall(np.zeros((10, 4)), np.zeros((10, 5)))
    with pytest.raises(ValueError, match="NaN"):
        pr.precision_recall(np.full((10, 4), np.nan), np.zeros((10, 4)))
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        pr.precision_recall(np.zeros(10), np.zeros((10, 4)))
