#!/usr/bin/env bash
# Run any mode of marval_jax.main on a Cloud TPU VM or pod slice: create (or reuse) the TPU, ship the code, set up
# the same pinned environment on every worker, start the job on all workers, stream worker 0's log, clean up.
#
#   bash launch/tpu_vm.sh --name=marval-h --zone=us-east5-a --project=PROJECT --accelerator=v5p-256 \
#       --mode=distill --config=configs/marval.py:huge --workdir=gs://BUCKET/marval_huge \
#       -- --config.teacher_ckpt=gs://BUCKET/mar_huge --config.data.cache_dir=gs://BUCKET/imagenet_kl16_cache
#   bash launch/tpu_vm.sh --dry-run ...        # print every command ("+ " lines), run nothing
#   bash launch/tpu_vm.sh --steps=logs ...     # re-attach to the log of a running job
#   bash launch/tpu_vm.sh --steps=delete ...   # tear down
#
# Steps (--steps, comma-separated, default create,copy,setup,run,logs,delete; each is safe to repeat):
#   create  describe the queued resource (or TPU VM); create it only if absent, then wait until it is ACTIVE/READY
#   copy    --code=scp (default): `git archive` of HEAD, scp to every worker, unpack to ~/marval_jax;
#           --code=git: clone --repo on every worker (once) and check out --ref
#   setup   on every worker (--worker=all): bash launch/worker_setup.sh tpu (venv + pinned jax[tpu] + setup_env.sh)
#   run     on every worker: launch/job.sh starts `python -m marval_jax.main ... --config.mesh.distributed_init=True`
#           detached (not started twice); jax.distributed.initialize() finds the pod's hosts itself
#   logs    follow worker 0's log until the job ends, then collect every worker's status and copy the logs to
#           WORKDIR/logs/RUN/
#   delete  delete the queued resource (--force also deletes its TPU) or the TPU VM; skipped with --keep. When
#           delete is among the steps it also runs if an earlier step fails, so a failed launch costs nothing.
#
# Options (--opt=value or --opt value):
#   --name NAME          TPU (and queued resource) name (required)      --zone ZONE (required)
#   --project PROJECT    default: gcloud's configured project            --accelerator TYPE (required: v5p-256, ...)
#   --version VERSION    TPU software version; default by generation: v5p -> v2-alpha-tpuv5,
#                        v5litepod -> v2-alpha-tpuv5-lite, v6e -> v2-alpha-tpuv6e, v4 -> tpu-ubuntu2204-base
#   --queued | --direct  queued resource (default; waits for capacity) or a plain `tpu-vm create`
#   --spot | --reserved  provisioning (default on-demand)
#   --code scp|git       --repo URL --ref REF (git; default ref: this checkout's HEAD commit)
#   --run NAME           job name for logs/pid files (default: mode-variant, e.g. distill-huge)
#   --mode --config --workdir   as marval_jax.main (workdir must be gs:// on a pod: every host writes to it)
#   --env K=V            environment of the job on every worker (repeatable), e.g. --env=LIBTPU_INIT_ARGS=...
#   --keep               do not delete the TPU at the end          -- ARGS   extra flags for marval_jax.main
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
source "$ROOT/launch/lib.sh"

NAME="" ZONE="" PROJECT="" ACCEL="" VERSION="" QUEUED=1 PROVISION="" CODE=scp REPO="" REF="" RUN=""
JOB_ENV=() MODE="" CONFIG="" WORKDIR="" KEEP=0 STEPS="create,copy,setup,run,logs,delete" EXTRA=()
while [ $# -gt 0 ]; do
  arg=$1; shift
  case $arg in
    --*=*) key=${arg%%=*}; val=${arg#*=} ;;
    --dry-run|--queued|--direct|--spot|--reserved|--keep|--help|-h|--) key=$arg; val="" ;;
    --*) key=$arg; [ $# -gt 0 ] || die "$arg needs a value"; val=$1; shift ;;
    *) die "unexpected argument $arg (pass main's flags after --)" ;;
  esac
  case $key in
    --name) NAME=$val ;; --zone) ZONE=$val ;; --project) PROJECT=$val ;; --accelerator) ACCEL=$val ;;
    --version) VERSION=$val ;; --queued) QUEUED=1 ;; --direct) QUEUED=0 ;;
    --spot) PROVISION=--spot ;; --reserved) PROVISION=--reserved ;;
    --code) CODE=$val ;; --repo) REPO=$val ;; --ref) REF=$val ;; --run) RUN=$val ;;
    --mode) MODE=$val ;; --config) CONFIG=$val ;; --workdir) WORKDIR=$val ;;
    --env) JOB_ENV+=("$val") ;; --steps) STEPS=$val ;; --keep) KEEP=1 ;; --dry-run) DRY_RUN=1 ;;
    --help|-h) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    --) EXTRA=("$@"); break ;;
    *) die "unknown option $key" ;;
  esac
