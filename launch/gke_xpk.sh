#!/usr/bin/env bash
# Run any mode of marval_jax.main on a GKE cluster of TPU slices through xpk (PyPI `xpk`, which needs gcloud,
# kubectl and docker where it runs): one JobSet, one container per TPU host, every host running the same program.
#
#   pip install xpk   # once, on the machine that launches
#   bash launch/gke_xpk.sh --cluster=marval-v5p --zone=us-east5-a --project=PROJECT --tpu_type=v5p-256 \
#       --mode=distill --config=configs/marval.py:huge --workdir=gs://BUCKET/marval_huge \
#       -- --config.teacher_ckpt=gs://BUCKET/mar_huge
#   bash launch/gke_xpk.sh --dry-run ...   # print every command ("+ " lines), run nothing
#
# The entry point is the TPU VM's: `python -m marval_jax.main ... --config.mesh.distributed_init=True`; with no
# arguments jax.distributed.initialize() finds the slice's hosts from the GKE TPU environment. A failed or
# preempted host restarts the whole JobSet (--max_restarts, default 3) and the program resumes from the workdir's
# latest checkpoint. The cluster (and its capacity: reservation, spot or on-demand node pools) is made beforehand
# with `xpk cluster create` (docs/scale.md for the slice a config needs).
#
# Steps (--steps, default create,wait,delete):
#   create  `xpk workload list --filter-by-job=W` first; `xpk workload create` only if W is not there. The image:
#           --docker_image IMG (a set-up image: python with marval_jax installed, run from its working directory),
#           else xpk builds one from --base_image (default python:3.11-slim) plus a `git archive` of HEAD
#           (--script-dir), and the container runs launch/worker_setup.sh tpu first (venv on uv's managed Python,
#           pinned jax[tpu]; needs internet from the nodes)
#   wait    `xpk workload list --wait-for-job-completion=W` (the logs are in Cloud Logging; xpk prints the link)
#   delete  `xpk workload delete` (the JobSet; the cluster stays)
# Options: --cluster --zone --project --tpu_type (required: v5p-256, v6e-64, ...) --num_slices N (default 1,
#   multi-slice over DCN) --workload NAME (default marval-MODE-VARIANT-SHA8) --priority --max_restarts N
#   --env K=V (repeatable) --docker_image / --base_image; -- ARGS go to marval_jax.main.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
source "$ROOT/launch/lib.sh"

CLUSTER="" ZONE="" PROJECT="" TPU_TYPE="" SLICES=1 WORKLOAD="" PRIORITY="" RESTARTS=3 IMAGE=""
BASE_IMAGE=python:3.11-slim MODE="" CONFIG="" WORKDIR="" STEPS="create,wait,delete" JOB_ENV=() EXTRA=()
while [ $# -gt 0 ]; do
  arg=$1; shift
  case $arg in
    --*=*) key=${arg%%=*}; val=${arg#*=} ;;
    --dry-run|--help|-h|--) key=$arg; val="" ;;
    --*) key=$arg; [ $# -gt 0 ] || die "$arg needs a value"; val=$1; shift ;;
    *) die "unexpected argument $arg (pass main's flags after --)" ;;
  esac
  case $key in
    --cluster) CLUSTER=$val ;; --zone) ZONE=$val ;; --project) PROJECT=$val ;; --tpu_type) TPU_TYPE=$val ;;
    --num_slices) SLICES=$val ;; --workload) WORKLOAD=$val ;; --priority) PRIORITY=$val ;;
    --max_restarts) RESTARTS=$val ;; --docker_image) IMAGE=$val ;; --base_image) BASE_IMAGE=$val ;;
    --mode) MODE=$val ;; --config) CONFIG=$val ;; --workdir) WORKDIR=$val ;; --env) JOB_ENV+=("$val") ;;
    --steps) STEPS=$val ;; --dry-run) DRY_RUN=1 ;;
    --help|-h) sed -n '2,/^set -euo/p' "$0" | sed '$d'; exit 0 ;;
    --) EXTRA=("$@"); break ;;
    *) die "unknown option $key" ;;
  esac
done
has_step() { [[ ",$STEPS," == *",$1,"* ]]; }
for s in ${STEPS//,/ }; do
  case $s in create|wait|delete) ;; *) die "unknown step $s in --steps=$STEPS" ;; esac
