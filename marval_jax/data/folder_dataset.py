"""Your own images: a TensorFlow-free tfds data set (array_record) built from an image folder tree.

Layout (torchvision ``ImageFolder``'s, which MAR reads)::

    root/<class>/**/*.{png,jpg,jpeg,webp}   # one class per top-level sub-folder, searched recursively
    root/*.{png,jpg,jpeg,webp}              # a flat folder (no sub-folder holds an image): one class, named root

Class ids are the sorted sub-folder names (``ImageFolder``'s order); only sub-folders that hold at least one image
file are classes. Files and folders whose name starts with ``.`` are ignored; with class sub-folders, images lying
directly in ``root`` are ignored (counted). Each image is decoded with PIL and converted to RGB:

* palette (``P``), ``LA``, ``RGBA``, ``PA`` and images with a transparent colour are composited on white (clip art
  is drawn on a transparent background; converting it straight to RGB would turn the background black);
* 16-bit grey (``I;16``, ``I``) is scaled by 255 / 65535 (PIL's own ``convert`` clips it to 255 instead);
* ``L``, ``1``, ``CMYK``, ``YCbCr`` ... through PIL's ``convert("RGB")``; the first frame of an animation.

then cropped to ``image_size`` as MAR (`marval_jax.data.preprocess.center_crop_arr`: BOX halving while the short side
is >= 2 * size, BICUBIC resize of the short side to size, center crop) and stored as a lossless PNG of
``image_size x image_size x 3``. An unreadable file (corrupt, truncated, not an image, a decompression bomb) or one
whose short side is below ``min_size`` (default ``image_size // 2``; 0 keeps every size) is skipped and counted, never
a crash: the counts are printed at the end and stored in the data set's ``metadata.json`` (``skipped``).

The prepared data set is ``image_folder/<folder name>_<size>px_<hash of the folder path and size>`` in
``data_dir`` (default ``$TFDS_DATA_DIR`` or ``~/tensorflow_datasets``): one per (folder, size), built once and
reused; ``--overwrite`` rebuilds it after the folder changed. Its only split is ``train``. Class names are the
``label`` feature's names (``dataset_info``) and ``class_names.txt`` next to the records (one per line, usable as
``rl.class_names_file``).

Build::

    python -m marval_jax.data.folder_dataset --folder_dir ~/my_images --image_size 64 [--data_dir DIR] \
        [--export_npz ~/my_images_64.npz]   # the prepared images as one .npz, for FID reference statistics

Train with ``--config.data.name=folder --config.data.folder_dir=~/my_images`` (``data.image_size`` picks the size;
a missing data set is built on first use in a one-process run). Bad inputs (no folder, an empty folder, a folder
without images, every image skipped) are `marval_jax.user_errors.UserError` one-liners naming ``data.folder_dir``.
"""
from __future__ import annotations

import argparse
import hashlib
import io
import json
import logging
import os
import re
import warnings
from collections.abc import Iterator
from typing import Any

import numpy as np
from PIL import Image

from marval_jax.data.preprocess import center_crop_arr
from marval_jax.user_errors import UserError, add_verbose_flag, run_cli

NAME = "image_folder"
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")
CLASS_NAMES_FILE = "class_names.txt"
FIELD = "data.folder_dir"
_ALPHA_MODES = ("P", "PA", "LA", "La", "RGBA", "RGBa")


# -- scanning --------------------------------------------------------------------------------------------------------
def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _walk_images(folder: str) -> list[str]:
    """Image files under ``folder`` (recursive, hidden entries skipped), sorted by their path."""
    found = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = [d for d in dirs if not d.startswith(".")]
        found.extend(os.path.join(root, f) for f in files if _is_image(f))
    return sorted(found)


