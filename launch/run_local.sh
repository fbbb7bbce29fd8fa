#!/usr/bin/env bash
# Run any mode of marval_jax.main on this machine: CPU, or a single-host GPU machine (all its GPUs, one process).
#
#   bash launch/run_local.sh --mode=train --config=configs/mar.py:tiny --workdir=/tmp/mar_tiny
#   bash launch/run_local.sh --platform=gpu --setup --mode=distill --config=configs/marval.py:base \
#       --workdir=gs://BUCKET/marval_base -- --config.teacher_ckpt=gs://BUCKET/mar_base
#   bash launch/run_local.sh --dry-run --platform=gpu --mode=rl --config=configs/marval_rl.py:base --workdir=/tmp/rl
#
# Options (--opt=value or --opt value):
#   --mode         train | distill | rl | sample | evaluate | demo (required; every mode of marval_jax.main)
#   --config       configs/FILE.py:VARIANT (required)
#   --workdir      local directory or gs:// path (required); rerunning resumes from its latest checkpoint
#   --platform     cpu (default) | gpu (JAX_PLATFORMS=cuda, XLA_PYTHON_CLIENT_MEM_FRACTION=--mem_fraction)
#   --gpus         CUDA_VISIBLE_DEVICES for --platform=gpu (default: all)
#   --mem_fraction GPU memory fraction XLA may take (default 0.9; XLA's own default is 0.75)
#   --setup        first install the environment: cpu: launch/setup_env.sh; gpu: launch/worker_setup.sh cuda
#                  (a venv at $MARVAL_VENV, default ~/marval_venv, with the pinned jax[cuda12])
#   --log FILE     also append stdout and stderr to FILE
#   --dry-run      print the commands ("+ " lines) and run nothing
#   --processes N  (cpu) start N processes of one program on this machine, as the N hosts of a pod: joined by
#                  jax.distributed.initialize with a localhost coordinator (--config.mesh.coordinator_address,
#                  num_processes, process_id are passed), CPU collectives through gloo. Each output line is prefixed
#                  "[i] " (i = process id); the launcher exits with the first non-zero exit status of any process
#                  (the others get --grace seconds, then are killed); SIGTERM / Ctrl-C to the launcher is passed to
#                  every process (a preemption of all of them: they agree on a step, save it and exit 0).
#   --devices_per_process M   forced CPU devices per process (XLA_FLAGS=--xla_force_host_platform_device_count=M)
#   --port P       coordinator port for --processes > 1 (default: a free one)
#   --grace S      seconds the other processes get after one fails (default 10)
#   -- ARGS        passed to marval_jax.main unchanged (config overrides such as --config.train.num_steps=5)
# One process drives every local device and needs no jax.distributed.initialize; --processes=N runs the code path
# of a pod (N processes, one program) on one machine.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
source "$ROOT/launch/lib.sh"

MODE="" CONFIG="" WORKDIR="" PLATFORM=cpu GPUS="" MEM_FRACTION=0.9 SETUP=0 LOG="" EXTRA=()
PROCESSES=1 DEVICES_PER_PROCESS="" PORT="" GRACE=10
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
    --processes) PROCESSES=$val ;; --devices_per_process) DEVICES_PER_PROCESS=$val ;;
    --port) PORT=$val ;; --grace) GRACE=$val ;;
    --help|-h) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    --) EXTRA=("$@"); break ;;
    *) die "unknown option $key" ;;
  esac
done
need_value --mode "$MODE"; need_value --config "$CONFIG"; need_value --workdir "$WORKDIR"
case $MODE in train|distill|rl|sample|evaluate|demo) ;;
  *) die "--mode must be train, distill, rl, sample, evaluate or demo, got $MODE" ;; esac
[ -f "$ROOT/${CONFIG%%:*}" ] || die "config file ${CONFIG%%:*} not found under $ROOT"
[[ $PROCESSES =~ ^[1-9][0-9]*$ ]] || die "--processes must be an integer >= 1, got $PROCESSES"
[ -z "$DEVICES_PER_PROCESS" ] || [[ $DEVICES_PER_PROCESS =~ ^[1-9][0-9]*$ ]] \
  || die "--devices_per_process must be an integer >= 1, got $DEVICES_PER_PROCESS"
[ -z "$PORT" ] || [[ $PORT =~ ^[0-9]+$ ]] || die "--port must be a port number, got $PORT"
[[ $GRACE =~ ^[0-9]+$ ]] || die "--grace must be a number of seconds, got $GRACE"
if [ "$PROCESSES" -gt 1 ] && [ "$PLATFORM" != cpu ]; then
  die "--processes > 1 runs CPU processes (the pod code path on one machine); got --platform=$PLATFORM"