done
need_value --name "$NAME"; need_value --zone "$ZONE"
has_step() { [[ ",$STEPS," == *",$1,"* ]]; }
for s in ${STEPS//,/ }; do
  case $s in create|copy|setup|run|logs|delete) ;; *) die "unknown step $s in --steps=$STEPS" ;; esac
done
if has_step create; then need_value --accelerator "$ACCEL"; fi
if has_step run || has_step logs; then
  need_value --mode "$MODE"; need_value --config "$CONFIG"; need_value --workdir "$WORKDIR"
  case $MODE in train|distill|rl|sample) ;; *) die "--mode must be train, distill, rl or sample, got $MODE" ;; esac
  [ -f "$ROOT/${CONFIG%%:*}" ] || die "config file ${CONFIG%%:*} not found under $ROOT"
  [[ $WORKDIR == gs://* ]] || echo "warning: --workdir $WORKDIR is not gs://: each worker writes its own copy" >&2
fi
if [ -z "$VERSION" ]; then
  case $ACCEL in
    v5p-*) VERSION=v2-alpha-tpuv5 ;; v5litepod-*|v5e-*) VERSION=v2-alpha-tpuv5-lite ;;
    v6e-*) VERSION=v2-alpha-tpuv6e ;; v4-*) VERSION=tpu-ubuntu2204-base ;;
    "") ;; *) die "no default --version for --accelerator=$ACCEL; pass --version" ;;
  esac
fi
case $CODE in scp) ;; git) need_value --repo "$REPO" ;; *) die "--code must be scp or git" ;; esac
variant=${CONFIG##*:}
RUN=${RUN:-${MODE:-job}-${variant:-run}}
SHA=$(git_sha)
REF=${REF:-$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo HEAD)}

LOC=("--zone=$ZONE"); [ -n "$PROJECT" ] && LOC+=("--project=$PROJECT")
TPU=(gcloud compute tpus tpu-vm)
QR=(gcloud compute tpus queued-resources)
on_all() { run "${TPU[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command="$1"; }
on_w0() { run "${TPU[@]}" ssh "$NAME" "${LOC[@]}" --worker=0 --command="$1"; }

delete_tpu() {
  if [ "$KEEP" = 1 ]; then note "--keep: $NAME is left running; delete it with --steps=delete"; return 0; fi
  if [ "$QUEUED" = 1 ]; then run "${QR[@]}" delete "$NAME" "${LOC[@]}" --force --quiet
  else run "${TPU[@]}" delete "$NAME" "${LOC[@]}" --quiet; fi
}
if has_step delete && [ "$DRY_RUN" != 1 ]; then
  trap 'rc=$?; if [ $rc -ne 0 ]; then echo "launch failed (exit $rc): cleaning up" >&2; delete_tpu; fi' EXIT
fi

state_of() {  # prints the resource state, empty if it does not exist
  if [ "$QUEUED" = 1 ]; then "${QR[@]}" describe "$NAME" "${LOC[@]}" --format='value(state.state)' 2>/dev/null || true
  else "${TPU[@]}" describe "$NAME" "${LOC[@]}" --format='value(state)' 2>/dev/null || true; fi
}

if has_step create; then
  if [ "$QUEUED" = 1 ]; then
    DESCRIBE=("${QR[@]}" describe "$NAME" "${LOC[@]}" --format='value(state.state)')
    CREATE=("${QR[@]}" create "$NAME" --node-id="$NAME" --accelerator-type="$ACCEL" --runtime-version="$VERSION"
            "${LOC[@]}" ${PROVISION:+"$PROVISION"})
    READY=ACTIVE
  else
    DESCRIBE=("${TPU[@]}" describe "$NAME" "${LOC[@]}" --format='value(state)')
    CREATE=("${TPU[@]}" create "$NAME" --accelerator-type="$ACCEL" --version="$VERSION" "${LOC[@]}"
            ${PROVISION:+"$PROVISION"})
    READY=READY
  fi
  echo "+ $(quote "${DESCRIBE[@]}")"
  if [ "$DRY_RUN" = 1 ]; then
    note "dry run: assuming $NAME does not exist yet"
    state=""
  else
    state=$(state_of)
  fi
  case $state in
    "") run "${CREATE[@]}" ;;
    FAILED|SUSPENDED|SUSPENDING|PREEMPTED|TERMINATED)
      die "$NAME exists in state $state: delete it first (--steps=delete) and rerun" ;;
    *) note "$NAME exists (state $state): reusing it" ;;
  esac
  note "waiting until $NAME is $READY (polling the describe above every 60 s)"
  if [ "$DRY_RUN" != 1 ]; then
    until state=$(state_of); [ "$state" = "$READY" ]; do
      case $state in FAILED|SUSPENDED|SUSPENDING) die "$NAME went to state $state while waiting" ;; esac
      sleep 60
    done
  fi
