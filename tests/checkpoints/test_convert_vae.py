"""marval_jax/checkpoints/convert_vae.py: layout rules, error reporting, file formats, parity tool entry."""
import functools
import pathlib

import numpy as np
import pytest
from flax import nnx

from marval_jax.checkpoints import convert_vae as cv
from marval_jax.models.vae import AutoencoderKL

FIXTURE = pathlib.Path(__file__).parents[1] / "fixtures" / "mar_reference_tiny.npz"


@pytest.fixture(scope="module")
def fixture():
    with np.load(FIXTURE) as data:
        return {k: data[k] for k in data.files if k.startswith(("vae_", "config_json"))}


@pytest.fixture(scope="module")
def sd(fixture):
    return {k[len("vae_param/"):]: v for k, v in fixture.items() if k.startswith("vae_param/")}


@functools.cache
def _abstract(ch=32):
    return nnx.eval_shape(lambda: AutoencoderKL(ch=ch, ch_mult=(1, 1, 2, 2, 4), embed_dim=16))


def test_vae_parity_below_1e4(fixture):
    result = cv.vae_parity(fixture)
    assert [name for name, _ in result] == ["post_mean", "post_logvar", "decoded"]
    for name, err in result:
        assert err < 1e-4, (name, err)


def test_layout_rules(sd):
    state = cv.convert_vae_state_dict(sd, _abstract())
    w = sd["encoder.down.2.block.0.conv1.weight"]  # (out, in, kh, kw)
    k = np.asarray(state["encoder"]["down"][2]["block"][0]["conv1"]["kernel"][...])
    np.testing.assert_array_equal(k, np.transpose(w, (2, 3, 1, 0)))
    np.testing.assert_array_equal(np.asarray(state["encoder"]["down"][2]["block"][0]["norm2"]["scale"][...]),
                                  sd["encoder.down.2.block.0.norm2.weight"])
    np.testing.assert_array_equal(np.asarray(state["decoder"]["up"][3]["upsample"]["conv"]["bias"][...]),
                                  sd["decoder.up.3.upsample.conv.bias"])
    np.testing.assert_array_equal(np.asarray(state["quant_conv"]["kernel"][...])[0, 0],
                                  sd["quant_conv.weight"][:, :, 0, 0].T)


def test_infer_config(sd):
    assert cv.infer_vae_config(sd) == dict(ch=32, ch_mult=(1, 1, 2, 2, 4), num_res_blocks=2, embed_dim=16,
                                           attn_levels=(4,))


def test_missing_and_misshaped_keys_raise_one_error(sd):
    bad = dict(sd)
    del bad["encoder.mid.attn_1.q.weight"]
    del bad["decoder.up.1.block.0.nin_shortcut.bias"]
    bad["post_quant_conv.weight"] = np.zeros((16, 16, 3, 3), np.float32)
    with pytest.raises(ValueError) as info:
        cv.convert_vae_state_dict(bad, _abstract())
    msg = str(info.value)
    assert "2 missing" in msg and "1 mis-shaped" in msg
    assert "encoder.mid.attn_1.q.weight (expected shape (128, 128, 1, 1))" in msg
    assert "decoder.up.1.block.0.nin_shortcut.bias" in msg
    assert "post_quant_conv.weight: expected shape (16, 16, 1, 1), got (16, 16, 3, 3)" in msg
    # A state_dict of another width does not fit: every tensor is reported at once.
    # (306 of 312: quant_conv, post_quant_conv and the conv_out biases do not depend on ch.)
    with pytest.raises(ValueError, match=r"306 mis-shaped.*\n.*decoder.conv_in.bias: expected shape \(256,\)") as info:
        cv.convert_vae_state_dict(sd, _abstract(ch=64))
    assert "looks like {'ch': 32" in str(info.value)


def test_unknown_keys_warn(sd):
    extra = dict(sd, **{"loss.logvar": np.zeros(()), "loss.discriminator.main.0.weight": np.zeros((2, 2))})
    with pytest.warns(UserWarning, match=r"ignoring 2 key\(s\).*loss.discriminator.main.0.weight, loss.logvar"):
        state = cv.convert_vae_state_dict(extra, _abstract())
    np.testing.assert_array_equal(np.asarray(state["post_quant_conv"]["bias"][...]), sd["post_quant_conv.bias"])


def test_load_checkpoint_formats(sd, tmp_path):
    got = cv.load_vae_checkpoint(FIXTURE)  # npz with the fixture's vae_param/ prefix
    assert set(got) == set(sd)
    np.testing.assert_array_equal(got["decoder.conv_out.weight"], sd["decoder.conv_out.weight"])

    from safetensors.numpy import save_file
    small = {k: v for k, v in sd.items() if k.startswith("quant_conv")}
    save_file(small, str(tmp_path / "vae.safetensors"))
    got = cv.load_vae_checkpoint(tmp_path / "vae.safetensors")
    assert set(got) == set(small)
    np.testing.assert_array_equal(got["quant_conv.weight"], small["quant_conv.weight"])

    np.savez(tmp_path / "plain.npz", **small)
    assert set(cv.load_vae_checkpoint(tmp_path / "plain.npz")) == set(small)

    with pytest.raises(FileNotFoundError, match="nope.ckpt"):
        cv.load_vae_checkpoint(tmp_path / "nope.ckpt")
    (tmp_path / "vae.h5").write_bytes(b"")
    with pytest.raises(ValueError, match="unsupported extension"):
        cv.load_vae_checkpoint(tmp_path / "vae.h5")


