"""Convert a reference MAR checkpoint into a params checkpoint the sampler and trainer load.

    python -m marval_jax.tools.convert_mar --ckpt checkpoint-last.pth --config=configs/mar.py:base \
        --which model_ema --out ckpts/mar_base_ema
    python -m marval_jax.main --mode=sample --config=configs/mar.py:base --workdir=/tmp/s \
        --config.init_from=ckpts/mar_base_ema

.pth files need torch (`pip install '.[torch]'`) and are read with torch.load(weights_only=True): tensors, containers
and the reference's argparse.Namespace only, so no code from the file runs. --trust_pickle unpickles fully (a pickle
can execute any code it names): only for files from a source you trust. .safetensors / .npz with the same keys need
no torch. Missing, unexpected and mis-shaped keys: one error. A bad input prints one `error:` line and exits 2
(--verbose: with the traceback).
"""
from __future__ import annotations

from absl import app, flags
from flax import nnx
from ml_collections import config_flags

from marval_jax.checkpoints.convert_mar import load_into_model, load_state_dict
from marval_jax.checkpoints.params_io import save_params
from marval_jax.models.mar import MAR, MARConfig
from marval_jax.user_errors import run_cli

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defined on demand: importing this module from tests or other tools must not register flags."""
    config_flags.DEFINE_config_file("config", None, "configs/mar.py:VARIANT describing the checkpoint's model.",
                                    lock_config=True)
    flags.DEFINE_string("ckpt", None, "Reference checkpoint (.pth / .safetensors / .npz).")
    flags.DEFINE_enum("which", "model_ema", ["model", "model_ema"], "Which weights of the checkpoint.")
    flags.DEFINE_string("prefix", "", "Key prefix to select inside the file (e.g. 'param/').")
    flags.DEFINE_string("out", None, "Output directory.")
    flags.DEFINE_bool("trust_pickle", False, "Unpickle a .pth fully instead of with weights_only=True. A pickle can "
                      "execute any code it names when it is loaded: only for files from a source you trust.")
    flags.DEFINE_bool("verbose", False, "Print the traceback of a user error (bad path, file or config).")


def convert(ckpt: str, model_cfg: dict, out: str, which: str = "model_ema", prefix: str = "", *,
            trust_pickle: bool = False) -> str:
    state_dict = load_state_dict(ckpt, which, prefix, trust_pickle=trust_pickle)  # a bad file fails before the model
    model = MAR(MARConfig(**model_cfg), rngs=nnx.Rngs(0))
    load_into_model(model, state_dict, f"{ckpt} [{which}]")
    return save_params(out, nnx.state(model, nnx.Param), model_cfg, {"source": ckpt, "which": which})


def main(argv):
    if FLAGS.config is None or FLAGS.ckpt is None or FLAGS.out is None:
        raise app.UsageError("--config, --ckpt and --out are required")
    path = convert(FLAGS.ckpt, FLAGS.config.model.to_dict(), FLAGS.out, FLAGS.which, FLAGS.prefix,
                   trust_pickle=FLAGS.trust_pickle)
    print(f"wrote {path}")


if __name__ == "__main__":
    define_flags()
    run_cli(lambda: app.run(main))
