"""Metric writers: stdout, JSONL, TensorBoard event files, and optionally Weights & Biases.

Decided once, here: clu's `metric_writers` import TensorFlow's SummaryWriter at module load, which we do not
install. clu.metrics (no TensorFlow) accumulates; this module writes. TensorBoard events come from tensorboardX
(numpy + protobuf only): its summary builders (scalars, images, the hparams plugin's session start) and its
synchronous `EventsWriter` (no background thread: `flush` writes everything written so far). Only process 0 writes.
A resumed run first drops the metrics.jsonl rows past its checkpoint (`truncate_metrics`), so each step is
written once.

Paths go through etils.epath, so a `gs://` workdir gets its files in the bucket (never a local folder named `gs:`).
Object stores have no append: there `_AppendFile` keeps the file's bytes and rewrites the object at each flush
(the writers flush once per log step; a metrics file of a long run is a few hundred kB). tensorboardX's own gs://
backend needs google-cloud-storage; its registry of path prefixes gets ours instead (`_EpathRecordFactory`), so
event files take the same epath route (an event file with a grid every few hundred steps stays a few MB).

`train.writers="wandb"` adds a Weights & Biases run (`pip install .[wandb]`; imported only then): the flattened
config as its config, scalars and sample grids at their steps, files under `<workdir>/wandb/`, one run id per
workdir so a resumed training continues the same run. `WANDB_MODE=offline` writes it locally (`wandb sync` uploads
it later); W&B's project / entity come from `WANDB_PROJECT` / `WANDB_ENTITY` (default project "marval-jax").
"""
from __future__ import annotations

import hashlib
import json
import os
import time
import uuid

import jax
import numpy as np
from etils import epath
from tensorboardX import record_writer, summary as tbx_summary
from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto import event_pb2

from marval_jax.user_errors import UserError

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


class _EpathRecordFactory:
    """tensorboardX's writer factory for a path prefix: gs:// event files through `_AppendFile` (etils.epath)."""

    def open(self, path):
        return _AppendFile(path)

    def directory_check(self, path):
        pass  # object stores have no folders


record_writer.register_writer_factory("gs", _EpathRecordFactory())


def flatten_config(cfg: dict, prefix: str = "") -> dict:
    """{"train": {"lr": 1e-4}} -> {"train.lr": 1e-4}; values TensorBoard's hparams accept (str, bool, int, float),
    anything else (lists, None) as its JSON text."""
    out = {}
    for k, v in cfg.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(flatten_config(v, key + "."))
        elif isinstance(v, (str, bool, int, float)):
            out[key] = v
        else:
            out[key] = json.dumps(v, default=str)
    return out


class TensorBoardWriter:
    """One event file per writer (a unique name: a resume in the same second does not overwrite the first run's)."""

    def __init__(self, logdir: str):
        logdir = str(logdir)
        record_writer.directory_check(logdir)
        self._w = EventsWriter(f"{logdir.rstrip('/')}/events", filename_suffix=f".{uuid.uuid4().hex[:8]}.marval")

    def _write(self, step: int, summary) -> None:
        self._w.write_event(event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary))

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        for tag, v in scalars.items():
            self._write(step, tbx_summary.scalar(tag, float(v)))

    def write_images(self, step: int, images: dict[str, np.ndarray]) -> None:
        """images: tag -> uint8 HWC (or HW) array, e.g. a sample grid (`evaluation.grid.make_grid`)."""
        for tag, img in images.items():
            img = np.asarray(img)
            self._write(step, tbx_summary.image(tag, img[..., None] if img.ndim == 2 else img, dataformats="HWC"))

    def write_hparams(self, hparams: dict) -> None:
        """The hparams plugin's session start (the flattened config); TensorBoard takes the metrics from the run's
        scalars."""
        _, session_start, _ = tbx_summary.hparams(flatten_config(hparams), {})
        self._write(0, session_start)

    def flush(self):
        self._w.flush()

    def close(self):
        self._w.close()


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


