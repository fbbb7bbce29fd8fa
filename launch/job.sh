#!/usr/bin/env bash
# A detached job on one host, by run name (used on every TPU worker by launch/tpu_vm.sh; works on any machine).
#
#   bash launch/job.sh start RUN CMD...   start CMD with nohup unless RUN is already running; output in RUN.log
#   bash launch/job.sh logs RUN           follow RUN.log until the job ends; exits with the job's status
#   bash launch/job.sh status RUN         prints "HOST RUN: running | exit N | not started"
#   bash launch/job.sh save RUN DEST      copy RUN.log to DEST/HOST.log (DEST may be gs://...)
#   bash launch/job.sh stop RUN           SIGTERM the job (the loop saves a checkpoint and exits cleanly)
# Files: RUN.log, RUN.pid, RUN.rc (exit status, written when the job ends) in $MARVAL_JOBS (default ~/marval_jobs,
# outside the code directory, which a new copy replaces); CMD runs from the repository root.
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${MARVAL_JOBS:-$HOME/marval_jobs}
ACTION=${1:-}; RUN=${2:-}
[ -n "$ACTION" ] && [ -n "$RUN" ] || { sed -n '2,10p' "$0"; exit 2; }
shift 2
mkdir -p "$JOBS"
LOG=$JOBS/$RUN.log PIDF=$JOBS/$RUN.pid RCF=$JOBS/$RUN.rc
running() { [ -f "$PIDF" ] && kill -0 "$(cat "$PIDF")" 2>/dev/null; }

case $ACTION in
  start)
    [ $# -gt 0 ] || { echo "job.sh start: no command" >&2; exit 2; }
    if running; then echo "$(hostname) $RUN: already running (pid $(cat "$PIDF")), not started again"; exit 0; fi
    rm -f "$RCF"
    nohup bash -c '"$@"; echo $? > "$0"' "$RCF" "$@" >> "$LOG" 2>&1 < /dev/null &
    echo $! > "$PIDF"
    echo "$(hostname) $RUN: started (pid $!), log $LOG" ;;
  logs)
    [ -f "$LOG" ] || { echo "$(hostname) $RUN: no log yet" >&2; exit 1; }
    if running; then tail -n +1 -F "$LOG" --pid="$(cat "$PIDF")"; else cat "$LOG"; fi
    rc=$(cat "$RCF" 2>/dev/null || echo 1)
    echo "$(hostname) $RUN: exit $rc"; exit "$rc" ;;
  status)
    if running; then echo "$(hostname) $RUN: running"
    elif [ -f "$RCF" ]; then echo "$(hostname) $RUN: exit $(cat "$RCF")"
    else echo "$(hostname) $RUN: not started"; fi ;;
  save)
    DEST=${1:?job.sh save RUN DEST}
    case $DEST in
      gs://*) gcloud storage cp "$LOG" "$DEST/$(hostname).log" ;;
      *) mkdir -p "$DEST" && cp "$LOG" "$DEST/$(hostname).log" ;;
    esac ;;
  stop)
    if running; then kill -TERM "$(cat "$PIDF")"; echo "$(hostname) $RUN: SIGTERM sent"; else echo "$(hostname) $RUN: not running"; fi ;;
  *) echo "job.sh: unknown action $ACTION" >&2; exit 2 ;;
esac
