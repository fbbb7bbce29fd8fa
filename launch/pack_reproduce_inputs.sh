#!/bin/bash
# Packs the inputs of launch/reproduce_fmnist_device.sh (docs/reproduction.md, "What travels") so that every
# accelerator call stays under the 64 MiB transfer limit next to the checkout. Inputs:
#   WHEELS     wheels the GPU host lacks (default .whl: grain, array_record, clu, tfds, ml_collections, tensorboardX,
#              ...; `bash launch/fetch_device_wheels.sh` downloads them)
#   RAW        the Fashion-MNIST IDX files (default /usr/share/datasets/fashion-mnist, Debian dataset-fashion-mnist)
#   INCEPTION  the FID Inception weights (default ~/.cache/marval_jax/fid_inception.npz, from
#              `python -m marval_jax.tools.convert_inception`), stored in float16 (docs/results.md, "FID network in
#              float16": FID changes by 2.2e-4 relative)
#   DEST       output directory (default .devstate)
#   LEAN=1     only what an evaluation needs (the wheels, the Inception weights, the test split; ~56 MB): one tar,
#              DEST/lean/lean.tar, that reproduce_fmnist_device.sh unpacks into /tmp/stash/x when the call carries
#              it. Default: everything, split in 25 MB chunks DEST/c0..cN (each with its part; the last also holds
#              pack.sha), which earlier calls copy into /tmp/stash.
#   TRAIN=1    what training adds to LEAN's: the two training IDX files and the teacher export TEACHER (default
#              marval_jax/assets/fmnist_teacher) as teacher.tar, in DEST/train (~50 MB). Carried by the call after
#              the lean one, reproduce_fmnist_device.sh puts them in place: two calls instead of five chunks.
#   SHIP=1     the shipped student (STUDENT, default marval_jax/assets/fmnist_student) in DEST/ship (~23 MB), for
#              rows of the embedded default itself (STAGE=results RESULTS_ASSETS=.devstate/ship, e.g. its KV-cache row)
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.whl}; RAW=${RAW:-/usr/share/datasets/fashion-mnist}
INCEPTION=${INCEPTION:-$HOME/.cache/marval_jax/fid_inception.npz}; DEST=${DEST:-.devstate}; LEAN=${LEAN:-0}
TRAIN=${TRAIN:-0}; TEACHER=${TEACHER:-marval_jax/assets/fmnist_teacher}
SHIP=${SHIP:-0}; STUDENT=${STUDENT:-marval_jax/assets/fmnist_student}
need() { for p in "$@"; do [ -e "$p" ] || { echo "error: $p not found (see the header)" >&2; exit 2; }; done; }
if [ "$SHIP" = 1 ]; then   # stored as fmnist_student/, the name tools/results.py reads under --assets
  need "$STUDENT/params.npz"
  rm -rf "$DEST/ship" && mkdir -p "$DEST/ship" && cp -r "$STUDENT" "$DEST/ship/fmnist_student"
  echo "packed $(du -sh "$DEST/ship" | cut -f1) in $DEST/ship"; exit 0
fi
if [ "$TRAIN" = 1 ]; then   # the export is stored as fmnist_teacher/, the name the device script's stages read
  need "$RAW" "$TEACHER/params.npz"
  rm -rf "$DEST/train" && mkdir -p "$DEST/train" && cp "$RAW"/train-*-ubyte.gz "$DEST/train/"
  tar -cf "$DEST/train/teacher.tar" -C "$(dirname "$TEACHER")" --transform "s,^$(basename "$TEACHER"),fmnist_teacher," \
      "$(basename "$TEACHER")"
  echo "packed $(du -sh "$DEST/train" | cut -f1) in $DEST/train"; exit 0
fi
[ -d "$WHEELS" ] || { echo "error: $WHEELS not found: bash launch/fetch_device_wheels.sh downloads it" >&2; exit 2; }
[ -e "$INCEPTION" ] || { echo "error: $INCEPTION not found: python -m marval_jax.tools.convert_inception writes it" >&2
  exit 2; }
need "$RAW"
pack=$DEST/pack && rm -rf "$pack" && mkdir -p "$pack/whl" "$pack/fmnist"
cp "$WHEELS"/*.whl "$pack/whl/"
if [ "$LEAN" = 1 ]; then cp "$RAW"/t10k-*-ubyte.gz "$pack/fmnist/"; else cp "$RAW"/*-ubyte.gz "$pack/fmnist/"; fi
python3 - "$INCEPTION" "$pack/fid_inception.npz" <<'PY'
import sys, numpy as np
with np.load(sys.argv[1]) as z:
    np.savez_compressed(sys.argv[2], **{k: (v.astype(np.float16) if v.dtype == np.float32 else v) for k, v in z.items()})
PY
if [ "$LEAN" = 1 ]; then
  rm -rf "$DEST/lean" && mkdir -p "$DEST/lean" && tar -cf "$DEST/lean/lean.tar" -C "$pack" . && rm -rf "$pack"
  echo "packed $(du -sh "$DEST/lean" | cut -f1) in $DEST/lean/lean.tar"; exit 0
fi
rm -rf "$DEST"/c? "$DEST/pack.sha"
tar -cf "$DEST/pack.tar" -C "$pack" . && (cd "$DEST" && sha256sum pack.tar > pack.sha)
split -b 25000000 -d -a 1 "$DEST/pack.tar" "$DEST/chunk"
n=0; for c in "$DEST"/chunk?; do mkdir -p "$DEST/c$n" && mv "$c" "$DEST/c$n/chunk$n"; n=$((n + 1)); done
cp "$DEST/pack.sha" "$DEST/c$((n - 1))/" && rm -rf "$pack" "$DEST/pack.tar"
echo "packed $(du -sch "$DEST"/c? | tail -1 | cut -f1) in $n chunks: $DEST/c0..c$((n - 1))"