def test_load_torch_ckpt(sd, tmp_path):
    torch = pytest.importorskip("torch")
    small = {k: torch.from_numpy(v) for k, v in sd.items() if k.startswith("post_quant_conv")}
    torch.save({"model": small, "epoch": 3}, tmp_path / "kl16.ckpt")
    got = cv.load_vae_checkpoint(tmp_path / "kl16.ckpt")
    assert set(got) == set(small)
    np.testing.assert_array_equal(got["post_quant_conv.weight"], sd["post_quant_conv.weight"])


class _WritesMarker:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


def test_torch_ckpt_that_runs_code_needs_trust(sd, tmp_path):
    """kl16.ckpt is read at run time when tokenizer.kind = "vae": the refusal names the config field there."""
    torch = pytest.importorskip("torch")
    import ml_collections as mlc
    from marval_jax.models.mar import MARConfig
    from marval_jax.checkpoints.convert_vae import make_vae_decoder
    from marval_jax.user_errors import UserError
    small = {k: torch.from_numpy(v) for k, v in sd.items() if k.startswith("post_quant_conv")}
    marker = tmp_path / "marker"
    torch.save({"model": small, "callbacks": _WritesMarker(marker)}, tmp_path / "kl16.ckpt")
    with pytest.raises(UserError, match=r"builtins\.exec.*pass --trust_pickle"):
        cv.load_vae_checkpoint(tmp_path / "kl16.ckpt")
    tok = mlc.ConfigDict(dict(vae_ckpt=str(tmp_path / "kl16.ckpt"), scale=0.2325))
    with pytest.raises(UserError, match=r"pass tokenizer\.trust_pickle=True in the config"):
        make_vae_decoder(tok, MARConfig())
    assert not marker.exists()
    assert set(cv.load_vae_checkpoint(tmp_path / "kl16.ckpt", trust_pickle=True)) == set(small)
    assert marker.exists()


def test_lightning_ckpt_loads_without_trust(sd, tmp_path):
    """LDM-era Lightning checkpoints key `callbacks` by the ModelCheckpoint class; it loads as an inert stand-in."""
    torch = pytest.importorskip("torch")
    import sys
    import types
    from marval_jax.checkpoints.safe_load import LightningCheckpointCallbackKey

    # A class importable under Lightning's name while the file is written (Lightning itself is not installed).
    names = ["pytorch_lightning", "pytorch_lightning.callbacks", "pytorch_lightning.callbacks.model_checkpoint"]
    mod = types.ModuleType(names[-1])
    mod.ModelCheckpoint = type("ModelCheckpoint", (), {"__module__": names[-1]})
    saved = {n: sys.modules.get(n) for n in names}
    sys.modules.update({n: types.ModuleType(n) for n in names[:-1]}, **{names[-1]: mod})
    try:
        small = {k: torch.from_numpy(v) for k, v in sd.items() if k.startswith("quant_conv")}
        torch.save({"state_dict": small, "epoch": 7, "global_step": 1000, "pytorch-lightning_version": "1.4.2",
                    "callbacks": {mod.ModelCheckpoint: {"best_model_score": torch.tensor(0.5), "monitor": "val"}}},
                   tmp_path / "lightning.ckpt")
    finally:
        for n, m in saved.items():
            if m is None:
                sys.modules.pop(n, None)
            else:
                sys.modules[n] = m
    from marval_jax.checkpoints.safe_load import torch_load
    raw = torch_load(tmp_path / "lightning.ckpt")
    assert list(raw["callbacks"]) == [LightningCheckpointCallbackKey]
    got = cv.load_vae_checkpoint(tmp_path / "lightning.ckpt")
    assert set(got) == set(small)
    np.testing.assert_array_equal(got["quant_conv.weight"], sd["quant_conv.weight"])


def test_garbage_vae_files_are_one_line(tmp_path):
    from marval_jax.user_errors import UserError
    noise = np.random.default_rng(0).integers(0, 256, 2048, dtype=np.uint8).tobytes()
    for name, expected in (("kl16.ckpt", "PyTorch checkpoint"), ("vae.safetensors", ".safetensors file"),
                           ("vae.npz", ".npz archive")):
        (tmp_path / name).write_bytes(noise)
        with pytest.raises(UserError) as info:
            cv.load_vae_checkpoint(tmp_path / name)
        msg = str(info.value)
        assert "\n" not in msg and "allow_pickle" not in msg and str(tmp_path / name) in msg and expected in msg
