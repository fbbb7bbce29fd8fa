"""train/writers.py: TensorBoard event files written through tensorboardX, parsed back here from the protobufs
(TFRecord framing with its masked CRC32C, then tensorboardX's Event / Summary / hparams plugin messages)."""
import io
import json
import struct

import numpy as np
from PIL import Image
from tensorboardX.record_writer import masked_crc32c
from tensorboardX.proto import event_pb2, plugin_hparams_pb2

from marval_jax.evaluation.grid import make_grid
from marval_jax.train import writers
from tests.gcs.conftest import gcs_emulator  # noqa: F401  (the session fixture, reused)


def read_events(path) -> list:
    """Every Event of a TFRecord event file; each record's length and payload CRCs are checked."""
    data, events, pos = path.read_bytes(), [], 0
    while pos < len(data):
        header = data[pos:pos + 8]
        (n,) = struct.unpack("<Q", header)
        assert struct.unpack("<I", data[pos + 8:pos + 12])[0] == masked_crc32c(header)
        payload = data[pos + 12:pos + 12 + n]
        assert struct.unpack("<I", data[pos + 12 + n:pos + 16 + n])[0] == masked_crc32c(payload)
        events.append(event_pb2.Event.FromString(payload))
        pos += 16 + n
    return events


def test_scalars_image_and_hparams_parse_back(tmp_path):
    config = {"train": {"lr": 3e-4, "num_steps": 20, "async_checkpoints": False, "profile_steps": [2, 4]},
              "data": {"name": "mnist", "data_dir": None}}
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (4, 6, 6, 3)).astype(np.float32)
    with writers.MultiWriter(str(tmp_path), stdout=False, hparams=config) as w:
        w.write_scalars(1, {"loss": np.float32(0.75), "gen/grad_norm": 2.5})
        w.write_scalars(2, {"loss": 0.5, "gen/grad_norm": 1.25})
        w.write_images(2, {"samples": make_grid(images)})

    files = list((tmp_path / "tensorboard").iterdir())
    assert len(files) == 1 and files[0].name.startswith("events.out.tfevents.")
    events = read_events(files[0])
    assert events[0].file_version == "brain.Event:2"

    values = [(e.step, v) for e in events[1:] for v in e.summary.value]
    # the values are exact in float32 (binary fractions), so equality is the check
    scalars = {(s, v.tag): v.simple_value for s, v in values if v.HasField("simple_value")}
    assert scalars == {(1, "loss"): 0.75, (1, "gen/grad_norm"): 2.5, (2, "loss"): 0.5, (2, "gen/grad_norm"): 1.25}

    [(step, img)] = [(s, v) for s, v in values if v.HasField("image")]
    assert step == 2 and img.tag == "samples"
    decoded = np.asarray(Image.open(io.BytesIO(img.image.encoded_image_string)))
    np.testing.assert_array_equal(decoded, make_grid(images))  # PNG is lossless: the grid's bytes exactly
    assert (img.image.height, img.image.width, img.image.colorspace) == (*decoded.shape[:2], 3)

    [hp] = [v for _, v in values if v.metadata.plugin_data.plugin_name == "hparams"]
    start = plugin_hparams_pb2.HParamsPluginData.FromString(hp.metadata.plugin_data.content).session_start_info
    got = {k: start.hparams[k].WhichOneof("kind") for k in start.hparams}
    assert got == {"train.lr": "number_value", "train.num_steps": "number_value",
                   "train.async_checkpoints": "bool_value", "train.profile_steps": "string_value",
                   "data.name": "string_value", "data.data_dir": "string_value"}
    assert start.hparams["train.lr"].number_value == 3e-4  # float64 in the proto: the Python float exactly
    assert start.hparams["train.profile_steps"].string_value == "[2, 4]"
    assert start.hparams["data.name"].string_value == "mnist"

    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["loss"]) for r in rows] == [(1, 0.75), (2, 0.5)]  # JSONL as before, images not in it


def test_two_writers_in_one_second_keep_both_files(tmp_path):
    """A resume in the same second as the first run (same host, same timestamp in the name) keeps both files."""
    for step in (1, 2):
        w = writers.TensorBoardWriter(str(tmp_path))
        w.write_scalars(step, {"loss": float(step)})
        w.close()
    files = sorted(tmp_path.iterdir())
    assert len(files) == 2
    steps = sorted(e.step for f in files for e in read_events(f) if e.summary.value)
    assert steps == [1, 2]


def test_gcs_event_file_is_rewritten_whole_at_each_flush(gcs_emulator):
    """gs:// through tensorboardX's prefix registry and etils.epath (tests/gcs/conftest.py's emulator): the second
    flush's object still holds the first step."""
    from etils import epath
    w = writers.TensorBoardWriter("gs://bucket/writers_test/tensorboard")
    w.write_scalars(1, {"loss": 1.0})
    w.flush()
    w.write_scalars(2, {"loss": 0.5})
    w.close()
    [obj] = list(epath.Path("gs://bucket/writers_test/tensorboard").iterdir())
    assert [(e.step, e.summary.value[0].simple_value) for e in read_events(obj)[1:]] == [(1, 1.0), (2, 0.5)]
