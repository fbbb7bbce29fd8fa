#!/usr/bin/env bash
# Run any mode of marval_jax.main as a GCP Batch job on one or --nodes GPU VMs (default a3-ultragpu-8g: 8 x H200).
#
#   bash launch/gcp_batch.sh --project=PROJECT --region=us-central1 --zone=us-central1-a \
#       --code_bucket=gs://BUCKET/code --mode=distill --config=configs/marval.py:base \
#       --workdir=gs://BUCKET/marval_base -- --config.teacher_ckpt=gs://BUCKET/mar_base
#   bash launch/gcp_batch.sh --dry-run ...   # print every command ("+ " lines) and the job spec, run nothing
#
# Steps (--steps, default upload,submit,logs; `delete` removes the job record, the VM goes away by itself):
#   upload  `git archive` of HEAD -> CODE_BUCKET/marval_jax-SHA.tar.gz (the task mounts the bucket and unpacks it)
#   submit  render launch/gcp_batch_job.json with launch/batch_spec.py; describe the job first and submit only if
#           it does not exist (a finished job of the same name is an error: pick another --job or delete it)
#   logs    poll the job state every 60 s and print its new Cloud Logging lines until it succeeds or fails
#   delete  gcloud batch jobs delete
# Options: --job NAME (default marval-MODE-VARIANT-SHA), --machine_type, --gpu_type/--gpu_count (other machines),
#   --nodes N (N VMs, one jax.distributed process each: coordinator on task 0's VM, --port, process id =
#   BATCH_TASK_INDEX; see launch/batch_spec.py), --provisioning STANDARD|SPOT (--spot = SPOT), --reservation NAME,
#   --image URI (a container instead of the script runnable), --max_retries N (retries resume from the
#   workdir's checkpoint), --mem_fraction; -- ARGS go to marval_jax.main.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
source "$ROOT/launch/lib.sh"

PROJECT="" REGION="" ZONE="" CODE_BUCKET="" JOB="" MODE="" CONFIG="" WORKDIR="" STEPS="upload,submit,logs"
SPEC_ARGS=() EXTRA=()
while [ $# -gt 0 ]; do
  arg=$1; shift
  case $arg in
    --*=*) key=${arg%%=*}; val=${arg#*=} ;;
    --dry-run|--spot|--help|-h|--) key=$arg; val="" ;;
    --*) key=$arg; [ $# -gt 0 ] || die "$arg needs a value"; val=$1; shift ;;
    *) die "unexpected argument $arg (pass main's flags after --)" ;;
  esac
  case $key in
    --project) PROJECT=$val ;; --region) REGION=$val ;; --zone) ZONE=$val ;; --code_bucket) CODE_BUCKET=${val%/} ;;
    --job) JOB=$val ;; --mode) MODE=$val ;; --config) CONFIG=$val ;; --workdir) WORKDIR=$val ;;
    --steps) STEPS=$val ;; --dry-run) DRY_RUN=1 ;;
    --spot) SPEC_ARGS+=(--provisioning=SPOT) ;;
    --machine_type|--gpu_type|--gpu_count|--image|--max_retries|--mem_fraction|--max_run_duration|--disk_gb|\
    --nodes|--port|--reservation|--provisioning)
      SPEC_ARGS+=("$key=$val") ;;
    --help|-h) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    --) EXTRA=("$@"); break ;;
    *) die "unknown option $key" ;;
  esac
done
has_step() { [[ ",$STEPS," == *",$1,"* ]]; }
for s in ${STEPS//,/ }; do
  case $s in upload|submit|logs|delete) ;; *) die "unknown step $s in --steps=$STEPS" ;; esac