fi

if has_step copy; then
  if [ "$CODE" = scp ]; then
    warn_dirty
    TAR=/tmp/marval_jax-$SHA.tar.gz
    run git -C "$ROOT" archive --format=tar.gz --prefix=marval_jax/ -o "$TAR" HEAD
    run "${TPU[@]}" scp "$TAR" "$NAME:marval_jax-$SHA.tar.gz" "${LOC[@]}" --worker=all
    # never swap the code under a running job (a repeated launch re-attaches instead)
    unpack="rm -rf marval_jax.new && mkdir marval_jax.new"
    unpack+=" && tar xzf marval_jax-$SHA.tar.gz -C marval_jax.new --strip-components=1"
    unpack+=" && echo $SHA > marval_jax.new/COMMIT && rm -rf marval_jax && mv marval_jax.new marval_jax"
    busy="bash marval_jax/launch/job.sh status $RUN 2>/dev/null | grep -q running"
    on_all "if $busy; then echo $RUN is running: code kept; else $unpack; fi"
  else
    on_all "([ -d marval_jax/.git ] || git clone -q $(quote "$REPO") marval_jax) && cd marval_jax \
&& git fetch -q origin && git checkout -q $(quote "$REF")"
  fi
fi

if has_step setup; then
  on_all "cd marval_jax && ${MARVAL_JAX_VERSION:+MARVAL_JAX_VERSION=$MARVAL_JAX_VERSION }bash launch/worker_setup.sh tpu"
fi

if has_step run; then
  MAIN=()
  [ ${#JOB_ENV[@]} -gt 0 ] && MAIN=(env "${JOB_ENV[@]}")
  MAIN+=('~/marval_venv/bin/python' -m marval_jax.main "--mode=$MODE" "--config=$CONFIG" "--workdir=$WORKDIR"
        --config.mesh.distributed_init=True "${EXTRA[@]}")
  on_all "cd marval_jax && bash launch/job.sh start $RUN $(quote "${MAIN[@]}")"
fi

if has_step logs; then
  # A dropped SSH stream must not end the launch (the delete step would kill a running job): re-attach while
  # worker 0 still reports the job as running (or cannot be asked), at most 100 times.
  for attempt in $(seq 100); do
    set +e
    on_w0 "cd marval_jax && bash launch/job.sh logs $RUN"
    job_rc=$?
    set -e
    [ "$DRY_RUN" = 1 ] && break
    st=$("${TPU[@]}" ssh "$NAME" "${LOC[@]}" --worker=0 --command="cd marval_jax && bash launch/job.sh status $RUN" \
         2>/dev/null || echo unknown)
    case $st in
      *running*|unknown) note "log stream ended but the job is ${st##* }: re-attaching in 30 s"; sleep 30 ;;
      *) break ;;
    esac
  done
  on_all "cd marval_jax && bash launch/job.sh status $RUN && bash launch/job.sh save $RUN $(quote "$WORKDIR/logs/$RUN")"
  [ "$DRY_RUN" = 1 ] || note "worker 0 exit status $job_rc; logs of every worker in $WORKDIR/logs/$RUN/"
fi

if has_step delete; then
  trap - EXIT
  delete_tpu
fi
exit "${job_rc:-0}"
