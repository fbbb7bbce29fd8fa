"""--mode evaluate end to end on a tiny random MAR: sampling, Inception features, FID, precision/recall, JSON."""
import json
import os

import numpy as np
import pytest
from flax import nnx

from configs import mar as mar_configs


def test_evaluate_writes_all_numbers(tmp_path, inception_npz, monkeypatch):
    from marval_jax.checkpoints.params_io import save_params
    from marval_jax.programs import evaluate as ev
    from marval_jax.models.mar import MAR, MARConfig
    cfg = mar_configs.get_config("tiny")
    model = MAR(MARConfig(**cfg.model.to_dict()), rngs=nnx.Rngs(0))
    ckpt = save_params(str(tmp_path / "ckpt"), nnx.state(model, nnx.Param), cfg.model.to_dict())
    cfg.unlock()
    cfg.sample.update(num_images=8, batch_size=8, fid_ref="raw:fashion_mnist/test", pr_num_real=8, crop=28,
                      inception=inception_npz)
    cfg.data.name = "latent_cache"  # no default classifier for it: class accuracy is skipped
    cfg.lock()
    full = ev.real_images
    monkeypatch.setattr(ev, "real_images", lambda spec: full(spec)[:16])  # 16 real images keep it fast
    report = ev.evaluate(cfg, str(tmp_path), ckpt=ckpt)
    assert report["fid"] > 0 and 0 <= report["precision"] <= 1 and 0 <= report["recall"] <= 1
    assert report["seconds_per_image"] > 0
    files = os.listdir(tmp_path / "eval")
    assert {"teacher_K4.json", "teacher_K4.png", "teacher_K4_stats.npz"} <= set(files)
    with np.load(tmp_path / "eval" / "teacher_K4_stats.npz") as st:
        assert st["mu"].shape == (2048,) and st["sigma"].shape == (2048, 2048)
    with open(tmp_path / "eval" / "teacher_K4.json") as f:
        assert json.load(f)["num_images"] == 8


def test_evaluate_needs_a_reference(tmp_path):
    from marval_jax.programs.evaluate import evaluate
    with pytest.raises(ValueError, match="fid_ref"):
        evaluate(mar_configs.get_config("tiny"), str(tmp_path))


def test_missing_inception_weights_fail_before_sampling(tmp_path):
    """evaluate() checks what it reads after sampling (reference, Inception weights) before it samples: a missing
    Inception file is a UserError naming sample.inception while nothing has been traced or compiled yet."""
    import jax
    from marval_jax.programs.evaluate import evaluate
    from marval_jax.user_errors import UserError
    events, recording = [], [True]
    jax.monitoring.register_event_duration_secs_listener(
        lambda e, *a, **k: events.append(e) if recording[0] and e.startswith("/jax/core/compile/") else None)
    ckpt = tmp_path / "ckpt"
    ckpt.mkdir()
    (ckpt / "model.json").write_text(json.dumps(mar_configs.get_config("tiny").model.to_dict()))
    cfg = mar_configs.get_config("tiny")
    cfg.unlock()
    cfg.sample.update(fid_ref="raw:fashion_mnist/test", inception=str(tmp_path / "missing.npz"))
    cfg.lock()
    try:
        with pytest.raises(UserError, match="sample.inception="):
            evaluate(cfg, str(tmp_path), ckpt=str(ckpt))
        assert events == []
        jax.jit(lambda x: x - 1)(1.0)   # the listener does see a compile
        assert events
    finally:
        recording[0] = False
