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
# Two ways to start the job (--start):
#   boot (default)  the job survives maintenance reboots and spot preemption. The copy step uploads the code and a
#           job script (RUN.boot.sh: unpack the code to /opt/marval_jax, launch/worker_setup.sh tpu into
#           /opt/marval_venv, start the job as the systemd unit marval-RUN with job.sh start --systemd) to --code_dir (default
#           WORKDIR/code). The TPU is created with a startup-script (metadata) that runs that job script at every
#           boot of every worker, so a rebooted worker starts the job again; systemd restarts a crashed one. A spot TPU
#           that was preempted (queued resource SUSPENDED/FAILED) is deleted and created again by the create step, and
#           its first boot starts the job. The program always resumes from the workdir's latest checkpoint. Job files:
#           /var/lib/marval_jobs on each worker. `--steps=stop` stops it for good (a reboot does not restart it).
#   ssh     the job is started over SSH under nohup in ~/marval_jax (survives a dropped SSH session only).
#
# Steps (--steps, comma-separated, default create,copy,setup,run,logs,delete; each is safe to repeat):
#   create  describe the queued resource (or TPU VM); create it only if absent (or preempted/failed: delete, create
#           again), then wait until it is ACTIVE/READY
#   copy    boot: `git archive` of HEAD and the job script to --code_dir. ssh: --code=scp (default): the archive
#           scp'd to every worker, unpacked to ~/marval_jax; --code=git: clone --repo on every worker, check out --ref
#   setup   ssh: on every worker (--worker=all) bash launch/worker_setup.sh tpu (venv on uv's managed Python 3.11 +
#           pinned jax[tpu] + setup_env.sh). boot: part of the job script, so done by the run step
#   run     on every worker: start `python -m marval_jax.main ... --config.mesh.distributed_init=True` (not started
#           twice); jax.distributed.initialize() finds the pod's hosts itself. boot: runs the job script as root
#   logs    follow worker 0's log until the job ends, then collect every worker's status and copy the logs to
#           WORKDIR/logs/RUN/
#   status  every worker's job status          stop  stop the job on every worker (SIGTERM: it saves a checkpoint)
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
#   --start boot|ssh     see above (default boot)        --code_dir gs://...   where boot puts code (WORKDIR/code)
#   --code scp|git       --repo URL --ref REF (ssh start; git; default ref: this checkout's HEAD commit)
#   --run NAME           job name for logs/pid files (default: mode-variant, e.g. distill-huge)
#   --mode --config --workdir   as marval_jax.main (workdir must be gs:// on a pod: every host writes to it)
#   --env K=V            environment of the job on every worker (repeatable), e.g. --env=LIBTPU_INIT_ARGS=...
#   --keep               do not delete the TPU at the end          -- ARGS   extra flags for marval_jax.main
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
source "$ROOT/launch/lib.sh"

NAME="" ZONE="" PROJECT="" ACCEL="" VERSION="" QUEUED=1 PROVISION="" CODE=scp REPO="" REF="" RUN=""
JOB_ENV=() MODE="" CONFIG="" WORKDIR="" KEEP=0 START=boot CODE_DIR= STEPS="create,copy,setup,run,logs,delete" EXTRA=()
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
    --start) START=$val ;; --code_dir) CODE_DIR=${val%/} ;;
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
  case $s in create|copy|setup|run|logs|status|stop|delete) ;; *) die "unknown step $s in --steps=$STEPS" ;; esac
