#!/bin/bash
# One accelerator call of the Fashion-MNIST teacher reproduction (docs/reproduction.md "Teacher FID <= 20").
# The inputs (FID Inception weights in float16, the Fashion-MNIST IDX files, the wheels) do not fit one call next to
# the checkout, so earlier calls of the same warm machine left them, split, in /tmp/stash (chunk0..N + pack.sha),
# or (launch/pack_reproduce_inputs.sh LEAN=1 / TRAIN=1) a call carried .devstate/lean (unpacked into /tmp/stash/x
# when that does not exist yet) and a later call carries .devstate/train (the training files and teacher.tar, put in
# place by every call that carries them).
#   STAGE=unpack  only that: the inputs in place, the wheels installed (e.g. before a benchmark command)
#   STAGE=first   unpack, data floor, train TEACHER_S seconds, FID curve of the kept checkpoints
#                 (TEACHER_ROW=1: then the teacher's 10k-sample row at CFG SWEEP (4.0), RESULTS_S s at most;
#                 CURVE_OFFSET: the steps of the carried teacher that TEACHER_INIT warm-starts from, e.g. 6222)
#                 (TEACHER_SET="k=v k=v": --set overrides of the teacher, e.g. model.attention_impl=xla)
#   STAGE=more    resume the training in /tmp/w for TEACHER_S seconds, FID curve of the new checkpoints
#   STAGE=distill GSIM student (configs/marval.py:fmnist_l, STUDENT_S s) and RL student (RL_S s) from the exported
#                 teacher, then the results table (tools/results.py run, 10k samples, RESULTS_S s at most)
#                 (ABLATE_PAR=1: the ablation runs beside them, stopped after ABLATE_WAIT_S more s;
#                 RESULTS_ONLY=student,rl SWEEP=4.0: skip the teacher's sweep when its rows are already measured;
#                 RL_S must cover the RL step's compile: ~85 s of the 89 s budget of 2026-12-06 went to it)
#                 (STUDENT_SET="k=v k=v": --set overrides of the student, e.g. the ablation's best gsim.*;
#                 RL_SET likewise for the RL student, e.g. "rl.reg_weight=3" (the shipped recipe of
#                 programs/reproduce.py already sets the student's gsim.weighting=kl and the l2 regulariser);
#                 RESULTS_S=0: no results run here, STAGE=results does it; STUDENT_S=0: the RL student alone, from
#                 the student exported by an earlier call of the same warm machine)
#   STAGE=variants  KL students side by side from the carried teacher (VARIANTS="NAME:k=v,k=v NAME2:k=v": one
#                 student per NAME with those --set overrides of the shipped recipe, VARIANT_S s each; ABLATE_PAR=1:
#                 the ablation beside them, stopped when they end), then each one's 10k-sample row (K 64, one step,
#                 --no-timing: the rows share the GPU too, so no speed; with it the approximate-cache row, at the
#                 policy RESULTS_CACHE=r,R when set); variants.tgz: each one's metrics,
#                 stages.json and row. The exports stay in $W/variants/NAME/export for RL by a later call
#   STAGE=results the results table alone, then the ablation for ABLATE_S more seconds (0: none)
#                 (RESULTS_ASSETS: the exports it evaluates, default those of this machine's runs, e.g. a carried
#                 .devstate/ship, measured into $W/results_<its folder>; RESULTS_CACHE=r,R: the cache row's policy,
#                 tools/results.py --cache; RESULTS_SET="ROLE:sample.KEY=VALUE ...": its --set items, e.g.
#                 student:sample.noise_scale=0.85)
#   STAGE=ablate  the GSIM variants of configs/ablations/fmnist_gsim.json, ABLATE_STEPS steps each, 2k samples
#                 (ABLATE_TEACHER: the teacher export they distil, default the one trained here; ABLATE_SEED: a
#                 directory of finished runs/NAME/ of the same sweep, steps and teacher weights, e.g.
#                 docs/results/ablation_fmnist_l, so its variants are not redone; ABLATE_S: stop after that many s;
#                 ABLATE_SET="k=v ...": --set for every variant, e.g. train.eval_every=50 for FID over steps)
# Results go to $OUT (at most 8 files come back): floor.json, curve.json, stages.json, metrics.jsonl, log.txt and the
# exported float16 teacher split in 15 MB pieces (teacher.tar.partN).
set -uo pipefail
STAGE=${STAGE:-first}; TEACHER_S=${TEACHER_S:-300}; CURVE_S=${CURVE_S:-120}
case $STAGE in unpack|first|more|distill|variants|results|ablate) ;;
  *) echo "error: STAGE=$STAGE; one of unpack, first, more, distill, variants, results, ablate" >&2; exit 2 ;; esac
