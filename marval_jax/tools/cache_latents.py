"""Encode a data split once with the KL-VAE into MAR's latent cache (moments of each image and its flip).

    python -m marval_jax.tools.cache_latents --vae_ckpt kl16.ckpt --data imagenet2012 --split train \
        --data_dir ~/tensorflow_datasets --cache_dir gs://BUCKET/imagenet_kl16_cache --image_size 256

Train from it with configs/mar.py:base|large|huge and --config.data.cache_dir=... (data.name = latent_cache).
Multi-host: run the same command on every worker. The process group is joined first, as `marval_jax.main` does
(`--distributed_init` for JAX's own detection on TPU VMs / SLURM, or `--coordinator_address=host:port
--num_processes=N --process_id=i`); process i encodes shards i, i + N, ... and a barrier after the shards and
another after the metadata keep any process from reading a cache another is still writing. --cache_dir and
--data_dir may be gs:// paths.
The process-group flags are also accepted under main's names, `--config.mesh.distributed_init`,
`--config.mesh.coordinator_address`, `--config.mesh.num_processes`, `--config.mesh.process_id`,
`--config.mesh.distributed_timeout_s` (aliases of the flags above), so the arguments a launcher passes to every
process of `marval_jax.main` (launch/run_local.sh --processes=N, launch/tpu_vm.sh) start this tool the same way.
A .ckpt is read with torch.load(weights_only=True), so no code from the file runs; --trust_pickle unpickles it fully
(only for files from a source you trust). A bad input prints one `error:` line and exits 2 (--verbose: traceback).
"""
from __future__ import annotations

import jax
import numpy as np
from absl import app, flags

from marval_jax.user_errors import run_cli

FLAGS = flags.FLAGS


MESH_FLAGS = ("distributed_init", "coordinator_address", "num_processes", "process_id", "distributed_timeout_s")


def define_flags(fv: flags.FlagValues = FLAGS) -> flags.FlagValues:
    """Defined on demand: importing this module from tests or other tools must not register flags."""
    _define(fv)
    for name in MESH_FLAGS:  # main's names of the process-group fields (what launchers pass)
        flags.DEFINE_alias(f"config.mesh.{name}", name, flag_values=fv)
    return fv


def _define(fv: flags.FlagValues) -> None:
    flags.DEFINE_string("vae_ckpt", None, "VAE weights (.ckpt needs torch; .safetensors / .npz do not).",
                        flag_values=fv)
    flags.DEFINE_string("data", "imagenet2012", "Data set name of marval_jax.data.pipeline.", flag_values=fv)
    flags.DEFINE_string("split", "train", "Split (tfds slicing allowed).", flag_values=fv)
    flags.DEFINE_string("data_dir", None, "tfds data dir.", flag_values=fv)
    flags.DEFINE_string("folder_dir", None, "--data=folder: the image folder (root/<class>/...; built first with "
                        "python -m marval_jax.data.folder_dataset, docs/data.md).", flag_values=fv)
    flags.DEFINE_string("cache_dir", None, "Output directory.", flag_values=fv)
    flags.DEFINE_integer("image_size", 256, "Center-crop size.", flag_values=fv)
    flags.DEFINE_integer("batch_size", 128, "Images per encoder call (each also encoded flipped).", flag_values=fv)
    flags.DEFINE_bool("trust_pickle", False, "Unpickle a --vae_ckpt .ckpt fully instead of with weights_only=True. "
                      "A pickle can execute any code it names when it is loaded: only for files from a source you "
                      "trust.", flag_values=fv)
    flags.DEFINE_bool("distributed_init", False, "jax.distributed.initialize with JAX's own detection (TPU VMs, "
                      "SLURM, ...).", flag_values=fv)
    flags.DEFINE_string("coordinator_address", "", "host:port of process 0 (with --num_processes, --process_id).",
                        flag_values=fv)
    flags.DEFINE_integer("num_processes", -1, "Number of processes (with --coordinator_address).", flag_values=fv)
    flags.DEFINE_integer("process_id", -1, "This process's id, 0..N-1 (with --coordinator_address).", flag_values=fv)
    flags.DEFINE_integer("distributed_timeout_s", 300, "How long initialisation waits for every process.",
                        flag_values=fv)
    flags.DEFINE_bool("verbose", False, "Print the traceback of a user error (bad path, file or data set).",
                        flag_values=fv)


def data_config(fv):
    """The images to cache, as a data config of marval_jax.data.pipeline (crop only: no patching)."""
    from marval_jax.data import pipeline  # pylint: disable=import-outside-toplevel
    return pipeline.default_config(name=fv.data, split=fv.split, data_dir=fv.data_dir, image_size=fv.image_size,
                                   patch_size=0, folder_dir=fv.folder_dir)


def main(argv):
    if not FLAGS.vae_ckpt or not FLAGS.cache_dir:
        raise app.UsageError("--vae_ckpt and --cache_dir are required")
    from marval_jax.parallel.mesh import maybe_initialize_distributed
    # first: anything that asks JAX for devices starts its backend, after which initialize refuses to run
    maybe_initialize_distributed({"distributed_init": FLAGS.distributed_init,
                                  "coordinator_address": FLAGS.coordinator_address,
                                  "num_processes": FLAGS.num_processes, "process_id": FLAGS.process_id,
                                  "distributed_timeout_s": FLAGS.distributed_timeout_s})
    from jax.experimental import multihost_utils
    from flax import nnx
    from marval_jax.checkpoints.convert_vae import load_vae
    from marval_jax.data import latent_cache, pipeline
    vae = load_vae(FLAGS.vae_ckpt, trust_pickle=FLAGS.trust_pickle)
    graphdef, state = nnx.split(vae)
    encode = jax.jit(lambda x: nnx.merge(graphdef, state).encode(x).moments)
    cfg = data_config(FLAGS)
    from tqdm import tqdm
    # process 0's share of the examples (process 0 only; quiet when stderr is not a terminal)
    bar = tqdm(desc="latent cache", unit="img", disable=None if jax.process_index() == 0 else True)

    def progress(done, total):
        bar.total = -(-total // jax.process_count())
        bar.update(done - bar.n)

    with bar:
        meta = latent_cache.build_latent_cache(
            pipeline.image_source_for_cache(cfg), lambda x: np.asarray(encode(x)), FLAGS.cache_dir, FLAGS.split,
            batch_size=FLAGS.batch_size, process_index=jax.process_index(), process_count=jax.process_count(),
            progress=progress, barrier=multihost_utils.sync_global_devices)
    if jax.process_index() == 0:
        print(meta)


if __name__ == "__main__":
    define_flags()
    run_cli(lambda: app.run(main))
