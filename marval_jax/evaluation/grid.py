"""Sample grids as PNG (images NHWC in [-1, 1], grey or RGB); saved through etils.epath (local or gs://)."""
from __future__ import annotations

import io
import math

import numpy as np
from etils import epath
from PIL import Image


def to_uint8(images) -> np.ndarray:
    """[-1, 1] floats -> uint8 as the reference saves samples: (x + 1) / 2 * 255, round, clip."""
    x = np.asarray(images, np.float32)
    return np.clip(np.round((x + 1.0) / 2.0 * 255.0), 0, 255).astype(np.uint8)


def make_grid(images, ncol: int | None = None, pad: int = 2) -> np.ndarray:
    x = to_uint8(images)
    if x.ndim != 4:
        raise ValueError(f"images must be NHWC, got shape {x.shape}")
    n, h, w, c = x.shape
    ncol = ncol or int(math.ceil(math.sqrt(n)))
    nrow = int(math.ceil(n / ncol))
    grid = np.zeros((nrow * (h + pad) + pad, ncol * (w + pad) + pad, c), np.uint8)
    for i in range(n):
        r, q = divmod(i, ncol)
        grid[pad + r * (h + pad): pad + r * (h + pad) + h, pad + q * (w + pad): pad + q * (w + pad) + w] = x[i]
    return grid[..., 0] if c == 1 else grid


def save_grid(path: str, images, ncol: int | None = None) -> str:
    """Encode in memory, write once through epath: a gs:// path becomes one object, never a local `gs:` folder."""
    out = epath.Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    buf = io.BytesIO()
    Image.fromarray(make_grid(images, ncol)).save(buf, format="PNG")
    out.write_bytes(buf.getvalue())
    return path
