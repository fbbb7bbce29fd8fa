"""What the RL step costs to compile, without running it, on whatever backend is at hand (a CPU works): the
lowered program's op count, the lowering and compile seconds and the optimised program's instruction count, for the
settings that change the program's size - `model.scan_blocks` (one block body per stack instead of one per block)
and the AR loop's encoder-length buckets (`sample.num_buckets`: one compiled loop body per bucket, each with its
backward pass). The step is the benchmark suite's `train/rl` row (model_bench.rl_bench_step: stand-in decode and
reward), so the settings found here are the ones to time there.

    python -m marval_jax.benchmarks.compile_cost --models base --num-buckets 4,2,1 --scan-blocks both \
        [--rl-batch 1] [--num-iter 64] [--lower-only] [--out FILE.json]

A CPU's compile seconds are not a GPU's (MAR-B's RL step, lowering + compile: 74 s on this repository's 2-core CPU,
174 s on an H200; docs/benchmarks.md "The RL step's compile"): compare settings on one machine, never machines.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import time

import jax
import jax.numpy as jnp

from marval_jax.benchmarks.model_bench import model_config, rl_bench_step
from marval_jax.models.factory import abstract_model
from marval_jax.models.mar import MARConfig
from marval_jax.user_errors import UserError, add_verbose_flag, run_cli


def _count_ops(text: str) -> int:
    """Instructions of a program's text (StableHLO or HLO): the lines that define a value."""
    return sum(1 for line in text.splitlines() if " = " in line)


def measure(cfg: MARConfig, *, batch: int, num_iter: int, num_buckets: int, t_init: int = 760,
            compile_program: bool = True) -> dict:
    """One setting: lower the RL step at abstract shapes (nothing allocated, nothing run) and compile it."""
    graphdef, params = abstract_model(cfg)
    step, init_state, loss_fn, _ = rl_bench_step(cfg, graphdef, num_iter=num_iter, num_buckets=num_buckets,
                                                 t_init=t_init, remat=True)
    state = jax.eval_shape(init_state, params)
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    t0 = time.perf_counter()
    lowered = jax.jit(step, donate_argnums=0).lower(state, labels)
    row = dict(scan_blocks=cfg.scan_blocks, num_buckets=num_buckets, loop_bodies=len(loss_fn.plan.pieces),
               batch=batch, num_iter=num_iter, lower_s=round(time.perf_counter() - t0, 2),
               lowered_ops=_count_ops(lowered.as_text()))
    if compile_program:
        t0 = time.perf_counter()
        compiled = lowered.compile()
        row["compile_s"] = round(time.perf_counter() - t0, 2)
        row["compiled_instructions"] = _count_ops(compiled.as_text())
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m marval_jax.benchmarks.compile_cost", description=__doc__.split("\n")[0])
    p.add_argument("--models", default="base", help="comma list: base, large, huge, fmnist_l, tiny")
    p.add_argument("--num-buckets", default="4,1", help="comma list of the AR loop's bucket counts")
    p.add_argument("--scan-blocks", default="both", choices=("off", "on", "both"))
    p.add_argument("--rl-batch", type=int, default=1)
    p.add_argument("--num-iter", type=int, default=64)
    p.add_argument("--lower-only", action="store_true", help="op counts and lowering only (seconds per setting)")
    p.add_argument("--out", default="", help="JSON file of the rows (default: printed only)")
    add_verbose_flag(p)
    a = p.parse_args(argv)
    try:
        buckets = [int(x) for x in a.num_buckets.split(",") if x]
    except ValueError:
        raise UserError(f"--num-buckets takes a comma list of positive integers, got {a.num_buckets!r}") from None
    if not buckets or min(buckets) < 1 or a.rl_batch < 1 or a.num_iter < 1:
        raise UserError(f"--num-buckets, --rl-batch and --num-iter take positive integers, got {a.num_buckets!r}, "
                        f"{a.rl_batch}, {a.num_iter}")
    scans = {"off": [False], "on": [True], "both": [False, True]}[a.scan_blocks]
    device = jax.devices()[0]
    report = dict(date=datetime.date.today().isoformat(), device=device.device_kind, platform=device.platform,
                  jax=jax.__version__, step="train/rl (rl.remat on, stand-in decode and reward)", rows=[])
    for name in [m for m in a.models.split(",") if m]:
        try:
            base = model_config(name)
        except ValueError as e:
            raise UserError(str(e)) from None
        for scan in scans:
            for nb in buckets:
                row = dict(model=name, **measure(dataclasses.replace(base, scan_blocks=scan), batch=a.rl_batch,
                                                 num_iter=a.num_iter, num_buckets=nb,
                                                 compile_program=not a.lower_only))
                report["rows"].append(row)
                print(json.dumps(row), flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=1)
    return 0


if __name__ == "__main__":
    run_cli(main)