fi

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

[ -n "$DEVICES_PER_PROCESS" ] && [ "$PLATFORM" = cpu ] && \
  ENVV+=("XLA_FLAGS=${XLA_FLAGS:+$XLA_FLAGS }--xla_force_host_platform_device_count=$DEVICES_PER_PROCESS")

cd "$ROOT"
[ "$SETUP" = 1 ] && run "${SETUP_CMD[@]}"
if [ "$PROCESSES" -gt 1 ]; then
  [ -n "$PORT" ] || PORT=$("$PY" -c 'import socket; s = socket.socket(); s.bind(("localhost", 0)); print(s.getsockname()[1])')
  PIDS=() LIVE=() FIRST_RC=0 KILLER=""
  stop_all() {  # a preemption of the launcher is a preemption of every process
    note "launcher got $1: passing SIGTERM to processes ${LIVE[*]:-none}"
    [ ${#LIVE[@]} -gt 0 ] && kill -TERM "${LIVE[@]}" 2>/dev/null
  }
  trap 'stop_all SIGTERM' TERM
  trap 'stop_all SIGINT' INT
  trap '[ ${#LIVE[@]} -gt 0 ] && kill -KILL "${LIVE[@]}" 2>/dev/null; [ -n "$KILLER" ] && kill "$KILLER" 2>/dev/null' EXIT
  for ((i = 0; i < PROCESSES; i++)); do
    CMD=(env "${ENVV[@]}" "$PY" -m marval_jax.main "--mode=$MODE" "--config=$CONFIG" "--workdir=$WORKDIR"
         "--config.mesh.coordinator_address=localhost:$PORT" "--config.mesh.num_processes=$PROCESSES"
         "--config.mesh.process_id=$i" "${EXTRA[@]}")
    echo "+ [$i] $(quote "${CMD[@]}")"
    [ "$DRY_RUN" = 1 ] && continue
    if [ -n "$LOG" ]; then
      mkdir -p "$(dirname "$LOG")"
      "${CMD[@]}" > >(sed -u "s/^/[$i] /" | tee -a "$LOG") 2>&1 &
    else
      "${CMD[@]}" > >(sed -u "s/^/[$i] /") 2>&1 &
    fi
    PIDS+=($!)
    note "process $i: pid $!"
  done
  [ "$DRY_RUN" = 1 ] && exit 0
  LIVE=("${PIDS[@]}")
  while [ ${#LIVE[@]} -gt 0 ]; do
    DONE=""
    rc=0; wait -n -p DONE "${LIVE[@]}" || rc=$?
    if [ -z "${DONE:-}" ]; then  # a trapped signal interrupted the wait; a process may have ended meanwhile
      for p in "${LIVE[@]}"; do
        if ! kill -0 "$p" 2>/dev/null; then DONE=$p; rc=0; wait "$p" 2>/dev/null || rc=$?; break; fi
      done
      [ -n "${DONE:-}" ] || continue
    fi
    NEXT=(); for p in "${LIVE[@]}"; do [ "$p" = "$DONE" ] || NEXT+=("$p"); done; LIVE=("${NEXT[@]}")
    for ((i = 0; i < PROCESSES; i++)); do if [ "${PIDS[$i]}" = "$DONE" ]; then break; fi; done
    note "process $i (pid $DONE) exited with status $rc"
    if [ "$rc" -ne 0 ] && [ "$FIRST_RC" -eq 0 ]; then
      FIRST_RC=$rc
      if [ ${#LIVE[@]} -gt 0 ]; then
        note "process $i failed: the others (${LIVE[*]}) are killed in ${GRACE}s unless they exit"
        (exec >/dev/null 2>&1; sleep "$GRACE" & s=$!; trap 'kill $s; exit 0' TERM; wait $s
         kill -KILL "${LIVE[@]}") &
        KILLER=$!
      fi
    fi
  done
  if [ -n "$KILLER" ]; then kill "$KILLER" 2>/dev/null || true; KILLER=""; fi
  wait 2>/dev/null || true  # the output prefixers flush
  exit "$FIRST_RC"
fi
CMD=(env "${ENVV[@]}" "$PY" -m marval_jax.main "--mode=$MODE" "--config=$CONFIG" "--workdir=$WORKDIR" "${EXTRA[@]}")
if [ -n "$LOG" ]; then
  echo "+ $(quote "${CMD[@]}") 2>&1 | tee -a $(quote "$LOG")"
  [ "$DRY_RUN" = 1 ] && exit 0
  mkdir -p "$(dirname "$LOG")"
  "${CMD[@]}" 2>&1 | tee -a "$LOG"
else
  run "${CMD[@]}"
fi
