"""One writer per workdir: `<workdir>/workdir.lock`, a small JSON object {host, pid, start_time, heartbeat, run_id}.

Two trainers on one workdir would overwrite each other's checkpoints and interleave metrics.jsonl, so `train`
takes this lock before it writes anything and a second run is refused at once with a `UserError` naming the
holder (host, pid, since when) and how to clear it. The lock is released (the file deleted) on normal exit, on
error and after a preemption save; only a hard kill (SIGKILL, a lost VM) leaves it behind, and then it is stale:

  * same host, holder pid no longer alive          -> stale at once, taken over with a warning;
  * another host (its pid cannot be checked here)  -> stale when its heartbeat is older than `stale_after_s`
    (config `train.lock_stale_after_s`, default 30 min). The holder refreshes the heartbeat at log and save
    steps, so that timeout must exceed the time between two log steps.

Paths go through `etils.epath`, so a gs:// workdir works the same. Creation is atomic on local file systems
(O_CREAT | O_EXCL); on object stores it is write-then-read-back (the last writer wins the race, and the loser sees
another run id and is refused). In a multi-process run only process 0 reads and writes the lock; its verdict is
broadcast so every process stops together.
"""
from __future__ import annotations

import contextlib
import datetime
import json
import logging
import os
import socket
import time
import uuid
from typing import Iterator

from etils import epath

from marval_jax.user_errors import UserError

LOCK_NAME = "workdir.lock"
DEFAULT_STALE_AFTER_S = 1800.0
HEARTBEAT_MIN_INTERVAL_S = 30.0  # log steps can be a second apart: do not rewrite the lock that often


class WorkdirLockedError(UserError):
    pass


def _is_local(path: epath.Path) -> bool:
    return "://" not in os.fspath(path)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _when(t: float) -> str:
    return datetime.datetime.fromtimestamp(t).isoformat(sep=" ", timespec="seconds")


def _create_exclusive(path: epath.Path, text: str, run_id: str) -> bool:
    """Write `text` to `path` only if it does not exist; True if this call created it."""
    if _is_local(path):
        try:
            fd = os.open(os.fspath(path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(text)
        return True
    if path.exists():
        return False
    path.write_text(text)
    return _read(path).get("run_id") == run_id


def _read(path: epath.Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise
    except (ValueError, OSError):
        return {}  # torn or unreadable lock file: treated as stale below (no pid, no heartbeat)


def stale_reason(holder: dict, stale_after_s: float, now: float | None = None) -> str | None:
    """Why the lock `holder` is stale, or None while it may still be held by a live run."""
    now = time.time() if now is None else now
    if not holder.get("host") or not holder.get("pid"):
        return "the lock file is unreadable"
    if holder["host"] == socket.gethostname():
        return None if _pid_alive(int(holder["pid"])) else f"pid {holder['pid']} is no longer running"
    age = now - float(holder.get("heartbeat", holder.get("start_time", 0)))
    if age > stale_after_s:
        return f"its last heartbeat was {age:.0f} s ago (stale after {stale_after_s:.0f} s)"
    return None


class WorkdirLock:
    """`with WorkdirLock(workdir): ...` holds the workdir; `heartbeat()` at log/save steps keeps it fresh."""

    def __init__(self, workdir: str, stale_after_s: float = DEFAULT_STALE_AFTER_S, writer: bool = True):
        self.path = epath.Path(workdir) / LOCK_NAME
        self.stale_after_s = float(stale_after_s)
        self.writer = writer  # False on processes other than 0: they neither read nor write the file
        self.run_id = uuid.uuid4().hex[:12]
        self.start_time = time.time()
        self._last_beat = 0.0
        self.held = False

    def _record(self, now: float) -> dict:
        return {"host": socket.gethostname(), "pid": os.getpid(), "start_time": self.start_time,
                "heartbeat": now, "run_id": self.run_id}

    def acquire(self) -> None:
        if not self.writer:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):  # a lock released or taken over between our reads: look again
            now = time.time()
            if _create_exclusive(self.path, json.dumps(self._record(now)), self.run_id):
                self.held, self._last_beat = True, now
                return
            try:
                holder = _read(self.path)
            except FileNotFoundError:
                continue
            reason = stale_reason(holder, self.stale_after_s, now)
            if reason is None:
                raise WorkdirLockedError(self._refusal(holder))
            logging.warning("taking over the stale lock %s of host %s pid %s (run %s): %s", self.path,
                            holder.get("host"), holder.get("pid"), holder.get("run_id"), reason)
            self.path.unlink(missing_ok=True)
        raise WorkdirLockedError(f"could not take the lock {self.path}: other runs keep taking it")

    def _refusal(self, holder: dict) -> str:
        beat = holder.get("heartbeat", holder.get("start_time", 0))
        return (f"workdir {self.path.parent} is in use by another run (host {holder.get('host')}, pid "
                f"{holder.get('pid')}, since {_when(holder.get('start_time', 0))}, last heartbeat {_when(beat)}, "
                f"run id {holder.get('run_id')}); wait for it to finish, use another --workdir, or if that run is "
                f"gone delete {self.path}")

    def heartbeat(self, force: bool = False) -> None:
        """Refresh the heartbeat time (at most every HEARTBEAT_MIN_INTERVAL_S unless `force`)."""
        now = time.time()
        if not self.held or (not force and now - self._last_beat < HEARTBEAT_MIN_INTERVAL_S):
            return
        tmp = self.path.with_name(f"{LOCK_NAME}.{self.run_id}.tmp")
        tmp.write_text(json.dumps(self._record(now)))
        tmp.replace(self.path)
        self._last_beat = now

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            if _read(self.path).get("run_id") == self.run_id:  # never delete a lock someone took over
                self.path.unlink(missing_ok=True)
        except FileNotFoundError:
            pass

    def __enter__(self):
        self.acquire()
        return self

    def __exit__(self, *exc):
        self.release()


@contextlib.contextmanager
def hold(workdir: str, stale_after_s: float = DEFAULT_STALE_AFTER_S) -> Iterator[WorkdirLock]:
    """`with hold(workdir) as lock:` the run's lock, released on exit, error or preemption. Process 0 takes it;
    in a multi-process run its verdict is broadcast so every process is refused together."""
    import jax
    lock = WorkdirLock(workdir, stale_after_s, writer=jax.process_index() == 0)
    if jax.process_count() == 1:
        lock.acquire()
    else:
        from jax.experimental import multihost_utils
        error = ""
        try:
            lock.acquire()
        except WorkdirLockedError as e:
            error = str(e)
        if int(multihost_utils.broadcast_one_to_all(int(bool(error)))):
            raise WorkdirLockedError(error or f"workdir {workdir} is in use by another run (refused on process 0)")
    try:
        yield lock
    finally:
        lock.release()