done
if has_step create; then need_value --accelerator "$ACCEL"; fi
case $START in boot|ssh) ;; *) die "--start must be boot or ssh, got $START" ;; esac
if has_step run || has_step logs || { [ "$START" = boot ] && has_step copy; }; then
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
if [ "$START" = boot ] && { has_step create || has_step copy || has_step run || has_step logs; }; then
  CODE_DIR=${CODE_DIR:-${WORKDIR%/}/code}
  [[ $CODE_DIR == gs://* ]] || die "--start=boot needs the code on GCS: pass --code_dir=gs://... (or a gs:// --workdir)"
  [ "$CODE" = scp ] || die "--code=git is for --start=ssh (boot ships the code through --code_dir)"
fi
variant=${CONFIG##*:}
RUN=${RUN:-${MODE:-job}-${variant:-run}}
SHA=$(git_sha)
REF=${REF:-$(git -C "$ROOT" rev-parse HEAD 2>/dev/null || echo HEAD)}

LOC=("--zone=$ZONE"); [ -n "$PROJECT" ] && LOC+=("--project=$PROJECT")
TPU=(gcloud compute tpus tpu-vm)
QR=(gcloud compute tpus queued-resources)
on_all() { run "${TPU[@]}" ssh "$NAME" "${LOC[@]}" --worker=all --command="$1"; }
on_w0() { run "${TPU[@]}" ssh "$NAME" "${LOC[@]}" --worker=0 --command="$1"; }
main_cmd() {  # the job's command line on a worker: $1 is the venv
  local m=()
  [ ${#JOB_ENV[@]} -gt 0 ] && m=(env "${JOB_ENV[@]}")
  m+=("$1/bin/python" -m marval_jax.main "--mode=$MODE" "--config=$CONFIG" "--workdir=$WORKDIR"
      --config.mesh.distributed_init=True "${EXTRA[@]}")
  quote "${m[@]}"
}
show_file() {  # a file a dry run (and the log) shows as "# " lines between markers
  note "--- $(basename "$1"): $2 ---"; sed 's/^/# /' "$1"; note "--- end $(basename "$1") ---"
}
startup_script() {  # the startup-script metadata: fetch and run the job script the last launch uploaded
  cat <<EOS
#!/bin/bash
# marval-jax: at every boot of every worker of $NAME (as root), run job $RUN's script (launch/tpu_vm.sh --start=boot)
gcloud storage cat $(quote "$BOOT_URI") > /run/marval-$RUN.boot.sh && exec bash /run/marval-$RUN.boot.sh
EOS
}
boot_script() {  # the job script: code, environment, systemd unit; idempotent
  local tar=marval_jax-$SHA.tar.gz jobs=/var/lib/marval_jobs
  cat <<EOS
#!/bin/bash
# marval-jax job $RUN, commit $SHA (launch/tpu_vm.sh --start=boot): run as root on every worker of $NAME at each
# boot and by the launch's run step. A stopped (job.sh stop) or finished (exit 0) job is not started at boot.
set -euo pipefail
export HOME=\${HOME:-/root}
JOBS=$jobs
mkdir -p \$JOBS && chmod 755 \$JOBS
if [ "\${MARVAL_START:-0}" != 1 ]; then
  [ -f \$JOBS/$RUN.stopped ] && { echo "$RUN was stopped: not started at boot"; exit 0; }
  [ "\$(cat \$JOBS/$RUN.rc 2>/dev/null)" = 0 ] && { echo "$RUN finished: not started at boot"; exit 0; }
fi
if [ "\$(cat /opt/marval_jax/COMMIT 2>/dev/null)" != $SHA ]; then
  if MARVAL_JOBS=\$JOBS bash /opt/marval_jax/launch/job.sh status $RUN 2>/dev/null | grep -qE 'running|restarting'; then
    echo "$RUN is running: code kept (job.sh stop $RUN first to change it)"
  else
    gcloud storage cp $(quote "$CODE_DIR/$tar") /tmp/$tar
    rm -rf /opt/marval_jax.new && mkdir /opt/marval_jax.new
    tar xzf /tmp/$tar -C /opt/marval_jax.new --strip-components=1 && echo $SHA > /opt/marval_jax.new/COMMIT
    rm -rf /opt/marval_jax && mv /opt/marval_jax.new /opt/marval_jax
  fi
fi
cd /opt/marval_jax
${MARVAL_JAX_VERSION:+MARVAL_JAX_VERSION=$MARVAL_JAX_VERSION }MARVAL_VENV=/opt/marval_venv bash launch/worker_setup.sh tpu
MARVAL_JOBS=\$JOBS bash launch/job.sh start --systemd $RUN $(main_cmd /opt/marval_venv)
EOS
}
if [ "$START" = boot ]; then
  JOBSH="MARVAL_JOBS=/var/lib/marval_jobs bash /opt/marval_jax/launch/job.sh"
  if [ -n "$CODE_DIR" ]; then
    BOOT_URI=$CODE_DIR/$RUN.boot.sh
    STARTUP=/tmp/marval-$NAME-startup.sh
    startup_script > "$STARTUP"
  fi
else
  JOBSH="bash marval_jax/launch/job.sh"
fi

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

create_tpu() {  # describe; create if absent, recreate if preempted/failed; wait until ready
  need_value --accelerator "$ACCEL"
  if [ "$QUEUED" = 1 ]; then
    DESCRIBE=("${QR[@]}" describe "$NAME" "${LOC[@]}" --format='value(state.state)')
    CREATE=("${QR[@]}" create "$NAME" --node-id="$NAME" --accelerator-type="$ACCEL" --runtime-version="$VERSION"
            "${LOC[@]}" ${PROVISION:+"$PROVISION"} ${STARTUP:+"--metadata-from-file=startup-script=$STARTUP"})
    READY=ACTIVE
  else
    DESCRIBE=("${TPU[@]}" describe "$NAME" "${LOC[@]}" --format='value(state)')
    CREATE=("${TPU[@]}" create "$NAME" --accelerator-type="$ACCEL" --version="$VERSION" "${LOC[@]}"
            ${PROVISION:+"$PROVISION"} ${STARTUP:+"--metadata-from-file=startup-script=$STARTUP"})
    READY=READY
  fi
  echo "+ $(quote "${DESCRIBE[@]}")"
  if [ "$DRY_RUN" = 1 ]; then
    note "dry run: assuming $NAME does not exist yet"
    state=""
  else
    state=$(state_of)
  fi
  if [ -n "${STARTUP:-}" ]; then show_file "$STARTUP" "startup-script: at every boot of every worker"; fi
  case $state in
    "") run "${CREATE[@]}" ;;
    FAILED|SUSPENDED|PREEMPTED|TERMINATED)
      note "$NAME is $state (preempted or failed): deleting it and creating it again (the job resumes from" \
           "its checkpoint)"
      KEEP=0 delete_tpu
      [ "$DRY_RUN" = 1 ] || until [ -z "$(state_of)" ]; do sleep 30; done
      run "${CREATE[@]}" ;;
    SUSPENDING|DELETING) die "$NAME is $state: wait until it is gone (or SUSPENDED) and rerun" ;;
    *) note "$NAME exists (state $state): reusing it" ;;
  esac
  note "waiting until $NAME is $READY (polling the describe above every 60 s)"
  if [ "$DRY_RUN" != 1 ]; then
    until state=$(state_of); [ "$state" = "$READY" ]; do
      case $state in FAILED|SUSPENDED|SUSPENDING) die "$NAME went to state $state while waiting" ;; esac
      sleep 60
    done
  fi
}
if has_step create; then create_tpu; fi

