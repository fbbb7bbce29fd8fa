"""train/loop.py's `train.profile_steps`: a jax.profiler trace of the chosen steps under <workdir>/profile, written by
the real loop (tests/train/test_loop_guards.py's minimal task, compiled in well under a second)."""
import gzip
import json
import os

import pytest

from marval_jax.train.loop import train
from marval_jax.user_errors import UserError
from tests.gcs.conftest import gcs_emulator  # noqa: F401  (the session fixture, reused)
from tests.train.test_loop_guards import config, growth_task


def test_profile_steps_write_a_trace_of_those_steps(tmp_path):
    workdir = str(tmp_path / "run")
    train(config(num_steps=4, ckpt_every=4, log_every=4, profile_steps=(2, 3)), workdir, growth_task(1.01))
    found = {name: os.path.join(here, name) for here, _, names in os.walk(os.path.join(workdir, "profile"))
             for name in names}
    xplane = [n for n in found if n.endswith(".xplane.pb")]
    assert len(xplane) == 1 and os.path.getsize(found[xplane[0]]) > 0, found  # the file TensorBoard/xprof open
    [trace] = [found[n] for n in found if n.endswith(".trace.json.gz")]  # the one Perfetto opens
    with gzip.open(trace) as f:
        spans = sorted((e["ts"], e["ts"] + e["dur"]) for e in json.load(f)["traceEvents"]
                       if e.get("name") == "PjitFunction(step)" and e.get("ph") == "X")
    # the jitted step's calls in the trace (jax nests one span of that name in another per call; count outermost):
    # steps 2 and 3, not 1 or 4
    calls, end = 0, float("-inf")
    for t0, t1 in spans:
        if t0 >= end:
            calls, end = calls + 1, t1
    assert calls == 2, spans


@pytest.mark.parametrize("steps", [(3, 2), (0, 1), (1, 2, 3), ("a", 2)])
def test_bad_profile_steps_are_refused_before_the_run(tmp_path, steps):
    with pytest.raises(UserError, match=r"train.profile_steps=.*expected two step numbers \(a, b\) with 1 <= a <= b"):
        train(config(num_steps=2, profile_steps=steps), str(tmp_path / "run"), growth_task(1.01))
    assert not os.path.exists(tmp_path / "run")  # refused before the workdir (and its lock) was made


def test_profile_of_a_gcs_workdir_is_copied_into_the_bucket(gcs_emulator, tmp_path, monkeypatch):
    """jax.profiler writes local files only: traced into a temporary folder, then copied to gs://.../profile
    (tests/gcs/conftest.py's emulator); no local 'gs:' folder appears."""
    from etils import epath
    monkeypatch.chdir(tmp_path)
    workdir = "gs://bucket/profiled"
    train(config(num_steps=1, ckpt_every=1, log_every=1, profile_steps=(1, 1)), workdir, growth_task(1.01))
    names = [p.name for p in epath.Path(f"{workdir}/profile").glob("plugins/profile/*/*")]
    assert any(n.endswith(".xplane.pb") for n in names) and any(n.endswith(".trace.json.gz") for n in names), names
    assert not os.path.exists(tmp_path / "gs:")
