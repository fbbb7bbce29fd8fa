"""`--mode=demo` on the shipped Fashion-MNIST models (marval_jax/assets/), at a tiny grid and K = 2 on the CPU."""
import json
import os

import numpy as np
import pytest
from PIL import Image

from configs import demo as demo_configs
from marval_jax.programs import demo


def _config(**fields):
    cfg = demo_configs.get_config()
    cfg.unlock()
    cfg.update(fields)
    cfg.lock()
    return cfg


def test_demo_samples_every_shipped_model(tmp_path, capsys):
    out = str(tmp_path / "demo")
    report = demo.run_demo(_config(per_class=1, num_iter=2, teacher_steps="2"), out)
    printed = capsys.readouterr().out.splitlines()
    # what it is doing comes first, before the first compile (the demo used to be silent for ~80 s)
    assert printed[0].startswith("demo: sampling the shipped") and out in printed[0]
    assert printed[1].startswith(f"{demo.ROLES[0]}: compiling its sampler")
    assert sum("compiling its sampler" in line for line in printed) == len(demo.ROLES)
    with open(os.path.join(out, "demo.json")) as f:
        saved = json.load(f)
    assert saved == json.loads(json.dumps(report))
    assert saved["batch"] == 10 and saved["num_iter"] == 2 and saved["assets"] == demo.ASSETS
    for role in demo.ROLES:
        entry = saved[role]
        assert entry["seconds_per_image"] > 0 and entry["compile_and_first_call_s"] > 0
        assert entry["grid"] == os.path.join(out, f"{role}_grid.png")
        with Image.open(entry["grid"]) as im:
            grid = np.asarray(im)
        assert grid.ndim in (2, 3) and grid.shape[1] > grid.shape[0] > 0 and grid.std() > 0  # one row of 10
    with open(os.path.join(demo.ASSETS, "sampling.json")) as f:  # the results run's best scale
        best_cfg = json.load(f)["teacher_cfg"]
    assert f"CFG {best_cfg:g}" in saved["teacher"]["sampler"]
    assert saved["speedup_student_vs_teacher"] == pytest.approx(
        saved["teacher"]["seconds_per_image"] / saved["student"]["seconds_per_image"])


def test_demo_without_assets_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="no fmnist_teacher"):
        demo.run_demo(_config(assets=str(tmp_path / "none")), str(tmp_path / "demo"))
    assert demo.best_teacher_cfg(str(tmp_path)) == 1.0  # no sampling.json: plain sampling
