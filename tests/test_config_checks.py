"""Every bad config is refused by `marval_jax.main.run` with a UserError naming the field, before JAX traces or
compiles anything (a jax.monitoring listener sees every trace / compile event; `test_the_listener_sees_a_compile`
shows it is not blind). Each case goes through `run`, the function every mode's CLI calls, with otherwise real
configs: without the check the run would go on to compile (and the assertion on events would fail)."""
import json
import os
import zipfile

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo as demo_configs, mar as mar_configs, marval as marval_configs, marval_rl as rl_configs
from configs.common import with_fields
from marval_jax import config_checks
from marval_jax.main import run
from marval_jax.user_errors import UserError

_EVENTS: list[str] = []
_RECORDING = [False]


def _listener(event, *args, **kwargs):
    if _RECORDING[0] and event.startswith(("/jax/core/compile/", "/jax/compilation_cache/")):
        _EVENTS.append(event)


jax.monitoring.register_event_duration_secs_listener(_listener)
jax.monitoring.register_event_listener(_listener)


def refused(mode, config, workdir, *needles):
    """run(mode, config, workdir) raises a UserError whose one-line message holds every needle; nothing compiled."""
    _EVENTS.clear()
    _RECORDING[0] = True
    try:
        with pytest.raises(UserError) as info:
            run(mode, config, str(workdir))
    finally:
        _RECORDING[0] = False
    msg = str(info.value)
    assert "\n" not in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    assert _EVENTS == [], f"compiled or traced before refusing: {_EVENTS}"
    return msg


def cfg(module, variant="tiny", **fields):
    return with_fields(module.get_config(variant), fields)


@pytest.fixture
def params_dir(tmp_path):
    """A params checkpoint as validation sees it (model.json present); nothing here reads its arrays."""
    d = tmp_path / "params"
    d.mkdir()
    (d / "model.json").write_text(json.dumps(mar_configs.get_config("tiny").model.to_dict()))
    return str(d)


def test_the_listener_sees_a_compile():
    _EVENTS.clear()
    _RECORDING[0] = True
    try:
        jax.jit(lambda x: x * 3 + 1)(jnp.float32(2))
    finally:
        _RECORDING[0] = False
    assert any("backend_compile" in e for e in _EVENTS)


@pytest.mark.parametrize("field,value,needle", [
    ("train.ckpt_every", 0, "train.ckpt_every=0"),       # was a ZeroDivisionError after the first compile
    ("train.log_every", 0, "train.log_every=0"),
    ("train.num_steps", 0, "train.num_steps=0"),         # was exit 0 having done nothing
    ("train.global_batch_size", -4, "train.global_batch_size=-4"),
    ("train.keep_checkpoints", 0, "train.keep_checkpoints=0"),
    ("train.grid_size", 0, "train.grid_size=0"),          # tiny writes grids (sample_every=10)
    ("train.sample_every", -1, "train.sample_every=-1"),
    ("data.patch_size", -1, "data.patch_size=-1"),
    ("mesh.axis_types", "implicit", "mesh.axis_types='implicit'"),
])
def test_bad_train_numbers(tmp_path, field, value, needle):
    msg = refused("train", cfg(mar_configs, **{field: value}), tmp_path / "w", needle)
    assert ">= " in msg or "choose one of" in msg  # says what is allowed


def test_mesh_that_does_not_fit_the_devices(tmp_path):
    refused("train", cfg(mar_configs, **{"mesh.shape.data": jax.device_count() + 2}), tmp_path / "w",
            "mesh.shape", f"have {jax.device_count()}")


@pytest.mark.parametrize("mode", ["train", "sample"])
def test_partial_process_group_is_refused_before_the_backend(tmp_path, params_dir, mode):
    """mesh.coordinator_address / num_processes / process_id: all three or none (a partial set would let JAX guess
    the rest from the environment, or hang waiting for processes that never come); main.run checks them before
    anything starts the process group or the backend, for every mode."""
    for fields in ({"mesh.coordinator_address": "localhost:1234"},
                   {"mesh.coordinator_address": "localhost:1234", "mesh.num_processes": 2, "mesh.process_id": 2},
                   {"mesh.process_id": 0}):
        refused(mode, cfg(mar_configs, init_from=params_dir, **fields), tmp_path / "w",
                "mesh.coordinator_address", "mesh.num_processes", "mesh.process_id", "all three")
    assert not jax.distributed.is_initialized()


