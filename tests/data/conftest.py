"""Shared fixtures: tiny offline tfds data sets built once per session in a temporary data_dir."""
import pytest

from marval_jax.data import tfds_builders

FMNIST_TRAIN = 64  # examples kept per split (max_examples)


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tfds"))
    tfds_builders.build("fashion_mnist_local", path, max_examples=FMNIST_TRAIN)
    return path


@pytest.fixture(scope="session")
def fmnist_size():
    return FMNIST_TRAIN