class WandbWriter:
    """A Weights & Biases run: scalars and images logged at their step, the flattened config as the run's config."""

    def __init__(self, workdir: str, hparams: dict | None = None):
        try:
            import wandb  # pylint: disable=import-outside-toplevel
        except ImportError as e:
            raise UserError(_NO_WANDB) from e
        self._wandb = wandb
        workdir = str(workdir).rstrip("/")
        local = _is_local(epath.Path(workdir))
        if local:
            os.makedirs(workdir, exist_ok=True)   # W&B puts its files elsewhere when the folder is missing
        self.run = wandb.init(
            project=os.environ.get("WANDB_PROJECT") or "marval-jax", name=os.path.basename(workdir),
            id=run_id(workdir), resume="allow", config=flatten_config(hparams) if hparams else None,
            # W&B writes through the local file system only: a gs:// workdir keeps its W&B files in the default
            # place (./wandb)
            dir=workdir if local else None,
            settings=wandb.Settings(console="off", x_disable_stats=True, silent=True))

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        self.run.log(dict(scalars), step=int(step))

    def write_images(self, step: int, images: dict[str, np.ndarray]) -> None:
        self.run.log({tag: self._wandb.Image(np.asarray(img)) for tag, img in images.items()}, step=int(step))

    def flush(self):
        pass

    def close(self):
        self.run.finish()


def run_id(workdir: str) -> str:
    """The W&B run id of a workdir: the same on every (re)start, so a resumed training continues its run."""
    path = str(workdir) if "://" in str(workdir) else os.path.abspath(str(workdir))
    return hashlib.sha256(path.encode()).hexdigest()[:16]


EXTRA_WRITERS = ("wandb",)


def extra_writers(spec) -> list[str]:
    """`train.writers`: "" or a comma-separated list of extra writers (today: "wandb"); an unknown name, or one whose
    package is not installed, is refused (the loop asks before anything is built)."""
    import importlib.util  # pylint: disable=import-outside-toplevel
    names = [n.strip() for n in str(spec or "").split(",") if n.strip()]
    unknown = [n for n in names if n not in EXTRA_WRITERS]
    if unknown:
        raise UserError(f"train.writers={spec!r}: unknown writer {unknown[0]!r}; choose from {', '.join(EXTRA_WRITERS)} "
                        "(metrics.jsonl, TensorBoard and stdout are always written)")
    if "wandb" in names and importlib.util.find_spec("wandb") is None:
        raise UserError(_NO_WANDB)
    return names


_NO_WANDB = ("train.writers='wandb' needs the wandb package: pip install '.[wandb]' (or pip install wandb), or drop "
             "wandb from train.writers")


class MultiWriter:
    """stdout + `<workdir>/metrics.jsonl` + `<workdir>/tensorboard/` (+ the `extra` writers, `train.writers`) on
    process 0; nothing elsewhere."""

    def __init__(self, workdir: str, stdout: bool = True, hparams: dict | None = None, extra: str = ""):
        self.writers, self.tensorboard, self.image_writers = [], None, []
        names = extra_writers(extra)   # checked on every process: a typo fails everywhere alike
        if jax.process_index() == 0:
            wb = [WandbWriter(workdir, hparams)] if "wandb" in names else []   # first: a failure leaves no file open
            self.tensorboard = TensorBoardWriter(str(epath.Path(workdir) / "tensorboard"))
            if hparams is not None:
                self.tensorboard.write_hparams(hparams)
            self.writers = [JsonlWriter(epath.Path(workdir) / "metrics.jsonl"), self.tensorboard, *wb]
            self.image_writers = [self.tensorboard, *wb]
            if stdout:
                self.writers.append(StdoutWriter())

    def write_scalars(self, step: int, scalars: dict) -> None:
        clean = {k: float(np.asarray(v)) for k, v in scalars.items()}
        for w in self.writers:
            w.write_scalars(step, clean)
            w.flush()

    def write_images(self, step: int, images: dict) -> None:
        """TensorBoard (and W&B) only (the PNG files are written by their owner, `evaluation.grid.save_grid`)."""
        for w in self.image_writers:
            w.write_images(step, images)
            w.flush()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for w in self.writers:
            w.close()
