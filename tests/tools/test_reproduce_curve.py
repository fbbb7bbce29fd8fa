"""reproduce_curve: reading the EMA weights of each kept checkpoint step, its config overrides and argument errors,
the plot from the curve JSON, and reproduce.py's --config (another config of a stage's family)."""
import argparse
import json
import os

import jax
import numpy as np
import pytest

from marval_jax.programs import reproduce
from marval_jax.tools import reproduce_curve
from marval_jax.user_errors import UserError
from tests.conftest import TEACHER_STEPS, tiny_teacher_config


def test_load_step_params_reads_that_steps_ema(tiny_teacher):
    from marval_jax.checkpoints.load import load_model_params
    from marval_jax.models.factory import abstract_model, model_config
    config = tiny_teacher_config()
    assert reproduce_curve.checkpoint_steps(tiny_teacher) == [TEACHER_STEPS]
    _, abstract = abstract_model(model_config(config))
    got = reproduce_curve.load_step_params(tiny_teacher, TEACHER_STEPS, abstract, config.model.to_dict())
    ema = load_model_params(tiny_teacher, abstract, config.model.to_dict(), use_ema=True)
    raw = load_model_params(tiny_teacher, abstract, config.model.to_dict(), use_ema=False)
    leaves = list(zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(ema), jax.tree_util.tree_leaves(raw)))
    assert all(np.array_equal(g, e) for g, e, _ in leaves)  # a restore copies the stored arrays: bit-equal
    assert any(not np.array_equal(g, r) for g, _, r in leaves)  # and they are the EMA, not the raw weights


def test_checkpoint_steps_and_config_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no checkpoints/ folder"):
        reproduce_curve.checkpoint_steps(str(tmp_path))
    (tmp_path / "checkpoints").mkdir()
    with pytest.raises(FileNotFoundError, match="no checkpoint steps"):
        reproduce_curve.checkpoint_steps(str(tmp_path))
    cfg = reproduce_curve.load_config("configs/mar.py:fmnist_l", ["data.raw_dir=/x", "train.global_batch_size=64"])
    assert cfg.data.raw_dir == "/x" and cfg.train.global_batch_size == 64
    assert cfg.model.encoder_embed_dim == 256 and cfg.train.ckpt_every == 1000
    for spec, sets, message in [("configs/marval.py:fmnist", [], "a teacher config"),
                                ("configs/mar.py:fmnist", ["train.no_such=1"], "no such config field"),
                                ("configs/mar.py:fmnist", ["train.num_steps"], "KEY=VALUE")]:
        with pytest.raises(UserError, match=message):
            reproduce_curve.load_config(spec, sets)


