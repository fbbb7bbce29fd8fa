"""Encode a data split once with the KL-VAE into MAR's latent cache (moments of each image and its flip).

    python -m marval_jax.tools.cache_latents --vae_ckpt kl16.ckpt --data imagenet2012 --split train \
        --data_dir ~/tensorflow_datasets --cache_dir gs://BUCKET/imagenet_kl16_cache --image_size 256

Train from it with configs/mar.py:base|large|huge and --config.data.cache_dir=... (data.name = latent_cache).
Each process encodes its own shards (multi-host: run on every worker; a barrier separates writing and reading).
A .ckpt is read with torch.load(weights_only=True), so no code from the file runs; --trust_pickle unpickles it fully
(only for files from a source you trust). A bad input prints one `error:` line and exits 2 (--verbose: traceback).
"""
from __future__ import annotations

import jax
import numpy as np
from absl import app, flags

from marval_jax.user_errors import run_cli

FLAGS = flags.FLAGS


def define_flags() -> None:
    """Defined on demand: importing this module from tests or other tools must not register flags."""
    flags.DEFINE_string("vae_ckpt", None, "VAE weights (.ckpt needs torch; .safetensors / .npz do not).")
    flags.DEFINE_string("data", "imagenet2012", "Data set name of marval_jax.data.pipeline.")
    flags.DEFINE_string("split", "train", "Split (tfds slicing allowed).")
    flags.DEFINE_string("data_dir", None, "tfds data dir.")
    flags.DEFINE_string("cache_dir", None, "Output directory.")
    flags.DEFINE_integer("image_size", 256, "Center-crop size.")
    flags.DEFINE_integer("batch_size", 128, "Images per encoder call (each also encoded flipped).")
    flags.DEFINE_bool("trust_pickle", False, "Unpickle a --vae_ckpt .ckpt fully instead of with weights_only=True. "
                      "A pickle can execute any code it names when it is loaded: only for files from a source you "
                      "trust.")
    flags.DEFINE_bool("verbose", False, "Print the traceback of a user error (bad path, file or data set).")


def main(argv):
    if not FLAGS.vae_ckpt or not FLAGS.cache_dir:
        raise app.UsageError("--vae_ckpt and --cache_dir are required")
    from flax import nnx
    from marval_jax.checkpoints.convert_vae import load_vae
    from marval_jax.data import latent_cache, pipeline
    vae = load_vae(FLAGS.vae_ckpt, trust_pickle=FLAGS.trust_pickle)
    graphdef, state = nnx.split(vae)
    encode = jax.jit(lambda x: nnx.merge(graphdef, state).encode(x).moments)
    cfg = pipeline.default_config(name=FLAGS.data, split=FLAGS.split, data_dir=FLAGS.data_dir,
                                  image_size=FLAGS.image_size, patch_size=0)
    meta = latent_cache.build_latent_cache(
        pipeline.image_source_for_cache(cfg), lambda x: np.asarray(encode(x)), FLAGS.cache_dir, FLAGS.split,
        batch_size=FLAGS.batch_size, process_index=jax.process_index(), process_count=jax.process_count())
    print(meta)


if __name__ == "__main__":
    define_flags()
    run_cli(lambda: app.run(main))
