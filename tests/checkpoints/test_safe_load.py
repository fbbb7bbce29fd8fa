"""marval_jax/checkpoints/safe_load.py: pickles run no code unless trusted; a bad weights file is one clear line."""
import argparse
import os
import pathlib
import re
import subprocess
import sys

import numpy as np
import pytest

from marval_jax.checkpoints import safe_load
from marval_jax.user_errors import UserError

torch = pytest.importorskip("torch")

REPO = pathlib.Path(__file__).parents[2]


class RunsCode:
    """Unpickling this object calls builtins.exec on a line that writes `marker`: what a hostile checkpoint does."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def _save(obj, path, zip_format=True):
    torch.save(obj, path, _use_new_zipfile_serialization=zip_format)
    return str(path)


def _one_line_user_error(exc_info, path):
    msg = str(exc_info.value)
    assert isinstance(exc_info.value, UserError)
    assert "\n" not in msg and "allow_pickle" not in msg, msg
    assert str(path) in msg, msg
    return msg


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_pickle_that_runs_code_is_refused_unless_trusted(tmp_path, zip_format):
    marker = tmp_path / "marker"
    path = _save({"model": {"w": torch.ones(2)}, "hook": RunsCode(marker)}, tmp_path / "hostile.pth", zip_format)
    with pytest.raises(UserError) as info:
        safe_load.torch_load(path)
    msg = _one_line_user_error(info, path)
    assert not marker.exists()
    # torch names it builtins.exec (zip) or exec (legacy message)
    assert re.search(r"global (builtins\.)?exec to unpickle", msg) and "--trust_pickle" in msg, msg
    assert "runs any code" in msg, msg
    # The same file with trust: the payload runs, so the check above would have seen it run.
    obj = safe_load.torch_load(path, trust_pickle=True)
    assert marker.read_text() == "ran"
    np.testing.assert_array_equal(obj["model"]["w"].numpy(), np.ones(2))


def test_refusal_names_the_hint_it_is_given(tmp_path):
    path = _save({"hook": RunsCode(tmp_path / "m")}, tmp_path / "h.ckpt")
    with pytest.raises(UserError, match=r"pass tokenizer\.trust_pickle=True \(full unpickling"):
        safe_load.torch_load(path, what="VAE checkpoint", trust_hint="tokenizer.trust_pickle=True")
    assert not (tmp_path / "m").exists()


@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_reference_checkpoint_with_namespace_loads_without_trust(tmp_path, zip_format):
    """The reference MAR checkpoint-last.pth pickles its argparse.Namespace under "args"."""
    w = torch.arange(6, dtype=torch.float32).reshape(2, 3)
    args = argparse.Namespace(model="mar_base", lr=8e-4, cfg=2.9, grad_checkpointing=False, epochs=400)
    path = _save({"model": {"w": w}, "model_ema": {"w": w * 2}, "epoch": 399, "args": args}, tmp_path / "ck.pth",
                 zip_format)
    obj = safe_load.torch_load(path)
    assert obj["args"] == args and obj["epoch"] == 399
    np.testing.assert_array_equal(obj["model_ema"]["w"].numpy(), (w * 2).numpy())


def _garbage(tmp_path, name, good_bytes=None):
    """Random bytes (seeded), the first half of a good file, and an empty file, under `name`."""
    rng = np.random.default_rng(0)
    files = {"random": rng.integers(0, 256, 4096, dtype=np.uint8).tobytes(), "empty": b""}
    if good_bytes is not None:
        files["truncated"] = good_bytes[:len(good_bytes) // 2]
    out = {}
    for kind, data in files.items():
        p = tmp_path / kind / name
        p.parent.mkdir(exist_ok=True)
        p.write_bytes(data)
        out[kind] = str(p)
    return out


def test_bad_pth_is_one_line(tmp_path):
    good = pathlib.Path(_save({"model": {"w": torch.ones(64)}}, tmp_path / "good.pth")).read_bytes()
    legacy = pathlib.Path(_save({"model": {"w": torch.ones(64)}}, tmp_path / "legacy.pth", False)).read_bytes()
    bad = _garbage(tmp_path, "w.pth", good)
    bad["legacy_truncated"] = str(tmp_path / "lt.pth")
    pathlib.Path(bad["legacy_truncated"]).write_bytes(legacy[:len(legacy) // 2])
    with open(tmp_path / "arrays.pth", "wb") as f:  # a zip, but not a PyTorch one
        np.savez(f, a=np.zeros(3))
    bad["npz_named_pth"] = str(tmp_path / "arrays.pth")
    for kind, path in bad.items():
        with pytest.raises(UserError) as info:
            safe_load.torch_load(path)
        msg = _one_line_user_error(info, path)
        assert "expected a PyTorch checkpoint" in msg, (kind, msg)
    assert "truncated" in str(pytest.raises(UserError, safe_load.torch_load, bad["truncated"]).value)
    with pytest.raises(FileNotFoundError, match="nothere.pth"):
        safe_load.torch_load(str(tmp_path / "nothere.pth"))


def test_bad_safetensors_is_one_line(tmp_path):
    from safetensors.numpy import save_file
    save_file({"w": np.ones(256, np.float32)}, str(tmp_path / "good.safetensors"))
    assert set(safe_load.load_safetensors(tmp_path / "good.safetensors")) == {"w"}
    bad = _garbage(tmp_path, "w.safetensors", (tmp_path / "good.safetensors").read_bytes())
    for kind, path in bad.items():
        with pytest.raises(UserError) as info:
            safe_load.load_safetensors(path)
        assert "expected a .safetensors file" in _one_line_user_error(info, path), kind
    with pytest.raises(FileNotFoundError, match="nothere.safetensors"):
        safe_load.load_safetensors(tmp_path / "nothere.safetensors")


def test_bad_npz_is_one_line_and_never_suggests_allow_pickle(tmp_path):
    np.savez(tmp_path / "good.npz", w=np.ones(256, np.float32), name=np.array("kl16"))
    got = safe_load.load_npz(tmp_path / "good.npz")
    assert set(got) == {"w", "name"} and str(got["name"]) == "kl16"
    bad = _garbage(tmp_path, "w.npz", (tmp_path / "good.npz").read_bytes())
    np.save(tmp_path / "single.npy", np.zeros(3))
    os.replace(tmp_path / "single.npy", tmp_path / "single.npz")
    bad["npy_named_npz"] = str(tmp_path / "single.npz")
    bad["pth_named_npz"] = _save({"w": torch.ones(2)}, tmp_path / "ck.npz")
    for kind, path in bad.items():
        with pytest.raises(UserError) as info:
            safe_load.load_npz(path)
        assert "expected an .npz archive" in _one_line_user_error(info, path), kind
    # numpy's own message for random bytes suggests allow_pickle=; ours must not (checked above), and the object
    # array of an otherwise fine file is refused when read, without being unpickled.
    np.savez(tmp_path / "objects.npz", w=np.ones(2), meta=np.array([{"a": 1}], dtype=object))
    with safe_load.open_npz(tmp_path / "objects.npz") as npz:
        np.testing.assert_array_equal(npz["w"], np.ones(2))
        with pytest.raises(UserError) as info:
            npz["meta"]
    assert "Python objects under 'meta'" in _one_line_user_error(info, tmp_path / "objects.npz")
    with pytest.raises(FileNotFoundError, match="nothere.npz"):
        safe_load.load_npz(tmp_path / "nothere.npz")


def test_convert_mar_cli_bad_file_is_one_error_line_exit_2(tmp_path):
    bad = tmp_path / "random.pth"
    bad.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    env = dict(os.environ, PYTHONPATH=str(REPO), JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "marval_jax.tools.convert_mar", "--config=configs/mar.py:tiny",
                           f"--ckpt={bad}", f"--out={tmp_path / 'out'}"],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert len(lines) == 1 and lines[0].startswith("error: checkpoint ") and str(bad) in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr and "expected a PyTorch checkpoint" in lines[0]
    assert not (tmp_path / "out").exists()
