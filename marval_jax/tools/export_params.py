"""Export the weights a run samples with (EMA of the trained role) as a params checkpoint.

    python -m marval_jax.tools.export_params --config=configs/marval.py:fmnist --source=workdirs/fmnist_marval \
        --out=marval_jax/assets/fmnist_student --format=npz --dtype=float16

`--source` is a run workdir (latest checkpoint) or another params directory; the model config of the run is checked
against `--config` first. npz + float16 is the embedded-default format (one small file that travels as one file).
A bad input (missing or mismatched source) prints one `error:` line and exits 2 (--verbose: with the traceback).
"""
from __future__ import annotations

import json

from absl import app, flags
from ml_collections import config_flags

from marval_jax.user_errors import run_cli


def export(config, source: str, out: str, fmt: str = "npz", dtype: str | None = None, use_ema: bool = True) -> str:
    from marval_jax.checkpoints.load import load_model_params
    from marval_jax.checkpoints.params_io import save_params
    from marval_jax.models.factory import abstract_model, model_config
    _, abstract = abstract_model(model_config(config))
    params = load_model_params(source, abstract, config.model.to_dict(), use_ema=use_ema)
    return save_params(out, params, config.model.to_dict(), fmt=fmt, dtype=dtype or None,
                       extra={"exported_from": source, "ema": use_ema,
                              "sampling": json.loads(config.sample.to_json())})


def main(argv):
    del argv
    f = flags.FLAGS
    print(export(f.config, f.source, f.out, f.format, f.dtype, not f.raw))


if __name__ == "__main__":
    config_flags.DEFINE_config_file("config", None, "configs/*.py:variant of the run", lock_config=True)
    flags.DEFINE_string("source", None, "run workdir or params directory")
    flags.DEFINE_string("out", None, "output params directory")
    flags.DEFINE_enum("format", "npz", ["npz", "orbax"], "params.npz or orbax params/")
    flags.DEFINE_string("dtype", "", "store floating leaves as this dtype (npz only), e.g. float16")
    flags.DEFINE_bool("raw", False, "export the raw (non-EMA) parameters")
    flags.DEFINE_bool("verbose", False, "print the traceback of a user error")
    flags.mark_flags_as_required(["config", "source", "out"])
    run_cli(lambda: app.run(main))
