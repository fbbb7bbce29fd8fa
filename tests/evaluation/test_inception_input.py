"""evaluation/inception_input.py: the pixels every FID of the repository is computed from."""
import numpy as np
import pytest

from marval_jax.evaluation.grid import to_uint8
from marval_jax.evaluation.inception_input import center_crop, inception_input
from marval_jax.user_errors import UserError


def test_inception_input_crops_the_centre_and_rounds_as_the_grids_do():
    """What the FID network sees of generated images, as --mode evaluate gives it: the centre crop (32 -> 28: rows
    and columns 2..29) in the uint8 levels of `evaluation.grid.to_uint8`; a crop larger than the images is refused."""
    x = np.random.default_rng(0).uniform(-1.2, 1.2, (3, 32, 32, 1)).astype(np.float32)   # clipping included
    got = np.asarray(inception_input(x, 28))
    assert got.dtype == np.uint8 and got.shape == (3, 28, 28, 1)
    np.testing.assert_array_equal(got, to_uint8(x[:, 2:30, 2:30]))
    np.testing.assert_array_equal(np.asarray(inception_input(x, 0)), to_uint8(x))
    np.testing.assert_array_equal(np.asarray(inception_input(x, 32)), to_uint8(x))
    with pytest.raises(UserError, match=r"sample.crop=40 is larger than the 32px images"):
        inception_input(x, 40)


def test_center_crop_keeps_numpy_arrays_and_matches_the_traced_crop():
    """The tools crop host uint8 arrays with the same function the jitted path traces: same window, no copy to jax."""
    import jax
    x = np.arange(2 * 6 * 6 * 1, dtype=np.uint8).reshape(2, 6, 6, 1)
    got = center_crop(x, 4)
    assert isinstance(got, np.ndarray)
    np.testing.assert_array_equal(got, x[:, 1:5, 1:5])
    np.testing.assert_array_equal(np.asarray(jax.jit(center_crop, static_argnums=1)(x, 4)), got)