if [ "$STAGE" = variants ]; then   # checked before anything runs: a typo must not cost a device call's setup
  [ -n "${VARIANTS:-}" ] || { echo "error: STAGE=variants needs VARIANTS=\"NAME:k=v,k=v NAME2:k=v\"" >&2; exit 2; }
  for v in $VARIANTS; do
    [[ $v =~ ^[A-Za-z0-9_]+:[A-Za-z0-9_.]+=[^,]+(,[A-Za-z0-9_.]+=[^,]+)*$ ]] \
      || { echo "error: VARIANTS entry '$v' is not NAME:key=value[,key=value...]" >&2; exit 2; }
  done
  names=$(for v in $VARIANTS; do echo "${v%%:*}"; done)
  [ "$(echo "$names" | sort -u | wc -l)" = "$(echo "$names" | wc -l)" ] \
    || { echo "error: VARIANTS names repeat: $(echo $names)" >&2; exit 2; }
fi
STUDENT_S=${STUDENT_S:-200}; RL_S=${RL_S:-90}; RESULTS_S=${RESULTS_S:-200}; ABLATE_STEPS=${ABLATE_STEPS:-300}
STASH=${STASH:-/tmp/stash}; X=$STASH/x; W=${W:-/tmp/w}; CFG=configs/mar.py:fmnist_l; SITE=${SITE:-/tmp/site}
DATASETS=${DATASETS:-/usr/share/datasets}   # (STASH, SITE, DATASETS, HOME, W: other places for tests)
log() { echo "[$(date +%T)] $*"; }
ablate() {  # the GSIM variants on the exported teacher (resumable: finished variants are skipped)
  if [ -n "${ABLATE_SEED:-}" ] && [ ! -d $W/ablate/runs ]; then mkdir -p $W/ablate && cp -r $ABLATE_SEED/runs $W/ablate/; fi
  python3 -m marval_jax.tools.ablate --base=configs/marval.py:fmnist_l --teacher=${ABLATE_TEACHER:-$W/export/fmnist_teacher} \
      --variants=configs/ablations/fmnist_gsim.json --steps=$ABLATE_STEPS --eval_samples=2000 --out=$W/ablate \
      --set train.sample_every=0 --set train.ckpt_every=100000 --set sample.pr_num_real=10000 --metric=loss \
      $(for kv in ${ABLATE_SET:-}; do echo --set $kv; done)
}
pack_ablate() {
  (cd $W/ablate && tar -czf $OUT/ablate.tgz --ignore-failed-read plan.json ablation.md ablation.json *.png \
      runs/*/metrics.jsonl runs/*/*.json)
}
if [ ! -d $X ] && [ -f .devstate/lean/lean.tar ]; then
  log "unpack .devstate/lean"; mkdir -p $X && tar -xf .devstate/lean/lean.tar -C $X || { rm -rf $X; exit 3; }
fi
if [ ! -d $X ] && ! ls $STASH/chunk? > /dev/null 2>&1; then
  echo "error: no inputs in $STASH: carry .devstate/lean (first call) or the chunks .devstate/cN" >&2; exit 3
