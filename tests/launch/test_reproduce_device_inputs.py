"""The two-carry inputs of the device reproduction: launch/pack_reproduce_inputs.sh LEAN=1 and TRAIN=1 on stand-in
inputs, then launch/reproduce_fmnist_device.sh STAGE=unpack in a stand-in checkout carrying both (its stash, site,
data-set and home folders redirected into the test's directory): the test split, the training files and the
teacher export land where every later stage reads them, and the wheels are installed."""
from __future__ import annotations

import os
import shutil
import subprocess
import zipfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
IDX = ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz", "train-images-idx3-ubyte.gz",
       "train-labels-idx1-ubyte.gz"]


def _wheel(folder) -> None:
    """A minimal pure-Python wheel that pip installs offline."""
    info = "standin-1.0.dist-info"
    with zipfile.ZipFile(folder / "standin-1.0-py3-none-any.whl", "w") as z:
        z.writestr("standin/__init__.py", "VALUE = 7\n")
        z.writestr(f"{info}/METADATA", "Metadata-Version: 2.1\nName: standin\nVersion: 1.0\n")
        z.writestr(f"{info}/WHEEL", "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n")
        z.writestr(f"{info}/RECORD", f"standin/__init__.py,,\n{info}/METADATA,,\n{info}/WHEEL,,\n{info}/RECORD,,\n")


