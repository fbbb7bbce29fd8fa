"""Per-example image preprocessing in NumPy / PIL (runs in grain workers; no jax, no TensorFlow).

* `center_crop_arr`: ADM's crop as used by MAR (``util/crop.py``): while the short side is >= 2 * size,
  BOX-downsample by 2; then BICUBIC-resize so the short side is ``size`` (sizes rounded); then center crop.
* `to_float`: uint8 HWC -> float32 in [-1, 1] as torchvision's ``ToTensor`` + ``Normalize(0.5, 0.5)``.
* `random_flip`: horizontal flip with probability 0.5 from a NumPy generator (grain gives one per example).
* `preprocess_imagenet` / `preprocess_small`: the full per-example transforms; outputs are float32 HWC.
  Small grey images (Fashion-MNIST, MNIST 28x28) are padded to ``pad_to`` (32) with -1 (black), shape (32, 32, 1).
"""
from __future__ import annotations

import io

import numpy as np
from PIL import Image


def center_crop_arr(pil_image: Image.Image, image_size: int) -> Image.Image:
    """ADM / MAR ``center_crop_arr``: returns a ``image_size x image_size`` PIL image."""
    while min(*pil_image.size) >= 2 * image_size:
        pil_image = pil_image.resize(tuple(x // 2 for x in pil_image.size), resample=Image.BOX)
    scale = image_size / min(*pil_image.size)
    pil_image = pil_image.resize(tuple(round(x * scale) for x in pil_image.size), resample=Image.BICUBIC)
    arr = np.array(pil_image)
    crop_y = (arr.shape[0] - image_size) // 2
    crop_x = (arr.shape[1] - image_size) // 2
    return Image.fromarray(arr[crop_y: crop_y + image_size, crop_x: crop_x + image_size])


def decode_rgb(image: bytes | np.ndarray | Image.Image) -> Image.Image:
    """Encoded bytes (JPEG / PNG / CMYK JPEG), an HWC uint8 array or a PIL image -> RGB PIL image
    (torchvision's ``pil_loader``: ``Image.open(f).convert('RGB')``)."""
    if isinstance(image, (bytes, bytearray)):
        with Image.open(io.BytesIO(image)) as im:
            return im.convert("RGB")
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image[..., 0] if image.ndim == 3 and image.shape[-1] == 1 else image)
    return image.convert("RGB")


def to_float(image: np.ndarray) -> np.ndarray:
    """uint8 (H, W[, C]) -> float32 (H, W, C) in [-1, 1]: ``(x / 255 - 0.5) / 0.5``."""
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"to_float expects uint8 pixels, got {image.dtype}")
    if image.ndim == 2:
        image = image[..., None]
    return ((image.astype(np.float32) / np.float32(255.0)) - np.float32(0.5)) / np.float32(0.5)


def random_flip(image: np.ndarray, rng: np.random.Generator, p: float = 0.5) -> np.ndarray:
    """Flip HWC ``image`` left-right with probability ``p`` (one draw from ``rng``)."""
    if rng.random() < p:
        return np.ascontiguousarray(image[:, ::-1])
    return image


def pad_to(image: np.ndarray, size: int, value: float = -1.0) -> np.ndarray:
    """Center-pad float HWC ``image`` to (size, size, C) with ``value`` (-1 is black in [-1, 1])."""
    h, w = image.shape[:2]
    if h > size or w > size:
        raise ValueError(f"pad_to: image {image.shape} is larger than {size}x{size}")
    top, left = (size - h) // 2, (size - w) // 2
    return np.pad(image, ((top, size - h - top), (left, size - w - left), (0, 0)), constant_values=value)


def preprocess_imagenet(image: bytes | np.ndarray | Image.Image, image_size: int,
                        rng: np.random.Generator | None = None) -> np.ndarray:
    """Encoded / decoded image -> float32 (image_size, image_size, 3) in [-1, 1]; flipped at random if ``rng``."""
    out = to_float(np.asarray(center_crop_arr(decode_rgb(image), image_size)))
    return random_flip(out, rng) if rng is not None else out


def preprocess_small(image: np.ndarray, pad_size: int | None = 32,
                     rng: np.random.Generator | None = None) -> np.ndarray:
    """uint8 (28, 28[, 1]) grey image -> float32 (pad_size, pad_size, 1) in [-1, 1], black padding;
    flipped at random if ``rng``."""
    out = to_float(image)
    if pad_size:
        out = pad_to(out, pad_size, -1.0)
    return random_flip(out, rng) if rng is not None else out
