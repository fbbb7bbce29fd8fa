"""launch/pack_reproduce_inputs.sh on stand-in inputs: the chunks rebuild the packed tar (its sha256 is the one the
device script checks), and LEAN=1 packs only what an evaluation call needs."""
from __future__ import annotations

import hashlib
import io
import os
import subprocess
import tarfile

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TEST_FILES = ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
TRAIN_FILES = ["train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"]


def _inputs(tmp_path, train_bytes: int):
    whl, raw = tmp_path / "whl", tmp_path / "raw"
    whl.mkdir()
    raw.mkdir()
    (whl / "pkg-1.0-py3-none-any.whl").write_bytes(b"wheel")
    rng = np.random.default_rng(0)
    for name in TEST_FILES + TRAIN_FILES:   # incompressible, so the chunk count is known
        (raw / name).write_bytes(rng.bytes(train_bytes if name == TRAIN_FILES[0] else 1000))
    np.savez(tmp_path / "inception.npz", w=np.linspace(-1, 1, 64, dtype=np.float32), n=np.arange(3))
    return dict(os.environ, WHEELS=str(whl), RAW=str(raw), INCEPTION=str(tmp_path / "inception.npz"))


def _run(env):
    proc = subprocess.run(["bash", "launch/pack_reproduce_inputs.sh"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def _members(data: bytes) -> dict:
    with tarfile.open(fileobj=io.BytesIO(data)) as tar:
        return {m.name.removeprefix("./"): tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}


def test_chunks_rebuild_the_pack_and_its_checksum(tmp_path):
    dest = tmp_path / "out"
    env = _inputs(tmp_path, train_bytes=30_000_000)   # > 25 MB: two chunks
    _run(dict(env, DEST=str(dest)))
    chunks = sorted(dest.glob("c?/chunk?"))
    assert [c.parent.name for c in chunks] == ["c0", "c1"]
    data = b"".join(c.read_bytes() for c in chunks)
    assert len(chunks[0].read_bytes()) == 25_000_000
    sha = (dest / "c1" / "pack.sha").read_text().split()
    assert sha == [hashlib.sha256(data).hexdigest(), "pack.tar"]
    files = _members(data)
    assert sorted(files) == sorted(["fid_inception.npz", "whl/pkg-1.0-py3-none-any.whl"]
                                   + [f"fmnist/{n}" for n in TEST_FILES + TRAIN_FILES])
    with np.load(io.BytesIO(files["fid_inception.npz"])) as z:
        assert z["w"].dtype == np.float16 and z["n"].dtype == np.arange(3).dtype
        np.testing.assert_allclose(z["w"], np.linspace(-1, 1, 64), atol=2 ** -11)


def test_lean_packs_the_test_split_wheels_and_inception_only(tmp_path):
    dest = tmp_path / "out"
    (dest / "c0").mkdir(parents=True)
    (dest / "c0" / "chunk0").write_bytes(b"kept")   # a full pack beside it is left alone
    _run(dict(_inputs(tmp_path, train_bytes=1000), DEST=str(dest), LEAN="1"))
    files = _members((dest / "lean" / "lean.tar").read_bytes())
    assert sorted(files) == sorted(["fid_inception.npz", "whl/pkg-1.0-py3-none-any.whl"]
                                   + [f"fmnist/{n}" for n in TEST_FILES])
    assert (dest / "c0" / "chunk0").read_bytes() == b"kept" and not (dest / "pack").exists()


def test_a_missing_input_is_an_error_naming_it(tmp_path):
    env = dict(_inputs(tmp_path, train_bytes=10), DEST=str(tmp_path / "out"), RAW=str(tmp_path / "nowhere"))
    proc = subprocess.run(["bash", "launch/pack_reproduce_inputs.sh"], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 2 and "nowhere not found" in proc.stderr
