#!/usr/bin/env bash
# The whole suite: the main tests in one process, multi-device tests (8 forced CPU devices) in their own.
# Both parts always run (a failure in the first must not hide the second); the exit status is non-zero if either
# failed, and pytest's "no tests collected" (exit 5) counts as a failure.
set -uo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=cpu
python -m pytest -q tests --ignore=tests/multidevice --durations=15 "$@"  # the slowest, for the time budget
main_rc=$?
XLA_FLAGS="--xla_force_host_platform_device_count=8" python -m pytest -q tests/multidevice "$@"
multi_rc=$?
echo "tests/run_all.sh: main part exit ${main_rc}, multi-device part exit ${multi_rc}"
[ "$main_rc" -eq 0 ] && [ "$multi_rc" -eq 0 ]
