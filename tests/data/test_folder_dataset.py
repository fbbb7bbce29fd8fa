"""The image-folder data set (`marval_jax.data.folder_dataset`, data.name=folder) on real clip art.

The committed fixture (tests/fixtures/openclipart: 18 public-domain PNGs of Debian's openclipart-png in 3 category
folders, RGBA / LA / palette, some in nested folders) plus files made here: corrupt, truncated, empty, palette with a
transparent colour, RGBA, 16-bit grey, 16-bit RGB, too small, a non-image, hidden files, an image beside the class
folders. When the package is installed, a subset of /usr/share/openclipart/png (full-size images) is built too.
One session-scoped build serves the data tests; the end-to-end run (build -> train 20 steps -> sample -> evaluate)
reuses it.
"""
import io
import os
import shutil
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from marval_jax.data import folder_dataset as fd
from marval_jax.data import pipeline
from marval_jax.data.preprocess import center_crop_arr
from marval_jax.user_errors import UserError

pytestmark = pytest.mark.usefixtures("compile_cache")  # tests/conftest.py

FIXTURE = os.path.join(os.path.dirname(os.path.dirname(__file__)), "fixtures", "openclipart")
OPENCLIPART = "/usr/share/openclipart/png"
SIZE = 64


def _png16_rgb(path, rgb16: np.ndarray) -> None:
    """A 16-bit-per-channel RGB PNG written by hand (PIL cannot write one)."""
    h, w, _ = rgb16.shape
    raw = b"".join(b"\x00" + rgb16[y].astype(">u2").tobytes() for y in range(h))

    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    with open(path, "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0))
                + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))


