"""Improved precision and recall (Kynkaanniemi et al. 2019), k-NN manifolds in the FID Inception feature space.

Each set's manifold is the union of balls around its points whose radius is the distance to the point's k-th nearest
neighbour within the set (the point itself excluded; k = 3 as in the paper, StyleGAN2-ADA and ADM's evaluator).
precision = fraction of generated points inside the real manifold; recall = fraction of real points inside the
generated manifold. A point is inside when its distance to some ball centre is <= that ball's radius.

Squared Euclidean distances are computed in float64 blocks of `batch_size x batch_size` (`|a|^2 - 2 a.b + |b|^2`,
clipped at 0), so memory stays O(batch_size * N) for any N. Use the same N of real and generated features as the
reference numbers you compare with (the measure depends on N).
"""
from __future__ import annotations

import numpy as np

DEFAULT_K = 3


def _as_features(x, name: str) -> np.ndarray:
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{name} must be a (n, d) feature matrix, got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{name} contains NaN or inf")
    return x


def _sq_dists(a, a_sq, b, b_sq):
    return np.maximum(a_sq[:, None] - 2.0 * (a @ b.T) + b_sq[None, :], 0.0)


def knn_sq_radii(features, k: int = DEFAULT_K, batch_size: int = 1024) -> np.ndarray:
    """Squared distance of each point to its k-th nearest neighbour in the same set (itself excluded)."""
    f = _as_features(features, "features")
    n = f.shape[0]
    if not 1 <= k < n:
        raise ValueError(f"k must satisfy 1 <= k < number of points ({n}), got k={k}")
    sq = np.einsum("ij,ij->i", f, f)
    radii = np.empty((n,), np.float64)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        d = _sq_dists(f[start:stop], sq[start:stop], f, sq)
        d[np.arange(stop - start), np.arange(start, stop)] = 0.0    # self, exactly (column index 0 after sorting)
        radii[start:stop] = np.partition(d, k, axis=1)[:, k]
    return radii


def knn_radii(features, k: int = DEFAULT_K, batch_size: int = 1024) -> np.ndarray:
    """Distance of each point to its k-th nearest neighbour in the same set (itself excluded)."""
    return np.sqrt(knn_sq_radii(features, k, batch_size))


def in_manifold(query, manifold, manifold_sq_radii, batch_size: int = 1024) -> np.ndarray:
    """bool (n_query,): whether each query point lies in some ball (centre manifold[j], radius^2 sq_radii[j])."""
    q = _as_features(query, "query")
    m = _as_features(manifold, "manifold")
    if q.shape[1] != m.shape[1]:
        raise ValueError(f"feature dimensions differ: query {q.shape[1]} vs manifold {m.shape[1]}")
    r = np.asarray(manifold_sq_radii, np.float64)
    if r.shape != (m.shape[0],):
        raise ValueError(f"manifold_sq_radii must be ({m.shape[0]},), got {r.shape}")
    q_sq, m_sq = np.einsum("ij,ij->i", q, q), np.einsum("ij,ij->i", m, m)
    inside = np.zeros((q.shape[0],), bool)
    for qs in range(0, q.shape[0], batch_size):
        qe = min(qs + batch_size, q.shape[0])
        for ms in range(0, m.shape[0], batch_size):
            me = min(ms + batch_size, m.shape[0])
            d = _sq_dists(q[qs:qe], q_sq[qs:qe], m[ms:me], m_sq[ms:me])
            inside[qs:qe] |= (d <= r[None, ms:me]).any(axis=1)
    return inside


def precision_recall(real_features, fake_features, k: int = DEFAULT_K, batch_size: int = 1024) -> dict:
    """{'precision', 'recall', 'k', 'num_real', 'num_fake'} of generated (fake) against real features."""
    real = _as_features(real_features, "real_features")
    fake = _as_features(fake_features, "fake_features")
    if real.shape[1] != fake.shape[1]:
        raise ValueError(f"feature dimensions differ: real {real.shape[1]} vs fake {fake.shape[1]}")
    real_r = knn_sq_radii(real, k, batch_size)
    fake_r = knn_sq_radii(fake, k, batch_size)
    precision = float(in_manifold(fake, real, real_r, batch_size).mean())
    recall = float(in_manifold(real, fake, fake_r, batch_size).mean())
    return {"precision": precision, "recall": recall, "k": k,
            "num_real": int(real.shape[0]), "num_fake": int(fake.shape[0])}
