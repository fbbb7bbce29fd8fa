#!/usr/bin/env bash
# Per-worker bootstrap, run on every host of a job (TPU VM workers, GPU VMs, Batch tasks, GKE containers): a
# virtualenv on a pinned Python that does not depend on the image's own python3, the pinned accelerator build of
# jax, then launch/setup_env.sh with the pins of launch/constraints.txt. Idempotent: a venv on the right Python is
# reused and pip skips what is installed.
#
#   bash launch/worker_setup.sh [--dry-run] tpu|cuda|cpu
#
# The interpreter: uv (the version pinned in constraints.txt, installed from PyPI with `pip install --target` into
# $MARVAL_UV_DIR, so neither a venv module nor a writable system site-packages is needed) creates the venv on its
# managed CPython $MARVAL_PYTHON (default 3.11.18: a python-build-standalone build that this uv release pins), which
# it downloads once into ~/.local/share/uv/python. Current TPU VM images ship python3 3.10, below setup.py's 3.11.
# A venv found on another Python (e.g. one an older setup made with the image's 3.10) is rebuilt.
#
# Environment: MARVAL_VENV (default ~/marval_venv), MARVAL_JAX_VERSION (default: the pin in constraints.txt),
# MARVAL_PYTHON (default 3.11.18), MARVAL_UV_DIR (default ~/.cache/marval_uv), PYTHON (the interpreter that
# installs uv, default python3; any version pip runs on).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
source launch/lib.sh
[ "${1:-}" = --dry-run ] && { DRY_RUN=1; shift; }
ACCEL=${1:-}
case $ACCEL in tpu) EXTRA="[tpu]" ;; cuda) EXTRA="[cuda12]" ;; cpu) EXTRA="" ;;
  *) die "usage: bash launch/worker_setup.sh [--dry-run] tpu|cuda|cpu" ;; esac
VENV=${MARVAL_VENV:-$HOME/marval_venv}
PYVER=${MARVAL_PYTHON:-3.11.18}
UV_DIR=${MARVAL_UV_DIR:-$HOME/.cache/marval_uv}
CONSTRAINTS=$PWD/launch/constraints.txt
if [ -n "${MARVAL_JAX_VERSION:-}" ]; then  # another supported jax: same pins otherwise
  CONSTRAINTS=$(mktemp)
  sed -E "s/^(jax|jaxlib)==.*/\1==${MARVAL_JAX_VERSION}/" launch/constraints.txt > "$CONSTRAINTS"
fi
JAX_PIN=$(sed -n 's/^jax==//p' "$CONSTRAINTS")
UV_PIN=$(sed -n 's/^uv==//p' "$CONSTRAINTS")
[ -n "$JAX_PIN" ] && [ -n "$UV_PIN" ] || die "launch/constraints.txt must pin jax==X and uv==X"
UV=$UV_DIR/bin/uv
PY=$VENV/bin/python

venv_python() {  # the X.Y.Z of the venv's interpreter, empty if there is no working one
  [ -x "$PY" ] && "$PY" -c 'import sys; print("%d.%d.%d" % sys.version_info[:3])' 2>/dev/null || true
}

if [ "$DRY_RUN" = 1 ] || [ "$("$UV" --version 2>/dev/null | cut -d' ' -f2)" != "$UV_PIN" ]; then
  run "${PYTHON:-python3}" -m pip install -q --upgrade --target "$UV_DIR" "uv==$UV_PIN"
fi
have=$(venv_python)
if [ "$DRY_RUN" = 1 ] || [ "$have" != "$PYVER" ]; then
  [ -n "$have" ] && note "$VENV runs Python $have, not $PYVER: rebuilding it"
  run "$UV" venv --clear --seed --managed-python --python "$PYVER" "$VENV"
fi
run "$PY" -m pip install -q -U pip
run env "PIP_CONSTRAINT=$CONSTRAINTS" "$PY" -m pip install -q "jax${EXTRA}==${JAX_PIN}"
run env "PIP_CONSTRAINT=$CONSTRAINTS" "PYTHON=$PY" bash launch/setup_env.sh
# Version only: touching the devices here would start the TPU runtime outside the job (pods wait for all hosts).
run "$PY" -c "import sys, jax, flax; print('worker ready:', sys.version.split()[0], jax.__version__, flax.__version__)"
