"""train/writers.py's optional Weights & Biases writer (`train.writers="wandb"`), run in offline mode: the run file
W&B writes (LevelDB log framing, one `wandb_internal_pb2.Record` per record) is parsed back here."""
import io
import json
import struct
import sys
import time
import zlib

import numpy as np
import pytest
from PIL import Image

from marval_jax.evaluation.grid import make_grid
from marval_jax.train import writers
from marval_jax.user_errors import UserError

BLOCK = 32 * 1024   # LevelDB log blocks; each record chunk has a 7-byte header (crc32, length, type)
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path) -> list:
    """Every Record of a W&B run file (`run-<id>.wandb`); each chunk's CRC-32 (of type byte + payload) is checked."""
    from wandb.proto import wandb_internal_pb2 as pb
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, out, pending = 7, [], b""
    while pos + 7 <= len(data):
        if BLOCK - pos % BLOCK < 7:          # a block's tail too short for a header is padding
            pos += BLOCK - pos % BLOCK
            continue
        crc, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if n == 0 and kind == 0:             # zero padding at the end of a block
            pos += BLOCK - pos % BLOCK
            continue
        chunk = data[pos + 7:pos + 7 + n]
        assert crc == zlib.crc32(bytes([kind]) + chunk), f"bad CRC at byte {pos}"
        pos += 7 + n
        pending = chunk if kind in (FULL, FIRST) else pending + chunk
        if kind in (FULL, LAST):
            record = pb.Record()
            record.ParseFromString(pending)
            out.append(record)
    return out


def finished_records(path, wait_s: float = 120.0) -> list:
    """The records of a finished run file: W&B's service process writes it out after `finish` returns (on stopping,
    which `wandb.teardown()` asks for), so this waits for the closing `exit` record (a bound on a wait, not a
    timing check)."""
    import wandb
    wandb.teardown()
    deadline = time.monotonic() + wait_s
    while True:
        records = read_records(path)
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def _history(records) -> dict:
    """{step: {key: value}} of the run's history rows (nested keys joined by '.')."""
    rows = {}
    for r in records:
        if r.WhichOneof("record_type") == "history":
            row = {".".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
            rows[row["_step"]] = row
    return rows


@pytest.fixture
def offline(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the W&B writer is optional: pip install '.[wandb]'")
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):   # nothing under ~
        monkeypatch.setenv(var, str(tmp_path / "wandb_home"))
    monkeypatch.delenv("WANDB_PROJECT", raising=False)


def test_wandb_writer_logs_scalars_image_and_config_offline(tmp_path, offline):
    config = {"train": {"lr": 3e-4, "eval_every": 5}, "data": {"name": "mnist"}}
    images = np.random.default_rng(0).uniform(-1, 1, (4, 6, 6, 3)).astype(np.float32)
    workdir = tmp_path / "run"
    with writers.MultiWriter(str(workdir), stdout=False, hparams=config, extra="wandb") as w:
        w.write_scalars(1, {"loss": np.float32(0.75), "eval/fid": 12.5})
        w.write_scalars(2, {"loss": 0.5})
        w.write_images(2, {"samples": make_grid(images)})

    [run_dir] = list((workdir / "wandb").glob("offline-run-*"))
    [run_file] = list(run_dir.glob("run-*.wandb"))
    records = finished_records(run_file)
    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.run_id == writers.run_id(str(workdir)) and run.project == "marval-jax"
    cfg = {u.key: json.loads(u.value_json) for u in run.config.update if u.key != "_wandb"}
    assert cfg == {"train.lr": 3e-4, "train.eval_every": 5, "data.name": "mnist"}   # the flattened config

    rows = _history(records)
    assert sorted(rows) == [1, 2]
    assert (rows[1]["loss"], rows[1]["eval/fid"]) == (0.75, 12.5)    # binary fractions: exact
    assert rows[2]["loss"] == 0.5 and rows[2]["samples._type"] == "image-file"
    png = run_dir / "files" / rows[2]["samples.path"]
    np.testing.assert_array_equal(np.asarray(Image.open(io.BytesIO(png.read_bytes()))), make_grid(images))

    # metrics.jsonl and TensorBoard are written as before, beside W&B
    assert [json.loads(x)["step"] for x in (workdir / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert len(list((workdir / "tensorboard").iterdir())) == 1


def test_a_resumed_run_keeps_its_wandb_run_id(tmp_path):
    """The id is the workdir's: every (re)start of one workdir logs into the same W&B run, another workdir not."""
    a = writers.run_id(str(tmp_path / "a"))
    assert a == writers.run_id(str(tmp_path / "a")) == writers.run_id(str(tmp_path / "a") + "/")
    assert a != writers.run_id(str(tmp_path / "b"))


def test_unknown_or_missing_writer_is_a_user_error(tmp_path, monkeypatch):
    with pytest.raises(UserError, match=r"train.writers='wandbb': unknown writer 'wandbb'; choose from wandb"):
        writers.MultiWriter(str(tmp_path), stdout=False, extra="wandbb")
    monkeypatch.setitem(sys.modules, "wandb", None)     # as if not installed: `import wandb` raises ImportError
    with pytest.raises(UserError, match=r"needs the wandb package: pip install '\.\[wandb\]'"):
        writers.MultiWriter(str(tmp_path), stdout=False, extra="wandb")
