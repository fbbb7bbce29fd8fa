"""FID statistics and FID / precision-recall from the command line (TF-FID Inception, 2048-d pool_3 features).

    python -m marval_jax.tools.fid stats --images raw:fashion_mnist/train --out fmnist_train.npz [--save-features]
    python -m marval_jax.tools.fid fid --images samples.npz --ref fmnist_train.npz \
        [--precision-recall-ref fmnist_train.npz|raw:fashion_mnist/train]

Image sources (X, and Y for --precision-recall-ref):
  * `file.npz` holding uint8 images (N, H, W[, C]) under `images` or `arr_0` (ADM sample batches);
  * a folder of .png (also .jpg/.jpeg) files, read in sorted order (all greyscale -> 1 channel, else RGB);
  * `raw:fashion_mnist/{train,test}`, `raw:mnist/{train,validation,test}` (marval_jax.data.raw_datasets);
    `tfds:NAME/SPLIT` is an alias of `raw:NAME/SPLIT` (same images, no TensorFlow needed).
  --precision-recall-ref also takes a stats .npz written with --save-features (key `features`).
Grey images repeat their channel to 3 and every image is bilinearly resized to 299 inside the network's preprocessing
(see marval_jax/evaluation/inception.py). Output: one JSON object on stdout.
Weights: `python -m marval_jax.tools.convert_inception` once (or --weights PATH).
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np

from marval_jax.checkpoints.safe_load import open_npz
from marval_jax.user_errors import add_verbose_flag, run_cli

_IMAGE_EXTS = (".png", ".jpg", ".jpeg")


def load_images(spec: str, num: int | None = None) -> np.ndarray:
    """uint8 images (N, H, W[, C]) from an image source spec (see the module docstring); first `num` if given."""
    if spec.startswith(("raw:", "tfds:")):
        from marval_jax.data.raw_datasets import load_raw
        body = spec.split(":", 1)[1]
        if "/" not in body:
            raise ValueError(f"{spec!r}: expected raw:NAME/SPLIT, e.g. raw:fashion_mnist/test")
        name, split = body.split("/", 1)
        images = load_raw(name, split)[0]
    elif os.path.isdir(spec):
        images = _load_folder(spec, num)
    elif spec.endswith(".npz"):
        if not os.path.exists(spec):
            raise FileNotFoundError(f"image file {spec} not found")
        with open_npz(spec, what="image file") as npz:
            key = next((k for k in ("images", "arr_0") if k in npz.files), None)
            if key is None:
                raise ValueError(f"{spec}: expected uint8 images under key 'images' or 'arr_0', found {npz.files}")
            images = npz[key]
    else:
        raise FileNotFoundError(f"image source {spec!r} is neither an .npz file, a folder, nor raw:NAME/SPLIT")
    if num is not None:
        if num > images.shape[0]:
            raise ValueError(f"{spec}: asked for {num} images, it holds {images.shape[0]}")
        images = images[:num]
    return images


def _load_folder(folder: str, num: int | None) -> np.ndarray:
    from PIL import Image
    files = sorted(f for f in os.listdir(folder) if f.lower().endswith(_IMAGE_EXTS))
    if not files:
        raise FileNotFoundError(f"{folder}: no {'/'.join(_IMAGE_EXTS)} files")
    files = files[:num] if num is not None else files
    pics = [Image.open(os.path.join(folder, f)) for f in files]
    grey = all(p.mode in ("L", "1") for p in pics)
    arrays = [np.asarray(p.convert("L" if grey else "RGB"), np.uint8) for p in pics]
    shapes = {a.shape for a in arrays}
    if len(shapes) != 1:
        raise ValueError(f"{folder}: images differ in size {sorted(shapes)[:4]}; resize them to one size first")
    return np.stack(arrays)


def _reference_features(spec: str, params, batch_size: int, num: int | None) -> np.ndarray:
    from marval_jax.evaluation.inception import inception_features
    if spec.endswith(".npz") and os.path.exists(spec):
        with open_npz(spec, what="reference file") as npz:
            if "features" in npz.files:
                feats = npz["features"]
                return feats[:num] if num is not None else feats
    return inception_features(params, load_images(spec, num), batch_size)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    add_verbose_flag(common)
    common.add_argument("--images", required=True, help="image source (see below)")
    common.add_argument("--num", type=int, default=None, help="use the first NUM images only")
    common.add_argument("--batch-size", type=int, default=200)
    common.add_argument("--weights", default=None, help="converted Inception .npz (default ~/.cache/marval_jax)")
    p_stats = sub.add_parser("stats", parents=[common], help="write mu / sigma of a set of images")
    p_stats.add_argument("--out", required=True, help="output statistics .npz (keys mu, sigma)")
    p_stats.add_argument("--save-features", action="store_true",
                         help="also store the features (float32, key `features`) for precision/recall")
    p_fid = sub.add_parser("fid", parents=[common], help="FID of images against reference statistics")
    p_fid.add_argument("--ref", required=True, help="reference statistics .npz (mu, sigma; ADM batches too)")
    p_fid.add_argument("--precision-recall-ref", default=None,
                       help="reference images (or a stats .npz with `features`) for precision / recall, k=3")
    p_fid.add_argument("--pr-num", type=int, default=None, help="first N reference images for precision/recall")
    args = parser.parse_args(argv)

    from marval_jax.evaluation import fid, inception, precision_recall
    if args.command == "fid":
        ref_mu, ref_sigma = fid.load_statistics(args.ref)        # fail on a bad --ref before any network work
    images = inception.check_images(load_images(args.images, args.num), args.images)
    params = inception.load_inception(args.weights)
    feats = inception.inception_features(params, images, args.batch_size)
    mu, sigma = fid.statistics_from_features(feats)
    result = {"images": args.images, "num_images": int(feats.shape[0])}
    if args.command == "stats":
        fid.save_statistics(args.out, mu, sigma)
        if args.save_features:
            np.savez(args.out, mu=mu, sigma=sigma, features=feats.astype(np.float32))
        result["out"] = args.out
    else:
        result.update(ref=args.ref, fid=fid.frechet_distance(mu, sigma, ref_mu, ref_sigma))
        if args.precision_recall_ref:
            ref_feats = _reference_features(args.precision_recall_ref, params, args.batch_size, args.pr_num)
            pr = precision_recall.precision_recall(ref_feats, feats)
            result.update(precision_recall_ref=args.precision_recall_ref, precision=pr["precision"],
                          recall=pr["recall"], k=pr["k"], num_pr_ref=pr["num_real"])
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    run_cli(main)
