"""The results tool's plan and run loop (settings order, the teacher's best-CFG substitution, skips for missing
weights, failures and the time budget, the JSON rewritten after each row), with a stub evaluator: the measurement
itself (samplers, FID, classifiers) is tested with those modules."""
import json
import types

import numpy as np
import pytest

from marval_jax.tools import results
from marval_jax.user_errors import UserError


def test_plan_order_and_content():
    rows = results.plan(num=100, sweep_num=20, sweep=[1.0, 2.0, 3.0], small_k=8, cache="1,4")
    assert rows[:3] == [dict(role="teacher", num_iter=64, cfg=c, num=20, timing=False, sweep=True)
                        for c in (1.0, 2.0, 3.0)]
    rest = rows[3:]
    assert [(r["role"], r["num_iter"], r["cfg"], r.get("cache")) for r in rest] == [
        ("teacher", 64, "best", None), ("student", 64, 1.0, None), ("rl", 64, 1.0, None),
        ("student", 8, 1.0, None), ("teacher", 8, "best", None), ("student", 64, 1.0, "1,4"), ("rl", 8, 1.0, None)]
    assert all(r["num"] == 100 and not r.get("sweep") and r.get("timing", True) for r in rest)
    assert [r["cfg"] for r in rows if r["role"] != "teacher"] == [1.0] * 5  # students never use CFG


class FakeClock:
    """results.time stand-in: time() advances only when a measurement says so."""

    def __init__(self):
        self.now = 1000.0

    def time(self):
        return self.now

    @staticmethod
    def strftime(fmt):
        return "2026-01-01"


def _fake_evaluator(clock, roles, fid_by_cfg, fail=lambda call: False, seconds=10.0):
    calls = []

    class FakeEvaluator:
        def __init__(self, assets, inception, real_num=0):
            self.models = {r: None for r in roles}
            self.jax = types.SimpleNamespace(devices=lambda: [types.SimpleNamespace(device_kind="cpu")],
                                             __version__="0.test")

        def set_sample(self, role, items):
            calls.append(dict(set=(role, tuple(items))))

        def measure(self, role, num_iter, cfg_scale, num, cache="none", batch=256, timing=True):
            calls.append(dict(role=role, num_iter=num_iter, cfg=cfg_scale, num=num, cache=cache, batch=batch,
                              timing=timing))
            clock.now += seconds
            if fail(calls[-1]):
                raise RuntimeError("out of memory")
            fid = fid_by_cfg[cfg_scale] if role == "teacher" else 7.0
            row = dict(model=role, num_iter=num_iter, cfg=cfg_scale, cache=cache, num_images=num, fid=fid)
            return row, np.full((2, 4, 4, 1), len(calls), np.uint8)

    return FakeEvaluator, calls


def _run(tmp_path, *extra):
    return results.main(["run", "--assets=unused", f"--out={tmp_path}", "--num=50", "--sweep-num=10",
                         "--sweep=1.0,2.0,3.0", "--small-k=8", "--batch=5", *extra])


def test_run_uses_the_sweeps_best_cfg_and_skips_missing_weights_and_failures(tmp_path, monkeypatch):
    clock = FakeClock()
    fake, calls = _fake_evaluator(clock, ("teacher", "student"), {1.0: 9.0, 2.0: 4.0, 3.0: 6.0},
                                  fail=lambda c: (c["role"], c["num_iter"]) == ("student", 8))
    monkeypatch.setattr(results, "Evaluator", fake)
    monkeypatch.setattr(results, "time", clock)
    assert _run(tmp_path) == 0
    assert [(c["role"], c["num_iter"], c["cfg"], c["cache"], c["num"], c["timing"]) for c in calls] == [
        ("teacher", 64, 1.0, "none", 10, False), ("teacher", 64, 2.0, "none", 10, False),
        ("teacher", 64, 3.0, "none", 10, False), ("teacher", 64, 2.0, "none", 50, True),
        ("student", 64, 1.0, "none", 50, True), ("student", 8, 1.0, "none", 50, True),
        ("teacher", 8, 2.0, "none", 50, True), ("student", 64, 1.0, "1,4", 50, True)]
    assert {c["batch"] for c in calls} == {5}
    with open(tmp_path / "results_run.json") as f:
        report = json.load(f)
    assert report["best_teacher_cfg"] == 2.0 and report["device"] == "cpu" and report["jax"] == "0.test"
    assert [r["name"] for r in report["rows"]] == [
        "teacher_K64_cfg1", "teacher_K64_cfg2", "teacher_K64_cfg3", "teacher_K64_cfg2", "student_K64_cfg1",
        "teacher_K8_cfg2", "student_K64_cfg1_cache1,4"]
    assert [r["sweep"] for r in report["rows"]] == [True] * 3 + [False] * 4
    assert all(r["wall_s"] == 10.0 for r in report["rows"])
    assert report["skipped"] == [
        {"name": "rl_K64_cfg1", "why": "no weights"},
        {"name": "student_K8_cfg1", "why": "RuntimeError: out of memory"},
        {"name": "rl_K8_cfg1", "why": "no weights"}]
    assert report["total_s"] == 80.0
    with np.load(tmp_path / "grids.npz") as z:
        assert sorted(z.files) == sorted({r["name"] for r in report["rows"]})