fi
if [ ! -d $X ]; then
  log unpack; cat $STASH/chunk? > $STASH/pack.tar && (cd $STASH && echo "$(cat pack.sha | cut -d' ' -f1)  pack.tar" | sha256sum -c -) || exit 3
  mkdir -p $X && tar -xf $STASH/pack.tar -C $X && rm $STASH/pack.tar || exit 3
fi
if [ -d .devstate/train ]; then   # carried training inputs: the IDX files beside the test split, the teacher export
  log "inputs of .devstate/train"; cp .devstate/train/*-ubyte.gz $X/fmnist/ || exit 3
  if [ -f .devstate/train/teacher.tar ]; then cp .devstate/train/teacher.tar $STASH/ && rm -rf $X/carried || exit 3; fi
fi
if [ ! -d $SITE ]; then   # the checkout's carried .whl when present (newer than the packed copy)
  WHL=$X/whl; [ -d .whl ] && WHL=.whl
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target $SITE $WHL/*.whl || exit 3
fi
export PYTHONPATH=$SITE:$PWD PYTHONUNBUFFERED=1
# a teacher export carried from an earlier run (.devstate/c4/teacher.tar or .devstate/train/teacher.tar ->
# /tmp/stash): the warm start of STAGE=first (train.init_from: its weights, a fresh optimizer) and the teacher of
# STAGE=distill / ablate
if [ -f $STASH/teacher.tar ] && [ ! -d $X/carried ]; then mkdir -p $X/carried && tar -xf $STASH/teacher.tar -C $X/carried; fi
if [ -d $X/carried/fmnist_teacher ] && [ ! -d $W/export/fmnist_teacher ] && [ "$STAGE" != first ]; then
  mkdir -p $W/export && cp -r $X/carried/fmnist_teacher $W/export/
fi
TEACHER_INIT=${TEACHER_INIT:-$( [ -d $X/carried/fmnist_teacher ] && echo $X/carried/fmnist_teacher )}
# the default locations every tool reads (data/raw_datasets.py, evaluation/inception.py): no per-tool flags
# (a machine with Debian's package keeps its own files: ln -sfn onto a real directory would link inside it)
mkdir -p $DATASETS ~/.cache/marval_jax && { [ -d $DATASETS/fashion-mnist ] \
    || ln -sfn $X/fmnist $DATASETS/fashion-mnist; } \
    && ln -sf $X/fid_inception.npz ~/.cache/marval_jax/fid_inception.npz
[ "$STAGE" = unpack ] && { log "inputs in place: $(ls $X/fmnist | tr '\n' ' ')"; exit 0; }
nvidia-smi --query-gpu=name --format=csv,noheader
stop_ablate_after() {  # the background sweep gets $1 more seconds, then SIGTERM (finished variants are kept)
  for _ in $(seq $1); do kill -0 $ABLATE_PID 2>/dev/null || break; sleep 1; done
  kill -TERM $ABLATE_PID 2>/dev/null && log "ablate stopped (SIGTERM; finished variants kept)"; wait $ABLATE_PID
  pack_ablate; cp $W/ablate.log $OUT/ 2>/dev/null
}
# the results' folder under $W: other assets measure into their own (a run continues only a run of the same assets)
RES=results${RESULTS_ASSETS:+_$(basename "$RESULTS_ASSETS")}
cache_reference() {  # the test split's FID features and statistics, once, before processes that share them start
  log "FID reference, once for every process below"; python3 -m marval_jax.tools.results reference || exit 3
}
results() {  # the 10k-sample table of the exports (resumable into the same --out: measured rows are kept)
  log "results $RESULTS_S s"
  python3 -m marval_jax.tools.results run --assets=${RESULTS_ASSETS:-$W/export} --out=$W/$RES \
      --sweep=${SWEEP:-1.5,2.5,4.0} --time-budget=$RESULTS_S ${RESULTS_ONLY:+--only=$RESULTS_ONLY} \
      ${RESULTS_CACHE:+--cache=$RESULTS_CACHE} $(for kv in ${RESULTS_SET:-}; do echo --set=$kv; done)
}
if [ "$STAGE" = distill ]; then
  if [ "${ABLATE_PAR:-0}" = 1 ]; then  # the ablation beside the student and RL: both are launch-bound on the GPU
    cache_reference
    log "ablate in the background, $ABLATE_STEPS steps per variant"
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.3 ablate > $W/ablate.log 2>&1 &
    ABLATE_PID=$!; export XLA_PYTHON_CLIENT_MEM_FRACTION=0.55
  fi
  log "student $STUDENT_S s, rl $RL_S s"; STAGES=student,rl; [ "$RL_S" = 0 ] && STAGES=student   # RL_S=0: no RL
  [ "$STUDENT_S" = 0 ] && STAGES=rl   # STUDENT_S=0: RL from the student an earlier call of this machine exported
  if [ "$STUDENT_S" = 0 ] && [ "$RL_S" = 0 ]; then echo "error: STUDENT_S=0 and RL_S=0: no stage to run" >&2; exit 2; fi
  python3 -m marval_jax.programs.reproduce --workdir=$W --stages=$STAGES --config student=configs/marval.py:fmnist_l \
      --config rl=configs/marval_rl.py:fmnist_l --budget=student=$STUDENT_S,rl=$RL_S \
      --set student:train.num_steps=100000 --set rl:train.num_steps=100000 \
      --set student:train.sample_every=0 --set rl:train.sample_every=0 \
      $(for kv in ${STUDENT_SET:-}; do echo --set student:$kv; done) $(for kv in ${RL_SET:-}; do echo --set rl:$kv; done)
  if [ -n "${ABLATE_PID:-}" ]; then  # the results' timings need the GPU alone
    stop_ablate_after ${ABLATE_WAIT_S:-120}; unset XLA_PYTHON_CLIENT_MEM_FRACTION
  fi
  [ "$RESULTS_S" != 0 ] && results
  mkdir -p $W/m && cp $W/student/metrics.jsonl $W/m/student.jsonl 2>/dev/null; cp $W/rl/metrics.jsonl $W/m/rl.jsonl 2>/dev/null
  tar -czf $OUT/distill.tgz -C $W export/stages.json m $( [ -d $W/$RES ] && echo $RES )   # one file: at most 8 come back
  (cd $W/export && tar -cf - fmnist_student $( [ -d fmnist_rl ] && echo fmnist_rl ) | split -b 15000000 -d -a 1 - $OUT/students.tar.part)
  log done; exit 0
fi
if [ "$STAGE" = variants ]; then
  [ -d $W/export/fmnist_teacher ] || { echo "error: no teacher in $W/export: carry .devstate/train" >&2; exit 3; }
  cache_reference
  n=$(echo $VARIANTS | wc -w); share=$(awk "BEGIN{printf \"%.2f\", 0.85 / ($n + ${ABLATE_PAR:-0})}")
  if [ "${ABLATE_PAR:-0}" = 1 ]; then
    log "ablate in the background"; XLA_PYTHON_CLIENT_MEM_FRACTION=$share ablate > $W/ablate.log 2>&1 & ABLATE_PID=$!
  fi
  pids=()
  for v in $VARIANTS; do
    name=${v%%:*}; mkdir -p $W/variants/$name; log "student $name (${v#*:}) ${VARIANT_S:-400} s"
    XLA_PYTHON_CLIENT_MEM_FRACTION=$share python3 -m marval_jax.programs.reproduce --workdir=$W/variants/$name \
        --stages=student --teacher=$W/export/fmnist_teacher --config student=configs/marval.py:fmnist_l \
        --budget=student=${VARIANT_S:-400} --set student:train.num_steps=100000 --set student:train.sample_every=0 \
        $(IFS=,; for kv in ${v#*:}; do echo --set student:$kv; done) \
        > $W/variants/$name.log 2>&1 &
    pids+=($!)
  done
  wait "${pids[@]}"
  [ -n "${ABLATE_PID:-}" ] && stop_ablate_after 0
  share=$(awk "BEGIN{printf \"%.2f\", 0.85 / $n}"); pids=()
  for v in $VARIANTS; do   # side by side too: quality columns only, so they may share the GPU
    name=${v%%:*}; log "row of $name"
    XLA_PYTHON_CLIENT_MEM_FRACTION=$share python3 -m marval_jax.tools.results run --no-timing \
        --assets=$W/variants/$name/export --out=$W/variants/$name/results --only=student_K64_cfg1 \
        ${RESULTS_CACHE:+--cache=$RESULTS_CACHE} > $W/variants/$name.results.log 2>&1 &
    pids+=($!)
  done
  wait "${pids[@]}"
  (cd $W/variants && tar -czf $OUT/variants.tgz --ignore-failed-read *.log */export/stages.json \
      */student/metrics.jsonl */results)
  log done; exit 0
