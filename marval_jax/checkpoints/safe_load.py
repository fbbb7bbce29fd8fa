"""Read weights files without executing them, and say in one line what is wrong with a bad one.

* `torch_load`: `.pth` / `.pt` / `.ckpt` / `.bin` through `torch.load(weights_only=True)`, which rebuilds tensors,
  containers and primitive values only. A pickle can name any Python callable and have the unpickler call it (that
  is how a file runs code when it is opened), so full unpickling happens only with `trust_pickle=True`
  (`--trust_pickle` in the tools). The few non-tensor globals that released checkpoints hold are allow-listed
  (`SAFE_GLOBALS`); a file that needs another global is refused with its name.
* `open_npz` / `load_npz`: `np.load(allow_pickle=False)`; object arrays are refused.
* `load_safetensors`: the safetensors format holds no code at all.

A missing path raises `FileNotFoundError` naming it; a file that is not of the expected format (random bytes,
truncated, another format, an empty file) raises `marval_jax.user_errors.UserError` with one line: which file, what
format was expected, and what to do.
"""
from __future__ import annotations

import argparse
import os
import pickle
import pickletools
import re
import zipfile
import zlib
from typing import Any, Iterator

import numpy as np

from marval_jax.user_errors import UserError

TRUST_FLAG = "--trust_pickle"
TRUST_RISK = "full unpickling runs any code the file contains"

ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")  # a zip archive (PyTorch >= 1.6, .npz), or an empty one
PICKLE_PROTO = b"\x80"  # pickle protocol >= 2 (PyTorch's legacy format starts with a pickled magic number)
TORCH_FORMAT = "a PyTorch checkpoint (torch.save zip archive or legacy pickle)"
NPZ_FORMAT = "an .npz archive (numpy.savez: a zip of .npy arrays)"
SAFETENSORS_FORMAT = "a .safetensors file (8-byte header length, JSON header, tensor data)"


class LightningCheckpointCallbackKey:
    """Inert stand-in for the callback class that Lightning (<= 1.4, the LDM-era VAE checkpoints) pickles as a
    dictionary key of `callbacks`: the key is only a name here; nothing of Lightning is imported or called."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        del args, kwargs


# Globals released checkpoints need besides tensors and containers:
# - argparse.Namespace: the reference MAR `checkpoint-last.pth` keeps its training arguments under "args"
#   (docs/checkpoints.md). Unpickling it sets attributes on a fresh Namespace; nothing is called.
# - Lightning's ModelCheckpoint class, as a `callbacks` key of LDM-era `.ckpt` files: mapped to an inert stand-in.
SAFE_GLOBALS: list[Any] = [
    argparse.Namespace,
    (LightningCheckpointCallbackKey, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
]
SAFE_GLOBAL_NAMES = {"argparse.Namespace", "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"}


def float32_array(v: Any) -> np.ndarray:
    """A state-dict value (torch tensor, bfloat16 included, or array) as float32 NumPy, without importing torch:
    what the converters store."""
    if hasattr(v, "detach"):
        v = v.detach().cpu()
        if str(v.dtype) == "torch.bfloat16":
            v = v.float()
        v = v.numpy()
    return np.asarray(v).astype(np.float32)


def _check_file(path: str, what: str) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{what} {path} does not exist")
    if os.path.isdir(path):
        raise IsADirectoryError(f"{what} {path} is a directory, expected a file")
    return path


def _head(path: str, n: int = 8) -> bytes:
    with open(path, "rb") as f:
        return f.read(n)


def _bad(path: str, what: str, expected: str, problem: str, todo: str) -> UserError:
    text = f"{what} {path} {problem}; expected {expected}; {todo}"
    return UserError(" ".join(text.split()))  # one line, whatever the parts held


def _first_sentence(exc: BaseException) -> str:
    return re.split(r"(?<=[^.])\.(?:\s|$)", _first_line(exc))[0].strip()[:160]


def _first_line(exc: BaseException) -> str:
    text = re.sub(r"^\s*\[enforce fail at [^\]]*\]\s*\.?\s*", "", str(exc))  # torch's C++ location prefix
    lines = [ln.strip() for ln in text.splitlines() if ln.strip()]
    return lines[0][:200] if lines else type(exc).__name__


# ------------------------------------------------------------------------------------------------ PyTorch pickles

def _legacy_pickles_intact(path: str) -> bool:
    """Whether the pickles that open a legacy-format file (magic number, protocol, sys info, the object) are whole.
    Scanned opcode by opcode (`pickletools.genops`), nothing is executed. A truncated file can end inside a global's
    name, which weights_only then reports as an unsupported global (e.g. `collections.Ordered`)."""
    try:
        with open(path, "rb") as f:
            for _ in range(4):
                for _op, _arg, _pos in pickletools.genops(f):
                    pass
    except Exception:  # noqa: BLE001 - any failure to scan means the stream is damaged
        return False
    return True


def _refused_globals(path: str, exc: BaseException) -> list[str]:
    """The globals a weights_only load refused: from the zip's pickle when torch can list them, else the message."""
    names = re.findall(r"GLOBAL ([\w.]+)", str(exc))
    try:
        import torch
        listed = torch.serialization.get_unsafe_globals_in_checkpoint(path)
    except Exception:  # noqa: BLE001 - legacy format or an older torch: the message's name is what we have
        listed = []
    out = [n for n in (list(listed) or names) if n not in SAFE_GLOBAL_NAMES]
    return list(dict.fromkeys(out))