def scan_folder(folder_dir: str) -> tuple[list[str], list[list[str]], int]:
    """``(class names, image paths per class, images ignored at the top level)`` of a folder tree (module doc).

    UserError (naming data.folder_dir) if the folder does not exist, is empty, or holds no image file."""
    if not folder_dir:
        raise UserError(f"data.name='folder' needs {FIELD}: set it to a folder of <class>/ sub-folders of "
                        f"{'/'.join(e[1:] for e in IMAGE_EXTENSIONS)} images (or a flat folder of images)")
    root = os.path.abspath(os.path.expanduser(os.fspath(folder_dir)))
    if not os.path.exists(root):
        raise UserError(f"{FIELD}={folder_dir!r} does not exist; set it to your image folder")
    if not os.path.isdir(root):
        raise UserError(f"{FIELD}={folder_dir!r} is a file, not a folder; set it to the folder that holds the images")
    entries = sorted(e for e in os.listdir(root) if not e.startswith("."))
    if not entries:
        raise UserError(f"{FIELD}={folder_dir!r} is empty; put images in <class>/ sub-folders (or directly in it)")
    classes, files = [], []
    for entry in entries:
        path = os.path.join(root, entry)
        if os.path.isdir(path):
            images = _walk_images(path)
            if images:
                classes.append(entry)
                files.append(images)
    top = [os.path.join(root, e) for e in entries if os.path.isfile(os.path.join(root, e)) and _is_image(e)]
    if not classes:
        if not top:
            raise UserError(f"{FIELD}={folder_dir!r} holds no {'/'.join(IMAGE_EXTENSIONS)} file (searched it and "
                            f"its sub-folders); put images in <class>/ sub-folders (or directly in it)")
        return [os.path.basename(root.rstrip(os.sep)) or "images"], [top], 0
    return classes, files, len(top)


# -- decoding --------------------------------------------------------------------------------------------------------
def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL image -> RGB (module doc): alpha and palette transparency composited on white, 16-bit scaled."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") or arr.max(initial=0) > 255 else 255.0
        arr = np.clip(np.round(arr * (255.0 / top)), 0, 255).astype(np.uint8)
        im = Image.fromarray(arr, mode="L")
    if im.mode in _ALPHA_MODES or "transparency" in im.info:
        rgba = im.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return im.convert("RGB")