def test_batch_split_over_the_batch_axes_and_processes(tmp_path):
    """The global batch must split over the devices of the mesh axes that the 'batch' rule names (-1 = the rest)
    and over the processes; checked for layouts other than this machine's through num_devices / process_count."""
    wd = str(tmp_path / "w")
    c = cfg(mar_configs, **{"train.global_batch_size": 6})
    with pytest.raises(UserError, match=r"train.global_batch_size=6 .*data x fsdp: 4 devices of 4.*multiple of 4"):
        config_checks.validate("train", c, wd, num_devices=4, process_count=1)
    config_checks.validate("train", c, wd, num_devices=2, process_count=1)
    with pytest.raises(UserError, match=r"train.global_batch_size=6 .*4 processes"):
        config_checks.validate("train", c, wd, num_devices=2, process_count=4)
    # fsdp is a batch axis by default: data=-1 (2), fsdp=4 -> 8 ways on 8 devices
    c8 = cfg(mar_configs, **{"train.global_batch_size": 4, "mesh.shape.fsdp": 4})
    with pytest.raises(UserError, match="multiple of 8"):
        config_checks.validate("train", c8, wd, num_devices=8, process_count=1)
    # ... unless the rules map the batch to data only: 2 ways
    c8.unlock()
    c8.mesh.logical_axis_rules = [["batch", ["data"]], ["embed", "fsdp"], ["mlp", "tensor"], ["vocab", None]]
    c8.lock()
    config_checks.validate("train", c8, wd, num_devices=8, process_count=1)


def test_in_memory_data_refuses_data_dir_and_names_raw_dir(tmp_path):
    msg = refused("train", cfg(mar_configs, **{"data.data_dir": str(tmp_path)}), tmp_path / "w",
                  "data.data_dir=", "data.raw_dir", "data.in_memory=False")
    assert "not read by the in-memory path" in msg
    empty = tmp_path / "raw"
    empty.mkdir()
    refused("train", cfg(mar_configs, **{"data.raw_dir": str(empty)}), tmp_path / "w",
            f"data.raw_dir={str(empty)!r}", os.path.join(str(empty), "train-images-idx3-ubyte.gz"))
    refused("train", cfg(mar_configs, **{"data.split": "train[:10%]"}), tmp_path / "w", "data.split='train[:10%]'")
    refused("train", cfg(mar_configs, **{"data.split": "validation"}), tmp_path / "w", "data.split='validation'")
    refused("distill", cfg(marval_configs, **{"data.name": "cifar10"}), tmp_path / "w", "data.name='cifar10'")


def test_folder_data_needs_an_existing_folder(tmp_path):
    folder = mar_configs.get_config("folder_tiny")
    refused("train", with_fields(folder, {"data.folder_dir": ""}), tmp_path / "w", "data.folder_dir", "docs/data.md")
    refused("train", with_fields(folder, {"data.folder_dir": str(tmp_path / "nope")}), tmp_path / "w",
            f"data.folder_dir={str(tmp_path / 'nope')!r}", "does not exist")


def test_teacher_and_student_checkpoints(tmp_path, params_dir):
    wd = tmp_path / "w"
    refused("distill", cfg(marval_configs), wd, "teacher_ckpt is empty")
    refused("distill", cfg(marval_configs, teacher_ckpt=str(tmp_path / "nope")), wd, "teacher_ckpt=", "does not exist")
    refused("distill", cfg(marval_configs, teacher_ckpt=str(tmp_path)), wd, "teacher_ckpt=", "neither a params")
    refused("rl", cfg(rl_configs), wd, "student_ckpt is empty")
    refused("rl", cfg(rl_configs, student_ckpt=str(tmp_path / "nope")), wd, "student_ckpt=", "does not exist")
    refused("rl", cfg(rl_configs, student_ckpt=params_dir, ref_ckpt=str(tmp_path / "nope")), wd, "ref_ckpt=")
    refused("train", cfg(mar_configs, init_from=str(tmp_path / "nope")), wd, "init_from=")
    # an empty teacher_ckpt is fine when the workdir resumes (its state holds the teacher); a given one is checked
    (wd / "checkpoints" / "2").mkdir(parents=True)
    config_checks.validate("distill", cfg(marval_configs), str(wd))
    config_checks.validate("distill", cfg(marval_configs, teacher_ckpt=params_dir), str(tmp_path / "fresh"))


