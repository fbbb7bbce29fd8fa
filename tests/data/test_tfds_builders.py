import io
import json
import os
import shutil
import tarfile

import numpy as np
import pytest
import tensorflow_datasets as tfds
from PIL import Image

from marval_jax.data import raw_datasets, tfds_builders

WNIDS = ("n01440764", "n01443537")  # labels 0 and 1 in tfds' labels.txt


def test_fashion_mnist_local_round_trip(data_dir, fmnist_size):
    src = tfds_builders.open_source("fashion_mnist_local", "train", data_dir)
    assert len(src) == fmnist_size
    images, labels = raw_datasets.load_raw("fashion_mnist", "train")
    for i in (0, 1, fmnist_size - 1):
        ex = src[i]
        assert ex["image"].shape == (28, 28, 1) and ex["image"].dtype == np.uint8
        np.testing.assert_array_equal(ex["image"][..., 0], images[i])
        assert ex["label"] == labels[i]
    assert len(tfds_builders.open_source("fashion_mnist_local", "test[:10]", data_dir)) == 10


def test_mnist_local_round_trip(tmp_path):
    tfds_builders.build("mnist_local", str(tmp_path), max_examples=5)
    images, labels = raw_datasets.load_raw("mnist", "validation")
    src = tfds_builders.open_source("mnist_local", "validation", str(tmp_path))
    assert len(src) == 5
    np.testing.assert_array_equal(np.stack([src[i]["image"][..., 0] for i in range(5)]), images[:5])
    np.testing.assert_array_equal([src[i]["label"] for i in range(5)], labels[:5])


def test_unprepared_data_dir_is_one_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not prepared.*python -m marval_jax.data.tfds_builders mnist_local"):
        tfds_builders.open_source("mnist_local", "train", str(tmp_path / "nowhere"))
    with pytest.raises(FileNotFoundError, match="ImageNet is not prepared"):
        tfds_builders.resolve_imagenet_name(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="ILSVRC2012_img_train.tar"):
        tfds_builders.build("imagenet2012_local", str(tmp_path), manual_dir=str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="unknown tfds builder"):
        tfds_builders.build("cifar10", str(tmp_path))


def _encode(mode="RGB", fmt="JPEG", seed=0, size=(40, 30)):
    arr = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format=fmt)
    return buf.getvalue()


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def _check_imagenet(data_dir, name, train_files):
    src = tfds_builders.open_source(name, "train", data_dir, decoders={"image": tfds.decode.SkipDecoding()})
    got = {src[i]["file_name"].decode(): (src[i]["label"], src[i]["image"]) for i in range(len(src))}
    assert set(got) == set(train_files)
    for fname, (wnid, data, mode) in train_files.items():
        label, stored = got[fname]
        assert label == WNIDS.index(wnid)
        im = Image.open(io.BytesIO(stored))
        assert im.format == "JPEG" and im.mode == mode
        original = Image.open(io.BytesIO(data))
        kept = original.format == "JPEG" and original.mode != "CMYK"  # CMYK / PNG re-encoded as RGB JPEG
        assert (stored == data) == kept


def test_imagenet2012_local_from_folders(tmp_path):
    manual = tmp_path / "manual"
    files = {"a.JPEG": (WNIDS[0], _encode(seed=1), "RGB"), "b.JPEG": (WNIDS[0], _encode("L", seed=2), "L"),
             "c.JPEG": (WNIDS[1], _encode("CMYK", seed=3), "RGB"), "d.JPEG": (WNIDS[1], _encode(fmt="PNG"), "RGB")}
    for fname, (wnid, data, _) in files.items():
        os.makedirs(manual / "train" / wnid, exist_ok=True)
        (manual / "train" / wnid / fname).write_bytes(data)
    tfds_builders.build("imagenet2012_local", str(tmp_path / "tfds"), manual_dir=str(manual))
    _check_imagenet(str(tmp_path / "tfds"), "imagenet2012_local", files)
    assert tfds_builders.resolve_imagenet_name(str(tmp_path / "tfds")) == "imagenet2012_local"


def test_imagenet2012_local_from_tars_and_stock_name(tmp_path):
    manual = tmp_path / "manual"
    manual.mkdir()
    files = {f"{w}_{i}.JPEG": (w, _encode(seed=10 * k + i), "RGB") for k, w in enumerate(WNIDS) for i in range(2)}
    with tarfile.open(manual / "ILSVRC2012_img_train.tar", "w") as outer:
        for w in WNIDS:
            buf = io.BytesIO()
            with tarfile.open(fileobj=buf, mode="w") as inner:
                for fname, (wnid, data, _) in files.items():
                    if wnid == w:
                        _add(inner, fname, data)
            _add(outer, f"{w}.tar", buf.getvalue())
    val_names = [f"ILSVRC2012_val_{i:08d}.JPEG" for i in (3, 1, 2)]  # archive order != sorted order
    with tarfile.open(manual / "ILSVRC2012_img_val.tar", "w") as tar:
        for i, fname in enumerate(val_names):
            _add(tar, fname, _encode(seed=100 + i))
    out = str(tmp_path / "tfds")
    tfds_builders.build("imagenet2012_local", out, manual_dir=str(manual))
    _check_imagenet(out, "imagenet2012_local", files)
    val = tfds_builders.open_source("imagenet2012_local", "validation", out,
                                    decoders={"image": tfds.decode.SkipDecoding()})
    with open(tfds_builders.IMAGENET_VALIDATION_LABELS_FILE) as f:
        first = f.read().split()[:3]  # labels of the sorted validation file names
    names = tfds.features.ClassLabel(names_file=tfds_builders.IMAGENET_LABELS_FILE)
    got = {val[i]["file_name"].decode(): names.int2str(val[i]["label"]) for i in range(3)}
    assert got == dict(zip(sorted(val_names), first))

    # The same files under the stock name (as if prepared by tfds' own builder) are read through tfds.data_source.
    src_dir, dst_dir = os.path.join(out, "imagenet2012_local", "5.1.0"), os.path.join(out, "imagenet2012", "5.1.0")
    os.makedirs(dst_dir)
    for f in os.listdir(src_dir):
        shutil.copy(os.path.join(src_dir, f), os.path.join(dst_dir, f.replace("imagenet2012_local", "imagenet2012")))
    info_path = os.path.join(dst_dir, "dataset_info.json")
    with open(info_path) as f:
        info = json.load(f)
    info["name"] = "imagenet2012"
    with open(info_path, "w") as f:
        json.dump(info, f)
    assert tfds_builders.resolve_imagenet_name(out) == "imagenet2012"
    _check_imagenet(out, "imagenet2012", files)
