"""evaluation/fid_reference.py: the reference's Inception features are computed once and cached beside its
statistics (one file per images + Inception weights), the statistics follow from cached features without a second
Inception pass, and `tools.results reference` fills both for the processes started after it. (The statistics'
own cache: tests/test_main_cli.py.)"""
from __future__ import annotations

import os

import numpy as np
import pytest

SPEC = "raw:fashion_mnist/test"


@pytest.fixture
def few_images(monkeypatch):
    """The first 8 test images stand in for the 10k (an Inception pass over them takes seconds on a CPU)."""
    from marval_jax.data import raw_datasets
    full = raw_datasets.load_raw
    monkeypatch.setattr(raw_datasets, "load_raw", lambda name, split, raw_dir=None: tuple(
        x[:8] for x in full(name, split, raw_dir)))


def test_features_are_computed_once_then_read_from_the_cache(tmp_path, monkeypatch, inception_npz, few_images):
    from marval_jax.evaluation import fid_reference as fr
    from marval_jax.evaluation.inception import inception_features, load_inception
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    inception = load_inception(inception_npz)
    images = fr.real_images(SPEC)
    feats = fr.reference_features(SPEC, inception, inception_path=inception_npz)
    np.testing.assert_array_equal(feats, inception_features(inception, images))   # the same numbers, float64
    key = fr.reference_key(SPEC, images, inception_npz)
    assert os.listdir(fr.stats_cache_dir()) == [f"fid_feat_raw_fashion_mnist_test_{key}.npz"]   # no temp file left
    # a second process reads them: no Inception given, bit for bit the computed features
    np.testing.assert_array_equal(fr.reference_features(SPEC, None, inception_path=inception_npz), feats)
    # the first num images are other images, so another file (never the cached 8)
    np.testing.assert_array_equal(fr.reference_features(SPEC, inception, inception_path=inception_npz, num=4),
                                  inception_features(inception, images[:4]))
    key4 = fr.reference_key(SPEC, images[:4], inception_npz)
    assert key4 != key and sorted(os.listdir(fr.stats_cache_dir())) == sorted(
        f"fid_feat_raw_fashion_mnist_test_{k}.npz" for k in (key, key4))


def test_statistics_come_from_cached_features_without_an_inception_pass(tmp_path, monkeypatch, capsys,
                                                                        inception_npz, few_images):
    from marval_jax.evaluation import fid as fid_lib
    from marval_jax.evaluation import fid_reference as fr
    from marval_jax.evaluation.inception import load_inception
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    feats = fr.reference_features(SPEC, load_inception(inception_npz), inception_path=inception_npz)
    capsys.readouterr()
    mu, sigma = fr.reference_stats(SPEC, None, inception_path=inception_npz)   # no Inception: the features' stats
    assert "statistics of the cached features" in capsys.readouterr().out
    mu_ref, sigma_ref = fid_lib.statistics_from_features(feats)
    np.testing.assert_array_equal(mu, mu_ref)
    np.testing.assert_array_equal(sigma, sigma_ref)
    key = fr.reference_key(SPEC, fr.real_images(SPEC), inception_npz)
    assert f"fid_ref_raw_fashion_mnist_test_{key}.npz" in os.listdir(fr.stats_cache_dir())   # and cached as such
    mu2, _ = fr.reference_stats(SPEC, None, inception_path=inception_npz)
    assert "cached statistics" in capsys.readouterr().out
    np.testing.assert_array_equal(mu2, mu)


def test_results_reference_fills_the_cache_for_later_processes(tmp_path, monkeypatch, inception_npz, few_images):
    from marval_jax.evaluation import fid_reference as fr
    from marval_jax.tools import results
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    assert results.main(["reference", f"--inception={inception_npz}"]) == 0
    key = fr.reference_key(SPEC, fr.real_images(SPEC), inception_npz)
    assert sorted(os.listdir(fr.stats_cache_dir())) == [f"fid_feat_raw_fashion_mnist_test_{key}.npz",
                                                        f"fid_ref_raw_fashion_mnist_test_{key}.npz"]
    # what a live evaluation or a results run then reads, without an Inception pass
    assert fr.reference_features(SPEC, None, inception_path=inception_npz).shape == (8, 2048)
    fr.reference_stats(SPEC, None, inception_path=inception_npz)


def test_an_unreadable_features_cache_is_a_clear_error(tmp_path, monkeypatch, few_images):
    """A cache file that is not the features .npz (a crash of another writer, a disk error) names itself and the
    fix instead of a bare numpy error."""
    from marval_jax.evaluation import fid_reference as fr
    from marval_jax.user_errors import UserError
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    path = fr._cache_file("feat", SPEC, fr.real_images(SPEC), None, None)   # pylint: disable=protected-access
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not an npz")
    with pytest.raises(UserError, match="cannot be read .*delete the file"):
        fr.reference_features(SPEC, None)
    with pytest.raises(UserError, match="cannot be read"):
        fr.reference_stats(SPEC, None)