def test_sample_numbers_and_source(tmp_path, params_dir):
    refused("sample", cfg(mar_configs, **{"sample.num_images": 0}), tmp_path, "sample.num_images=0")
    refused("sample", cfg(mar_configs, **{"sample.batch_size": -1}), tmp_path, "sample.batch_size=-1")
    refused("sample", cfg(mar_configs, **{"sample.sampler": "fast"}), tmp_path, "sample.sampler='fast'")
    refused("sample", cfg(mar_configs), tmp_path / "nope", "--workdir=", "does not exist")
    refused("sample", cfg(mar_configs), tmp_path, "--workdir=", "neither a params")
    refused("sample", cfg(mar_configs, init_from=str(tmp_path / "x")), tmp_path, "init_from=")
    refused("demo", cfg(demo_configs, variant=None, per_class=0), tmp_path, "per_class=0")


def _fake_inception(path):
    """A zip .npz with an Inception-named array: what validation looks at (it never loads the arrays)."""
    np.savez(path, **{"Conv2d_1a_3x3.weight": np.zeros((1,), np.float32)})
    return str(path)


def test_evaluate_files_are_checked_before_sampling(tmp_path, params_dir):
    ev = lambda **f: cfg(mar_configs, init_from=params_dir, **{"sample.fid_ref": "raw:fashion_mnist/test", **f})  # noqa: E731
    inception = _fake_inception(tmp_path / "inc.npz")
    refused("evaluate", ev(**{"sample.fid_ref": ""}), tmp_path, "sample.fid_ref is empty")
    refused("evaluate", ev(**{"sample.fid_ref": str(tmp_path / "ref.npz")}), tmp_path, "sample.fid_ref=", "not found")
    refused("evaluate", ev(**{"sample.fid_ref": "raw:cifar10/test"}), tmp_path, "sample.fid_ref=", "'cifar10'")
    refused("evaluate", ev(**{"sample.fid_ref": "raw:fashion_mnist/val"}), tmp_path, "sample.fid_ref=",
            "train, test")
    refused("evaluate", ev(**{"sample.fid_ref": "imagenet"}), tmp_path, "sample.fid_ref='imagenet'")
    images = tmp_path / "images.npz"
    np.savez(images, arr_0=np.zeros((2, 4, 4, 3), np.uint8))
    refused("evaluate", ev(**{"sample.fid_ref": str(images)}), tmp_path, "sample.fid_ref=", "'mu' and 'sigma'")
    broken = tmp_path / "broken.npz"
    broken.write_bytes(b"not a zip")
    refused("evaluate", ev(**{"sample.fid_ref": str(broken)}), tmp_path, "sample.fid_ref=", "not a readable .npz")
    refused("evaluate", ev(**{"sample.inception": str(tmp_path / "none.npz")}), tmp_path, "sample.inception=")
    stats = tmp_path / "stats.npz"
    np.savez(stats, mu=np.zeros(3), sigma=np.zeros((3, 3)))
    refused("evaluate", ev(**{"sample.fid_ref": str(stats), "sample.inception": str(stats)}), tmp_path,
            "sample.inception=", "no Inception weights")
    refused("evaluate", ev(**{"sample.inception": inception, "sample.classifier": str(tmp_path / "none")}),
            tmp_path, "sample.classifier=")
    (tmp_path / "clf").mkdir()
    refused("evaluate", ev(**{"sample.inception": inception, "sample.classifier": str(tmp_path / "clf")}),
            tmp_path, "sample.classifier=", "classifier.json")
    # the raw reference is read from data.raw_dir, as the training data
    refused("evaluate", ev(**{"sample.inception": inception, "data.raw_dir": str(tmp_path / "clf")}),
            tmp_path, "sample.fid_ref=", "t10k-images-idx3-ubyte.gz")
    assert zipfile.is_zipfile(inception)
    config_checks.validate("evaluate", ev(**{"sample.inception": inception}), str(tmp_path))
