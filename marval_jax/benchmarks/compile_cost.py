"""What a program costs to compile, without running it, on whatever backend is at hand (a CPU works): the lowered
program's op count, the lowering and compile seconds and the optimised program's instruction count, for the
settings that change the program's size - `model.scan_blocks` (one block body per stack instead of one per block)
and the AR loop's encoder-length buckets (`sample.num_buckets`: one compiled loop body per bucket; in the RL step
each with its backward pass, in the cached samplers each with a refresh and a cached-rows body). The programs are
the benchmark suite's rows of the same names (model_bench: `train/rl` with its stand-in decode and reward, the
samplers with their predictors and KV-cache policy), so the settings found here are the ones to time there.

    python -m marval_jax.benchmarks.compile_cost --models base --programs train/rl,kv/onestep/approx \
        --num-buckets 4,2,1 --scan-blocks both [--batch 1] [--num-iter 64] [--kv-approx 2,4] [--lower-only] \
        [--out FILE.json]

A CPU's compile seconds are not a GPU's (MAR-B's RL step, lowering + compile: 72 s on this repository's 2-core CPU,
174 s on an H200; docs/benchmarks.md "Compile time on the CPU: the RL step and the cached sampler"): compare
settings on one machine, never machines.
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import time

import jax
import jax.numpy as jnp
from etils import epath

from marval_jax.benchmarks.model_bench import (SAMPLE_CFG, bench_predictor, bench_spec, model_config,
                                               rl_bench_step)
from marval_jax.benchmarks.runner import Settings
from marval_jax.models.factory import abstract_model
from marval_jax.models.mar import MARConfig
from marval_jax.sampling.ar_sampler import make_sampler
from marval_jax.sampling.decode import make_plan
from marval_jax.user_errors import UserError, add_verbose_flag, run_cli

PROGRAMS = ("train/rl", "sample/onestep", "sample/teacher", "kv/onestep/approx", "kv/teacher/approx")


def _count_ops(text: str) -> int:
    """Instructions of a program's text (StableHLO or HLO): the lines that define a value."""
    return sum(1 for line in text.splitlines() if " = " in line)


def measure(cfg: MARConfig, *, program: str = "train/rl", name: str = "base", batch: int, num_iter: int,
            num_buckets: int, kv_approx: tuple[int, int] = (2, 4), compile_program: bool = True) -> dict:
    """One program and setting: lowered at abstract shapes (nothing allocated, nothing run), then compiled.
    `name` picks the suite's per-model settings (the teacher's CFG scale)."""
    if program not in PROGRAMS:
        raise UserError(f"unknown program {program!r}; choose from {', '.join(PROGRAMS)}")
    graphdef, params = abstract_model(cfg)
    settings = Settings(models=[name], what=[], batches=[batch], out=None, table=None, num_iter=num_iter,
                        rl_num_iter=num_iter, num_buckets=num_buckets, kv_approx=tuple(kv_approx))
    labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
    if program == "train/rl":
        step, init_state, loss_fn, _ = rl_bench_step(cfg, graphdef, num_iter=num_iter, num_buckets=num_buckets,
                                                     t_init=settings.t_init, remat=True)
        jitted, args, pieces = jax.jit(step, donate_argnums=0), (jax.eval_shape(init_state, params), labels), \
            len(loss_fn.plan.pieces)
    else:
        kind = program.split("/")[1]
        spec = bench_spec(settings, kind, SAMPLE_CFG[name], ("approx", *kv_approx) if program.startswith("kv/")
                          else "none")
        kw = dict(seq_len=cfg.seq_len, buffer_size=cfg.buffer_size, token_dim=cfg.token_dim)
        jitted = make_sampler(graphdef, spec, bench_predictor(settings, kind), **kw)
        args = (params, labels, jax.eval_shape(lambda: jax.random.key(0)))
        pieces = len(make_plan(spec, **kw).pieces)
    t0 = time.perf_counter()
    lowered = jitted.lower(*args)
    row = dict(program=program, scan_blocks=cfg.scan_blocks, num_buckets=num_buckets, plan_pieces=pieces,
               batch=batch, num_iter=num_iter, lower_s=round(time.perf_counter() - t0, 2),
               lowered_ops=_count_ops(lowered.as_text()))
    if compile_program:
        t0 = time.perf_counter()
        compiled = lowered.compile()
        row["compile_s"] = round(time.perf_counter() - t0, 2)
        row["compiled_instructions"] = _count_ops(compiled.as_text())
    return row


