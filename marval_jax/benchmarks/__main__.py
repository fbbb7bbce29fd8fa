"""Benchmark suite CLI (docs/benchmarks.md).

  python -m marval_jax.benchmarks --models base --what sample,train,breakdown --batch 1,256 \
      --out docs/benchmarks/h200.json --table docs/benchmarks.md
  python -m marval_jax.benchmarks --quick --out /tmp/bench.json --table /tmp/bench.md   # tiny shapes, CPU, < 60 s
  python -m marval_jax.benchmarks --from-json docs/benchmarks/h200.json --table docs/benchmarks.md  # re-render

--what: sample (MAR teacher + MARVAL one-step samplers at each --batch), train (MAR, GSIM and RL steps; pick with
--train-steps), breakdown (the samplers' transformer loop and head loop timed apart, at the largest batch).
--out defaults to docs/benchmarks/<device>.json. --time-budget S skips what would not finish within S seconds
(recorded as skipped). The JSON is rewritten after every measurement.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

QUICK_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"


def _list(s: str) -> list[str]:
    return [x.strip() for x in s.split(",") if x.strip()]


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m marval_jax.benchmarks", description=__doc__.split("\n")[0])
    p.add_argument("--models", default="base", help="comma list of base, large, huge")
    p.add_argument("--what", default="sample,train,breakdown", help="comma list of sample, train, breakdown")
    p.add_argument("--batch", default="1,256", help="sampler batch sizes")
    p.add_argument("--out", default=None, help="JSON path (default docs/benchmarks/<device>.json)")
    p.add_argument("--table", default=None, help="markdown file whose generated section is (re)written")
    p.add_argument("--quick", action="store_true", help="tiny model and shapes (CPU smoke run)")
    p.add_argument("--from-json", default=None, help="only render --table from an existing JSON")
    p.add_argument("--train-steps", default="mar,gsim,rl")
    p.add_argument("--train-batch", type=int, default=256)
    p.add_argument("--gsim-batch", type=int, default=256)
    p.add_argument("--rl-batch", type=int, default=32)
    p.add_argument("--num-iter", type=int, default=64, help="AR iterations of the samplers")
    p.add_argument("--head-steps", default="100", help="teacher head respacing")
    p.add_argument("--t-init", type=int, default=760)
    p.add_argument("--time-budget", type=float, default=None, help="seconds for the whole suite")
    p.add_argument("--min-reps", type=int, default=2)
    p.add_argument("--target-s", type=float, default=3.0, help="time each sampler at least this long")
    return p.parse_args(argv)


def main(argv=None) -> int:
    a = parse(argv)
    if a.quick and "jax" not in sys.modules:
        # Tiny shapes compile for longer than they run: cheaper LLVM optimisation keeps the smoke run short.
        os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + QUICK_XLA_FLAGS).strip()
    from marval_jax.benchmarks import suite
    if a.from_json:
        if not a.table:
            raise SystemExit("--from-json needs --table")
        with open(a.from_json) as f:
            suite.write_table(json.load(f), a.table)
        return 0
    common = dict(what=_list(a.what), out=a.out, table=a.table, train_steps=tuple(_list(a.train_steps)),
                  time_budget_s=a.time_budget, t_init=a.t_init)
    batches = [int(b) for b in _list(a.batch)]
    if a.quick:
        settings = suite.Settings.quick_settings(batches=batches, **common)
    else:
        settings = suite.Settings(models=_list(a.models), batches=batches, num_iter=a.num_iter,
                                  head_steps=a.head_steps, train_batch=a.train_batch, gsim_batch=a.gsim_batch,
                                  rl_batch=a.rl_batch, min_reps=a.min_reps, target_s=a.target_s, **common)
    report = suite.main_run(settings)
    bad = [r for r in report["results"] if r["status"] == "error"]
    for r in bad:
        print(f"ERROR {r['model']} {r['name']} b={r.get('batch')}: {r['error']}", file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