if has_step copy; then
  if [ "$START" = boot ]; then
    warn_dirty
    TAR=/tmp/marval_jax-$SHA.tar.gz BOOT=/tmp/marval-$NAME-$RUN.boot.sh
    run git -C "$ROOT" archive --format=tar.gz --prefix=marval_jax/ -o "$TAR" HEAD
    run gcloud storage cp "$TAR" "$CODE_DIR/marval_jax-$SHA.tar.gz"
    boot_script > "$BOOT"
    show_file "$BOOT" "the job script, run as root on every worker"
    run gcloud storage cp "$BOOT" "$BOOT_URI"
  elif [ "$CODE" = scp ]; then
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

if has_step setup && [ "$START" = boot ]; then
  note "--start=boot: worker setup is part of the job script (run step)"
elif has_step setup; then
  on_all "cd marval_jax && ${MARVAL_JAX_VERSION:+MARVAL_JAX_VERSION=$MARVAL_JAX_VERSION }bash launch/worker_setup.sh tpu"
fi

if has_step run; then
  if [ "$START" = boot ]; then
    # MARVAL_START=1: a launch starts the job even if it was stopped before (a boot does not)
    on_all "gcloud storage cp $(quote "$BOOT_URI") /tmp/marval-$RUN.boot.sh && sudo MARVAL_START=1 bash /tmp/marval-$RUN.boot.sh"
  else
    on_all "cd marval_jax && bash launch/job.sh start $RUN $(main_cmd '~/marval_venv')"
  fi
fi

if has_step logs; then
  # A dropped SSH stream must not end the launch (the delete step would kill a running job): re-attach while
  # worker 0 still reports the job as running (or cannot be asked), at most 100 times. --start=boot: a preempted
  # queued resource is created again (see create) and followed on.
  for attempt in $(seq 100); do
    set +e
    on_w0 "$JOBSH logs $RUN"
    job_rc=$?
    set -e
    [ "$DRY_RUN" = 1 ] && break
    st=$("${TPU[@]}" ssh "$NAME" "${LOC[@]}" --worker=0 --command="$JOBSH status $RUN" \
         2>/dev/null || echo unknown)
    if [ "$st" = unknown ] && [ "$START" = boot ]; then
      case $(state_of) in  # preempted while we watch: bring it back, its boot script resumes the job
        FAILED|SUSPENDED|PREEMPTED|TERMINATED) create_tpu; continue ;;
      esac
    fi
    case $st in
      *running*|*restarting*|unknown) note "log stream ended but the job is ${st##* }: re-attaching in 30 s"; sleep 30 ;;
      *) break ;;
    esac
  done
  on_all "$JOBSH status $RUN && $JOBSH save $RUN $(quote "$WORKDIR/logs/$RUN")"
  [ "$DRY_RUN" = 1 ] || note "worker 0 exit status $job_rc; logs of every worker in $WORKDIR/logs/$RUN/"
fi

if has_step status; then on_all "$JOBSH status $RUN"; fi
if has_step stop; then on_all "$JOBSH stop $RUN"; fi

if has_step delete; then
  trap - EXIT
  delete_tpu
fi
exit "${job_rc:-0}"
