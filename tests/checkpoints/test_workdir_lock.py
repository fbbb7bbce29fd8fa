"""checkpoints/workdir_lock.py: one writer per workdir, stale locks taken over, the holder named on refusal."""
import json
import logging
import os
import socket
import subprocess
import sys
import time

import pytest

from marval_jax.checkpoints import workdir_lock as wl
from marval_jax.user_errors import UserError, one_line


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def _write_lock(workdir, **fields):
    rec = {"host": socket.gethostname(), "pid": os.getpid(), "start_time": 1.7e9, "heartbeat": 1.7e9,
           "run_id": "other"}
    rec.update(fields)
    (workdir / wl.LOCK_NAME).write_text(json.dumps(rec))


def test_second_writer_is_refused_naming_the_holder(tmp_path):
    first = wl.WorkdirLock(str(tmp_path))
    first.acquire()
    held = json.loads((tmp_path / wl.LOCK_NAME).read_text())
    assert held["pid"] == os.getpid() and held["host"] == socket.gethostname() and held["run_id"] == first.run_id
    t0 = time.monotonic()
    with pytest.raises(UserError) as e:
        wl.WorkdirLock(str(tmp_path)).acquire()
    assert time.monotonic() - t0 < 5  # refused at once, not after a wait
    msg = one_line(e.value)
    assert f"host {socket.gethostname()}, pid {os.getpid()}, since " in msg
    assert f"delete {tmp_path / wl.LOCK_NAME}" in msg and len(str(e.value).splitlines()) == 1
    first.release()
    assert not (tmp_path / wl.LOCK_NAME).exists()
    with wl.hold(str(tmp_path)):  # free again
        assert (tmp_path / wl.LOCK_NAME).exists()
    assert not (tmp_path / wl.LOCK_NAME).exists()


def test_lock_of_a_dead_pid_on_this_host_is_taken_over(tmp_path, caplog):
    _write_lock(tmp_path, pid=_dead_pid())
    with caplog.at_level(logging.WARNING):
        with wl.hold(str(tmp_path)) as lock:
            assert json.loads((tmp_path / wl.LOCK_NAME).read_text())["run_id"] == lock.run_id
    assert "is no longer running" in caplog.text and "taking over the stale lock" in caplog.text


def test_other_host_is_stale_only_after_its_heartbeat_times_out(tmp_path):
    now = time.time()
    _write_lock(tmp_path, host="some-other-host", pid=1, heartbeat=now - 100)
    with pytest.raises(UserError, match="host some-other-host, pid 1"):
        wl.WorkdirLock(str(tmp_path), stale_after_s=1000).acquire()
    with wl.hold(str(tmp_path), stale_after_s=50) as lock:  # 100 s without a heartbeat > 50 s: stale
        assert json.loads((tmp_path / wl.LOCK_NAME).read_text())["run_id"] == lock.run_id


def test_heartbeat_refreshes_the_lock_and_release_spares_a_lock_taken_over(tmp_path):
    lock = wl.WorkdirLock(str(tmp_path))
    lock.acquire()
    path = tmp_path / wl.LOCK_NAME
    before = json.loads(path.read_text())["heartbeat"]
    time.sleep(0.01)
    lock.heartbeat()  # within HEARTBEAT_MIN_INTERVAL_S: no write
    assert json.loads(path.read_text())["heartbeat"] == before
    lock.heartbeat(force=True)
    assert json.loads(path.read_text())["heartbeat"] > before
    assert wl.stale_reason(json.loads(path.read_text()), 10.0, now=time.time() + 5) is None
    _write_lock(tmp_path, run_id="taker")  # another run took it over (e.g. after a stale verdict)
    lock.release()
    assert json.loads(path.read_text())["run_id"] == "taker"
