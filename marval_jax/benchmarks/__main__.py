"""Benchmark suite CLI (docs/benchmarks.md).

  python -m marval_jax.benchmarks --models base --batch 1,256 --out docs/benchmarks/h200.json \
      --table docs/benchmarks.md --time-budget 480      # bash launch/gpu_bench.sh does this on a GPU machine
  python -m marval_jax.benchmarks --quick --out /tmp/bench.json --table /tmp/bench.md   # tiny shapes, CPU, < 60 s
  python -m marval_jax.benchmarks --from-json docs/benchmarks/h200.json --table docs/benchmarks.md  # re-render
  python -m marval_jax.benchmarks --from-json a.json,b.json --table docs/benchmarks.md \
      --out docs/benchmarks/h200.json                   # several runs in one table (and one merged JSON)
  python -m marval_jax.benchmarks --from-json old.json,new.json --newest-wins ...   # new code's rows replace old

--what: sample (MAR teacher + MARVAL one-step samplers at each --batch), train (MAR, GSIM and RL steps, the RL
step with and without remat; pick with --train-steps), kv (KV-cached samplers: the approximate cache of the
bidirectional model, and the exact cache of the attention="causal" model with its uncached sampler, at each
--kv-batch), breakdown (the samplers' transformer loop and head loop timed apart, at the largest batch), block (not
in the default: one transformer block and its parts - attention, the attention core unfused and through
jax.nn.dot_product_attention, the four matmuls, the MLP - each called --block-calls times in one compiled loop, at
--block-batch over the decoder's positions).
--rows PATTERNS runs only the rows whose names match one of the comma-separated fnmatch patterns (e.g.
sample/onestep,kv/onestep/*); --plan lists the rows in the order they would run, each with the seconds it is
estimated to need (status "planned", or "skipped" where --time-budget would skip it), and compiles and runs nothing.
--out defaults to docs/benchmarks/<device>.json (with --plan: no file unless given). --time-budget S skips what
would not finish within S seconds (recorded as skipped). The JSON (and --table) is rewritten after every measurement. Out-of-memory failures are
recorded as status "oom" (a training step is retried at half the batch) and do not make the exit status nonzero.
"""
from __future__ import annotations

import argparse
import fnmatch
import json
import os
import sys

from marval_jax.benchmarks.defaults import (BLOCK_BATCH, BLOCK_CALLS, DEFAULT_WHAT, GSIM_BATCH, KV_APPROX,
                                            NUM_BUCKETS, RL_BATCH, TRAIN_STEPS, WHAT)
from marval_jax.user_errors import UserError, add_verbose_flag, run_cli

