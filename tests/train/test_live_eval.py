"""train/live_eval.py in the loop: a tiny distillation with train.eval_every logs FID (+ precision / recall, class
accuracy) into metrics.jsonl and the TensorBoard event file, loads the Inception once, and shares the reference
statistics cache of --mode evaluate."""
import json
import math

import numpy as np
import pytest

from configs import marval as marval_configs
from configs.common import with_fields
from marval_jax.user_errors import UserError
from tests.train.test_writers import read_events

pytestmark = pytest.mark.usefixtures("compile_cache")  # tests/conftest.py

REAL = 4   # real images of the reference: the first 4 Fashion-MNIST test images (the Inception costs ~1 s an image)


def _config(teacher, inception, **fields):
    return with_fields(marval_configs.get_config("tiny"), {
        "teacher_ckpt": teacher, "train.num_steps": 2, "train.log_every": 2, "train.ckpt_every": 2,
        "train.sample_every": 0, "train.async_checkpoints": False, "train.grid_size": 2,
        "train.eval_every": 1, "train.eval_samples": 4,           # one grid of 2 x 2
        "sample.fid_ref": "raw:fashion_mnist/test", "sample.inception": inception, "sample.pr_num_real": 4,
        "sample.crop": 28, **fields})


def test_distillation_logs_live_fid_to_jsonl_and_tensorboard(tmp_path, tiny_teacher, inception_npz, monkeypatch):
    from marval_jax.evaluation import fid_reference
    from marval_jax.main import run
    from marval_jax.programs import evaluate as ev
    from marval_jax.train import live_eval
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    full = fid_reference.real_images
    monkeypatch.setattr(fid_reference, "real_images", lambda spec, **kw: full(spec, **kw)[:REAL])
    loads = []
    real_load = live_eval.load_inception
    monkeypatch.setattr(live_eval, "load_inception", lambda *a, **k: loads.append(a) or real_load(*a, **k))

    workdir = tmp_path / "run"
    run("distill", _config(tiny_teacher, inception_npz), str(workdir))

    assert len(loads) == 1   # the Inception is read once per run, not per evaluation
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    evals = {r["step"]: r for r in rows if "eval/fid" in r}
    assert sorted(evals) == [1, 2]
    for r in evals.values():
        assert math.isfinite(r["eval/fid"]) and r["eval/fid"] > 0
        assert 0 <= r["eval/precision"] <= 1 and 0 <= r["eval/recall"] <= 1
        assert 0 <= r["eval/class_accuracy"] <= 1
        assert r["eval/class_accuracy"] * 4 == round(r["eval/class_accuracy"] * 4)   # of 4 images

    [events_file] = list((workdir / "tensorboard").iterdir())
    tb = {(e.step, v.tag): v.simple_value for e in read_events(events_file) for v in e.summary.value
          if v.HasField("simple_value")}
    for step, r in evals.items():
        for tag in ("eval/fid", "eval/precision", "eval/recall", "eval/class_accuracy"):
            assert tb[(step, tag)] == np.float32(r[tag])   # TensorBoard keeps the float32 of the same number

    # the reference statistics went to the cache --mode evaluate reads (one file per images + Inception weights)
    monkeypatch.setattr(ev, "real_images", lambda spec, **kw: full(spec, **kw)[:REAL])
    key = ev.reference_key("raw:fashion_mnist/test", full("raw:fashion_mnist/test")[:REAL], inception_npz)
    cached = tmp_path / "cache" / "marval_jax" / "fid_stats" / f"fid_ref_raw_fashion_mnist_test_{key}.npz"
    assert cached.exists()
    ev.reference_stats("raw:fashion_mnist/test", None, inception_path=inception_npz)   # no Inception: cache only

    # the ablation runner reads the curve: its last and its best point
    from marval_jax.tools import ablate
    best = min(evals, key=lambda s: evals[s]["eval/fid"])
    assert ablate.live_fid(ablate.read_metrics(str(workdir))) == {
        "live_fid_last": evals[2]["eval/fid"], "live_fid_best": evals[best]["eval/fid"], "live_fid_best_step": best}
    assert ablate.live_fid([{"step": 1, "loss": 0.5}]) == {
        "live_fid_last": None, "live_fid_best": None, "live_fid_best_step": None}


@pytest.mark.parametrize("fields, message", [
    ({"train.eval_every": -1}, r"train.eval_every=-1: give a number of steps > 0, or 0"),
    ({"train.eval_samples": 0}, r"train.eval_samples=0: live evaluation \(train.eval_every=1\) needs >= 1 image"),
    ({"sample.fid_ref": ""}, r"train.eval_every=1 needs sample.fid_ref"),
    ({"train.writers": "tensorboard,wandbb"}, r"unknown writer 'tensorboard'; choose from wandb"),
    ({"sample.inception": "MISSING"}, r"FID Inception weights .*missing.npz not found.*convert_inception"),
])
def test_bad_live_evaluation_settings_stop_the_run_before_it_starts(tmp_path, tiny_teacher, fields, message):
    """Refused with one line before the first step: nothing trained, nothing saved, no metrics row."""
    from marval_jax.main import run
    missing = str(tmp_path / "missing.npz")
    fields = {k: (missing if v == "MISSING" else v) for k, v in fields.items()}
    workdir = tmp_path / "run"
    with pytest.raises((UserError, FileNotFoundError), match=message):
        run("distill", _config(tiny_teacher, missing, **fields), str(workdir))
    assert not (workdir / "checkpoints").exists() and not (workdir / "metrics.jsonl").exists()