def torch_load(path: str | os.PathLike, *, trust_pickle: bool = False, what: str = "checkpoint",
               trust_hint: str = TRUST_FLAG) -> Any:
    """`torch.load(path, map_location="cpu")` of a PyTorch checkpoint without running code from it.

    With `trust_pickle=False` (the default) the file is read with `weights_only=True` plus `SAFE_GLOBALS`; a file
    that needs another global is refused with a UserError naming it and `trust_hint` (the flag or config field that
    sets `trust_pickle`). `trust_pickle=True` unpickles fully: only for files from a source you trust.
    """
    path = _check_file(path, what)
    head = _head(path)
    todo = "check the path, or re-download / re-save the file"
    if not head:
        raise _bad(path, what, TORCH_FORMAT, "is empty", todo)
    if not (head.startswith(ZIP_MAGIC) or head.startswith(PICKLE_PROTO)):
        raise _bad(path, what, TORCH_FORMAT, "is not a PyTorch checkpoint (it starts with neither a zip nor a "
                   "pickle header)", todo)
    try:
        import torch
    except ImportError as e:
        raise UserError(f"reading {what} {path} needs torch (pip install torch, CPU build), or convert the file "
                        "to .safetensors / .npz elsewhere") from e
    try:
        if trust_pickle:
            return torch.load(path, map_location="cpu", weights_only=False)
        if not hasattr(torch.serialization, "safe_globals"):  # torch < 2.5: the process-wide allow-list
            torch.serialization.add_safe_globals(SAFE_GLOBALS)
            return torch.load(path, map_location="cpu", weights_only=True)
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        legacy_ok = head.startswith(ZIP_MAGIC) or _legacy_pickles_intact(path)
        if not legacy_ok:
            raise _bad(path, what, TORCH_FORMAT, "ends early or is damaged (its pickle stream is incomplete)",
                       todo) from None
        refused = [] if trust_pickle else _refused_globals(path, e)
        if refused:
            names = ", ".join(refused)
            raise UserError(
                f"{what} {path} needs the Python global {names} to unpickle, which is not allow-listed for safe "
                f"loading (a pickle can name any callable and run it); if you trust where the file came from, "
                f"pass {trust_hint} ({TRUST_RISK}), or re-save its tensors as .safetensors") from None
        detail = _first_line(e)
        m = re.search(r"WeightsUnpickler error:\s*([^\n]+(?:\n[^\n]+)?)", str(e))
        if m:
            detail = " ".join(m.group(1).split())[:200]
        if not trust_pickle:
            todo += (f"; if the file is intact and you trust its source, {trust_hint} reads it without the "
                     f"safety checks ({TRUST_RISK})")
        raise _bad(path, what, TORCH_FORMAT, f"could not be unpickled ({detail})", todo) from None
    except EOFError:
        raise _bad(path, what, TORCH_FORMAT, "ends early (truncated)", todo) from None
    except RuntimeError as e:
        msg = str(e)
        if not any(s in msg for s in ("PytorchStreamReader", "inline_container", "archive", "magic number",
                                      "corrupt")):
            raise
        if "central directory" in msg:
            problem = "is truncated or damaged"
        elif head.startswith(ZIP_MAGIC):
            problem = "is a zip archive but not a PyTorch checkpoint, or a damaged one"
        else:
            problem = "is damaged"
        raise _bad(path, what, TORCH_FORMAT, f"{problem} ({_first_sentence(e)})", todo) from None