done
need_value --project "$PROJECT"; need_value --region "$REGION"
SHA=$(git_sha)
TAR=marval_jax-$SHA.tar.gz
if has_step upload || has_step submit; then
  need_value --code_bucket "$CODE_BUCKET"
  [[ $CODE_BUCKET == gs://* ]] || die "--code_bucket must be gs://BUCKET[/DIR], got $CODE_BUCKET"
fi
if has_step submit; then
  need_value --zone "$ZONE"; need_value --mode "$MODE"; need_value --config "$CONFIG"; need_value --workdir "$WORKDIR"
  [ -f "$ROOT/${CONFIG%%:*}" ] || die "config file ${CONFIG%%:*} not found under $ROOT"
  # the spec is rendered before anything is uploaded, so a bad option fails first
  python3 "$ROOT/launch/batch_spec.py" --code=gs://b/x.tar.gz --mode="$MODE" --config="$CONFIG" --workdir="$WORKDIR" \
    --zone="$ZONE" "${SPEC_ARGS[@]}" > /dev/null 2>/tmp/marval-batch-spec.err || die "$(tail -n1 /tmp/marval-batch-spec.err)"
fi
variant=${CONFIG##*:}
JOB=${JOB:-marval-${MODE:-job}-${variant:-run}-${SHA:0:8}}
JOB=$(echo "$JOB" | tr 'A-Z_.' 'a-z--')
LOC=("--location=$REGION" "--project=$PROJECT")
SPEC=/tmp/$JOB.json

if has_step upload; then
  warn_dirty
  run git -C "$ROOT" archive --format=tar.gz --prefix=marval_jax/ -o "/tmp/$TAR" HEAD
  run gcloud storage cp "/tmp/$TAR" "$CODE_BUCKET/$TAR"
fi

if has_step submit; then
  RENDER=(python3 "$ROOT/launch/batch_spec.py" "--code=$CODE_BUCKET/$TAR" "--mode=$MODE" "--config=$CONFIG"
          "--workdir=$WORKDIR" "--zone=$ZONE" "--run=$JOB" "${SPEC_ARGS[@]}" -- "${EXTRA[@]}")
  echo "+ $(quote "${RENDER[@]}") > $SPEC"
  if [ "$DRY_RUN" = 1 ]; then
    "${RENDER[@]}" | sed 's/^/# /'   # the spec the submit would send (rendering is local and writes nothing)
  else
    "${RENDER[@]}" > "$SPEC"
  fi
  DESCRIBE=(gcloud batch jobs describe "$JOB" "${LOC[@]}" --format='value(status.state)')
  echo "+ $(quote "${DESCRIBE[@]}")"
  if [ "$DRY_RUN" = 1 ]; then note "dry run: assuming job $JOB does not exist yet"; state=""
  else state=$("${DESCRIBE[@]}" 2>/dev/null || true); fi
  case $state in
    "") run gcloud batch jobs submit "$JOB" "${LOC[@]}" --config="$SPEC" ;;
    SUCCEEDED|FAILED) die "job $JOB already exists ($state): choose another --job or run --steps=delete" ;;
    *) note "job $JOB exists ($state): not submitted again" ;;
  esac
fi

if has_step logs; then
  STATE=(gcloud batch jobs describe "$JOB" "${LOC[@]}" --format='value(status.state)')
  UID_CMD=(gcloud batch jobs describe "$JOB" "${LOC[@]}" --format='value(uid)')
  echo "+ $(quote "${UID_CMD[@]}")"
  uid=JOB_UID; [ "$DRY_RUN" = 1 ] || uid=$("${UID_CMD[@]}")
  since=$(date -u +%Y-%m-%dT%H:%M:%SZ -d '-1 day' 2>/dev/null || echo 1970-01-01T00:00:00Z)
  read_logs() {
    gcloud logging read "logName=\"projects/$PROJECT/logs/batch_task_logs\" AND labels.job_uid=\"$uid\" AND timestamp>\"$1\"" \
      --project="$PROJECT" --order=asc --limit=10000 --format='value(timestamp,textPayload)'
  }
  echo "+ $(quote gcloud logging read "logName=\"projects/$PROJECT/logs/batch_task_logs\" AND labels.job_uid=\"$uid\" AND timestamp>\"LAST\"" --project="$PROJECT" --order=asc --limit=10000 '--format=value(timestamp,textPayload)')"
  echo "+ $(quote "${STATE[@]}")"
  note "repeating the two commands above every 60 s until the job is SUCCEEDED or FAILED"
  if [ "$DRY_RUN" != 1 ]; then
    while :; do
      state=$("${STATE[@]}")
      out=$(read_logs "$since")
      if [ -n "$out" ]; then printf '%s\n' "$out" | cut -f2-; since=$(printf '%s\n' "$out" | tail -n1 | cut -f1); fi
      case $state in SUCCEEDED) break ;; FAILED) echo "job $JOB FAILED" >&2; exit 1 ;; esac
      sleep 60
    done
  fi
fi

if has_step delete; then
  run gcloud batch jobs delete "$JOB" "${LOC[@]}" --quiet
fi
