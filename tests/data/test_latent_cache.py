import os
import threading

import grain
import numpy as np
import pytest

from marval_jax.data import latent_cache as lc
from tolerances import assert_close_to_scale

H, S, C = 16, 4, 4  # image size, encoder stride, latent channels


class LinearEncoder:
    """Stand-in VAE encoder: a fixed random linear map of 4x4 patches to raw moments (mean || logvar)."""

    def __init__(self, seed=0, logvar_shift=-1.0):
        rng = np.random.default_rng(seed)
        self.a = rng.normal(size=(S * S * 3, 2 * C)).astype(np.float32) / 4
        self.shift = np.concatenate([np.zeros(C), np.full(C, logvar_shift)]).astype(np.float32)
        self.batch_shapes = []

    def __call__(self, x):
        self.batch_shapes.append(x.shape)
        b, hh, ww, c = x.shape
        p = x.reshape(b, hh // S, S, ww // S, S, c).transpose(0, 1, 3, 2, 4, 5).reshape(b, hh // S, ww // S, -1)
        return p @ self.a + self.shift


def _images(n, seed=1):
    x = np.random.default_rng(seed).uniform(-1, 1, (n, H, H, 3)).astype(np.float32)
    return [{"image": x[i], "label": i % 10} for i in range(n)]


def test_cache_round_trip_and_process_split(tmp_path):
    enc = LinearEncoder()
    examples = _images(10)
    meta = lc.build_latent_cache(examples, enc, str(tmp_path / "one"), "train", batch_size=4, num_threads=2)
    assert meta["num_examples"] == 10 and meta["moments_shape"] == [H // S, H // S, 2 * C]
    assert set(enc.batch_shapes) == {(8, H, H, 3)}  # image + flip, last batch padded: one compiled shape
    src, meta2 = lc.open_latent_cache(str(tmp_path / "one"), "train")
    assert meta2 == meta and len(src) == 10
    x = np.stack([e["image"] for e in examples])
    for i in (0, 5, 9):
        rec = src[i]
        # the cache ran the matmul on batches of 8, this on 1: BLAS may pick other kernels (blocking, FMA), so
        # two programs over S*S*3 terms plus the shift (tests/tolerances.py)
        assert_close_to_scale(rec["moments"], enc(x[i:i + 1])[0], S * S * 3 + 1)
        assert_close_to_scale(rec["moments_flip"], enc(x[i:i + 1, :, ::-1])[0], S * S * 3 + 1)
        assert rec["label"] == i % 10 and rec["label"].dtype == np.int32
    # two processes (threads here, joined by a real barrier) writing 3 shards between them give the same records
    # in the same order; the metadata appears only after both barriers' first round, i.e. after every shard
    two = str(tmp_path / "two")
    with pytest.raises(ValueError, match="barrier"):
        lc.build_latent_cache(examples, LinearEncoder(), two, "train", batch_size=4, num_shards=3,
                              process_index=1, process_count=2)
    tb, seen, errors = threading.Barrier(2), [], []

    def barrier(name):
        seen.append((name, os.path.exists(lc.metadata_path(two, "train")),
                     sum(os.path.exists(lc.shard_path(two, "train", s, 3)) for s in range(3))))
        tb.wait(timeout=120)

    def process(p):
        try:
            lc.build_latent_cache(examples, LinearEncoder(), two, "train", batch_size=4, num_shards=3,
                                  process_index=p, process_count=2, num_threads=1, barrier=barrier)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)
            tb.abort()

    threads = [threading.Thread(target=process, args=(p,)) for p in (1, 0)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    first = [s for s in seen if s[0] == "latent_cache_shards_written"]
    assert len(first) == 2 and not any(has_meta for _, has_meta, _ in first)
    assert all(n == 3 for name, _, n in seen if name == "latent_cache_metadata_written")
    assert [has_meta for name, has_meta, _ in seen if name == "latent_cache_metadata_written"].count(True) >= 1
    src2, meta3 = lc.open_latent_cache(str(tmp_path / "two"), "train")
    assert meta3["shard_lengths"] == [3, 3, 4]
    for i in range(10):
        np.testing.assert_array_equal(src2[i]["moments"], src[i]["moments"])
        np.testing.assert_array_equal(src2[i]["moments_flip"], src[i]["moments_flip"])
    os.remove(os.path.join(tmp_path, "two", meta3["files"][1]))
    with pytest.raises(FileNotFoundError, match="incomplete"):
        lc.open_latent_cache(str(tmp_path / "two"), "train")
    with pytest.raises(FileNotFoundError, match="build the cache"):
        lc.open_latent_cache(str(tmp_path / "none"), "train")


def test_sample_moments_exact_and_clamped():
    moments = np.concatenate([np.full((2, 2, 3), 0.5), np.array([-40.0, 0.0, 50.0]) * np.ones((2, 2, 3))], -1)
    out = lc.sample_moments_np(moments, np.random.default_rng(7), 0.2325)
    eps = np.random.default_rng(7).standard_normal((2, 2, 3), dtype=np.float32)
    logvar = np.clip(moments[..., 3:], -30, 20).astype(np.float32)
    expected = (np.float32(0.5) + np.exp(np.float32(0.5) * logvar) * eps) * np.float32(0.2325)
    np.testing.assert_allclose(out, expected, rtol=1e-6)
    assert out.dtype == np.float32


def _draws(record, flip_prob, n, seed=0):
    ds = grain.MapDataset.source([record]).repeat(n).random_map(lc.SampleLatents(flip_prob=flip_prob), seed=seed)
    out = [ds[i] for i in range(n)]
    return np.stack([o["latents"] for o in out]), np.array([o["labels"] for o in out])


def test_sampling_statistics():
    rng = np.random.default_rng(3)
    mean, logvar = rng.normal(size=(2, 2, C)).astype(np.float32), rng.uniform(-2, 0, (2, 2, C)).astype(np.float32)
    rec = {"moments": np.concatenate([mean, logvar], -1),
           "moments_flip": np.concatenate([-mean, np.full_like(logvar, -30.0)], -1), "label": np.int32(4)}
    n = 4000
    z, labels = _draws(rec, 0.0, n)
    assert z.shape == (n, 2, 2, C) and z.dtype == np.float32 and (labels == 4).all()
    std = np.exp(0.5 * logvar) * 0.2325
    assert np.all(np.abs(z.mean(0) - mean * 0.2325) < 4.5 * std / np.sqrt(n))  # mean of draws = posterior mean * scale
    np.testing.assert_allclose(z.std(0), std, rtol=0.1)
    z2, _ = _draws(rec, 0.0, 50)
    np.testing.assert_array_equal(z2, z[:50])  # seeded per example: deterministic
    # p = 0.5 picks the flipped moments (here: -mean, std ~ 0) for about half of the draws
    z, _ = _draws(rec, 0.5, 1000, seed=1)
    flipped = np.all(np.abs(z - (-mean * 0.2325)) < 1e-6, axis=(1, 2, 3))
    assert 0.44 < flipped.mean() < 0.56
    assert np.all(np.abs(z[~flipped].mean(0) - mean * 0.2325) < 4.5 * std / np.sqrt((~flipped).sum()))