def load_image(path: str, image_size: int, min_size: int) -> tuple[np.ndarray | None, str]:
    """``(uint8 (image_size, image_size, 3), "")`` for a usable image, else ``(None, reason)`` with reason
    ``"unreadable"`` or ``"too_small"``. Never raises for a bad file."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as im:
                im.load()
                if min(im.size) < max(min_size, 1):
                    return None, "too_small"
                rgb = to_rgb(im)
        return np.asarray(center_crop_arr(rgb, image_size), np.uint8), ""
    except Exception:  # pylint: disable=broad-except  # any file PIL cannot turn into pixels is skipped, counted
        return None, "unreadable"


def encode_png(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


# -- the tfds builder ------------------------------------------------------------------------------------------------
def config_name(folder_dir: str, image_size: int, min_size: int | None = None) -> str:
    """The builder config (sub-folder of ``data_dir/image_folder``) of a (folder, size). ``min_size`` is not part of
    it (a run finds a folder built with any ``--min_size``; rebuild with ``--overwrite`` to change it)."""
    del min_size
    root = os.path.abspath(os.path.expanduser(os.fspath(folder_dir))).rstrip(os.sep)
    digest = hashlib.sha256(f"{root}|{int(image_size)}".encode()).hexdigest()[:10]
    base = re.sub(r"[^a-z0-9]+", "_", os.path.basename(root).lower()).strip("_")[:40] or "folder"
    return f"{base}_{int(image_size)}px_{digest}"


def default_min_size(image_size: int) -> int:
    return max(int(image_size) // 2, 1)


def _builder_class():
    """The tfds builder class (tensorflow_datasets is imported only when a folder is built or read)."""
    global _BUILDER  # pylint: disable=global-statement
    if _BUILDER is not None:
        return _BUILDER
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    from marval_jax.data.tfds_builders import _OfflineBuilder  # pylint: disable=import-outside-toplevel

    class ImageFolder(_OfflineBuilder):
        """An image folder tree (module doc of marval_jax.data.folder_dataset), cropped to one size, as PNGs."""

        name = NAME
        VERSION = tfds.core.Version("1.0.0")

        def __init__(self, *, folder_dir: str, image_size: int, min_size: int | None = None,
                     progress: bool = True, **kwargs: Any):
            self._folder_dir = folder_dir
            self._image_size = int(image_size)
            self._min_size = default_min_size(image_size) if min_size is None else int(min_size)
            self._progress = progress
            self._scan = scan_folder(folder_dir)
            kwargs.setdefault("config", tfds.core.BuilderConfig(
                name=config_name(folder_dir, image_size, self._min_size),
                description=f"{os.path.abspath(os.path.expanduser(folder_dir))} at {image_size}x{image_size}"))
            super().__init__(**kwargs)

        def _info(self) -> tfds.core.DatasetInfo:
            classes, files, _ = self._scan
            s = self._image_size
            return tfds.core.DatasetInfo(
                builder=self,
                description=(f"Images of {os.path.abspath(os.path.expanduser(self._folder_dir))} "
                             f"({len(classes)} classes, {sum(map(len, files))} files found), RGB, MAR center crop "
                             f"to {s}x{s}, min_size {self._min_size}."),
                features=tfds.features.FeaturesDict({
                    "image": tfds.features.Image(shape=(s, s, 3), encoding_format="png"),
                    "label": tfds.features.ClassLabel(names=list(classes)),
                    "file_name": tfds.features.Text(),
                }),
                supervised_keys=("image", "label"),
                metadata=tfds.core.MetadataDict(),
                disable_shuffling=True,
            )

        def _split_generators(self, dl_manager):
            del dl_manager  # nothing to download
            return {"train": self._generate_examples()}

        def _generate_examples(self) -> Iterator[tuple[str, dict[str, Any]]]:
            classes, files, ignored = self._scan
            root = os.path.abspath(os.path.expanduser(self._folder_dir))
            counts = {"unreadable": 0, "too_small": 0, "top_level_ignored": ignored}
            per_class = [0] * len(classes)
            todo = [(label, path) for label, paths in enumerate(files) for path in paths]
            from tqdm import tqdm  # pylint: disable=import-outside-toplevel
            bar = tqdm(todo, desc=f"building {os.path.basename(root)}", unit="img",
                       disable=None if self._progress else True)
            for key, (label, path) in enumerate(bar):
                pixels, reason = load_image(path, self._image_size, self._min_size)
                if pixels is None:
                    counts[reason] += 1
                    continue
                per_class[label] += 1
                # a file name that is not valid UTF-8 (bytes the file system kept) is stored with U+FFFD in their
                # place; the key is the file's position, unique whatever its name
                rel = os.path.relpath(path, root).encode("utf-8", "surrogateescape").decode("utf-8", "replace")
                yield key, {"image": encode_png(pixels), "label": label, "file_name": rel}
            kept = sum(per_class)
            self.info.metadata.update({"folder_dir": root, "image_size": self._image_size,
                                       "min_size": self._min_size, "found": len(todo), "kept": kept,
                                       "skipped": counts, "per_class": dict(zip(classes, per_class))})
            if kept == 0:
                raise UserError(f"{FIELD}={self._folder_dir!r}: none of its {len(todo)} image files is usable "
                                f"({counts['unreadable']} unreadable, {counts['too_small']} with a side below "
                                f"{self._min_size} px); add readable images or lower --min_size")

    _BUILDER = ImageFolder
    return _BUILDER


_BUILDER = None


def prepared_dir(folder_dir: str, image_size: int, data_dir: str | None = None,
                 min_size: int | None = None) -> str:
    """``<data_dir>/image_folder/<config_name>``: the prepared versions of this (folder, size) live below it."""
    from marval_jax.data.tfds_builders import default_data_dir  # pylint: disable=import-outside-toplevel
    return os.path.join(default_data_dir(data_dir), NAME, config_name(folder_dir, image_size, min_size))


def tfds_name(folder_dir: str, image_size: int, min_size: int | None = None) -> str:
    """The name `marval_jax.data.tfds_builders.open_source` reads: ``image_folder/<config_name>``."""
    return f"{NAME}/{config_name(folder_dir, image_size, min_size)}"


def is_prepared(folder_dir: str, image_size: int, data_dir: str | None = None, min_size: int | None = None) -> bool:
    root = prepared_dir(folder_dir, image_size, data_dir, min_size)
    # version folders only: an interrupted build leaves incomplete.<random>_<version> behind
    return os.path.isdir(root) and any(re.fullmatch(r"\d+\.\d+\.\d+", v)
                                       and os.path.isfile(os.path.join(root, v, "dataset_info.json"))
                                       for v in os.listdir(root))


def build(folder_dir: str, image_size: int, data_dir: str | None = None, *, min_size: int | None = None,
          overwrite: bool = False, progress: bool = True) -> dict[str, Any]:
    """Prepare the folder (no-op if prepared, unless ``overwrite``); returns `summary` of the prepared data set."""
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    from marval_jax.data.tfds_builders import default_data_dir  # pylint: disable=import-outside-toplevel
    if int(image_size) < 1:
        raise UserError(f"data.image_size={image_size} must be >= 1")
    data_dir = default_data_dir(data_dir)
    absl_logger = logging.getLogger("absl")
    level = absl_logger.level
    absl_logger.setLevel(max(level, logging.ERROR))  # "Using custom data configuration": every folder is one
    try:
        builder = _builder_class()(folder_dir=folder_dir, image_size=image_size, min_size=min_size,
                                   progress=progress, data_dir=data_dir, file_format="array_record")
    finally:
        absl_logger.setLevel(level)
    mode = (tfds.download.GenerateMode.REUSE_CACHE_IF_EXISTS if overwrite
            else tfds.download.GenerateMode.REUSE_DATASET_IF_EXISTS)
    from tensorflow_datasets.core.utils import tqdm_utils  # pylint: disable=import-outside-toplevel
    shown = tqdm_utils._active  # pylint: disable=protected-access
    tqdm_utils.display_progress_bar(False)  # our own bar counts images; tfds' would count splits and shards
    try:
        builder.download_and_prepare(download_config=tfds.download.DownloadConfig(download_mode=mode))
    finally:
        tqdm_utils.display_progress_bar(shown)
    names = builder.info.features["label"].names
    with open(os.path.join(builder.data_dir, CLASS_NAMES_FILE), "w") as f:
        f.write("".join(n + "\n" for n in names))
    return summary(folder_dir, image_size, data_dir, min_size)


def _version_dir(folder_dir: str, image_size: int, data_dir: str | None, min_size: int | None) -> str:
    from marval_jax.data import tfds_builders  # pylint: disable=import-outside-toplevel
    name = tfds_name(folder_dir, image_size, min_size)
    return os.path.join(tfds_builders.default_data_dir(data_dir), name, tfds_builders.prepared_version(name, data_dir))


def summary(folder_dir: str, image_size: int, data_dir: str | None = None,
            min_size: int | None = None) -> dict[str, Any]:
    """What a prepared folder data set holds: path, class names, example count, skip counts (metadata.json)."""
    path = _version_dir(folder_dir, image_size, data_dir, min_size)
    with open(os.path.join(path, "dataset_info.json")) as f:
        info = json.load(f)
    meta = {}
    if os.path.isfile(os.path.join(path, "metadata.json")):
        with open(os.path.join(path, "metadata.json")) as f:
            meta = json.load(f)
    num = sum(int(n) for split in info["splits"] for n in split.get("shardLengths", []))
    return {"path": path, "class_names": class_names_from_dir(path), "num_examples": num,
            "class_names_file": os.path.join(path, CLASS_NAMES_FILE), **{k: meta[k] for k in meta if k != "folder_dir"}}


def class_names_from_dir(version_dir: str) -> list[str]:
    """Class names of a prepared version directory (tfds writes the ClassLabel names to ``label.labels.txt``)."""
    for name in (CLASS_NAMES_FILE, "label.labels.txt"):
        for path in (os.path.join(version_dir, name), os.path.join(os.path.dirname(version_dir), name)):
            if os.path.isfile(path):
                with open(path) as f:
                    return [line.rstrip("\n") for line in f if line.strip()]
    raise FileNotFoundError(f"no class names ({CLASS_NAMES_FILE} / label.labels.txt) in {version_dir}")


def _get(config: Any, key: str, default: Any = None) -> Any:
    value = config.get(key, default) if hasattr(config, "get") else getattr(config, key, default)
    return default if value in ("", None) else value


def class_names(data_config: Any) -> list[str]:
    """Class names of the data config's folder data set (prepared), in label order."""
    folder, size = _get(data_config, "folder_dir"), int(_get(data_config, "image_size", 256))
    if not folder:
        scan_folder(folder)  # the one-line error naming data.folder_dir
    return class_names_from_dir(_version_dir(folder, size, _get(data_config, "data_dir"), None))


