#!/usr/bin/env bash
# The whole suite in three parts, each its own pytest process: the main tests; the multi-device tests (8 forced
# CPU devices); the multi-process tests (tests/multiprocess: each test launches 2 processes x 4 CPU devices joined
# by jax.distributed through launch/run_local.sh, the code path of a pod's hosts).
# Every part always runs (a failure in one must not hide the others); the exit status is non-zero if any failed,
# and pytest's "no tests collected" (exit 5) counts as a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=cpu
# The main part runs in TEST_WORKERS pytest-xdist workers (default 2: the CI machine's cores), whole files per
# worker (module fixtures stay shared); its tests are mostly single-threaded compiles, so two workers nearly halve it.
# Files go to the workers in collection order, where tests/conftest.py puts the longest (SLOW_FIRST) first.
python -m pytest -q tests --ignore=tests/multidevice --ignore=tests/multiprocess -n "${TEST_WORKERS:-2}" \
    --dist loadfile --no-loadscope-reorder --durations=15 "$@"  # the slowest
main_rc=$?
XLA_FLAGS="--xla_force_host_platform_device_count=8" python -m pytest -q tests/multidevice "$@"
multi_rc=$?
python -m pytest -q tests/multiprocess "$@"
proc_rc=$?
echo "tests/run_all.sh: main part exit ${main_rc}, multi-device part exit ${multi_rc}, multi-process part exit ${proc_rc}"
[ "$main_rc" -eq 0 ] && [ "$multi_rc" -eq 0 ] && [ "$proc_rc" -eq 0 ]
