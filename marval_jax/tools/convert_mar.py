"""Convert a reference MAR checkpoint into a params checkpoint the sampler and trainer load.

    python -m marval_jax.tools.convert_mar --ckpt checkpoint-last.pth --config=configs/mar.py:base \
        --which model_ema --out ckpts/mar_base_ema
    python -m marval_jax.main --mode=sample --config=configs/mar.py:base --workdir=/tmp/s \
        --config.init_from=ckpts/mar_base_ema

.pth files need torch (`pip install '.[torch]'`) and are unpickled with weights_only=False: trusted files only.
.safetensors / .npz with the same keys need no torch. Missing, unexpected and mis-shaped keys: one error.
"""
from __future__ import annotations

import sys

from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from marval_jax.checkpoints.convert_mar import load_into_model, load_state_dict
from marval_jax.checkpoints.params_io import save_params
from marval_jax.models.mar import MAR, MARConfig

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defined on demand: importing this module from tests or other tools must not register flags."""
    config_flags.DEFINE_config_file("config", None, "configs/mar.py:VARIANT describing the checkpoint's model.",
                                    lock_config=True)
    flags.DEFINE_string("ckpt", None, "Reference checkpoint (.pth / .safetensors / .npz).")
    flags.DEFINE_enum("which", "model_ema", ["model", "model_ema"], "Which weights of the checkpoint.")
    flags.DEFINE_string("prefix", "", "Key prefix to select inside the file (e.g. 'param/').")
    flags.DEFINE_string("out", None, "Output directory.")


def convert(ckpt: str, model_cfg: dict, out: str, which: str = "model_ema", prefix: str = "") -> str:
    cfg = MARConfig(**model_cfg)
    model = MAR(cfg, rngs=nnx.Rngs(0))
    load_into_model(model, load_state_dict(ckpt, which, prefix), f"{ckpt} [{which}]")
    return save_params(out, nnx.state(model, nnx.Param), model_cfg, {"source": ckpt, "which": which})


def main(argv):
    if FLAGS.config is None or FLAGS.ckpt is None or FLAGS.out is None:
        raise app.UsageError("--config, --ckpt and --out are required")
    try:
        path = convert(FLAGS.ckpt, FLAGS.config.model.to_dict(), FLAGS.out, FLAGS.which, FLAGS.prefix)
    except (OSError, ValueError, KeyError) as e:
        print(f"convert_mar: {e}", file=sys.stderr)
        sys.exit(2)
    print(f"wrote {path}")


if __name__ == "__main__":
    define_flags()
    app.run(main)