def open_folder_source(data_config: Any, *, build_if_missing: bool | None = None):
    """The random-access tfds source of ``data.folder_dir`` at ``data.image_size`` (records: PNG bytes, label).

    A missing data set is built first when ``build_if_missing`` (default: in a one-process run only; with several
    processes every one would build it, so build it first with this module's command)."""
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    folder, size = _get(data_config, "folder_dir"), int(_get(data_config, "image_size", 256))
    data_dir = _get(data_config, "data_dir")
    if not folder:
        scan_folder(folder)  # the one-line error naming data.folder_dir
    if not is_prepared(folder, size, data_dir):
        if build_if_missing is None:
            import jax  # pylint: disable=import-outside-toplevel
            build_if_missing = jax.process_count() == 1
        scan_folder(folder)  # missing / empty folder: its one-line error before anything else
        if not build_if_missing:
            raise UserError(f"{FIELD}={folder!r} is not prepared at {size}px in {data_dir or 'the tfds data dir'}; "
                            f"build it once first: python -m marval_jax.data.folder_dataset --folder_dir {folder} "
                            f"--image_size {size}" + (f" --data_dir {data_dir}" if data_dir else ""))
        print(f"data.folder_dir={folder!r}: preparing it at {size}x{size} once", flush=True)
        build(folder, size, data_dir)
    from marval_jax.data.tfds_builders import open_source  # pylint: disable=import-outside-toplevel
    return open_source(tfds_name(folder, size), _get(data_config, "split", "train"), data_dir,
                       decoders={"image": tfds.decode.SkipDecoding()})


