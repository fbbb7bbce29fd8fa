#!/bin/bash
# One accelerator call of the Fashion-MNIST teacher reproduction (docs/reproduction.md "Teacher FID <= 20").
# The inputs (FID Inception weights in float16, the Fashion-MNIST IDX files, the wheels) do not fit one call next to
# the checkout, so earlier calls of the same warm machine left them, split, in /tmp/stash (chunk0..N + pack.sha).
#   STAGE=first   unpack, data floor, train TEACHER_S seconds, FID curve of the kept checkpoints
#   STAGE=more    resume the training in /tmp/w for TEACHER_S seconds, FID curve of the new checkpoints
# Results go to $OUT (at most 8 files come back): floor.json, curve.json, stages.json, metrics.jsonl, log.txt and the
# exported float16 teacher split in 15 MB pieces (teacher.tar.partN).
set -uo pipefail
STAGE=${STAGE:-first}; TEACHER_S=${TEACHER_S:-300}; CURVE_S=${CURVE_S:-120}
X=/tmp/stash/x; W=/tmp/w; CFG=configs/mar.py:fmnist_l
log() { echo "[$(date +%T)] $*"; }
if [ ! -d $X ]; then
  log unpack; cat /tmp/stash/chunk? > /tmp/stash/pack.tar && (cd /tmp/stash && echo "$(cat pack.sha | cut -d' ' -f1)  pack.tar" | sha256sum -c -) || exit 3
  mkdir -p $X && tar -xf /tmp/stash/pack.tar -C $X && rm /tmp/stash/pack.tar || exit 3
fi
if [ ! -d /tmp/site ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site $X/whl/*.whl || exit 3
fi
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name --format=csv,noheader
if [ "$STAGE" = first ]; then
  log floor; python3 -m marval_jax.tools.reproduce_curve floor --out=$OUT/floor.json --inception=$X/fid_inception.npz \
      --raw-dir=$X/fmnist
fi
log "train $TEACHER_S s"
python3 -m marval_jax.programs.reproduce --workdir=$W --stages=teacher --config teacher=$CFG --budget=teacher=$TEACHER_S \
    --set teacher:data.raw_dir=$X/fmnist --set teacher:train.num_steps=100000
cp $W/teacher/metrics.jsonl $W/export/stages.json $OUT/ 2>/dev/null
log "curve $CURVE_S s"
python3 -m marval_jax.tools.reproduce_curve curve --workdir=$W/teacher --config=$CFG --set data.raw_dir=$X/fmnist \
    --out=$W/curve.json --inception=$X/fid_inception.npz --raw-dir=$X/fmnist --num=2000 --num-iter=64 --cfg=2.5 \
    --time-budget=$CURVE_S
cp $W/curve.json $OUT/
(cd $W/export && tar -cf - fmnist_teacher | split -b 15000000 -d -a 1 - $OUT/teacher.tar.part)
log done
