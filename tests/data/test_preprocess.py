import io

import numpy as np
import pytest
from PIL import Image

from marval_jax.data import preprocess as pp


def _image(w, h, c=3, seed=0):
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, c), dtype=np.uint8)
    return Image.fromarray(arr if c > 1 else arr[..., 0])


def test_center_crop_arr_follows_adm_steps():
    img = _image(600, 400)
    out = pp.center_crop_arr(img, 64)
    assert out.size == (64, 64)
    # ADM: 600x400 -> BOX 300x200 -> BOX 150x100 (100 < 128 stops) -> BICUBIC to round(150 * .64)=96 x 64 -> crop x 16
    ref = img.resize((300, 200), resample=Image.BOX).resize((150, 100), resample=Image.BOX)
    ref = np.asarray(ref.resize((96, 64), resample=Image.BICUBIC))[:, 16:80]
    np.testing.assert_array_equal(np.asarray(out), ref)


def test_center_crop_box_step_is_2x2_mean():
    arr = np.random.default_rng(1).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    out = np.asarray(pp.center_crop_arr(Image.fromarray(arr), 64)).astype(np.float64)
    mean = arr.astype(np.float64).reshape(64, 2, 64, 2, 3).mean(axis=(1, 3))
    assert np.abs(out - mean).max() <= 1.0  # one BOX step, then a same-size resize (no-op), no crop


def test_center_crop_is_centered_and_keeps_constants():
    arr = np.zeros((50, 200), np.uint8)
    arr[:, 75:125] = 255  # a white band in the middle of a wide image
    out = np.asarray(pp.center_crop_arr(Image.fromarray(arr), 32))
    assert out.shape == (32, 32)
    np.testing.assert_array_equal(out, out[:, ::-1])  # symmetric about the center
    const = np.asarray(pp.center_crop_arr(Image.fromarray(np.full((77, 91, 3), 200, np.uint8)), 24))
    assert const.shape == (24, 24, 3) and (const == 200).all()


def test_to_float_matches_totensor_normalize():
    x = np.arange(256, dtype=np.uint8).reshape(16, 16)
    out = pp.to_float(x)
    assert out.shape == (16, 16, 1) and out.dtype == np.float32
    expected = (x.astype(np.float32) / np.float32(255) - np.float32(0.5)) / np.float32(0.5)  # torchvision
    np.testing.assert_array_equal(out[..., 0], expected)
    assert out.min() == -1.0 and out.max() == 1.0
    with pytest.raises(ValueError, match="uint8"):
        pp.to_float(x.astype(np.float32))


def test_small_image_padded_black_and_flip():
    x = np.random.default_rng(2).integers(0, 256, (28, 28, 1), dtype=np.uint8)
    out = pp.preprocess_small(x, 32)
    assert out.shape == (32, 32, 1) and out.dtype == np.float32
    np.testing.assert_array_equal(out[2:30, 2:30], pp.to_float(x))
    border = np.ones((32, 32), bool)
    border[2:30, 2:30] = False
    assert (out[border] == -1.0).all()
    flips = [not np.array_equal(pp.preprocess_small(x, 32, np.random.default_rng(s)), out) for s in range(400)]
    assert 0.4 < np.mean(flips) < 0.6
    flipped = next(pp.preprocess_small(x, 32, np.random.default_rng(s)) for s in range(400) if flips[s])
    np.testing.assert_array_equal(flipped, out[:, ::-1])


@pytest.mark.parametrize("mode,fmt", [("RGB", "JPEG"), ("L", "JPEG"), ("CMYK", "JPEG"), ("RGBA", "PNG")])
def test_preprocess_imagenet_any_encoding(mode, fmt):
    img = _image(90, 70).convert(mode)
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    out = pp.preprocess_imagenet(buf.getvalue(), 32)
    assert out.shape == (32, 32, 3) and out.dtype == np.float32
    assert -1.0 <= out.min() and out.max() <= 1.0
    ref = pp.to_float(np.asarray(pp.center_crop_arr(Image.open(io.BytesIO(buf.getvalue())).convert("RGB"), 32)))
    np.testing.assert_array_equal(out, ref)
