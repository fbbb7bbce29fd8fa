"""Train one copy of the Fashion-MNIST / MNIST classifier and save it.

    python -m marval_jax.tools.train_classifier --dataset fashion_mnist --copy reward \
        --out marval_jax/evaluation/weights/fashion_mnist_reward

"reward" and "eval" copies use different default seeds (0 / 1) and disjoint halves of the training split
(see `marval_jax.evaluation.classifier_train`). Writes `params.npz` and `classifier.json` (data set, copy, seed,
settings, test accuracy, the command) into --out.
"""
from __future__ import annotations

import argparse
import shlex
import sys

import jax

from marval_jax.evaluation.classifier_train import (COPIES, DATASETS, DEFAULT_EPOCHS, DEFAULT_SEEDS, TrainConfig,
                                                    save_classifier, train_classifier)
from marval_jax.user_errors import add_verbose_flag, run_cli


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_verbose_flag(p)
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--copy", required=True, choices=COPIES)
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--epochs", type=int, default=None, help=f"default {DEFAULT_EPOCHS}")
    p.add_argument("--seed", type=int, default=None, help=f"default {DEFAULT_SEEDS}")
    p.add_argument("--batch-size", type=int, default=TrainConfig.batch_size)
    p.add_argument("--learning-rate", type=float, default=TrainConfig.learning_rate)
    p.add_argument("--num-train", type=int, default=None, help="train on a subset of this copy's half")
    p.add_argument("--num-test", type=int, default=None, help="evaluate on the first N test images")
    p.add_argument("--data-dir", default=None, help="folder of the raw data set files (default: installed copy)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parse_args(argv)
    cfg = TrainConfig(
        dataset=args.dataset, copy=args.copy,
        seed=DEFAULT_SEEDS[args.copy] if args.seed is None else args.seed,
        epochs=DEFAULT_EPOCHS[args.dataset] if args.epochs is None else args.epochs,
        batch_size=args.batch_size, learning_rate=args.learning_rate,
        num_train=args.num_train, num_test=args.num_test)
    params, metrics = train_classifier(cfg, data_dir=args.data_dir)
    meta = {
        "dataset": cfg.dataset, "copy": cfg.copy, "seed": cfg.seed,
        "test_accuracy": metrics["test_accuracy"], "per_class_accuracy": metrics["per_class_accuracy"],
        "num_train": metrics["num_train"], "num_test": metrics["num_test"],
        "epoch_losses": metrics["epoch_losses"], "train_seconds": round(metrics["train_seconds"], 1),
        "model": cfg.model.to_dict(), "train_config": cfg.to_dict(),
        "command": "python -m marval_jax.tools.train_classifier " + " ".join(shlex.quote(a) for a in argv),
        "jax_version": jax.__version__, "backend": jax.default_backend(),
    }
    save_classifier(args.out, params, meta)
    print(f"saved {args.out}: test accuracy {metrics['test_accuracy']:.4f}")
    return meta


if __name__ == "__main__":
    run_cli(main)