def test_plot_from_curve_json(tmp_path):
    pytest.importorskip("matplotlib")  # as marval_jax.tools.results_render: plotting is a rendering extra
    curve = tmp_path / "curve.json"
    rows = [{"step": s, "fid": f, "precision": 0.5, "recall": 0.1, "class_accuracy": 0.8}
            for s, f in ((1000, 90.0), (2000, 40.0))]
    curve.write_text(json.dumps({"config": "configs/mar.py:fmnist_l", "num_images": 2000, "num_iter": 64, "cfg": 2.5,
                                 "rows": rows}))
    floor = tmp_path / "floor.json"
    floor.write_text(json.dumps({"fid": 1.5}))
    out = tmp_path / "p" / "curve.png"
    assert reproduce_curve.main(["plot", f"--curve={curve}", f"--floor={floor}", f"--out={out}"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    curve.write_text(json.dumps({"rows": []}))
    with pytest.raises(UserError, match="no measured steps"):
        reproduce_curve.main(["plot", f"--curve={curve}", f"--out={out}"])


def test_reproduce_config_flag_picks_the_stage_config(tmp_path, monkeypatch):
    seen = []

    def fake_stage(cmd, budget, log):  # records the command; no training here (the export then fails: rc 1 stops)
        seen.append(cmd)
        return 1, 0.0, False
    monkeypatch.setattr(reproduce, "run_stage", fake_stage)
    assert reproduce.main([f"--workdir={tmp_path}", "--stages=teacher", "--config", "teacher=configs/mar.py:fmnist_l"]) == 1
    assert "--config=configs/mar.py:fmnist_l" in seen[0]
    with pytest.raises(UserError, match="--config wants STAGE="):
        reproduce.main([f"--workdir={tmp_path}", "--config", "teacher=configs/marval.py:fmnist"])
    with pytest.raises(UserError, match="--config wants STAGE="):
        reproduce.main([f"--workdir={tmp_path}", "--config", "vae=configs/mar.py:fmnist"])


def test_evaluation_order_latest_first_and_offset():
    # a warm-started run's steps 1000.. are the curve's 7222..: the earlier run's rows are not redone by mistake
    assert reproduce_curve.evaluation_order([1000, 2000, 3000], 0, set()) == [3000, 1000, 2000]
    assert reproduce_curve.evaluation_order([1000, 2000, 3000], 6222, {7222}) == [3000, 2000]
    assert reproduce_curve.evaluation_order([1000, 2000], 0, {1000, 2000}) == []


def test_negative_step_offset_is_refused_before_any_work(tmp_path):
    args = argparse.Namespace(num=10, batch=5, step_offset=-1, workdir=str(tmp_path / "missing"))
    with pytest.raises(UserError, match="--step-offset must be >= 0"):
        reproduce_curve.curve(args)   # before the workdir is read: no "no checkpoints/ folder" error


def test_merge_joins_continued_curves_by_step_and_refuses_another_protocol(tmp_path):
    """A teacher trained across machines has one curve per machine (offset steps); merge orders them by step, keeps
    each machine's device, and refuses a curve of another CFG (its FIDs are not comparable)."""
    proto = {"config": "configs/mar.py:fmnist_l", "num_images": 2000, "num_iter": 64, "cfg": 2.5}
    row = lambda s, f: {"step": s, "fid": f, "precision": 0.5, "recall": 0.1, "class_accuracy": 0.9}  # noqa: E731
    a, b, c = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "c.json"
    a.write_text(json.dumps({**proto, "device": "H200", "rows": [row(2000, 50.0), row(1000, 90.0)]}))
    b.write_text(json.dumps({**proto, "device": "H100", "rows": [row(14579, 18.0), row(7222, 28.8)]}))
    out = tmp_path / "m.json"
    assert reproduce_curve.main(["merge", f"--curve={a}", f"--curve={b}", f"--out={out}"]) == 0
    merged = json.loads(out.read_text())
    assert [r["step"] for r in merged["rows"]] == [1000, 2000, 7222, 14579]
    assert merged["device"] == "H200 + H100" and merged["cfg"] == 2.5
    assert [s["steps"] for s in merged["segments"]] == [[1000, 2000], [7222, 14579]]
    c.write_text(json.dumps({**proto, "cfg": 4.0, "rows": [row(3000, 20.0)]}))
    with pytest.raises(UserError, match="cfg 2.5 vs 4.0"):
        reproduce_curve.main(["merge", f"--curve={a}", f"--curve={c}", f"--out={out}"])
    c.write_text(json.dumps({**proto, "rows": [row(2000, 49.0)]}))
    with pytest.raises(UserError, match="step 2000 is measured twice"):
        reproduce_curve.main(["merge", f"--curve={a}", f"--curve={c}", f"--out={out}"])
    with pytest.raises(UserError, match="does not exist"):
        reproduce_curve.main(["merge", f"--curve={a}", f"--curve={tmp_path / 'none.json'}", f"--out={out}"])
    c.write_text("{ cut off")
    with pytest.raises(UserError, match="is not a curve JSON"):
        reproduce_curve.main(["merge", f"--curve={a}", f"--curve={c}", f"--out={out}"])