done
need_value --cluster "$CLUSTER"; need_value --zone "$ZONE"
[[ $SLICES =~ ^[1-9][0-9]*$ ]] || die "--num_slices must be a positive integer, got $SLICES"
[[ $RESTARTS =~ ^[0-9]+$ ]] || die "--max_restarts must be a non-negative integer, got $RESTARTS"
if has_step create; then
  need_value --tpu_type "$TPU_TYPE"; need_value --mode "$MODE"; need_value --config "$CONFIG"
  need_value --workdir "$WORKDIR"
  case $MODE in train|distill|rl|sample) ;; *) die "--mode must be train, distill, rl or sample, got $MODE" ;; esac
  [ -f "$ROOT/${CONFIG%%:*}" ] || die "config file ${CONFIG%%:*} not found under $ROOT"
  [[ $WORKDIR == gs://* ]] || die "--workdir must be gs://...: every host of the slice writes to it"
fi
SHA=$(git_sha)
variant=${CONFIG##*:}
WORKLOAD=${WORKLOAD:-marval-${MODE:-job}-${variant:-run}-${SHA:0:8}}
WORKLOAD=$(echo "$WORKLOAD" | tr 'A-Z_.' 'a-z--')
[[ $WORKLOAD =~ ^[a-z][a-z0-9-]{0,38}[a-z0-9]$ ]] || die "--workload $WORKLOAD: 2-40 of a-z 0-9 -, starting with a letter"
WHERE=("--cluster=$CLUSTER" "--zone=$ZONE"); [ -n "$PROJECT" ] && WHERE+=("--project=$PROJECT")

if has_step create; then
  MAIN=()
  [ -n "$IMAGE" ] && MAIN=(python) || MAIN=(/opt/marval_venv/bin/python)
  MAIN+=(-m marval_jax.main "--mode=$MODE" "--config=$CONFIG" "--workdir=$WORKDIR"
         --config.mesh.distributed_init=True "${EXTRA[@]}")
  COMMAND=$(quote "${MAIN[@]}")
  CREATE=(xpk workload create "${WHERE[@]}" "--workload=$WORKLOAD" "--tpu-type=$TPU_TYPE" "--num-slices=$SLICES"
          "--max-restarts=$RESTARTS" ${PRIORITY:+"--priority=$PRIORITY"})
  for kv in ${JOB_ENV[@]+"${JOB_ENV[@]}"}; do CREATE+=("--env=$kv"); done
  if [ -n "$IMAGE" ]; then
    CREATE+=("--docker-image=$IMAGE")
  else
    warn_dirty
    SRC=/tmp/marval_jax-$SHA
    run rm -rf "$SRC"
    run mkdir -p "$SRC"
    echo "+ $(quote git -C "$ROOT" archive HEAD) | $(quote tar x -C "$SRC")"
    [ "$DRY_RUN" = 1 ] || { git -C "$ROOT" archive HEAD | tar x -C "$SRC"; echo "$SHA" > "$SRC/COMMIT"; }
    CREATE+=("--base-docker-image=$BASE_IMAGE" "--script-dir=$SRC")
    COMMAND="MARVAL_VENV=/opt/marval_venv bash launch/worker_setup.sh tpu && $COMMAND"
  fi
  CREATE+=("--command=$COMMAND")
  LIST=(xpk workload list "${WHERE[@]}" "--filter-by-job=$WORKLOAD")
  echo "+ $(quote "${LIST[@]}")"
  if [ "$DRY_RUN" = 1 ]; then note "dry run: assuming workload $WORKLOAD does not exist yet"; found=""
  else found=$("${LIST[@]}" 2>/dev/null | grep -w -- "$WORKLOAD" || true); fi
  if [ -z "$found" ]; then run "${CREATE[@]}"
  else note "workload $WORKLOAD exists: not created again (--steps=delete first to replace it)"; fi
fi

if has_step wait; then
  set +e
  run xpk workload list "${WHERE[@]}" "--wait-for-job-completion=$WORKLOAD"
  job_rc=$?
  set -e
fi

if has_step delete; then
  run xpk workload delete "${WHERE[@]}" "--workload=$WORKLOAD" --force
fi
exit "${job_rc:-0}"