def _odd_files(folder: str) -> dict[str, str]:
    """Deliberately awkward files in class folder `odd` (and around it); returns {kind: path}."""
    odd = os.path.join(folder, "odd")
    os.makedirs(odd)
    paths = {k: os.path.join(odd, n) for k, n in (
        ("corrupt", "corrupt.png"), ("truncated", "truncated.jpg"), ("empty", "empty.webp"),
        ("palette", "palette.png"), ("rgba", "rgba.PNG"), ("grey16", "grey16.png"), ("rgb16", "rgb16.png"),
        ("tiny", "tiny.jpeg"), ("jpeg", "photo.jpg"), ("webp", "pic.webp"))}
    with open(paths["corrupt"], "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + os.urandom(200))
    buf = io.BytesIO()
    Image.fromarray(np.full((80, 80, 3), 90, np.uint8)).save(buf, format="JPEG")
    with open(paths["truncated"], "wb") as f:
        f.write(buf.getvalue()[: len(buf.getvalue()) // 3])
    open(paths["empty"], "wb").close()
    pal = Image.new("P", (80, 70))
    pal.putpalette([0, 0, 0, 200, 30, 30])            # index 0: black but transparent, index 1: red
    pal.paste(1, (20, 20, 60, 50))
    pal.info["transparency"] = 0
    pal.save(paths["palette"])
    rgba = np.zeros((70, 90, 4), np.uint8)            # transparent black around an opaque blue square
    rgba[20:50, 30:60] = (10, 20, 250, 255)
    Image.fromarray(rgba, "RGBA").save(paths["rgba"], format="PNG")
    Image.fromarray(np.full((72, 72), 65535, np.uint16)).save(paths["grey16"])    # 16-bit white
    _png16_rgb(paths["rgb16"], np.tile(np.array([65535, 32896, 0], np.uint16), (66, 66, 1)))
    Image.fromarray(np.full((20, 24, 3), 128, np.uint8)).save(paths["tiny"], format="JPEG")
    Image.fromarray(np.full((96, 128, 3), 200, np.uint8)).save(paths["jpeg"], format="JPEG")
    Image.fromarray(np.full((64, 80, 3), 40, np.uint8)).save(paths["webp"], format="WEBP", lossless=True)
    with open(os.path.join(odd, "notes.txt"), "w") as f:    # not an image extension: not looked at
        f.write("not an image")
    with open(os.path.join(odd, "._photo.jpg"), "wb") as f:  # hidden (macOS resource fork): ignored
        f.write(b"junk")
    Image.fromarray(np.full((64, 64, 3), 30, np.uint8)).save(          # a name that is not valid UTF-8
        os.path.join(os.fsencode(odd), b"caf\xe9.png"), format="PNG")
    os.makedirs(os.path.join(folder, "no_images"))            # no image inside: not a class
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(os.path.join(folder, "beside.png"))  # top level: ignored
    return paths


ODD_KEPT = ("palette", "rgba", "grey16", "rgb16", "jpeg", "webp", "latin1")


@pytest.fixture(scope="session")
def clipart(tmp_path_factory):
    """(folder, data_dir, summary): the fixture + odd files, built once at 64 px."""
    root = tmp_path_factory.mktemp("folder")
    folder = str(root / "clipart")
    shutil.copytree(FIXTURE, folder, ignore=shutil.ignore_patterns("README.md"))
    paths = _odd_files(folder)
    data_dir = str(root / "tfds")
    info = fd.build(folder, SIZE, data_dir, progress=False)
    return folder, data_dir, info, paths


def test_build_counts_skips_and_lists_classes(clipart):
    folder, data_dir, info, _ = clipart
    assert info["class_names"] == ["animals", "food", "odd", "transportation"]  # sorted sub-folders with images
    assert info["found"] == 18 + 11 and info["kept"] == 18 + len(ODD_KEPT) == info["num_examples"]
    assert info["skipped"] == {"unreadable": 3, "too_small": 1, "top_level_ignored": 1}
    assert info["per_class"] == {"animals": 6, "food": 6, "transportation": 6, "odd": len(ODD_KEPT)}
    with open(info["class_names_file"]) as f:
        assert f.read().split("\n")[:-1] == info["class_names"]
    import tensorflow_datasets as tfds
    stored = tfds.builder_from_directory(info["path"]).info      # what any tfds reader sees
    assert stored.features["label"].names == info["class_names"] and stored.splits["train"].num_examples == 25
    assert fd.class_names({"folder_dir": folder, "image_size": SIZE, "data_dir": data_dir}) == info["class_names"]
    # a second build is a no-op: same records
    again = fd.build(folder, SIZE, data_dir, progress=False)
    assert again["path"] == info["path"] and again["num_examples"] == info["num_examples"]


def _records(folder, data_dir):
    source = fd.open_folder_source({"folder_dir": folder, "image_size": SIZE, "data_dir": data_dir,
                                    "split": "train"}, build_if_missing=False)
    return {r["file_name"].decode(): r for r in (source[i] for i in range(len(source)))}


def test_records_are_mar_center_crops_of_rgb_on_white(clipart):
    """Each record is the PNG of center_crop_arr(RGB composited on white) of its file, pixel for pixel (PNG is
    lossless and every step is deterministic, so equality is exact)."""
    folder, data_dir, info, paths = clipart
    recs = _records(folder, data_dir)
    assert len(recs) == info["num_examples"] and "odd/caf\ufffd.png" in recs
    for rel, rec in recs.items():
        with Image.open(io.BytesIO(rec["image"])) as im:
            got = np.asarray(im)
        assert got.shape == (SIZE, SIZE, 3) and got.dtype == np.uint8, rel
        path = (os.path.join(folder, rel) if "\ufffd" not in rel        # the non-UTF-8 name, as stored
                else os.path.join(os.fsencode(folder), b"odd", b"caf\xe9.png"))
        with Image.open(path) as im:
            im.load()
            want = np.asarray(center_crop_arr(fd.to_rgb(im), SIZE))
        np.testing.assert_array_equal(got, want, err_msg=rel)
        assert info["class_names"][int(rec["label"])] == rel.split("/")[0]
    by_kind = {k: np.asarray(Image.open(io.BytesIO(recs[os.path.relpath(p, folder)]["image"])), np.int32)
               for k, p in paths.items() if k in ODD_KEPT}
    # transparent pixels became white, opaque ones kept their colour (a plain convert("RGB") gives black)
    assert (by_kind["palette"][0, 0] == 255).all() and tuple(by_kind["palette"][32, 32]) == (200, 30, 30)
    assert (by_kind["rgba"][0, 0] == 255).all() and tuple(by_kind["rgba"][32, 32]) == (10, 20, 250)
    assert (by_kind["grey16"] == 255).all()            # 16-bit white stays white
    # 16-bit RGB: PIL reads the high byte: 65535 -> 255, 32896 -> 128, 0 -> 0
    assert tuple(by_kind["rgb16"][10, 10]) == (255, 128, 0)
    # clip art: the transparent background of the committed files is white after conversion
    assert (np.asarray(Image.open(io.BytesIO(recs["food/beverages/alcohol/beer.png"]["image"])))[0, 0] == 255).all()


def test_to_rgb_scales_16_bit_grey():
    """16-bit grey is scaled by 255/65535 (a plain convert would clip every value above 255 to white)."""
    im = Image.fromarray(np.array([[0, 257, 32896, 65535]], np.uint16))
    assert im.mode.startswith("I;16")
    np.testing.assert_array_equal(np.asarray(fd.to_rgb(im))[0, :, 0], [0, 1, 128, 255])
    la = Image.fromarray(np.array([[[0, 0], [100, 255]]], np.uint8), "LA")
    np.testing.assert_array_equal(np.asarray(fd.to_rgb(la))[0], [[255] * 3, [100] * 3])


def test_load_image_reports_instead_of_raising(tmp_path, clipart):
    _, _, _, paths = clipart
    for kind in ("corrupt", "truncated", "empty"):
        assert fd.load_image(paths[kind], SIZE, 32) == (None, "unreadable"), kind
    assert fd.load_image(paths["tiny"], SIZE, 32) == (None, "too_small")
    pixels, reason = fd.load_image(paths["tiny"], SIZE, 0)       # min_size 0 keeps it (upscaled)
    assert reason == "" and pixels.shape == (SIZE, SIZE, 3)
    bomb = tmp_path / "bomb.png"
    Image.new("1", (1, 1)).save(bomb)
    limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = 0.25   # every image is then over the decompression-bomb limit
        assert fd.load_image(str(bomb), 1, 0) == (None, "unreadable")
    finally:
        Image.MAX_IMAGE_PIXELS = limit


def test_flat_folder_is_one_class(tmp_path):
    flat = tmp_path / "My Pets"
    flat.mkdir()
    for i in range(3):
        Image.fromarray(np.full((40, 50, 3), 60 * i, np.uint8)).save(flat / f"{i}.png")
    classes, files, ignored = fd.scan_folder(str(flat))
    assert classes == ["My Pets"] and [os.path.basename(f) for f in files[0]] == ["0.png", "1.png", "2.png"]
    assert ignored == 0
    info = fd.build(str(flat), 32, str(tmp_path / "tfds"), progress=False)
    assert info["class_names"] == ["My Pets"] and info["num_examples"] == 3
    assert os.path.basename(os.path.dirname(info["path"])).startswith("my_pets_32px_")
    # a new file: the prepared set is reused as is until --overwrite rebuilds it (with its own --min_size, which a
    # run then finds: the name depends on the folder and the size only)
    Image.fromarray(np.full((60, 60, 3), 250, np.uint8)).save(flat / "3.png")
    assert fd.build(str(flat), 32, str(tmp_path / "tfds"), progress=False)["num_examples"] == 3
    fd.main(["--folder_dir", str(flat), "--image_size", "32", "--data_dir", str(tmp_path / "tfds"), "--overwrite",
             "--min_size", "41"])
    again = fd.summary(str(flat), 32, str(tmp_path / "tfds"))
    assert again["num_examples"] == 1 and again["skipped"]["too_small"] == 3 and again["min_size"] == 41
    source = fd.open_folder_source({"folder_dir": str(flat), "image_size": 32, "data_dir": str(tmp_path / "tfds")},
                                   build_if_missing=False)
    assert len(source) == 1 and source[0]["file_name"] == b"3.png"


def test_bad_folders_are_one_line_user_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "text_only" / "a").mkdir(parents=True)
    (tmp_path / "text_only" / "a" / "x.txt").write_text("x")
    (tmp_path / "file.png").write_bytes(b"x")
    (tmp_path / "all_bad" / "c").mkdir(parents=True)
    (tmp_path / "all_bad" / "c" / "x.png").write_bytes(b"not a png")
    cases = {str(tmp_path / "missing"): "does not exist", str(tmp_path / "empty"): "is empty",
             str(tmp_path / "text_only"): "holds no", str(tmp_path / "file.png"): "is a file", "": "needs"}
    for folder, what in cases.items():
        with pytest.raises(UserError, match=what) as e:
            fd.build(folder, SIZE, str(tmp_path / "tfds"), progress=False)
        assert "data.folder_dir" in str(e.value) and "\n" not in str(e.value)
    with pytest.raises(UserError, match=r"none of its 1 image files is usable \(1 unreadable") as e:
        fd.build(str(tmp_path / "all_bad"), SIZE, str(tmp_path / "tfds"), progress=False)
    assert not fd.is_prepared(str(tmp_path / "all_bad"), SIZE, str(tmp_path / "tfds"))
    # training from a folder that is not prepared, where the run may not build it (several processes)
    (tmp_path / "one" / "c").mkdir(parents=True)
    Image.new("RGB", (64, 64)).save(tmp_path / "one" / "c" / "a.png")
    # an interrupted build: tfds' incomplete.<random>_<version> folder, even with its dataset_info.json, is not a set
    partial = os.path.join(fd.prepared_dir(str(tmp_path / "one"), SIZE, str(tmp_path / "tfds")), "incomplete.X_1.0.0")
    os.makedirs(partial)
    open(os.path.join(partial, "dataset_info.json"), "w").write("{}")
    assert not fd.is_prepared(str(tmp_path / "one"), SIZE, str(tmp_path / "tfds"))
    with pytest.raises(UserError, match="python -m marval_jax.data.folder_dataset --folder_dir"):
        fd.open_folder_source({"folder_dir": str(tmp_path / "one"), "image_size": SIZE,
                               "data_dir": str(tmp_path / "tfds")}, build_if_missing=False)
    with pytest.raises(FileNotFoundError, match="python -m marval_jax.data.folder_dataset --folder_dir"):
        fd.export_images(str(tmp_path / "one"), SIZE, str(tmp_path / "x.npz"), str(tmp_path / "tfds"))
    with pytest.raises(UserError, match="data.folder_dir=.*does not exist"):
        pipeline.make_source(pipeline.default_config(name="folder", folder_dir=str(tmp_path / "missing"),
                                                     data_dir=str(tmp_path / "tfds"), image_size=SIZE))


def test_cli_error_line_and_exit_code(tmp_path, capsys):
    from marval_jax.user_errors import call_cli
    argv = ["--folder_dir", str(tmp_path / "nope"), "--data_dir", str(tmp_path / "tfds")]
    assert call_cli(lambda: fd.main(argv), argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: data.folder_dir=") and "does not exist" in err[0]


def test_pipeline_feeds_pixel_tokens_and_the_latent_cache(clipart, tmp_path):
    from marval_jax.data import latent_cache
    folder, data_dir, info, _ = clipart
    cfg = pipeline.default_config(name="folder", folder_dir=folder, data_dir=data_dir, image_size=SIZE, flip=True,
                                  patch_size=8, read_threads=1, prefetch=4)
    batch = next(pipeline.make_train_iterator(cfg, 8, seed=0, process_index=0, process_count=1))
    assert batch["tokens"].shape == (8, (SIZE // 8) ** 2, 3 * 8 * 8) and batch["tokens"].dtype == np.float32
    assert -1.0 <= batch["tokens"].min() and batch["tokens"].max() <= 1.0
    assert set(batch["labels"].tolist()) <= set(range(len(info["class_names"])))
    # the cache path: source order, no flip, (64, 64, 3) images; a 4x4 mean-pool "encoder" gives moments
    # ... as `python -m marval_jax.tools.cache_latents --data=folder --folder_dir=...` configures it
    from absl import flags
    from marval_jax.tools import cache_latents
    fv = cache_latents.define_flags(flags.FlagValues())
    fv(["cache_latents", "--data=folder", f"--folder_dir={folder}", f"--data_dir={data_dir}", f"--image_size={SIZE}"])
    cache_cfg = cache_latents.data_config(fv)
    source = pipeline.image_source_for_cache(cache_cfg)
    assert len(source) == info["num_examples"] and source[0]["image"].shape == (SIZE, SIZE, 3)

    def encode(x):
        pooled = np.asarray(x).reshape(len(x), SIZE // 4, 4, SIZE // 4, 4, 3).mean(axis=(2, 4))
        return np.concatenate([pooled, np.zeros_like(pooled)], axis=-1)

    meta = latent_cache.build_latent_cache(source, encode, str(tmp_path / "cache"), "train", batch_size=8)
    assert meta["num_examples"] == info["num_examples"]
    cached, _ = latent_cache.open_latent_cache(str(tmp_path / "cache"), "train")
    rec = cached[3]
    want = encode(source[3]["image"][None])[0]
    np.testing.assert_array_equal(rec["moments"], want)
    assert int(rec["label"]) == int(source[3]["label"])


@pytest.mark.skipif(not os.path.isdir(OPENCLIPART), reason="Debian openclipart-png is not installed")
def test_builds_from_the_installed_openclipart_package(tmp_path):
    """Full-size clip art (BOX halving path of the crop) from the package: 3 categories x 4 files, linked."""
    folder = tmp_path / "openclipart"
    for cat in ("animals", "food", "signs_and_symbols"):
        files = sorted(os.path.join(r, f) for r, _, fs in os.walk(os.path.join(OPENCLIPART, cat))
                       for f in fs if f.endswith(".png"))[:4]
        (folder / cat).mkdir(parents=True)
        for i, f in enumerate(files):
            os.symlink(f, folder / cat / f"{i}_{os.path.basename(f)}")
    info = fd.build(str(folder), SIZE, str(tmp_path / "tfds"), progress=False)
    assert info["class_names"] == ["animals", "food", "signs_and_symbols"] and info["found"] == 12
    assert info["kept"] + info["skipped"]["unreadable"] + info["skipped"]["too_small"] == 12
    assert info["kept"] >= 6 and info["num_examples"] == info["kept"]
    recs = _records(str(folder), str(tmp_path / "tfds"))
    rel, rec = sorted(recs.items())[0]
    with Image.open(os.path.join(folder, rel)) as im:
        im.load()
        want = np.asarray(center_crop_arr(fd.to_rgb(im), SIZE))
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(rec["image"]))), want)


def folder_tiny_config(folder: str, data_dir: str, num_classes: int):
    from configs import mar as mar_configs
    from configs.common import with_fields
    return with_fields(mar_configs.get_config("folder_tiny"), {
        "data.folder_dir": folder, "data.data_dir": data_dir, "model.class_num": num_classes,
        "train.global_batch_size": 8, "train.ckpt_every": 20, "train.sample_every": 0,
        "sample.num_images": 8, "sample.batch_size": 8})


def test_end_to_end_build_train_sample_evaluate(clipart, tmp_path, capsys):
    """The README's own-images commands on the clip art: build (+ export for the FID reference), 20 training steps
    of configs/mar.py:folder_tiny (64x64 RGB), sampling with a grid, evaluation (FID against the folder's images)."""
    pytest.importorskip("torch")
    from marval_jax.main import run
    from marval_jax.tools import fid as fid_tool
    from marval_jax.tools.convert_inception import convert
    folder, data_dir, info, _ = clipart
    export = str(tmp_path / "clipart_64.npz")
    fd.main(["--folder_dir", folder, "--image_size", str(SIZE), "--data_dir", data_dir, "--export_npz", export])
    out = capsys.readouterr().out
    assert f"prepared {info['num_examples']} images of 4 classes at 64x64" in out
    assert "skipped: 3 unreadable, 1 smaller than 32 px, 1 beside the class folders" in out
    assert "--config.model.class_num=4" in out
    with np.load(export) as z:
        assert z["images"].shape == (info["num_examples"], SIZE, SIZE, 3)
        assert list(z["class_names"]) == info["class_names"]
    inception = convert(str(tmp_path / "fid_inception.npz"))
    ref = str(tmp_path / "clipart_fid.npz")
    assert fid_tool.main(["stats", "--images", export, "--out", ref, "--weights", inception, "--batch-size", "8"]) == 0

    cfg = folder_tiny_config(folder, data_dir, len(info["class_names"]))
    workdir = str(tmp_path / "run")
    run("train", cfg, workdir)   # config_checks accepts data.name=folder with an existing folder
    import json
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    assert rows[-1]["step"] == 20 and np.isfinite(rows[-1]["loss"])
    run("sample", cfg, workdir)
    grids = [f for f in os.listdir(os.path.join(workdir, "samples_final")) if f.endswith(".png")]
    assert grids and Image.open(os.path.join(workdir, "samples_final", grids[0])).mode == "RGB"
    with open(os.path.join(workdir, "samples_final", grids[0].replace(".png", ".json"))) as f:
        sampled = json.load(f)
    # the grid's cells named by the class folders (8 samples, labels cycling: a 3-column grid)
    assert sampled["class_names"] == info["class_names"]
    assert sampled["grid_classes"] == [[info["class_names"][i % 4] for i in range(r, min(r + 3, 8))]
                                       for r in range(0, 8, 3)]
    from configs.common import with_fields
    report = run("evaluate", with_fields(cfg, {"sample.fid_ref": ref, "sample.inception": inception}), workdir)
    assert report["num_images"] == 8 and np.isfinite(report["fid"]) and report["fid"] > 0


def test_readme_own_images_commands_parse():
    """The README's "Train on your own images" commands: each main command's mode, config variant and override
    fields parse with main's real flag parser; the build command's flags are the module's."""
    import importlib.util
    import shlex
    from absl import flags
    from marval_jax.main import define_flags
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "README.md")) as f:
        body = f.read().split("## Train on your own images", 1)[1].split("\n## ", 1)[0]
    commands = [shlex.split(line.strip()) for line in body.splitlines() if line.startswith("    ") and line.strip()]
    modules = [c[2] for c in commands]
    assert modules[:3] == ["marval_jax.data.folder_dataset", "marval_jax.main", "marval_jax.main"], modules
    build_source = open(fd.__file__).read()
    for cmd in commands:
        assert cmd[:2] == ["python", "-m"] and importlib.util.find_spec(cmd[2]) is not None, cmd
        if cmd[2] == "marval_jax.data.folder_dataset":
            for arg in cmd[3:]:
                if arg.startswith("--"):
                    assert f'add_argument("{arg}"' in build_source, arg
        elif cmd[2] == "marval_jax.main":
            argv = ["main"] + [a.replace("class_num=N", "class_num=4") for a in cmd[3:]]
            fv = define_flags(flags.FlagValues(), argv)
            fv(argv)
            assert fv.config.data.name == "folder" and fv.config.model.class_num == 4
            assert fv.config.data.folder_dir == "~/my_images"