def export_images(folder_dir: str, image_size: int, out: str, data_dir: str | None = None, num: int = 0,
                  min_size: int | None = None) -> str:
    """Write the prepared images as ``out`` (.npz: ``images`` uint8 (N, S, S, 3), ``labels`` int32, ``class_names``),
    the input of ``python -m marval_jax.tools.fid stats --images out`` (FID reference statistics of your data).
    ``num`` > 0 keeps that many, evenly spaced over the records (which are in class order); 0 keeps all (held in
    host memory: N * S * S * 3 bytes)."""
    import tensorflow_datasets as tfds  # pylint: disable=import-outside-toplevel
    from marval_jax.data.tfds_builders import open_source  # pylint: disable=import-outside-toplevel
    source = open_source(tfds_name(folder_dir, image_size, min_size), "train", data_dir,
                         decoders={"image": tfds.decode.SkipDecoding()})
    n = len(source)
    idx = np.arange(n) if not num or num >= n else np.linspace(0, n - 1, int(num)).round().astype(np.int64)
    images = np.empty((len(idx), image_size, image_size, 3), np.uint8)
    labels = np.empty((len(idx),), np.int32)
    for j, i in enumerate(idx):
        rec = source[int(i)]
        with Image.open(io.BytesIO(rec["image"])) as im:
            images[j] = np.asarray(im.convert("RGB"))
        labels[j] = rec["label"]
    out = os.path.expanduser(out)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    np.savez(out, images=images, labels=labels,
             class_names=np.array(class_names_from_dir(_version_dir(folder_dir, image_size, data_dir, min_size))))
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Prepare an image folder (root/<class>/*.png|jpg|jpeg|webp, or a flat folder = one class) as a "
                    "TensorFlow-free tfds data set for --config.data.name=folder.")
    parser.add_argument("--folder_dir", required=True, help="the image folder (data.folder_dir)")
    parser.add_argument("--image_size", type=int, default=256, help="center-crop size (data.image_size)")
    parser.add_argument("--data_dir", default=None, help="default: $TFDS_DATA_DIR or ~/tensorflow_datasets "
                        "(data.data_dir)")
    parser.add_argument("--min_size", type=int, default=None,
                        help="skip images whose short side is below this (default image_size // 2; 0 keeps all)")
    parser.add_argument("--overwrite", action="store_true", help="rebuild after the folder changed")
    parser.add_argument("--export_npz", default=None, help="also write the prepared images to this .npz (the input "
                        "of python -m marval_jax.tools.fid stats: FID reference statistics of your data)")
    parser.add_argument("--export_num", type=int, default=0, help="images in --export_npz, evenly spaced (0: all)")
    add_verbose_flag(parser)
    args = parser.parse_args(argv)
    info = build(args.folder_dir, args.image_size, args.data_dir, min_size=args.min_size, overwrite=args.overwrite)
    skipped = info.get("skipped", {})
    names = info["class_names"]
    print(f"prepared {info['num_examples']} images of {len(names)} classes at {args.image_size}x{args.image_size} "
          f"in {info['path']}", flush=True)
    print(f"skipped: {skipped.get('unreadable', 0)} unreadable, {skipped.get('too_small', 0)} smaller than "
          f"{info.get('min_size')} px, {skipped.get('top_level_ignored', 0)} beside the class folders", flush=True)
    shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
    print(f"classes ({len(names)}): {shown}; names in {info['class_names_file']}", flush=True)
    if args.export_npz:
        path = export_images(args.folder_dir, args.image_size, args.export_npz, args.data_dir, args.export_num,
                             args.min_size)
        print(f"images written to {path}: FID reference statistics with python -m marval_jax.tools.fid stats "
              f"--images {path} --out <stats.npz>", flush=True)
    print(f"train with: --config.data.folder_dir={args.folder_dir} --config.data.image_size={args.image_size} "
          f"--config.model.class_num={len(names)}" + (f" --config.data.data_dir={args.data_dir}"
                                                        if args.data_dir else ""), flush=True)


if __name__ == "__main__":
    run_cli(main)