fi
if [ "$STAGE" = results ]; then
  results; tar -czf $OUT/results.tgz -C $W $RES
  if [ "${ABLATE_S:-0}" != 0 ]; then
    log "ablate $ABLATE_S s"; ablate > $W/ablate.log 2>&1 & ABLATE_PID=$!
    stop_ablate_after $ABLATE_S
  fi
  log done; exit 0
fi
if [ "$STAGE" = ablate ]; then   # ABLATE_S > 0: stopped after that many seconds (finished variants kept)
  log "ablate $ABLATE_STEPS steps per variant"
  if [ "${ABLATE_S:-0}" != 0 ]; then ablate > $W/ablate.log 2>&1 & ABLATE_PID=$!; stop_ablate_after $ABLATE_S
  else ablate; pack_ablate; fi
  log done; exit 0
fi
if [ "$STAGE" = first ] && [ "${FLOOR:-1}" = 1 ]; then   # FLOOR=0: measured already (docs/results/data_floor.json)
  log floor; python3 -m marval_jax.tools.reproduce_curve floor --out=$OUT/floor.json --inception=$X/fid_inception.npz \
      --raw-dir=$X/fmnist
fi
log "train $TEACHER_S s"
python3 -m marval_jax.programs.reproduce --workdir=$W --stages=teacher --config teacher=$CFG --budget=teacher=$TEACHER_S \
    --set teacher:data.raw_dir=$X/fmnist --set teacher:train.num_steps=100000 \
    ${TEACHER_INIT:+--set teacher:init_from=$TEACHER_INIT} $(for kv in ${TEACHER_SET:-}; do echo --set teacher:$kv; done)
cp $W/teacher/metrics.jsonl $W/export/stages.json $OUT/ 2>/dev/null
log "curve $CURVE_S s"
python3 -m marval_jax.tools.reproduce_curve curve --workdir=$W/teacher --config=$CFG --set data.raw_dir=$X/fmnist \
    --out=$W/curve.json --inception=$X/fid_inception.npz --raw-dir=$X/fmnist --num=2000 --num-iter=64 --cfg=2.5 \
    --time-budget=$CURVE_S --step-offset=${CURVE_OFFSET:-0}
cp $W/curve.json $OUT/
if [ "${TEACHER_ROW:-0}" = 1 ]; then   # the new teacher's 10k row (K 64, CFG $SWEEP) in the same call
  SWEEP=${SWEEP:-4.0}; RESULTS_ONLY=teacher_K64_cfg$(awk "BEGIN{printf \"%g\", $SWEEP}") results   # 4.0 -> cfg4
  tar -czf $OUT/results.tgz -C $W $RES
fi
(cd $W/export && tar -cf - fmnist_teacher | split -b 15000000 -d -a 1 - $OUT/teacher.tar.part)
log done
