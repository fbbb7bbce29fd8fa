#!/usr/bin/env bash
# A detached job on one host, by run name (used on every TPU worker by launch/tpu_vm.sh; works on any machine).
#
#   bash launch/job.sh start [--systemd] RUN CMD...   start CMD unless RUN is already running; output in RUN.log
#   bash launch/job.sh logs RUN           follow RUN.log until the job ends; exits with the job's status
#   bash launch/job.sh status RUN         prints "HOST RUN: running | restarting | exit N | stopped | not started"
#   bash launch/job.sh save RUN DEST      copy RUN.log to DEST/HOST.log (DEST may be gs://...)
#   bash launch/job.sh stop RUN           SIGTERM the job (the loop saves a checkpoint and exits cleanly); a systemd
#                                         job is also marked stopped, so the boot script does not start it again
#   bash launch/job.sh --dry-run start ...   print the command it would run ("+ " line), run nothing
# Without --systemd the job runs under nohup (it survives a dropped SSH session, not a reboot). With --systemd it is
# the transient unit marval-RUN.service (root only): systemd restarts it when it fails (not after exit 2, a user
# error; at most 5 starts an hour) and gives it 10 minutes to checkpoint on stop. After a reboot the TPU VM's boot
# script (launch/tpu_vm.sh) starts it again; the program resumes from the workdir's latest checkpoint.
# Files: RUN.log, RUN.pid, RUN.rc (exit status, written when the job ends), RUN.stopped in $MARVAL_JOBS (default
# ~/marval_jobs, outside the code directory, which a new copy replaces); CMD runs from the repository root.
# Compiles: the job gets JAX's persistent compilation cache in $JAX_COMPILATION_CACHE_DIR (default
# $MARVAL_JOBS/jax_cache; "off": none), so a restarted job (systemd's restart, a reboot, a resume after stop) loads
# its programs instead of compiling them again (docs/reliability.md "Compiles after a restart").
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
source launch/lib.sh
[ "${1:-}" = --dry-run ] && { DRY_RUN=1; shift; }
JOBS=${MARVAL_JOBS:-$HOME/marval_jobs}
ACTION=${1:-}; shift || true
SYSTEMD=0; [ "$ACTION" = start ] && [ "${1:-}" = --systemd ] && { SYSTEMD=1; shift; }
RUN=${1:-}
[ -n "$ACTION" ] && [ -n "$RUN" ] || { sed -n '2,12p' "$0"; exit 2; }
shift
[[ $RUN =~ ^[A-Za-z0-9_.-]+$ ]] || die "run name $RUN: use letters, digits, _ . - only"
LOG=$JOBS/$RUN.log PIDF=$JOBS/$RUN.pid RCF=$JOBS/$RUN.rc STOPF=$JOBS/$RUN.stopped UNIT=marval-$RUN.service
CACHE=${JAX_COMPILATION_CACHE_DIR:-$JOBS/jax_cache}
if [ "$CACHE" = off ]; then CACHE_ENV=(-u JAX_COMPILATION_CACHE_DIR) SETENV=()   # systemd passes no environment on
else CACHE_ENV=("JAX_COMPILATION_CACHE_DIR=$CACHE") SETENV=("--setenv=JAX_COMPILATION_CACHE_DIR=$CACHE"); fi
# The wrapper records the exit status and passes SIGTERM on to the program (bash would otherwise die and leave it).
WRAP='"$@" & c=$!; trap "kill -TERM $c 2>/dev/null" TERM INT; while :; do wait $c; rc=$?; kill -0 $c 2>/dev/null || break; done; echo $rc > "$0"; exit $rc'
SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
unit_state() { command -v systemctl >/dev/null && systemctl show -p ActiveState --value "$UNIT" 2>/dev/null || true; }
state() {  # running | restarting | exit N | stopped | not started
  case $(unit_state) in
    active|deactivating) echo running; return ;;
    activating) echo restarting; return ;;
  esac
  if [ -f "$PIDF" ] && kill -0 "$(cat "$PIDF")" 2>/dev/null; then echo running
  elif [ -f "$STOPF" ]; then echo stopped
  elif [ -f "$RCF" ]; then echo "exit $(cat "$RCF")"
  else echo "not started"; fi
}
running() { case $(state) in running|restarting) return 0 ;; *) return 1 ;; esac; }

case $ACTION in
  start)
    [ $# -gt 0 ] || die "job.sh start: no command"
    if [ "$DRY_RUN" != 1 ] && running; then echo "$(hostname) $RUN: already running, not started again"; exit 0; fi
    [ "$DRY_RUN" = 1 ] || { mkdir -p "$JOBS"; rm -f "$RCF" "$STOPF"; }
    if [ "$SYSTEMD" = 1 ]; then
      run systemd-run --unit="$UNIT" --collect --working-directory="$ROOT" --setenv=HOME="$HOME" \
        "${SETENV[@]}" \
        --property=Restart=on-failure --property=RestartSec=30 --property=RestartPreventExitStatus=2 \
        --property=StartLimitIntervalSec=3600 --property=StartLimitBurst=5 --property=KillMode=mixed \
        --property=TimeoutStopSec=600 --property=StandardOutput=append:"$LOG" --property=StandardError=append:"$LOG" \
        bash -c "$WRAP" "$RCF" "$@"
      [ "$DRY_RUN" = 1 ] || { rm -f "$PIDF"; echo "$(hostname) $RUN: started as $UNIT, log $LOG"; }
    else
      echo "+ $(quote env "${CACHE_ENV[@]}" nohup bash -c "$WRAP" "$RCF" "$@") >> $LOG 2>&1 &"
      [ "$DRY_RUN" = 1 ] && exit 0
      env "${CACHE_ENV[@]}" nohup bash -c "$WRAP" "$RCF" "$@" >> "$LOG" 2>&1 < /dev/null &
      echo $! > "$PIDF"
      echo "$(hostname) $RUN: started (pid $!), log $LOG"
    fi ;;
  logs)
    [ -f "$LOG" ] || { echo "$(hostname) $RUN: no log yet" >&2; exit 1; }
    tail -n +1 -F "$LOG" 2>/dev/null & t=$!
    while running; do sleep 1; done   # a systemd job keeps its log across restarts: follow it until the unit is done
    sleep 1; kill "$t" 2>/dev/null || true
    rc=$(cat "$RCF" 2>/dev/null || echo 1)
    echo "$(hostname) $RUN: $(state)"; exit "$rc" ;;
  status) echo "$(hostname) $RUN: $(state)" ;;
  save)
    DEST=${1:?job.sh save RUN DEST}
    case $DEST in
      gs://*) run gcloud storage cp "$LOG" "$DEST/$(hostname).log" ;;
      *) run mkdir -p "$DEST" && run cp "$LOG" "$DEST/$(hostname).log" ;;
    esac ;;
  stop)
    # the mark also keeps the boot script from starting it again (a systemd job's files are root's)
    if [ -w "$JOBS" ]; then touch "$STOPF"; elif [ -d "$JOBS" ]; then $SUDO touch "$STOPF"; fi
    us=$(unit_state)
    if [ -n "$us" ] && [ "$us" != inactive ]; then
      run $SUDO systemctl stop "$UNIT"; echo "$(hostname) $RUN: stopped ($UNIT)"
    elif [ -f "$PIDF" ] && kill -0 "$(cat "$PIDF")" 2>/dev/null; then
      run kill -TERM "$(cat "$PIDF")"; echo "$(hostname) $RUN: SIGTERM sent"
    else
      echo "$(hostname) $RUN: not running"
    fi ;;
  *) die "job.sh: unknown action $ACTION" ;;
esac
