#!/usr/bin/env bash
# The benchmark suite on one GPU (H100 or H200; the JSON and the table name the card) in one call, from the
# repository root (docs/benchmarks.md):
#
#   OUT=/path/to/results bash launch/gpu_bench.sh            # BUDGET=480 by default
#   BUDGET=300 WHAT=kv,breakdown OUT=/tmp/b bash launch/gpu_bench.sh --kv-batch 256
#   BUDGET=300 WHAT=block OUT=/tmp/b bash launch/gpu_bench.sh       # the transformer block breakdown only
#   bash launch/gpu_bench.sh --dry-run                         # print the commands, run nothing
#
# Writes $OUT/gpu.json (rewritten after every measurement), $OUT/benchmarks.md (a copy of docs/benchmarks.md whose
# generated section holds this run's tables: copy it over docs/benchmarks.md to publish) and $OUT/bench.log (the
# whole output). Installs nothing: jax with its CUDA plugin, flax and optax must already be installed.
# Always exits 0 once it has written what it measured: a failed or out-of-memory row is recorded in the JSON
# (status "error" / "oom"), a row that would not fit the budget as "skipped".
#
# Environment (all optional):
#   OUT         output directory (default ./bench_out)
#   BUDGET      seconds for the suite's measurements (--time-budget, default 480); rows that would not fit are skipped
#   HARD_LIMIT  seconds after which the suite is killed whatever it is doing (default BUDGET + 45); the JSON and table
#               then hold every row finished before
#   WHAT        --what (default sample,train,kv,breakdown); WHAT=block runs the block/* rows (one transformer block
#               and its parts, each called 24 times in one compiled loop, at --block-batch 256, T = 320; not in the
#               default), e.g. with --block-batch / --block-calls passed through as extra arguments
#   GSIM_BATCH, RL_BATCH, KV_APPROX   --gsim-batch (64), --rl-batch (2), --kv-approx (2,4)
#   XLA_PYTHON_CLIENT_MEM_FRACTION    GPU memory XLA may take (default 0.9 here; XLA's own default 0.75 would leave
#               a quarter of the card unused and make the remat-off RL step fail earlier)
#   PYTHON      the interpreter (default: python, else python3)
#   Extra arguments are passed to `python -m marval_jax.benchmarks` unchanged (a repeated flag: the last one counts).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 0

DRY_RUN=0
ARGS=()
for a in "$@"; do
  case $a in
    --dry-run) DRY_RUN=1 ;;
    --help|-h) sed -n '2,/^set -uo/p' "$0" | sed '$d'; exit 0 ;;
    *) ARGS+=("$a") ;;
  esac
done

OUT=${OUT:-bench_out}
BUDGET=${BUDGET:-480}
HARD_LIMIT=${HARD_LIMIT:-$(( ${BUDGET%.*} + 45 ))}
WHAT=${WHAT:-sample,train,kv,breakdown}
export PYTHONUNBUFFERED=1
export JAX_PLATFORMS=${JAX_PLATFORMS:-cuda}
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.9}
PY=${PYTHON:-$(command -v python || command -v python3 || echo python)}

SUITE=("$PY" -m marval_jax.benchmarks --models base --batch 1,256 --what "$WHAT"
       --out "$OUT/gpu.json" --table "$OUT/benchmarks.md" --time-budget "$BUDGET"
       --gsim-batch "${GSIM_BATCH:-64}" --rl-batch "${RL_BATCH:-2}" --kv-approx "${KV_APPROX:-2,4}"
       ${ARGS[@]+"${ARGS[@]}"})
RENDER=("$PY" -m marval_jax.benchmarks --from-json "$OUT/gpu.json" --table "$OUT/benchmarks.md")

if [ "$DRY_RUN" = 1 ]; then
  echo "# OUT=$OUT BUDGET=$BUDGET HARD_LIMIT=$HARD_LIMIT JAX_PLATFORMS=$JAX_PLATFORMS" \
       "XLA_PYTHON_CLIENT_MEM_FRACTION=$XLA_PYTHON_CLIENT_MEM_FRACTION PYTHONUNBUFFERED=1"
  echo "+ $(printf '%q ' timeout --signal=TERM --kill-after=15 "$HARD_LIMIT" "${SUITE[@]}")2>&1 | tee -a $OUT/bench.log"
  echo "+ $(printf '%q ' "${RENDER[@]}")"
  exit 0
fi

mkdir -p "$OUT" || exit 0
LOG="$OUT/bench.log"
# the table goes into a copy of the benchmarks page, so the result can replace docs/benchmarks.md as it is
[ -f docs/benchmarks.md ] && [ ! -f "$OUT/benchmarks.md" ] && cp docs/benchmarks.md "$OUT/benchmarks.md"
{
  echo "# $(date -u +%Y-%m-%dT%H:%M:%SZ) commit $(git rev-parse HEAD 2>/dev/null || echo unknown)" \
       "budget ${BUDGET}s, hard limit ${HARD_LIMIT}s"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
} 2>&1 | tee -a "$LOG"

timeout --signal=TERM --kill-after=15 "$HARD_LIMIT" "${SUITE[@]}" 2>&1 | tee -a "$LOG"
rc=${PIPESTATUS[0]}
echo "# suite exit status $rc (1: some row failed, see the JSON; 124/137: killed at the hard limit)" | tee -a "$LOG"
if [ -f "$OUT/gpu.json" ]; then  # the table from the JSON as it is now (also after a kill mid-write)
  "${RENDER[@]}" 2>&1 | tee -a "$LOG"
fi
ls -l "$OUT" 2>&1 | tee -a "$LOG"
exit 0
