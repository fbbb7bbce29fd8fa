"""The stage driver of the Fashion-MNIST reproduction: budgets, argument errors, the SIGTERM cut of a stage, and the
stage -> export -> next stage bookkeeping (stages stubbed: nothing is trained here)."""
import json
import os
import sys

import pytest

from marval_jax.user_errors import UserError

from marval_jax.programs import reproduce


def test_parse_budget():
    assert reproduce.parse_budget("teacher=240,student=30") == {"teacher": 240.0, "student": 30.0}
    assert reproduce.parse_budget(" rl=1.5 , ") == {"rl": 1.5}
    assert reproduce.parse_budget("") == {}
    for bad in ("techer=240", "teacher", "teacher=", "=30", "teacher=240,vae=10"):
        with pytest.raises(ValueError, match="teacher=240"):
            reproduce.parse_budget(bad)


@pytest.mark.parametrize("args, message", [
    (["--stages=teacher,decoder"], r"unknown stage\(s\) \['decoder'\]"),
    (["--set=train.num_steps=3"], "--set wants STAGE:KEY=VALUE"),
    (["--set=vae:train.num_steps=3"], "--set wants STAGE:KEY=VALUE"),
    (["--set=rl:train.num_steps"], "--set wants STAGE:KEY=VALUE"),
    (["--stages=student"], "stage student needs the teacher weights: .*fmnist_teacher does not exist"),
    (["--stages=rl", "--student=/nonexistent/student"], "stage rl needs the student weights: /nonexistent/student"),
    (["--config=student=configs/mar.py:fmnist"], "--config wants STAGE=.*configs/mar.py:fmnist"),
])
def test_main_refuses_bad_arguments_before_running_anything(tmp_path, monkeypatch, args, message):
    def never(*a, **k):
        raise AssertionError("no stage may run")
    monkeypatch.setattr(reproduce, "run_stage", never)
    with pytest.raises(UserError, match=message):  # one `error:` line and exit 2 through run_cli
        reproduce.main([f"--workdir={tmp_path / 'w'}", *args])


SIGTERM_SAVES = """
import signal, sys, time
def handler(signum, frame):
    print("saved", flush=True)
    sys.exit(0)
signal.signal(signal.SIGTERM, handler)
print("started", flush=True)
while True:
    time.sleep(0.05)
"""


def test_run_stage_cuts_at_the_budget_and_keeps_the_log(tmp_path):
    log = str(tmp_path / "stage.log")
    rc, seconds, cut = reproduce.run_stage([sys.executable, "-u", "-c", SIGTERM_SAVES], 1.0, log)
    assert (rc, cut) == (0, True)
    assert 1.0 <= seconds < 30
    with open(log) as f:
        lines = f.read().splitlines()
    assert "started" in lines and "saved" in lines


def test_run_stage_without_budget_runs_to_the_end(tmp_path):
    log = str(tmp_path / "stage.log")
    rc, _, cut = reproduce.run_stage([sys.executable, "-c", "print('done'); raise SystemExit(3)"], None, log)
    assert (rc, cut) == (3, False)
    with open(log) as f:
        assert f.read().splitlines() == ["done"]


