"""Strict conversion of reference checkpoints, and the convert CLI's output loads into the sampler."""
import pathlib
import numpy as np
import pytest
from flax import nnx

FIXTURE = pathlib.Path(__file__).parents[1] / "fixtures" / "mar_reference_tiny.npz"
from marval_jax.checkpoints.convert_mar import CheckpointMismatchError, load_into_model, load_state_dict
from marval_jax.models.mar import MAR
from marval_jax.user_errors import UserError


def _sd(ref):
    return {k[6:]: v for k, v in ref.items() if k.startswith("param/")}


def test_missing_unexpected_misshaped_listed_together(ref, ref_model):
    _, cfg = ref_model
    sd = _sd(ref)
    sd.pop("mask_token")
    sd["extra.weight"] = np.zeros(3)
    sd["z_proj.weight"] = np.zeros((5, 5))
    with pytest.raises(CheckpointMismatchError) as e:
        load_into_model(MAR(cfg, rngs=nnx.Rngs(0)), sd)
    msg = str(e.value)
    assert "missing" in msg and "mask_token" in msg and "unexpected" in msg and "extra.weight" in msg
    assert "mis-shaped" in msg and "z_proj.weight" in msg


def test_formats_and_which(tmp_path, ref):
    sd = _sd(ref)
    np.savez(tmp_path / "a.npz", **{f"model_ema.{k}": v for k, v in sd.items()}, **{f"model.{k}": v * 0 for k, v in sd.items()})
    ema = load_state_dict(str(tmp_path / "a.npz"), "model_ema")
    raw = load_state_dict(str(tmp_path / "a.npz"), "model")
    assert set(ema) == set(sd) and float(np.abs(raw["fake_latent"]).max()) == 0
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(tmp_path / "b.safetensors"))
    assert set(load_state_dict(str(tmp_path / "b.safetensors"))) == set(sd)
    with pytest.raises(FileNotFoundError):
        load_state_dict(str(tmp_path / "none.pth"))
    with pytest.raises(ValueError, match="extension"):
        (tmp_path / "c.bin2").write_text("x")
        load_state_dict(str(tmp_path / "c.bin2"))


def test_pth_with_namespace(tmp_path, ref):
    """The reference checkpoint layout (Namespace under "args") converts without trusting the pickle."""
    torch = pytest.importorskip("torch")
    import argparse
    sd = {k: torch.from_numpy(np.asarray(v)) for k, v in _sd(ref).items()}
    torch.save({"model": sd, "model_ema": sd, "args": argparse.Namespace(a=1)}, tmp_path / "ck.pth")
    got = load_state_dict(str(tmp_path / "ck.pth"), "model_ema")
    assert set(got) == set(sd)
    np.testing.assert_array_equal(got["fake_latent"], _sd(ref)["fake_latent"])
    torch.save({"model": sd, "args": argparse.Namespace(a=1)}, tmp_path / "raw_only.pth")
    with pytest.raises(UserError, match=r"has no 'model_ema'; it has \['args', 'model'\]: pick another --which"):
        load_state_dict(str(tmp_path / "raw_only.pth"), "model_ema")


class _WritesMarker:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_pth_that_runs_code_needs_trust_pickle(tmp_path, ref):
    torch = pytest.importorskip("torch")
    sd = {k: torch.from_numpy(np.asarray(v)) for k, v in _sd(ref).items()}
    marker = tmp_path / "marker"
    torch.save({"model_ema": sd, "optimizer": _WritesMarker(marker)}, tmp_path / "ck.pth")
    with pytest.raises(UserError, match="builtins.exec.*--trust_pickle") as info:
        load_state_dict(str(tmp_path / "ck.pth"), "model_ema")
    assert "\n" not in str(info.value) and not marker.exists()
    assert set(load_state_dict(str(tmp_path / "ck.pth"), "model_ema", trust_pickle=True)) == set(sd)
    assert marker.exists()


def test_converted_params_dir_loads_and_refuses_other_config(tmp_path, ref, ref_model):
    import json
    from marval_jax.checkpoints.load import load_model_params
    from marval_jax.checkpoints.manager import ConfigMismatchError
    from marval_jax.models.mar import MARConfig
    from marval_jax.tools.convert_mar import convert
    model_cfg = dict(json.loads(str(ref["config_json"])))
    model_cfg = {k: v for k, v in model_cfg.items() if k in MARConfig.__dataclass_fields__}
    out = convert(str(FIXTURE), model_cfg, str(tmp_path / "conv"), prefix="param/")
    abstract = nnx.state(nnx.eval_shape(lambda: MAR(MARConfig(**model_cfg), rngs=nnx.Rngs(0))), nnx.Param)
    params = load_model_params(out, abstract, model_cfg)
    np.testing.assert_array_equal(np.asarray(params["fake_latent"][...]), ref["param/fake_latent"])
    with pytest.raises(ConfigMismatchError, match="decoder_depth"):
        load_model_params(out, abstract, dict(model_cfg, decoder_depth=3))