def _pack(tmp_path, dest, **extra):
    env = dict(os.environ, WHEELS=str(tmp_path / "whl"), RAW=str(tmp_path / "raw"),
               INCEPTION=str(tmp_path / "inception.npz"), DEST=str(dest), **extra)
    proc = subprocess.run(["bash", "launch/pack_reproduce_inputs.sh"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def _device(checkout, tmp_path, stage: str, **extra) -> subprocess.CompletedProcess:
    env = dict(os.environ, STAGE=stage, STASH=str(tmp_path / "stash"), SITE=str(tmp_path / "site"),
               DATASETS=str(tmp_path / "datasets"), HOME=str(tmp_path / "home"), W=str(tmp_path / "w"), **extra)
    return subprocess.run(["bash", os.path.join(ROOT, "launch", "reproduce_fmnist_device.sh")], cwd=checkout,
                          env=env, capture_output=True, text=True, timeout=300)


def test_lean_then_train_carries_put_every_input_in_place(tmp_path):
    for d in ("whl", "raw", "my_teacher"):
        (tmp_path / d).mkdir()
    _wheel(tmp_path / "whl")
    for i, name in enumerate(IDX):
        (tmp_path / "raw" / name).write_bytes(bytes([i]) * 100)
    np.savez(tmp_path / "inception.npz", w=np.ones(4, np.float32))
    np.savez(tmp_path / "my_teacher" / "params.npz", a=np.zeros(3, np.float16))
    (tmp_path / "my_teacher" / "model.json").write_text("{}")
    dest = tmp_path / "packs"
    _pack(tmp_path, dest, LEAN="1")
    _pack(tmp_path, dest, TRAIN="1", TEACHER=str(tmp_path / "my_teacher"))
    assert sorted(os.listdir(dest / "train")) == sorted(IDX[2:] + ["teacher.tar"])

    checkout = tmp_path / "checkout"   # the first call carries .devstate/lean only
    (checkout / ".devstate").mkdir(parents=True)
    shutil.copytree(dest / "lean", checkout / ".devstate" / "lean")
    first = _device(checkout, tmp_path, "unpack")
    assert first.returncode == 0, first.stdout + first.stderr
    x = tmp_path / "stash" / "x"
    assert sorted(os.listdir(x / "fmnist")) == sorted(IDX[:2])
    assert (tmp_path / "site" / "standin" / "__init__.py").exists()
    assert os.path.realpath(tmp_path / "datasets" / "fashion-mnist") == os.path.realpath(x / "fmnist")
    assert (tmp_path / "home" / ".cache" / "marval_jax" / "fid_inception.npz").exists()

    shutil.rmtree(checkout / ".devstate" / "lean")   # the second call carries .devstate/train instead
    shutil.copytree(dest / "train", checkout / ".devstate" / "train")
    second = _device(checkout, tmp_path, "unpack")
    assert second.returncode == 0, second.stdout + second.stderr
    assert sorted(os.listdir(x / "fmnist")) == sorted(IDX)
    assert (x / "fmnist" / IDX[2]).read_bytes() == bytes([2]) * 100
    teacher = x / "carried" / "fmnist_teacher"   # stored under the name the stages read, whatever its folder's
    assert sorted(os.listdir(teacher)) == ["model.json", "params.npz"]
    assert sorted(os.listdir(tmp_path / "w" / "export" / "fmnist_teacher")) == ["model.json", "params.npz"]


def test_a_train_carry_without_the_lean_inputs_is_an_error_naming_them(tmp_path):
    (tmp_path / "checkout" / ".devstate" / "train").mkdir(parents=True)
    proc = _device(tmp_path / "checkout", tmp_path, "unpack")
    assert proc.returncode == 3 and "carry .devstate/lean" in proc.stderr


def test_an_unknown_stage_is_an_error_before_anything_runs(tmp_path):
    proc = _device(tmp_path, tmp_path, "unpak")
    assert proc.returncode == 2 and "STAGE=unpak" in proc.stderr
    assert not (tmp_path / "stash").exists()


def test_train_pack_without_the_teacher_is_an_error_naming_it(tmp_path):
    (tmp_path / "raw").mkdir()
    env = dict(os.environ, RAW=str(tmp_path / "raw"), TRAIN="1", TEACHER=str(tmp_path / "none"),
               DEST=str(tmp_path / "out"))
    proc = subprocess.run(["bash", "launch/pack_reproduce_inputs.sh"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "none/params.npz not found" in proc.stderr


def test_pack_without_wheels_or_inception_names_the_command_that_makes_them(tmp_path):
    (tmp_path / "raw").mkdir()
    (tmp_path / "whl").mkdir()
    base = dict(os.environ, RAW=str(tmp_path / "raw"), LEAN="1", DEST=str(tmp_path / "out"))
    for extra, message in ((dict(WHEELS=str(tmp_path / "none")), "fetch_device_wheels.sh downloads it"),
                           (dict(WHEELS=str(tmp_path / "whl"), INCEPTION=str(tmp_path / "none.npz")),
                            "convert_inception writes it")):
        proc = subprocess.run(["bash", "launch/pack_reproduce_inputs.sh"], cwd=ROOT, env=dict(base, **extra),
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr


def test_ship_pack_holds_the_student_under_the_name_results_reads(tmp_path):
    student = tmp_path / "my_student"
    student.mkdir()
    np.savez(student / "params.npz", a=np.zeros(3, np.float16))
    (student / "model.json").write_text("{}")
    _pack(tmp_path, tmp_path / "packs", SHIP="1", STUDENT=str(student))
    assert sorted(os.listdir(tmp_path / "packs" / "ship" / "fmnist_student")) == ["model.json", "params.npz"]
    env = dict(os.environ, SHIP="1", STUDENT=str(tmp_path / "none"), DEST=str(tmp_path / "out"))
    proc = subprocess.run(["bash", "launch/pack_reproduce_inputs.sh"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "none/params.npz not found" in proc.stderr


def test_variants_without_a_carried_teacher_name_the_carry(tmp_path):
    """STAGE=variants past its inputs (the lean carry only): no teacher export is an error naming the train carry."""
    (tmp_path / "whl").mkdir()
    (tmp_path / "raw").mkdir()
    _wheel(tmp_path / "whl")
    for name in IDX:
        (tmp_path / "raw" / name).write_bytes(b"x")
    np.savez(tmp_path / "inception.npz", w=np.ones(4, np.float32))
    _pack(tmp_path, tmp_path / "packs", LEAN="1")
    checkout = tmp_path / "checkout"
    (checkout / ".devstate").mkdir(parents=True)
    shutil.copytree(tmp_path / "packs" / "lean", checkout / ".devstate" / "lean")
    proc = _device(checkout, tmp_path, "variants", VARIANTS="g15:gsim.guidance_scale=1.5")
    assert proc.returncode == 3 and "carry .devstate/train" in proc.stderr, proc.stdout + proc.stderr