def test_stages_export_and_record(tmp_path, monkeypatch):
    """Each stage runs marval_jax.main on <workdir>/<stage> with its overrides and the previous export, then the
    export tool in a CPU child process; the record adds up the seconds of reruns; a failing stage or export stops
    the driver with its exit code."""
    calls, exports = [], []

    def fake_stage(cmd, budget_s, log_path):
        calls.append((cmd, budget_s, log_path))
        workdir = next(c for c in cmd if c.startswith("--workdir=")).split("=", 1)[1]
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
            f.write(json.dumps({"step": 10 * len(calls), "loss": 1.0}) + "\n")
        return 0, 5.0, budget_s is not None

    def fake_call(cmd, env=None, **kw):
        assert cmd[1:3] == ["-m", "marval_jax.tools.export_params"] and env["JAX_PLATFORMS"] == "cpu"
        flags = dict(c[2:].split("=", 1) for c in cmd[3:])
        exports.append(flags)
        os.makedirs(flags["out"], exist_ok=True)
        return 0

    monkeypatch.setattr(reproduce, "run_stage", fake_stage)
    monkeypatch.setattr(reproduce.subprocess, "call", fake_call)
    w, e = str(tmp_path / "w"), str(tmp_path / "e")
    assert reproduce.main([f"--workdir={w}", f"--export={e}", "--stages=teacher,student", "--budget=teacher=7",
                           "--set=student:train.num_steps=3", "--set=teacher:train.log_every=1",
                           "--recipe=small"]) == 0
    (t_cmd, t_budget, t_log), (s_cmd, s_budget, _) = calls
    assert t_cmd[1:5] == ["-m", "marval_jax.main", "--mode=train", "--config=configs/mar.py:fmnist"]
    assert f"--workdir={w}/teacher" in t_cmd and "--config.train.log_every=1" in t_cmd
    assert not any("num_steps" in c for c in t_cmd) and (t_budget, t_log) == (7.0, f"{w}/teacher.log")
    assert s_cmd[3:5] == ["--mode=distill", "--config=configs/marval.py:fmnist"] and s_budget is None
    assert "--config.train.num_steps=3" in s_cmd and f"--config.teacher_ckpt={e}/fmnist_teacher" in s_cmd
    assert exports == [
        {"config": "configs/mar.py:fmnist", "source": f"{w}/teacher", "out": f"{e}/fmnist_teacher", "dtype": "float16"},
        {"config": "configs/marval.py:fmnist", "source": f"{w}/student", "out": f"{e}/fmnist_student",
         "dtype": "float16"}]
    with open(os.path.join(e, "stages.json")) as f:
        record = json.load(f)
    assert record["teacher"]["steps"] == 10 and record["teacher"]["stopped_by_budget"] is True
    assert record["student"]["steps"] == 20 and record["student"]["stopped_by_budget"] is False
    assert record["teacher"]["command"].startswith("python -m marval_jax.main --mode=train")
    assert record["student"]["export"] == f"{e}/fmnist_student"

    # a rerun of one stage (resuming in the same workdir) adds its seconds; --student points rl at any directory
    assert reproduce.main([f"--workdir={w}", f"--export={e}", "--stages=teacher,rl", f"--student={e}/fmnist_student",
                           "--dtype=", "--recipe=small"]) == 0
    assert f"--config.student_ckpt={e}/fmnist_student" in calls[-1][0]
    assert exports[-1]["config"] == "configs/marval_rl.py:fmnist" and exports[-1]["dtype"] == ""
    with open(os.path.join(e, "stages.json")) as f:
        record = json.load(f)
    assert record["teacher"]["seconds"] == 10.0 and record["teacher"]["steps"] == 30
    assert set(record) == {"teacher", "student", "rl"}

    n = len(exports)
    monkeypatch.setattr(reproduce.subprocess, "call", lambda *a, **k: 4)
    assert reproduce.main([f"--workdir={w}", f"--export={e}", "--stages=teacher,student"]) == 4
    assert len(calls) == 5  # the student stage did not run after the failed export
    monkeypatch.setattr(reproduce.subprocess, "call", fake_call)
    monkeypatch.setattr(reproduce, "run_stage", lambda *a: (9, 1.0, False))
    assert reproduce.main([f"--workdir={w}", f"--export={e}", "--stages=teacher,student"]) == 9
    assert len(exports) == n  # nothing exported after a failed stage


def test_the_shipped_recipe_is_what_the_assets_hold(tmp_path, monkeypatch):
    """The default recipe trains the embedded default's models: the fmnist_l configs (their model.json records
    them), the student with the GSIM weighting it was distilled with and the RL student with its regulariser (their
    stages.json commands); a stage given
    another --config drops the recipe's overrides, and --set comes after them (the later flag wins)."""
    cmds = []

    def fake_stage(cmd, budget_s, log_path):
        cmds.append(cmd)
        os.makedirs(next(c for c in cmd if c.startswith("--workdir=")).split("=", 1)[1], exist_ok=True)
        return 0, 1.0, False

    monkeypatch.setattr(reproduce, "run_stage", fake_stage)
    monkeypatch.setattr(reproduce.subprocess, "call",
                        lambda cmd, env=None, **k: os.makedirs(cmd[-2].split("=", 1)[1], exist_ok=True) or 0)
    w, e = str(tmp_path / "w"), str(tmp_path / "e")
    assert reproduce.main([f"--workdir={w}", f"--export={e}", "--set=student:gsim.t_min=200"]) == 0
    teacher, student, rl = cmds
    assert [c for c in teacher + student + rl if c.startswith("--config=")] == [
        "--config=configs/mar.py:fmnist_l", "--config=configs/marval.py:fmnist_l", "--config=configs/marval_rl.py:fmnist_l"]
    assert student.index("--config.gsim.weighting=kl") < student.index("--config.gsim.t_min=200")
    assert not any("weighting" in c for c in teacher + rl)
    with open(os.path.join(reproduce.__file__.rsplit("/marval_jax/", 1)[0], "marval_jax", "assets", "stages.json")) as f:
        shipped = json.load(f)
    assert "--config=configs/marval.py:fmnist_l" in shipped["student"]["command"]
    assert "--config.gsim.weighting=kl" in shipped["student"]["command"]
    for kv in ("--config.rl.regularizer=l2", "--config.rl.reg_weight=10"):   # the RL student's, likewise
        assert kv in rl and kv in shipped["rl"]["command"], kv
    cmds.clear()
    assert reproduce.main([f"--workdir={w}2", f"--export={e}2", "--stages=teacher,student",
                           "--config=student=configs/marval.py:fmnist"]) == 0
    assert "--config=configs/marval.py:fmnist" in cmds[1] and not any("weighting" in c for c in cmds[1])
    cmds.clear()  # naming the recipe's own config keeps its overrides
    assert reproduce.main([f"--workdir={w}3", f"--export={e}3", "--stages=teacher,student",
                           "--config=student=configs/marval.py:fmnist_l"]) == 0
    assert "--config.gsim.weighting=kl" in cmds[1]
