#!/usr/bin/env bash
# The whole suite: the main tests in one process, multi-device tests (8 forced CPU devices) in their own.
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=cpu
python -m pytest -q tests --ignore=tests/multidevice --durations=15 "$@"  # the slowest, for the time budget
XLA_FLAGS="--xla_force_host_platform_device_count=8" python -m pytest -q tests/multidevice "$@"
