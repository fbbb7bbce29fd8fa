#!/bin/bash
# Downloads into WHEELS (default .whl, git-ignored) the wheels the GPU host lacks (docs/environment.md: its image has
# jax, flax, optax, orbax, numpy, protobuf, pyarrow, ... but no grain, ml-collections, clu or tensorflow-datasets),
# for its Python 3.12 on manylinux x86-64, with no dependencies resolved: the list below names every missing one.
# Run it here, where PyPI is reachable; launch/pack_reproduce_inputs.sh packs WHEELS for the device calls. Versions:
# launch/constraints.txt's pin where it has one (the same libraries as every other machine), else the pin below.
#   bash launch/fetch_device_wheels.sh             # WHEELS=.whl
#   bash launch/fetch_device_wheels.sh --dry-run   # print the requirements, fetch nothing
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.whl}
# NAME==VERSION for the packages constraints.txt does not pin (tensorflow-datasets' and grain's own needs)
EXTRA="dm-tree==0.1.10 portpicker==1.6.0 immutabledict==4.3.1 promise==2.3 simple-parsing==0.1.9
docstring-parser==0.18.0 tensorflow-metadata==1.21.0 googleapis-common-protos==1.76.0 termcolor==3.3.0 toml==0.10.2
tensorboardX==2.6.5"
PINNED="grain ml-collections clu tensorflow-datasets array-record"
reqs=()
for name in $PINNED; do
  pin=$(grep -E "^$name==" launch/constraints.txt) || { echo "error: launch/constraints.txt pins no $name" >&2; exit 2; }
  reqs+=("$pin")
done
for r in $EXTRA; do reqs+=("$r"); done
if [ "${1:-}" = "--dry-run" ]; then printf '%s\n' "${reqs[@]}"; exit 0; fi
mkdir -p "$WHEELS"
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux1_x86_64)
for r in "${reqs[@]}"; do
  case $r in
    promise==*)   # released as source only, pure Python: its wheel is built here (py3-none-any, any Python)
      python3 -m pip wheel -q --no-deps -w "$WHEELS" "$r" ;;
    *) python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
         "${PLAT[@]}" -d "$WHEELS" "$r" ;;
  esac
done
echo "$(ls "$WHEELS"/*.whl | wc -l) wheels, $(du -sh "$WHEELS" | cut -f1) in $WHEELS"