def _ints(text: str, flag: str, low: int) -> list[int]:
    """A comma list of integers >= low, or a UserError naming the flag."""
    try:
        values = [int(x) for x in text.split(",") if x]
    except ValueError:
        values = []
    if not values or min(values) < low:
        raise UserError(f"{flag} takes a comma list of integers >= {low}, got {text!r}")
    return values


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m marval_jax.benchmarks.compile_cost", description=__doc__.split("\n")[0])
    p.add_argument("--models", default="base", help="comma list: base, large, huge, fmnist_l, tiny")
    p.add_argument("--programs", default="train/rl", help=f"comma list of {', '.join(PROGRAMS)}")
    p.add_argument("--num-buckets", default="4,1", help="comma list of the AR loop's bucket counts")
    p.add_argument("--scan-blocks", default="both", choices=("off", "on", "both"))
    p.add_argument("--batch", type=int, default=1, help="the programs' batch (the RL step's and the samplers')")
    p.add_argument("--num-iter", type=int, default=64, help="AR iterations")
    p.add_argument("--kv-approx", default="2,4", help="r,R of the kv/*/approx programs' cache policy")
    p.add_argument("--lower-only", action="store_true", help="op counts and lowering only (seconds per setting)")
    p.add_argument("--out", default="", help="JSON file of the rows (default: printed only)")
    add_verbose_flag(p)
    a = p.parse_args(argv)
    buckets, kv_approx = _ints(a.num_buckets, "--num-buckets", 1), _ints(a.kv_approx, "--kv-approx", 0)
    programs = [x for x in a.programs.split(",") if x]
    bad = [x for x in programs if x not in PROGRAMS]
    if bad or not programs:
        raise UserError(f"--programs takes a comma list of {', '.join(PROGRAMS)}, got {a.programs!r}")
    if len(kv_approx) != 2 or kv_approx[1] < 1:
        raise UserError(f"--kv-approx takes r,R with r >= 0 and R >= 1, got {a.kv_approx!r}")
    if a.batch < 1 or a.num_iter < 1:
        raise UserError(f"--batch and --num-iter take positive integers, got {a.batch}, {a.num_iter}")
    scans = {"off": [False], "on": [True], "both": [False, True]}[a.scan_blocks]
    names = [m for m in a.models.split(",") if m]
    for name in names:   # every bad value is an error before the first (minutes-long) compile
        try:
            model_config(name)
        except ValueError as e:
            raise UserError(str(e)) from None
    out = epath.Path(a.out) if a.out else None
    if out is not None and not out.parent.exists():
        raise UserError(f"--out={a.out}: the folder {out.parent} does not exist")
    device = jax.devices()[0]
    report = dict(date=datetime.date.today().isoformat(), device=device.device_kind, platform=device.platform,
                  jax=jax.__version__, notes="train/rl: rl.remat on, stand-in decode and reward", rows=[])
    for name in names:
        for program in programs:
            for scan in scans:
                for nb in buckets:
                    row = dict(model=name, **measure(dataclasses.replace(model_config(name), scan_blocks=scan),
                                                     program=program, name=name, batch=a.batch,
                                                     num_iter=a.num_iter, num_buckets=nb, kv_approx=tuple(kv_approx),
                                                     compile_program=not a.lower_only))
                    report["rows"].append(row)
                    print(json.dumps(row), flush=True)
                    if out is not None:   # rewritten after every row: a killed run keeps what it measured
                        out.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    run_cli(main)