def test_run_falls_back_to_the_first_scale_and_stops_at_the_time_budget(tmp_path, monkeypatch):
    clock = FakeClock()
    fake, calls = _fake_evaluator(clock, ("teacher", "student", "rl"), {1.0: 5.0}, fail=lambda c: not c["timing"],
                                  seconds=100.0)
    monkeypatch.setattr(results, "Evaluator", fake)
    monkeypatch.setattr(results, "time", clock)
    assert _run(tmp_path, "--time-budget=350") == 0
    # 3 failed sweep rows (300 s), then the best-CFG row at the first scale (400 s used): the rest is over budget
    assert [(c["role"], c["cfg"], c["num"]) for c in calls] == [
        ("teacher", 1.0, 10), ("teacher", 2.0, 10), ("teacher", 3.0, 10), ("teacher", 1.0, 50)]
    with open(tmp_path / "results_run.json") as f:
        report = json.load(f)
    assert "best_teacher_cfg" not in report and [r["name"] for r in report["rows"]] == ["teacher_K64_cfg1"]
    failed, over = report["skipped"][:3], report["skipped"][3:]
    assert failed == [{"name": f"teacher_K64_cfg{c}", "why": "RuntimeError: out of memory"} for c in (1, 2, 3)]
    assert [s["name"] for s in over] == ["student_K64_cfg1", "rl_K64_cfg1", "student_K8_cfg1", "teacher_K8_cfg1",
                                         "student_K64_cfg1_cache1,4", "rl_K8_cfg1"]
    assert {s["why"] for s in over} == {"time budget (400 s used)"}


def test_only_runs_the_named_rows(tmp_path, monkeypatch):
    clock = FakeClock()
    fake, calls = _fake_evaluator(clock, ("teacher", "student", "rl"), {2.5: 5.0})
    monkeypatch.setattr(results, "Evaluator", fake)
    monkeypatch.setattr(results, "time", clock)
    assert _run(tmp_path, "--sweep=2.5", "--only=_cache,rl_K8") == 0
    assert [(c["role"], c["num_iter"], c["cache"]) for c in calls] == [("student", 64, "1,4"), ("rl", 8, "none")]


def test_no_timing_measures_quality_only(tmp_path, monkeypatch):
    clock = FakeClock()
    fake, calls = _fake_evaluator(clock, ("student",), {})
    monkeypatch.setattr(results, "Evaluator", fake)
    monkeypatch.setattr(results, "time", clock)
    assert _run(tmp_path, "--only=student_K64", "--no-timing") == 0
    assert [(c["role"], c["cache"], c["timing"]) for c in calls] == [("student", "none", False),
                                                                      ("student", "1,4", False)]
    with open(tmp_path / "results_run.json") as f:
        assert json.load(f)["timing"] is False
    # a timed run must not continue into it (its rows have no seconds per image)
    with pytest.raises(UserError, match=r"another run \(timing False there, True here\)"):
        _run(tmp_path, "--only=student_K64")


def test_a_results_file_from_before_no_timing_counts_as_timed(tmp_path, monkeypatch):
    clock = FakeClock()
    fake, calls = _fake_evaluator(clock, ("student",), {})
    monkeypatch.setattr(results, "Evaluator", fake)
    monkeypatch.setattr(results, "time", clock)
    assert _run(tmp_path, "--only=student_K64_cfg1_cache") == 0
    report = json.loads((tmp_path / "results_run.json").read_text())
    del report["timing"]   # as written before the flag existed
    (tmp_path / "results_run.json").write_text(json.dumps(report))
    assert _run(tmp_path, "--only=student_K64") == 0   # continues: only the row not measured yet runs
    assert [c["cache"] for c in calls] == ["1,4", "none"]


def test_evaluator_without_any_weights_is_an_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no fmnist_teacher"):
        results.Evaluator(str(tmp_path), inception="")


def test_render_checks_come_from_the_committed_rows():
    """docs/results.md's criteria are computed from docs/results/results_run.json, not typed in."""
    import os
    from marval_jax.tools import results_render
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "docs", "results", "results_run.json")) as f:
        rows = json.load(f)["rows"]
    c = results_render.checks(rows)
    t, s, rl = ({r["model"]: r for r in rows if not r["sweep"] and r["num_iter"] == 64}[m]
                for m in ("teacher", "student", "rl"))
    assert c["student_fid_over_teacher_fid_K64"] == pytest.approx(s["fid"] / t["fid"])
    assert c["speedup_batch1_K64"] == pytest.approx(t["s_per_image_b1"] / s["s_per_image_b1"])
    assert c["rl_class_accuracy_gain"] == pytest.approx(rl["class_accuracy"] - s["class_accuracy"])
    assert c["rl_fid_over_student_fid"] == pytest.approx(rl["fid"] / s["fid"])
    assert c["student_recall_over_teacher_K64"] == pytest.approx(s["recall"] / t["recall"])
    assert c["rl_recall_over_student"] == pytest.approx(rl["recall"] / s["recall"])
    table = results_render.table(rows)
    assert table.count("\n") == 2 + sum(not r["sweep"] for r in rows)
    assert results_render.checks([]) == {}


