"""What the FID network is given of images: a centre crop and the uint8 levels of `evaluation.grid.to_uint8`.

One definition for `--mode evaluate`, the live evaluation of a training run and the results / ablation / curve tools,
so every FID in the repository sees the same pixels (NumPy arrays and traced jax arrays alike)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from marval_jax.user_errors import UserError


def center_crop(images, size: int):
    """NHWC images -> their central size x size window; 0 or the image size: as is. A larger size is refused."""
    if not size or images.shape[1] == size:
        return images
    if images.shape[1] < size:   # raised while tracing when jitted: at the first evaluation
        raise UserError(f"sample.crop={size} is larger than the {images.shape[1]}px images; use 0 or <= "
                        f"{images.shape[1]}")
    o = (images.shape[1] - size) // 2
    return images[:, o:o + size, o:o + size]


@jax.jit
def uint8_images(images):
    """[-1, 1] -> uint8 on device, as `grid.to_uint8` (only a quarter of the float bytes are gathered); one jitted
    program on sharded global batches, as the samplers' outputs are."""
    return jnp.clip(jnp.round((images.astype(jnp.float32) + 1.0) / 2.0 * 255.0), 0, 255).astype(jnp.uint8)


def inception_input(images, crop: int):
    """Generated [-1, 1] images -> centre-cropped to `crop`, then uint8 levels (jit with `crop` static)."""
    return uint8_images(center_crop(images, crop))
