"""Entry point for every mode.

    python -m marval_jax.main --mode=train   --config=configs/mar.py:tiny --workdir=/tmp/mar_tiny
    python -m marval_jax.main --mode=sample  --config=configs/mar.py:tiny --workdir=/tmp/mar_tiny
    python -m marval_jax.main --mode=distill --config=configs/marval.py:tiny --workdir=/tmp/marval_tiny
    python -m marval_jax.main --mode=rl      --config=configs/marval_rl.py:tiny --workdir=/tmp/rl_tiny
    python -m marval_jax.main --mode=evaluate --config=configs/mar.py:tiny --workdir=/tmp/mar_tiny \
        --config.sample.fid_ref=raw:fashion_mnist/test --config.sample.crop=28
    python -m marval_jax.main --mode=demo --config=configs/demo.py --workdir=/tmp/marval_demo   # embedded default

Configs are locked: `--config.train.num_stpes=5` is an error. All logic lives in importable modules; this file
only parses flags.
"""
from __future__ import annotations

import sys

from absl import app, flags
from ml_collections import config_flags

MODES = ("train", "distill", "rl", "sample", "evaluate", "demo")

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defined on demand: importing this module from tests or other tools must not register flags."""
    config_flags.DEFINE_config_file("config", None, "A configs/*.py file with its variant: configs/mar.py:tiny.",
                                    lock_config=True)
    flags.DEFINE_string("workdir", None, "Run directory (local path or gs://...): checkpoints, metrics, samples.")
    flags.DEFINE_enum("mode", "train", MODES, "What to run.")
    flags.DEFINE_string("out", "", "sample: output directory (default <workdir>/samples_final).")


def run(mode: str, config, workdir: str, out: str = ""):
    if mode == "train":
        from marval_jax.train.loop import train
        from marval_jax.train.mar_task import make_mar_task
        return train(config, workdir, make_mar_task(config))
    if mode == "distill":
        from marval_jax.train.loop import train
        from marval_jax.train.distill_task import make_distill_task
        return train(config, workdir, make_distill_task(config))
    if mode == "rl":
        from marval_jax.train.loop import train
        from marval_jax.train.rl_task import make_rl_task
        return train(config, workdir, make_rl_task(config))
    if mode == "sample":
        from marval_jax.sampling.sample_run import sample_from_workdir
        return sample_from_workdir(config, workdir, out)
    if mode == "evaluate":
        from marval_jax.evaluation.evaluate import evaluate
        return evaluate(config, workdir, out)
    if mode == "demo":
        from marval_jax.demo import run_demo
        return run_demo(config, workdir)
    raise ValueError(f"unknown mode {mode!r}; choose one of {MODES}")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {argv[1:]}")
    if FLAGS.config is None or FLAGS.workdir is None:
        raise app.UsageError("--config and --workdir are required")
    run(FLAGS.mode, FLAGS.config, FLAGS.workdir, FLAGS.out)


if __name__ == "__main__":
    define_flags()
    app.run(main)
