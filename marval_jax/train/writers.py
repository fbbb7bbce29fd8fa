"""Metric writers: stdout, JSONL and TensorBoard event files.

Decided once, here: clu's `metric_writers` import TensorFlow's SummaryWriter at module load, which we do not
install. clu.metrics (no TensorFlow) accumulates; this module writes. The TensorBoard writer is a small
TFRecord + Event-protobuf encoder of our own (scalars only), readable by TensorBoard. Only process 0 writes.
A resumed run first drops the metrics.jsonl rows past its checkpoint (`truncate_metrics`), so each step is
written once.

Paths go through etils.epath, so a `gs://` workdir gets its files in the bucket (never a local folder named `gs:`).
Object stores have no append: there `_AppendFile` keeps the file's bytes and rewrites the object at each flush
(the writers flush once per log step; a metrics file of a long run is a few hundred kB).
"""
from __future__ import annotations

import json
import socket
import struct
import time

import jax
import numpy as np
from etils import epath

# -- TensorBoard event files -----------------------------------------------------------------------------------
_CRC_TABLE = []
for _i in range(256):
    _c = _i
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _CRC_TABLE.append(_c)


def _crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for b in data:
        crc = _CRC_TABLE[(crc ^ b) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    crc = _crc32c(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n & 0x7F
        n >>= 7
        out.append(b | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(num: int, wire: int, payload: bytes) -> bytes:
    return _varint((num << 3) | wire) + payload


def _len_field(num: int, data: bytes) -> bytes:
    return _field(num, 2, _varint(len(data)) + data)


def encode_event(wall_time: float, step: int, scalars: dict[str, float] | None = None,
                 file_version: str | None = None) -> bytes:
    """Serialised tensorflow.Event (wall_time=1 double, step=2 int64, file_version=3, summary=5)."""
    msg = _field(1, 1, struct.pack("<d", wall_time)) + _field(2, 0, _varint(step))
    if file_version is not None:
        msg += _len_field(3, file_version.encode())
    if scalars:
        values = b"".join(_len_field(1, _len_field(1, tag.encode()) + _field(2, 5, struct.pack("<f", float(v))))
                          for tag, v in scalars.items())
        msg += _len_field(5, values)
    return msg


def tfrecord(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", _masked_crc(header)) + data + struct.pack("<I", _masked_crc(data))


def _is_local(path: epath.Path) -> bool:
    return "://" not in str(path)


class _AppendFile:
    """Append-only binary file on any epath: a real append handle locally; on an object store, the whole content
    kept in memory (starting from what the object already holds) and written as one object on flush."""

    def __init__(self, path: str | epath.Path):
        self.path = epath.Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = _is_local(self.path)
        if self._local:
            self._f = open(self.path, "ab")  # pylint: disable=consider-using-with
        else:
            self._data = bytearray(self.path.read_bytes() if self.path.exists() else b"")
            self._dirty = False

    def write(self, data: bytes) -> None:
        if self._local:
            self._f.write(data)
        else:
            self._data += data
            self._dirty = True

    def flush(self) -> None:
        if self._local:
            self._f.flush()
        elif self._dirty:
            self.path.write_bytes(bytes(self._data))
            self._dirty = False

    def close(self) -> None:
        self.flush()
        if self._local:
            self._f.close()


class TensorBoardWriter:
    def __init__(self, logdir: str):
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.marval"
        self._f = _AppendFile(epath.Path(logdir) / name)
        self._f.write(tfrecord(encode_event(time.time(), 0, file_version="brain.Event:2")))

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        self._f.write(tfrecord(encode_event(time.time(), step, scalars)))

    def flush(self):
        self._f.flush()

    def close(self):
        self._f.close()


class JsonlWriter:
    def __init__(self, path: str):
        self._f = _AppendFile(path)

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        self._f.write((json.dumps({"step": step, "time": time.time(), **scalars}) + "\n").encode())

    def flush(self):
        self._f.flush()

    def close(self):
        self._f.close()


def truncate_metrics(workdir: str, step: int) -> int:
    """Drop the rows of `<workdir>/metrics.jsonl` with step > `step` (the step a run resumes from; 0 on a fresh
    start), and a torn last line, rewriting the file atomically (temp file + rename). Returns the rows dropped."""
    path = epath.Path(workdir) / "metrics.jsonl"
    if not path.exists():
        return 0
    lines = path.read_text().splitlines()
    keep = []
    for line in lines:
        try:
            if int(json.loads(line)["step"]) <= step:
                keep.append(line)
        except (ValueError, KeyError, TypeError):
            pass  # a row cut by a kill mid-write
    if len(keep) == len(lines):
        return 0
    tmp = path.with_name("metrics.jsonl.tmp")
    tmp.write_text("".join(line + "\n" for line in keep))
    tmp.replace(path)
    return len(lines) - len(keep)


class StdoutWriter:
    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        print(f"[{step:7d}] " + "  ".join(f"{k}={v:.4g}" for k, v in sorted(scalars.items())), flush=True)

    def flush(self):
        pass

    def close(self):
        pass


class MultiWriter:
    """stdout + `<workdir>/metrics.jsonl` + `<workdir>/tensorboard/` on process 0; nothing elsewhere."""

    def __init__(self, workdir: str, stdout: bool = True):
        self.writers = []
        if jax.process_index() == 0:
            self.writers = [JsonlWriter(epath.Path(workdir) / "metrics.jsonl"),
                            TensorBoardWriter(epath.Path(workdir) / "tensorboard")]
            if stdout:
                self.writers.append(StdoutWriter())

    def write_scalars(self, step: int, scalars: dict) -> None:
        clean = {k: float(np.asarray(v)) for k, v in scalars.items()}
        for w in self.writers:
            w.write_scalars(step, clean)
            w.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for w in self.writers:
            w.close()
