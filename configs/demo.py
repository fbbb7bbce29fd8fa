"""The embedded default: sample class-conditional Fashion-MNIST grids with the shipped MARVAL student, its MAR teacher
and the RL-tuned student (marval_jax/assets/, trained by the reproduction of docs/results.md), on any machine.

Run:
  python -m marval_jax.main --mode=demo --config=configs/demo.py --workdir=/tmp/marval_demo
  python -m marval_jax.main --mode=demo --config=configs/demo.py --workdir=workdirs/fmnist --config.full=True
`full=True` first reruns the whole pipeline from data (teacher -> GSIM student -> RL student: programs/reproduce.py's
"shipped" recipe, the step counts of configs/{mar,marval,marval_rl}.py:fmnist_l; at the step rates measured on one
H100, ~20k teacher steps at ~23/s, 6k student steps and the RL steps take well under an hour; days on a CPU) and
samples from what it trained.
  bash launch/run_local.sh --processes=2 --devices_per_process=4 --mode=demo --config=configs/demo.py \
      --workdir=/tmp/marval_demo_2p
`mesh` forms the process group on a pod (coordinator / process fields, or JAX's detection with
mesh.distributed_init) and lays the samplers over all processes' devices (batch over data x fsdp).
Override any field with --config.a.b=value; unknown fields are an error (the config is locked).
"""
from __future__ import annotations

import ml_collections as mlc

from configs import common


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    if arg:
        raise ValueError(f"configs/demo.py has no variants, got {arg!r}")
    cfg = mlc.ConfigDict()
    cfg.assets = ""             # params directories fmnist_{teacher,student,rl} ("" = the shipped marval_jax/assets)
    cfg.full = False            # rerun the whole pipeline from data first (marval_jax.programs.reproduce)
    cfg.per_class = 4           # grid rows: images per class (10 classes)
    cfg.num_iter = 64           # AR iterations K of every sampler
    cfg.teacher_cfg = -1.0      # teacher CFG scale; -1 = the best scale of the results run (assets/sampling.json)
    cfg.teacher_steps = "100"   # teacher head respacing
    cfg.seed = 0
    cfg.kv_cache = "none"       # none | approx (bidirectional models; docs/kv_cache.md) | exact (causal models)
    cfg.kv_reuse_after = 2      # approx: r, iterations after a token is fixed before its keys/values are reused
    cfg.kv_refresh_every = 4    # approx: R, every R-th iteration recomputes the whole cache
    cfg.mesh = common.mesh_config()  # the process group and the samplers' device layout (batch: data x fsdp)
    cfg.lock()
    return cfg
