"""Files of sampling and evaluation through etils.epath: local paths and gs:// alike.

Writers encode in memory and write once (`write_npz`, `grid.save_grid`): a gs:// path becomes one object and never
a local folder named `gs:`. Readers that open only local files (the safe .npz reader, zipfile) get `local_file`: the
path itself when local, a temporary local copy of a remote object otherwise.
"""
from __future__ import annotations

import contextlib
import io
import os
import tempfile
from typing import Iterator

import numpy as np
from etils import epath


def is_remote(path) -> bool:
    return "://" in os.fspath(path)


def as_path(path) -> epath.Path:
    """`path` as an epath.Path; a local one with `~` expanded."""
    path = os.fspath(path)
    return epath.Path(path if is_remote(path) else os.path.expanduser(path))


def write_npz(path, compressed: bool = False, **arrays) -> epath.Path:
    """An .npz of `arrays`, encoded in memory, written once to `path` (its folder created). A local file appears
    whole or not at all (written beside it, then renamed), so another process reading the same cache file never
    meets half of it; an object store's write is whole already."""
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, **arrays)
    path = as_path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if is_remote(path):
        path.write_bytes(buf.getvalue())
        return path
    tmp = path.parent / f".{path.name}.{os.getpid()}.tmp"
    tmp.write_bytes(buf.getvalue())
    os.replace(tmp, path)
    return path


@contextlib.contextmanager
def local_file(path) -> Iterator[str]:
    """A local file path holding `path`'s bytes: `path` itself when local, else a temporary copy (removed after)."""
    if not is_remote(path):
        yield os.fspath(as_path(path))
        return
    with tempfile.TemporaryDirectory() as tmp:
        local = os.path.join(tmp, os.path.basename(os.fspath(path).rstrip("/")) or "file")
        with open(local, "wb") as f:
            f.write(epath.Path(path).read_bytes())
        yield local
