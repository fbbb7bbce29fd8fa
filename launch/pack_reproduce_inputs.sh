#!/bin/bash
# Packs the inputs of launch/reproduce_fmnist_device.sh (docs/reproduction.md, "What travels") into one tar split in
# 25 MB chunks, .devstate/c0..cN (each with its part; the last also holds pack.sha), so that every accelerator call
# stays under the 64 MiB transfer limit next to the checkout. Inputs:
#   WHEELS     wheels the GPU host lacks (default .whl: grain, array_record, clu, tfds, ml_collections, tensorboardX,
#              tqdm, ...; see docs/environment.md)
#   RAW        the Fashion-MNIST IDX files (default /usr/share/datasets/fashion-mnist, Debian dataset-fashion-mnist)
#   INCEPTION  the FID Inception weights (default ~/.cache/marval_jax/fid_inception.npz, from
#              `python -m marval_jax.tools.convert_inception`), stored in float16 (docs/results.md, "FID network in
#              float16": FID changes by 2.2e-4 relative)
set -euo pipefail
cd "$(dirname "$0")/.."
WHEELS=${WHEELS:-.whl}; RAW=${RAW:-/usr/share/datasets/fashion-mnist}
INCEPTION=${INCEPTION:-$HOME/.cache/marval_jax/fid_inception.npz}
for p in "$WHEELS" "$RAW" "$INCEPTION"; do [ -e "$p" ] || { echo "error: $p not found (see the header)" >&2; exit 2; }; done
pack=.devstate/pack && rm -rf .devstate && mkdir -p "$pack/whl" "$pack/fmnist"
cp "$WHEELS"/*.whl "$pack/whl/" && cp "$RAW"/*-ubyte.gz "$pack/fmnist/"
python - "$INCEPTION" "$pack/fid_inception.npz" <<'PY'
import sys, numpy as np
with np.load(sys.argv[1]) as z:
    np.savez_compressed(sys.argv[2], **{k: (v.astype(np.float16) if v.dtype == np.float32 else v) for k, v in z.items()})
PY
tar -cf .devstate/pack.tar -C "$pack" . && (cd .devstate && sha256sum pack.tar > pack.sha)
split -b 25000000 -d -a 1 .devstate/pack.tar .devstate/chunk
n=0; for c in .devstate/chunk?; do mkdir -p ".devstate/c$n" && mv "$c" ".devstate/c$n/chunk$n"; n=$((n + 1)); done
cp .devstate/pack.sha ".devstate/c$((n - 1))/" && rm -rf "$pack" .devstate/pack.tar
echo "packed $(du -sh .devstate | cut -f1) in $n chunks: .devstate/c0..c$((n - 1))"