QUICK_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _list(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m marval_jax.benchmarks", description=__doc__.split("\n")[0])
    add_verbose_flag(p)
    p.add_argument("--models", default="base",
                   help="comma list of base, large, huge, fmnist_l (the embedded default's MAR)")
    p.add_argument("--what", default=",".join(DEFAULT_WHAT),
                   help="comma list of " + ", ".join(WHAT) + " (block only when named)")
    p.add_argument("--batch", default="1,256", help="sampler batch sizes")
    p.add_argument("--out", default=None, help="JSON path (default docs/benchmarks/<device>.json)")
    p.add_argument("--table", default=None, help="markdown file whose generated section is (re)written")
    p.add_argument("--quick", action="store_true", help="tiny model and shapes (CPU smoke run)")
    p.add_argument("--from-json", default=None,
                   help="only render --table from existing JSON files (a comma list: the runs' rows together)")
    p.add_argument("--newest-wins", action="store_true",
                   help="with --from-json: a measured row of a later file replaces the earlier rows of the same "
                        "model, name and batch (after a code change); by default it only replaces skipped/failed ones")
    p.add_argument("--train-steps", default=",".join(TRAIN_STEPS),
                   help="comma list of mar, gsim, rl (rl.remat on), rl_noremat (rl.remat off)")
    p.add_argument("--train-batch", type=int, default=256)
    p.add_argument("--gsim-batch", type=int, default=GSIM_BATCH)
    p.add_argument("--rl-batch", type=int, default=RL_BATCH, help="batch of both RL steps (remat on and off)")
    p.add_argument("--kv-batch", default=None, help="batch sizes of the kv rows (default: --batch)")
    p.add_argument("--kv-approx", default=",".join(map(str, KV_APPROX)),
                   help="r,R of the approximate cache policy: recompute the last r steps' tokens, refresh every R")
    p.add_argument("--block-batch", type=int, default=BLOCK_BATCH, help="batch of the block/* rows")
    p.add_argument("--block-calls", type=int, default=BLOCK_CALLS,
                   help="calls of the block part in each block/* row's compiled loop")
    p.add_argument("--num-iter", type=int, default=64, help="AR iterations of the samplers")
    p.add_argument("--head-steps", default="100", help="teacher head respacing")
    p.add_argument("--t-init", type=int, default=760)
    p.add_argument("--time-budget", type=float, default=None, help="seconds for the whole suite")
    p.add_argument("--min-reps", type=int, default=2)
    p.add_argument("--target-s", type=float, default=3.0, help="time each sampler at least this long")
    p.add_argument("--rows", default=None,
                   help="comma list of fnmatch patterns of row names to run, e.g. sample/onestep,kv/onestep/*")
    p.add_argument("--scan-blocks", action="store_true",
                   help="model.scan_blocks for every row: encoder and decoder blocks as one jax.lax.scan each (one "
                        "block body compiled per stack; compare the rows' compile times with a run without it)")
    p.add_argument("--num-buckets", type=int, default=None,
                   help="encoder-length buckets of every AR loop, the samplers' and the RL step's (sample.num_buckets; "
                        f"default {NUM_BUCKETS}): fewer compiled loop bodies, more padded positions")
    p.add_argument("--attention-impl", default=None,
                   help="model.attention_impl for every row (default: the config's, 'auto'); 'flash' times the "
                        "training rows with the Pallas flash attention and its in-kernel dropout (docs/kernels.md)")
    p.add_argument("--remat-blocks", type=int, default=-1,
                   help="model.remat_blocks for every row: only the first N blocks of each stack run under the "
                        "remat policy (the remat/mar/* rows' policies; -1: all blocks)")
    p.add_argument("--kernels", default=None,
                   help="model.kernels for every row (default: the config's, 'xla'); 'pallas' runs each block's "
                        "LayerNorm -> Linear pairs as one fused Pallas kernel (docs/kernels.md)")
    p.add_argument("--plan", action="store_true",
                   help="list the rows in order with their estimated seconds; compile and run nothing")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse(argv)
    if a.quick and "jax" not in sys.modules:
        # Tiny shapes compile for longer than they run: cheaper LLVM optimisation keeps the smoke run short.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + QUICK_XLA_FLAGS).strip()
    from marval_jax.benchmarks import suite
    from marval_jax.models.transformer import ATTENTION_IMPLS, KERNELS
    for flag, value, allowed in (("--attention-impl", a.attention_impl, ATTENTION_IMPLS),
                                 ("--kernels", a.kernels, KERNELS)):
        if value is not None and value not in allowed:
            raise UserError(f"{flag} takes one of {', '.join(allowed)}, got {value!r}")
    if a.remat_blocks < -1:
        raise UserError(f"--remat-blocks takes N >= 0 or -1 (all blocks), got {a.remat_blocks}")
    if a.newest_wins and not a.from_json:
        raise UserError("--newest-wins merges runs: it needs --from-json a.json,b.json")
    if a.from_json:
        if not a.table:
            raise UserError("--from-json needs --table: the markdown file to render the runs into")
        reports = []
        for path in _list(a.from_json):
            with open(path) as f:
                reports.append(json.load(f))
        merged = suite.merge_reports(reports, newest_wins=a.newest_wins)
        if a.out:  # the merged report as one JSON (what docs/benchmarks/<device>.json holds)
            os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
            with open(a.out, "w") as f:
                json.dump(merged, f, indent=1, default=suite._json_default)
        suite.write_table(merged, a.table)
        return 0
    what, steps = _list(a.what), tuple(_list(a.train_steps))
    for x in what:
        if x not in WHAT:
            raise UserError(f"--what takes {', '.join(WHAT)}, got {x!r}")
    for x in steps:
        if x not in TRAIN_STEPS:
            raise UserError(f"--train-steps takes {', '.join(TRAIN_STEPS)}, got {x!r}")
    if a.block_batch < 1 or a.block_calls < 1:
        raise UserError(f"--block-batch and --block-calls take positive integers, got {a.block_batch}, "
                         f"{a.block_calls}")
    if a.num_buckets is not None and a.num_buckets < 1:
        raise UserError(f"--num-buckets takes a positive integer, got {a.num_buckets}")
    kv_approx = tuple(int(x) for x in _list(a.kv_approx))
    if len(kv_approx) != 2 or kv_approx[0] < 0 or kv_approx[1] < 1:
        raise UserError(f"--kv-approx takes r,R with r >= 0 and R >= 1, got {a.kv_approx!r}")
    rows = _rows(a.rows, suite.row_names(what, steps), what)
    common = dict(what=what, out=a.out, table=a.table, train_steps=steps, time_budget_s=a.time_budget,
                  t_init=a.t_init, kv_approx=kv_approx, rows=rows, plan=a.plan, scan_blocks=a.scan_blocks,
                  attention_impl=a.attention_impl, kernels=a.kernels, remat_blocks=a.remat_blocks,
                  **({} if a.num_buckets is None else {"num_buckets": a.num_buckets}))
    batches = [int(b) for b in _list(a.batch)]
    if a.quick:
        settings = suite.Settings.quick_settings(batches=batches, **common)
    else:
        kv_batches = [int(b) for b in _list(a.kv_batch)] if a.kv_batch else None
        settings = suite.Settings(models=_list(a.models), batches=batches, num_iter=a.num_iter,
                                  head_steps=a.head_steps, train_batch=a.train_batch, gsim_batch=a.gsim_batch,
                                  rl_batch=a.rl_batch, kv_batches=kv_batches, block_batch=a.block_batch,
                                  block_calls=a.block_calls, min_reps=a.min_reps,
                                  target_s=a.target_s, **common)
    report = suite.main_run(settings)
    for r in report["results"]:
        if r["status"] == "oom":
            print(f"OOM {r['model']} {r['name']} b={r.get('batch')}: {r['error'][:500]}", file=sys.stderr)
    for r in report["results"]:
        if r["status"] == "error":
            print(f"ERROR {r['model']} {r['name']} b={r.get('batch')}: {r['error']}", file=sys.stderr)
    return exit_code(report)


def _rows(arg: str | None, names: list[str], what: list[str]) -> tuple[str, ...] | None:
    """--rows as a tuple of patterns, each checked to name at least one row of --what."""
    if arg is None:
        return None
    rows = tuple(_list(arg))
    for pattern in rows:
        if not any(fnmatch.fnmatchcase(n, pattern) for n in names):
            raise UserError(f"--rows: {pattern!r} matches no row of --what {','.join(what)} (rows: {', '.join(names)})")
    return rows


def exit_code(report: dict) -> int:
    """1 if a measurement failed; out-of-memory rows ("oom") and rows skipped for time are results, not failures."""
    return 1 if any(r["status"] == "error" for r in report["results"]) else 0


if __name__ == "__main__":
    run_cli(main)