# ---------------------------------------------------------------------------------------------------- numpy .npz

class SafeNpz:
    """`np.load(path, allow_pickle=False)` of an .npz, with the NpzFile interface (`files`, `[key]`, `in`,
    `keys()`, `items()`, context manager) and one-line UserErrors for damaged members and object arrays."""

    def __init__(self, npz: np.lib.npyio.NpzFile, path: str, what: str):
        self._npz, self.path, self.what = npz, path, what
        self.files = list(npz.files)

    def __getitem__(self, key: str) -> np.ndarray:
        try:
            return self._npz[key]
        except KeyError:
            raise
        except ValueError as e:
            if "pickle" in str(e) or "Object arrays" in str(e):
                raise _bad(self.path, self.what, NPZ_FORMAT + " of numeric arrays",
                           f"holds Python objects under {key!r} (object arrays are never unpickled)",
                           "re-save it with plain numeric / string arrays") from None
            raise _bad(self.path, self.what, NPZ_FORMAT, f"has a damaged member {key!r} ({_first_line(e)})",
                       "re-create the file") from None
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError) as e:
            raise _bad(self.path, self.what, NPZ_FORMAT, f"has a damaged member {key!r} ({_first_line(e)})",
                       "re-create the file") from None

    def __contains__(self, key: object) -> bool:
        return key in self.files

    def __iter__(self) -> Iterator[str]:
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)

    def keys(self) -> list[str]:
        return list(self.files)

    def items(self) -> Iterator[tuple[str, np.ndarray]]:
        return ((k, self[k]) for k in self.files)

    def close(self) -> None:
        self._npz.close()

    def __enter__(self) -> "SafeNpz":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def open_npz(path: str | os.PathLike, what: str = "array file") -> SafeNpz:
    """An .npz opened with `allow_pickle=False`; use as `with open_npz(p, what=...) as npz: npz[key]`."""
    path = _check_file(path, what)
    head = _head(path)
    todo = "check the path, or re-create the file"
    if not head:
        raise _bad(path, what, NPZ_FORMAT, "is empty", todo)
    if head.startswith(b"\x93NUMPY"):
        raise _bad(path, what, NPZ_FORMAT, "is a single .npy array, not an archive of named arrays",
                   "save it with numpy.savez")
    if not head.startswith(ZIP_MAGIC):
        raise _bad(path, what, NPZ_FORMAT, "is not an .npz archive (no zip header)", todo)
    try:
        npz = np.load(path, allow_pickle=False)
    except (zipfile.BadZipFile, ValueError, EOFError, OSError) as e:
        problem = "is truncated or damaged" if isinstance(e, zipfile.BadZipFile) else "could not be read"
        raise _bad(path, what, NPZ_FORMAT, f"{problem} ({_first_line(e)[:120]})", todo) from None
    if not isinstance(npz, np.lib.npyio.NpzFile):  # cannot happen after the zip check; kept for clarity
        raise _bad(path, what, NPZ_FORMAT, "is not an .npz archive", todo)
    others = [n for n in npz.zip.namelist() if not n.endswith(".npy")]
    if others:
        npz.close()
        kind = "a PyTorch checkpoint" if any(n.endswith("data.pkl") for n in others) else "another zip archive"
        raise _bad(path, what, NPZ_FORMAT, f"looks like {kind}: it holds {others[0]!r}, not only .npy arrays",
                   "check the path, or convert the file to .npz")
    return SafeNpz(npz, path, what)


def load_npz(path: str | os.PathLike, what: str = "array file") -> dict[str, np.ndarray]:
    """Every array of an .npz, read with `allow_pickle=False`."""
    with open_npz(path, what) as npz:
        return {k: npz[k] for k in npz.files}


# ---------------------------------------------------------------------------------------------------- safetensors

def load_safetensors(path: str | os.PathLike, what: str = "weights file") -> dict[str, np.ndarray]:
    """Every tensor of a .safetensors file as numpy arrays (`safetensors.numpy.load_file`)."""
    path = _check_file(path, what)
    from safetensors import SafetensorError
    from safetensors.numpy import load_file
    try:
        return dict(load_file(path))
    except SafetensorError as e:
        msg = str(e)
        problem = ("is truncated (its header promises more data than the file holds)" if "not fully covered" in msg
                   or "incomplete" in msg else f"is not a readable .safetensors file ({_first_line(e)})")
        raise _bad(path, what, SAFETENSORS_FORMAT, problem, "check the path, or re-download / re-save the file") \
            from None
