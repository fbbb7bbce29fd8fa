#!/usr/bin/env bash
# Run any mode of marval_jax.main on this machine: CPU, or a single-host GPU machine (all its GPUs, one process).
#
#   bash launch/run_local.sh --mode=train --config=configs/mar.py:tiny --workdir=/tmp/mar_tiny
#   bash launch/run_local.sh --platform=gpu --setup --mode=distill --config=configs/marval.py:base \
#       --workdir=gs://BUCKET/marval_base -- --config.teacher_ckpt=gs://BUCKET/mar_base
#   bash launch/run_local.sh --dry-run --platform=gpu --mode=rl --config=configs/marval_rl.py:base --workdir=/tmp/rl
#
# Options (--opt=value or --opt value):
#   --mode         train | distill | rl | sample (required)
#   --config       configs/FILE.py:VARIANT (required)
#   --workdir      local directory or gs:// path (required); rerunning resumes from its latest checkpoint
#   --platform     cpu (default) | gpu (JAX_PLATFORMS=cuda, XLA_PYTHON_CLIENT_MEM_FRACTION=--mem_fraction)
#   --gpus         CUDA_VISIBLE_DEVICES for --platform=gpu (default: all)
#   --mem_fraction GPU memory fraction XLA may take (default 0.9; XLA's own default is 0.75)
#   --setup        first install the environment: cpu: launch/setup_env.sh; gpu: launch/worker_setup.sh cuda
#                  (a venv at $MARVAL_VENV, default ~/marval_venv, with the pinned jax[cuda12])
#   --log FILE     also append stdout and stderr to FILE
#   --dry-run      print the commands ("+ " lines) and run nothing
#   -- ARGS        passed to marval_jax.main unchanged (config overrides such as --config.train.num_steps=5)
# Single host needs no jax.distributed.initialize: one process drives every local device.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
source "$ROOT/launch/lib.sh"

MODE="" CONFIG="" WORKDIR="" PLATFORM=cpu GPUS="" MEM_FRACTION=0.9 SETUP=0 LOG="" EXTRA=()
while [ $# -gt 0 ]; do
  arg=$1; shift
  case $arg in
    --*=*) key=${arg%%=*}; val=${arg#*=} ;;
    --dry-run|--setup|--help|-h|--) key=$arg; val="" ;;
    --*) key=$arg; [ $# -gt 0 ] || die "$arg needs a value"; val=$1; shift ;;
    *) die "unexpected argument $arg (pass main's flags after --)" ;;
  esac
  case $key in
    --mode) MODE=$val ;; --config) CONFIG=$val ;; --workdir) WORKDIR=$val ;;
    --platform) PLATFORM=$val ;; --gpus) GPUS=$val ;; --mem_fraction) MEM_FRACTION=$val ;;
    --log) LOG=$val ;; --setup) SETUP=1 ;; --dry-run) DRY_RUN=1 ;;
    --help|-h) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    --) EXTRA=("$@"); break ;;
    *) die "unknown option $key" ;;
  esac
done
need_value --mode "$MODE"; need_value --config "$CONFIG"; need_value --workdir "$WORKDIR"
case $MODE in train|distill|rl|sample) ;; *) die "--mode must be train, distill, rl or sample, got $MODE" ;; esac
[ -f "$ROOT/${CONFIG%%:*}" ] || die "config file ${CONFIG%%:*} not found under $ROOT"

PY=${PYTHON:-python3}
ENVV=()
case $PLATFORM in
  cpu)
    ENVV+=(JAX_PLATFORMS=cpu)
    SETUP_CMD=(bash launch/setup_env.sh) ;;
  gpu)
    VENV=${MARVAL_VENV:-$HOME/marval_venv}
    PY=${PYTHON:-$VENV/bin/python}
    ENVV+=(JAX_PLATFORMS=cuda "XLA_PYTHON_CLIENT_MEM_FRACTION=$MEM_FRACTION")
    [ -n "$GPUS" ] && ENVV+=("CUDA_VISIBLE_DEVICES=$GPUS")
    SETUP_CMD=(env "MARVAL_VENV=$VENV" bash launch/worker_setup.sh cuda) ;;
  *) die "--platform must be cpu or gpu (TPU VMs: launch/tpu_vm.sh), got $PLATFORM" ;;
esac

cd "$ROOT"
[ "$SETUP" = 1 ] && run "${SETUP_CMD[@]}"
CMD=(env "${ENVV[@]}" "$PY" -m marval_jax.main "--mode=$MODE" "--config=$CONFIG" "--workdir=$WORKDIR" "${EXTRA[@]}")
if [ -n "$LOG" ]; then
  echo "+ $(quote "${CMD[@]}") 2>&1 | tee -a $(quote "$LOG")"
  [ "$DRY_RUN" = 1 ] && exit 0
  mkdir -p "$(dirname "$LOG")"
  "${CMD[@]}" 2>&1 | tee -a "$LOG"
else
  run "${CMD[@]}"
fi
