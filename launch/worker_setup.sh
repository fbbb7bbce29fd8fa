#!/usr/bin/env bash
# Per-worker bootstrap, run on every host of a job (TPU VM workers through `--worker=all`, GPU VMs, batch jobs):
# a virtualenv with the pinned accelerator build of jax, then launch/setup_env.sh with the pins of
# launch/constraints.txt. Idempotent: an existing venv is reused and pip skips what is installed.
#
#   bash launch/worker_setup.sh tpu|cuda|cpu
#
# Environment: MARVAL_VENV (default ~/marval_venv), MARVAL_JAX_VERSION (default: the pin in constraints.txt),
# PYTHON (the interpreter that creates the venv, default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
ACCEL=${1:-}
case $ACCEL in tpu) EXTRA="[tpu]" ;; cuda) EXTRA="[cuda12]" ;; cpu) EXTRA="" ;;
  *) echo "usage: bash launch/worker_setup.sh tpu|cuda|cpu" >&2; exit 2 ;; esac
VENV=${MARVAL_VENV:-$HOME/marval_venv}
CONSTRAINTS=$PWD/launch/constraints.txt
if [ -n "${MARVAL_JAX_VERSION:-}" ]; then  # another supported jax: same pins otherwise
  CONSTRAINTS=$(mktemp)
  sed -E "s/^(jax|jaxlib)==.*/\1==${MARVAL_JAX_VERSION}/" launch/constraints.txt > "$CONSTRAINTS"
fi
JAX_PIN=$(sed -n 's/^jax==//p' "$CONSTRAINTS")

if [ ! -x "$VENV/bin/python" ]; then
  if ! "${PYTHON:-python3}" -m venv "$VENV" 2>/dev/null; then
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -qq && $SUDO apt-get install -y -qq python3-venv >/dev/null
    "${PYTHON:-python3}" -m venv "$VENV"
  fi
fi
PY=$VENV/bin/python
$PY -m pip install -q -U pip
PIP_CONSTRAINT=$CONSTRAINTS $PY -m pip install -q "jax${EXTRA}==${JAX_PIN}"
PIP_CONSTRAINT=$CONSTRAINTS PYTHON=$PY bash launch/setup_env.sh
# Version only: touching the devices here would start the TPU runtime outside the job (pods wait for all hosts).
$PY -c "import jax, flax; print('worker ready: jax', jax.__version__, 'flax', flax.__version__)"
