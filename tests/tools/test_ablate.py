"""The ablation runner (marval_jax/tools/ablate.py) on the tiny config: a 2 x 2 grid distilled from the session's
tiny teacher, stopped by a real SIGTERM after two variants and resumed; the table, the JSON and the plot; one-line
errors for bad sweep keys and values."""
import json
import os
import signal

import pytest
from PIL import Image

from marval_jax.tools import ablate as ablate_lib
from marval_jax.user_errors import UserError, call_cli

# two real-valued switches: all four variants run one compiled train step (tools/ablate.py `distill_task`)
SWEEPS = ["gsim.l2_weight=1.0,0.0", "gsim.guidance_scale=1.2,2.0"]
NAMES = ["l2_weight-1.0__guidance_scale-1.2", "l2_weight-1.0__guidance_scale-2.0",
         "l2_weight-0.0__guidance_scale-1.2", "l2_weight-0.0__guidance_scale-2.0"]
QUIET = ["train.sample_every=0", "train.log_every=1"]


def _stat(path):
    with open(path, "rb") as f:
        return os.stat(path).st_mtime_ns, f.read()


def test_sweep_stops_on_sigterm_resumes_and_writes_the_table(tmp_path, tiny_teacher, capsys):
    from marval_jax.checkpoints import manager as ckpt
    out = str(tmp_path / "ablate")
    run = lambda **kw: ablate_lib.ablate("configs/marval.py:tiny", SWEEPS, steps=2, eval_samples=4, out=out,
                                         sets=QUIET, teacher=tiny_teacher, **kw)
    finished = []

    def kill_after_two(name, result):
        finished.append(name)
        if len(finished) == 2:   # the real signal: the loop's handler saves at the next step and returns early
            os.kill(os.getpid(), signal.SIGTERM)

    try:
        assert run(on_variant=kill_after_two) is None
    finally:
        ckpt._SIGTERM.clear()  # pylint: disable=protected-access - the flag the signal set (the process goes on)
    runs = os.path.join(out, "runs")
    assert finished == NAMES[:2]
    assert all(os.path.exists(os.path.join(runs, n, ablate_lib.RESULT)) for n in NAMES[:2])
    # the third variant stopped after its first step with a checkpoint and no result; the fourth never started
    assert not os.path.exists(os.path.join(runs, NAMES[2], ablate_lib.RESULT))
    assert os.listdir(os.path.join(runs, NAMES[2], "checkpoints")) == ["1"]
    assert not os.path.exists(os.path.join(runs, NAMES[3]))
    assert not os.path.exists(os.path.join(out, "ablation.md"))
    # --report_only: the stopped sweep's table of its two finished variants, the others named; nothing trained
    argv = ["--base=configs/marval.py:tiny", *[f"--sweep={x}" for x in SWEEPS], "--steps=2", "--eval_samples=4",
            f"--out={out}", "--report_only"]
    assert ablate_lib.main(argv) == 0
    with open(os.path.join(out, "ablation.md")) as f:
        partial = f.read()
    assert [line.split(" | ")[0] for line in partial.splitlines() if line.startswith("| l2")] == [
        f"| {n}" for n in NAMES[:2]]
    assert f"Not finished: {NAMES[2]}, {NAMES[3]}" in partial and "--report_only" not in partial
    assert not os.path.exists(os.path.join(runs, NAMES[3]))
    before = {n: _stat(os.path.join(runs, n, ablate_lib.RESULT)) for n in NAMES[:2]}
    capsys.readouterr()

    summary = run()
    log = capsys.readouterr().out
    # finished variants are not redone (result files untouched, one training run each); the stopped one resumes
    assert {n: _stat(os.path.join(runs, n, ablate_lib.RESULT)) for n in NAMES[:2]} == before
    assert all(f"ablate: {n} finished earlier" in log for n in NAMES[:2])
    assert "distill: resumed from step 1" in log
    assert [r["train_runs"] for r in summary["rows"]] == [1, 1, 2, 1]
    assert sorted(os.listdir(os.path.join(runs, NAMES[2], "checkpoints"))) == ["1", "2"]

    rows = {r["name"]: r for r in summary["rows"]}
    assert list(rows) == NAMES and summary["switches"] == ["gsim.l2_weight", "gsim.guidance_scale"]
    # same teacher, seed and data order: the first fake-score step sees the same generator, batch and keys
    first = [ablate_lib.read_metrics(os.path.join(runs, n))[0] for n in NAMES]
    assert [m["step"] for m in first] == [1] * 4 and len({m["fake_loss"] for m in first}) == 1
    # the switches reached the losses although they are arguments of one program: alpha = 0 -> gen/l2 = 0, and the
    # teacher's CFG scale w (constant schedule) is the swept one
    assert all(rows[n]["final"]["gen/l2"] == 0.0 for n in NAMES[2:])
    assert all(rows[n]["final"]["gen/l2"] > 0.0 for n in NAMES[:2])
    assert [m["gen/guidance"] for m in first] == pytest.approx([1.2, 2.0, 1.2, 2.0], rel=1e-6)
    # one train step program for the whole sweep (the persistent cache holds one entry for it), not one per variant
    cached = os.listdir(os.path.join(out, "xla_cache"))
    assert len([f for f in cached if f.startswith("jit_step-")]) == 1, sorted(cached)
    for r in rows.values():
        assert r["fid"] is None and r["precision"] is None        # no Inception weights / fid_ref on the test
        assert 0.0 <= r["class_accuracy"] <= 1.0 and r["num_images"] == 4 and r["seconds"] > 0

    with open(os.path.join(out, "ablation.md")) as f:
        md = f.read()
    table = [line for line in md.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| variant | `gsim.l2_weight` | `gsim.guidance_scale` | gen loss | fake loss | FID |")
    assert len(table) == 5 and all(" | - | - | - | " in line for line in table[1:])
    with open(os.path.join(out, "ablation.json")) as f:
        assert json.load(f)["rows"] == summary["rows"]
    with Image.open(summary["plot"]) as im:
        assert im.size[0] > 100 and im.size[1] > 100
    # a rerun asking for other steps into the same --out is refused, not mixed into the table (nothing retrained)
    with pytest.raises(UserError, match=r"steps 2 there, 3 here"):
        ablate_lib.ablate("configs/marval.py:tiny", SWEEPS, steps=3, eval_samples=4, out=out, sets=QUIET,
                          teacher=tiny_teacher)
    assert {n: _stat(os.path.join(runs, n, ablate_lib.RESULT)) for n in NAMES[:2]} == before


def _cli(argv, capsys):
    code = call_cli(lambda: ablate_lib.main(argv), ["ablate"] + argv)
    return code, capsys.readouterr().err


def test_bad_sweeps_are_one_line_errors(tmp_path, capsys):
    base = ["--base=configs/marval.py:tiny", "--steps=1", "--eval_samples=1", f"--out={tmp_path}"]
    code, err = _cli(base + ["--sweep", "gsim.weightin=none,kl"], capsys)
    assert code == 2 and err.count("\n") == 1
    assert "unknown config field 'gsim.weightin'" in err and "nearest: gsim.weighting" in err
    code, err = _cli(base + ["--sweep", "gsim.use_l2_term=maybe"], capsys)
    assert code == 2 and "gsim.use_l2_term='maybe' is not a bool" in err
    code, err = _cli(base + ["--sweep", "gsim.t_min=20", "--set", "gsim.huber_rr=1"], capsys)
    assert code == 2 and "--set: unknown config field 'gsim.huber_rr'; nearest: gsim.huber_r" in err
    code, err = _cli(["--base=configs/nope.py:tiny", "--steps=1", "--eval_samples=1", f"--out={tmp_path}",
                      "--sweep", "gsim.t_min=20"], capsys)
    assert code == 2 and "config file configs/nope.py not found" in err
    bad = tmp_path / "v.json"
    bad.write_text(json.dumps({"a": {"gsim.distanse": "l2"}}))
    code, err = _cli(base + [f"--variants={bad}"], capsys)
    assert code == 2 and "--variants a: unknown config field 'gsim.distanse'; nearest: gsim.distance" in err
    assert "runs" not in os.listdir(tmp_path)   # validated before anything starts
    code, err = _cli(base + ["--sweep", "gsim.t_min=20", "--report_only"], capsys)
    assert code == 2 and err.count("\n") == 1 and "--report_only: no finished variant under" in err


def test_named_variants_plan():
    base = ablate_lib.load_base("configs/marval.py:tiny")
    todo = ablate_lib.plan(base, ["gsim.distance=l2,squared_l2"], "")
    assert todo == {"distance-l2": {"gsim.distance": "l2"}, "distance-squared_l2": {"gsim.distance": "squared_l2"}}
    with pytest.raises(ablate_lib.UserError, match="nothing to run"):
        ablate_lib.plan(base, [], "")


def test_into_writes_the_compact_table_between_the_markers(tmp_path):
    """--into puts the finished variants' numbers into a results page from their JSON (no hand-copied table); a page
    without the markers, or no page, is a one-line error; --into is not part of the recorded sweep command."""
    rows = [{"name": "default", "overrides": {}, "fid": 43.0027, "precision": 0.5266, "recall": 0.1202,
             "class_accuracy": 0.912},
            {"name": "weighting_kl", "overrides": {"gsim.weighting": "kl"}, "fid": 35.006, "precision": 0.543,
             "recall": None, "class_accuracy": None}]
    page = tmp_path / "results.md"
    page.write_text(f"# R\n\nbefore\n{ablate_lib.INTO_BEGIN}\nold table\n{ablate_lib.INTO_END}\nafter\n")
    ablate_lib.write_into(str(page), rows, "CMD")
    text = page.read_text()
    assert text.startswith("# R\n\nbefore\n") and text.endswith(f"{ablate_lib.INTO_END}\nafter\n")
    assert "old table" not in text and "(generated by `CMD`)" in text
    assert "| default | (base) | 43.00 | 0.527 | 0.120 | 91.2% |" in text
    assert "| weighting_kl | `gsim.weighting=kl` | 35.01 | 0.543 | - | - |" in text
    ablate_lib.write_into(str(page), rows[:1], "CMD")  # rewriting replaces, it does not append
    assert page.read_text().count(ablate_lib.INTO_BEGIN) == 1 and "weighting_kl" not in page.read_text()
    page.write_text("no markers\n")
    with pytest.raises(UserError, match="lacks the markers"):
        ablate_lib.write_into(str(page), rows, "CMD")
    with pytest.raises(UserError, match="is not a file"):
        ablate_lib.write_into(str(tmp_path / "missing.md"), rows, "CMD")
    assert ablate_lib._sweep_args(["--base=b", "--into", "x.md", "--steps=1", "--into=y.md", "--report_only"]) == [
        "--base=b", "--steps=1", "--report_only"]


def test_log_scale_only_when_the_curves_span_more_than_four_times():
    assert ablate_lib.log_scale({"a": [(50, 40.0), (100, 35.0)], "diverged": [(50, 258.0), (100, 371.0)]})
    assert not ablate_lib.log_scale({"a": [(50, 72.0), (150, 41.0)], "b": [(50, 67.0), (150, 43.0)]})
    assert not ablate_lib.log_scale({"loss": [(1, -0.5), (2, 20.0)]})   # a non-positive value: linear
    assert not ablate_lib.log_scale({"empty": []})


def test_pil_fallback_draws_on_the_log_axis(tmp_path):
    # 10 lies halfway between 1 and 100 on a log axis: the vertical middle of the frame (top 30, bottom 420 - 40)
    curves = {"lo": [(0, 1.0)], "hi": [(0, 100.0)], "mid": [(1, 10.0)]}
    path = ablate_lib._plot_pil(curves, "fid", str(tmp_path / "p.png"), log=ablate_lib.log_scale(curves))
    with Image.open(path) as img:
        assert img.convert("RGB").getpixel((720 - 250, (30 + 380) // 2)) == ablate_lib._COLORS[2]
