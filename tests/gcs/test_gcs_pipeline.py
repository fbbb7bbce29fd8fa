"""train -> distill -> sample with the workdirs, the teacher checkpoint, the sample outputs and a latent cache all on
gs://bucket/... of a local GCS emulator (tests/gcs/conftest.py): orbax checkpoints (tensorstore), metrics.jsonl,
TensorBoard events, grids, `--mode sample`'s grid / npz / json and the latent cache go through the emulator, and no
local folder named `gs:` appears."""
import io
import json
import os

import numpy as np
import pytest
from etils import epath

from configs import mar as mar_configs, marval as marval_configs
from configs.common import with_fields
from marval_jax.data import latent_cache as lc

pytestmark = pytest.mark.usefixtures("compile_cache")  # tests/conftest.py

ROOT = "gs://bucket"


def _cfg(module_or_cfg, **fields):
    cfg = module_or_cfg.get_config("tiny") if hasattr(module_or_cfg, "get_config") else module_or_cfg
    return with_fields(cfg, fields)


def _no_local_gs_folder(*dirs):
    for d in dirs:
        for here, subdirs, _ in os.walk(d):
            assert "gs:" not in subdirs, f"a local 'gs:' folder was created under {here}"


def test_train_distill_sample_on_gcs(gcs_emulator, tmp_path, monkeypatch):
    from marval_jax.main import run
    monkeypatch.chdir(tmp_path)  # a relative 'gs:/...' folder would appear here
    teacher, student = f"{ROOT}/teacher", f"{ROOT}/student"

    run("train", _cfg(mar_configs, **{"train.num_steps": 2, "train.ckpt_every": 2, "train.sample_every": 0,
                                       "train.log_every": 1}), teacher)
    assert (epath.Path(teacher) / "checkpoints" / "2").is_dir()
    rows = [json.loads(x) for x in (epath.Path(teacher) / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]  # two flushes: the second rewrite kept the first row
    events = list((epath.Path(teacher) / "tensorboard").iterdir())
    assert len(events) == 1 and events[0].stat().length > 0

    # the teacher is read from gs:// (checkpoint restore via tensorstore); grids at step 2 are written there
    distill = _cfg(marval_configs, **{"train.num_steps": 2, "train.ckpt_every": 2, "teacher_ckpt": teacher,
                                      "train.sample_every": 2, "train.log_every": 1})
    run("distill", distill, student)
    assert (epath.Path(student) / "checkpoints" / "2").is_dir()
    png = epath.Path(student) / "samples" / "step_00000002.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

    # the student is sampled from its gs:// workdir into a gs:// output folder (grid, npz, json: one object each)
    out = f"{ROOT}/samples_out"
    report = run("sample", _cfg(marval_configs, **{"sample.num_images": 4, "sample.batch_size": 4}), student, out)
    assert report["sampler"] == "onestep" and report["num_images"] == 4
    assert sorted(p.name for p in epath.Path(out).iterdir()) == ["onestep_K4.json", "onestep_K4.npz", "onestep_K4.png"]
    assert json.loads((epath.Path(out) / "onestep_K4.json").read_text())["num_images"] == 4
    with np.load(io.BytesIO((epath.Path(out) / "onestep_K4.npz").read_bytes())) as npz:
        assert npz["images"].shape[0] == 4 and npz["images"].dtype == np.uint8
    _no_local_gs_folder(tmp_path, os.getcwd())


def test_latent_cache_on_gcs(gcs_emulator, tmp_path):
    """A cache built into gs:// by two processes (sequential here: the barrier is a no-op) reads back through the
    data pipeline with the same records as a local build."""
    from marval_jax.data import pipeline
    rng = np.random.default_rng(0)
    examples = [{"image": rng.uniform(-1, 1, (8, 8, 3)).astype(np.float32), "label": i % 10} for i in range(6)]
    a = rng.normal(size=(3, 4)).astype(np.float32)
    enc = lambda x: np.asarray(x[:, ::2, ::2, :] @ a, np.float32)  # moments (B, 4, 4, 4): C = 2

    local = str(tmp_path / "local")
    lc.build_latent_cache(examples, enc, local, "train", batch_size=4, num_threads=1)
    remote = f"{ROOT}/cache"
    for p in (1, 0):
        lc.build_latent_cache(examples, enc, remote, "train", batch_size=4, num_shards=3, process_index=p,
                              process_count=2, num_threads=1, barrier=lambda name: None)
    names = sorted(x.name for x in epath.Path(remote).iterdir())
    assert names == ["train.array_record-00000-of-00003", "train.array_record-00001-of-00003",
                     "train.array_record-00002-of-00003", "train.json"]
    cfg = {"name": "latent_cache", "cache_dir": remote, "split": "train", "patch_size": 0}
    source, _ = pipeline.make_source(cfg)
    ref, _ = lc.open_latent_cache(local, "train")
    assert len(source) == len(ref) == 6
    for i in range(6):
        np.testing.assert_array_equal(source[i]["moments"], ref[i]["moments"])
        np.testing.assert_array_equal(source[i]["moments_flip"], ref[i]["moments_flip"])
    _no_local_gs_folder(tmp_path, os.getcwd())


def test_params_export_on_gcs(gcs_emulator, tmp_path, monkeypatch):
    """save_params into gs:// (npz and orbax) and load_model_params back: the same arrays, no local `gs:` folder."""
    import jax
    from flax import nnx
    from marval_jax.checkpoints.load import load_model_params
    from marval_jax.checkpoints.params_io import save_params
    from marval_jax.models.mar import MAR, MARConfig
    monkeypatch.chdir(tmp_path)
    model_cfg = mar_configs.get_config("tiny").model.to_dict()
    params = nnx.state(MAR(MARConfig(**model_cfg), rngs=nnx.Rngs(0)), nnx.Param)
    want = jax.tree_util.tree_leaves(nnx.to_pure_dict(params))
    for fmt in ("npz", "orbax"):
        out = save_params(f"{ROOT}/export_{fmt}", params, model_cfg, fmt=fmt)
        assert out == f"{ROOT}/export_{fmt}" and (epath.Path(out) / "model.json").exists()
        got = jax.tree_util.tree_leaves(nnx.to_pure_dict(load_model_params(out, params, model_cfg)))
        assert len(got) == len(want)
        for g, w in zip(got, want):
            np.testing.assert_array_equal(np.asarray(g), np.asarray(w))
    _no_local_gs_folder(tmp_path)


def test_evaluation_files_on_gcs(gcs_emulator, tmp_path, monkeypatch):
    """FID statistics written to and read from gs://, and the config checks of --mode evaluate (sample.fid_ref,
    sample.inception) on gs:// paths: a present file passes, a missing one is a UserError naming its field."""
    from marval_jax import config_checks
    from marval_jax.evaluation import fid
    from marval_jax.evaluation.files import write_npz
    from marval_jax.user_errors import UserError
    monkeypatch.chdir(tmp_path)
    mu, sigma = np.linspace(0, 1, 2048), np.diag(np.linspace(0.5, 1.5, 2048))
    stats = fid.save_statistics(f"{ROOT}/eval/ref.npz", mu, sigma)
    got_mu, got_sigma = fid.load_statistics(stats)
    np.testing.assert_array_equal(got_mu, mu)
    np.testing.assert_array_equal(got_sigma, sigma)
    weights = write_npz(f"{ROOT}/eval/inception.npz", **{"conv.weight": np.zeros((1,), np.float32)})
    cfg = _cfg(mar_configs, **{"sample.fid_ref": stats, "sample.inception": str(weights)})
    config_checks.check_fid_ref(cfg)
    config_checks.check_inception(cfg)
    for field, value in (("sample.fid_ref", f"{ROOT}/eval/missing.npz"), ("sample.inception", f"{ROOT}/nope.npz")):
        with pytest.raises(UserError, match=field.replace(".", r"\.")):
            config_checks.check_evaluation_files(_cfg(mar_configs, **{"sample.fid_ref": stats, "sample.inception":
                                                                       str(weights), field: value}))
    _no_local_gs_folder(tmp_path)