def test_criteria_lines_say_met_or_missed_against_the_bound():
    from marval_jax.tools import results_render
    lines = results_render.criteria_lines({"student_fid_over_teacher_fid_K64": 1.15, "speedup_batch1_K64": 20.5,
                                           "rl_reward_gain": -0.01})
    assert lines == ["- student FID / teacher FID: 1.150 (target <= 1.15): **met**",
                     "- speed-up per image at batch 1: 20.500 (target >= 30): **missed**",
                     "- RL reward - student reward: -0.010 (target >= 0): **missed**"]


def test_a_rerun_into_the_same_out_keeps_the_measured_rows_and_measures_the_rest(tmp_path, monkeypatch):
    """A run cut by its time budget, run again into the same --out: the rows (sweep and 10k rows apart, though they
    share a name), the grids and the chosen CFG are kept, only the missing rows are measured; another run's
    results_run.json there is refused."""
    clock = FakeClock()
    fake, calls = _fake_evaluator(clock, ("teacher", "student", "rl"), {1.0: 9.0, 2.0: 4.0, 3.0: 6.0}, seconds=100.0)
    monkeypatch.setattr(results, "Evaluator", fake)
    monkeypatch.setattr(results, "time", clock)
    assert _run(tmp_path, "--time-budget=350") == 0   # the sweep (300 s) and the teacher's 10k row
    assert len(calls) == 4
    calls.clear()
    assert _run(tmp_path) == 0
    assert [(c["role"], c["num_iter"], c["cfg"], c["cache"]) for c in calls] == [
        ("student", 64, 1.0, "none"), ("rl", 64, 1.0, "none"), ("student", 8, 1.0, "none"),
        ("teacher", 8, 2.0, "none"), ("student", 64, 1.0, "1,4"), ("rl", 8, 1.0, "none")]
    with open(tmp_path / "results_run.json") as f:
        report = json.load(f)
    assert [(r["name"], r["sweep"]) for r in report["rows"]][:4] == [
        ("teacher_K64_cfg1", True), ("teacher_K64_cfg2", True), ("teacher_K64_cfg3", True),
        ("teacher_K64_cfg2", False)]
    assert len(report["rows"]) == 10 and report["best_teacher_cfg"] == 2.0 and report["skipped"] == []
    with np.load(tmp_path / "grids.npz") as z:
        assert sorted(z.files) == sorted({r["name"] for r in report["rows"]})
    with pytest.raises(UserError, match=r"holds the results of another run \(num 50 there, 60 here\)"):
        results.main(["run", "--assets=unused", f"--out={tmp_path}", "--num=60", "--sweep-num=10",
                      "--sweep=1.0,2.0,3.0", "--small-k=8", "--batch=5"])


def test_set_overrides_a_roles_sampling_and_is_recorded(tmp_path, monkeypatch):
    clock = FakeClock()
    fake, calls = _fake_evaluator(clock, ("student",), {})
    monkeypatch.setattr(results, "Evaluator", fake)
    monkeypatch.setattr(results, "time", clock)
    sets = ["--set=student:sample.noise_scale=0.85", "--set=student:sample.t_init=700"]
    assert _run(tmp_path, "--only=student_K64_cfg1", "--no-timing", *sets) == 0
    assert calls[0] == dict(set=("student", ("sample.noise_scale=0.85", "sample.t_init=700")))  # before any row
    assert len(calls) == 3   # then both student rows
    report = json.loads((tmp_path / "results_run.json").read_text())
    assert report["set"] == ["student:sample.noise_scale=0.85", "student:sample.t_init=700"]
    # rows of other sampling settings must not continue into it
    with pytest.raises(UserError, match="another run"):
        _run(tmp_path, "--only=student_K64_cfg1", "--no-timing")


@pytest.mark.parametrize("item", ["student:model.decoder_depth=2", "sample.noise_scale=0.8", "critic:sample.cfg=2",
                                  "student:sample.noise_scale"])
def test_set_outside_a_roles_sample_section_is_refused_before_loading(tmp_path, monkeypatch, item):
    monkeypatch.setattr(results, "Evaluator", lambda *a, **k: pytest.fail("loaded models"))
    with pytest.raises(UserError, match="ROLE:sample.KEY=VALUE"):
        _run(tmp_path, f"--set={item}")


def test_sample_settings_are_typed_and_checked_on_a_real_config():
    from configs import marval
    config = marval.get_config("fmnist_l")
    new = results.with_sample_settings(config, ["sample.noise_scale=0.85", "sample.t_init=700"])
    assert new.sample.noise_scale == 0.85 and new.sample.t_init == 700 and config.sample.noise_scale == -1.0
    with pytest.raises(UserError, match="noise_scal"):
        results.with_sample_settings(config, ["sample.noise_scal=0.85"])
    with pytest.raises(UserError):
        results.with_sample_settings(config, ["sample.t_init=abc"])
