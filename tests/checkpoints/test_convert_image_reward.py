"""The ImageReward converter: the release's state-dict layout (ImageReward.pt / safetensors) -> params.npz, strict
about every key and shape; the command line in-process (exit code 2 and the offending key on a wrong checkpoint)."""
import json

import numpy as np
import pytest

from marval_jax.checkpoints import convert_image_reward as ci
from marval_jax.user_errors import UserError, call_cli

TINY = {"vision": dict(hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
                       image_size=16, patch_size=8),
        "text": dict(vocab_size=50, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                     max_position_embeddings=40, encoder_width=16),
        "mlp_hidden": [12, 6, 4, 2]}
CONFIG = ci.ImageRewardConfig.from_dict(TINY)


def release_state_dict(seed=0) -> dict:
    """Random tensors under the release's keys and storage layouts ((out, in) linears, OIHW conv), plus the keys
    the release file carries that the score never reads."""
    rng = np.random.default_rng(seed)
    sd = {}
    for e in ci.param_spec(CONFIG):
        w = rng.standard_normal(e.shape).astype(np.float32)
        sd[e.key] = w.T if e.kind == "linear" else w.transpose(3, 2, 0, 1) if e.kind == "conv" else w
    sd["blip.text_encoder.embeddings.position_ids"] = np.arange(40)[None]
    sd["blip.vision_proj.weight"], sd["blip.text_proj.bias"] = np.zeros((4, 16)), np.zeros(4)
    return sd


def test_layout_and_transposes():
    sd = release_state_dict()
    arrays = ci.convert_state_dict(sd, CONFIG)
    assert set(arrays) == {e.path for e in ci.param_spec(CONFIG)}
    np.testing.assert_array_equal(arrays["visual_encoder/blocks/0/attn/qkv/kernel"],
                                  sd["blip.visual_encoder.blocks.0.attn.qkv.weight"].T)
    np.testing.assert_array_equal(arrays["visual_encoder/patch_embed/proj/kernel"][2, 5],   # HWIO <- OIHW
                                  sd["blip.visual_encoder.patch_embed.proj.weight"][:, :, 2, 5].T)
    np.testing.assert_array_equal(arrays["mlp/layers/4/kernel"], sd["mlp.layers.7.weight"].T)   # the head's last
    assert arrays["text_encoder/encoder/layer/0/crossattention/self/key/kernel"].shape == (16, 8)   # from the ViT


def test_strict_conversion_lists_all_problems():
    sd = release_state_dict()
    del sd["blip.visual_encoder.norm.bias"]
    sd["blip.itm_head.weight"] = np.zeros((2, 8))
    sd["mlp.layers.2.weight"] = np.zeros((12, 6))      # stored (in, out): transposed
    with pytest.raises(UserError) as e:
        ci.convert_state_dict(sd, CONFIG)
    msg = str(e.value)
    assert "missing: blip.visual_encoder.norm.bias" in msg
    assert "unexpected: blip.itm_head.weight" in msg
    assert "mis-shaped: mlp.layers.2.weight" in msg
    assert "position_ids" not in msg and "proj" not in msg.replace("proj.weight", "").replace("/proj", "")
    extra = {**release_state_dict(), "blip.text_decoder.cls.predictions.bias": np.zeros(50)}   # one extra key only
    with pytest.raises(UserError, match="unexpected: blip.text_decoder.cls.predictions.bias"):
        ci.convert_state_dict(extra, CONFIG)


def test_cli_round_trip_and_refusal(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    release, out = tmp_path / "release", tmp_path / "out"
    release.mkdir()
    sd = release_state_dict(1)
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, release / "ImageReward.pt")
    (release / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n")
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    argv = ["--release-dir", str(release), "--out", str(out), "--config", str(tmp_path / "config.json")]
    ci.main(argv)
    config, arrays = ci.load_image_reward_arrays(str(out))
    assert config == CONFIG and (out / "vocab.txt").read_text().startswith("[PAD]")
    for k, v in ci.convert_state_dict(sd, CONFIG).items():
        np.testing.assert_array_equal(arrays[k], v)
    # a checkpoint of another model: exit code 2 and one line naming an offending key
    del sd["blip.text_encoder.embeddings.LayerNorm.weight"]
    torch.save({k: torch.from_numpy(np.asarray(v)) for k, v in sd.items()}, release / "ImageReward.pt")
    capsys.readouterr()
    assert call_cli(lambda: ci.main(argv), argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "missing: blip.text_encoder.embeddings.LayerNorm.weight" in err
    assert len(err.strip().splitlines()) == 1


def test_safetensors_and_release_config(tmp_path):
    from safetensors.numpy import save_file
    save_file({k: np.ascontiguousarray(v, np.float32) for k, v in release_state_dict(2).items()},
              str(tmp_path / "model.safetensors"))
    assert set(ci.read_release_state_dict(str(tmp_path))) == set(release_state_dict())
    # med_config.json sets the text encoder; the ViT is the release's (ViT-L/16 at 224), whose width the
    # cross-attention reads
    (tmp_path / "med_config.json").write_text(json.dumps({"hidden_size": 768, "num_attention_heads": 12,
                                                          "vocab_size": 30524, "encoder_width": 768,
                                                          "add_cross_attention": True, "type_vocab_size": 2}))
    cfg = ci.release_config(str(tmp_path))
    assert (cfg.text.vocab_size, cfg.text.encoder_width, cfg.vision.hidden_size) == (30524, 1024, 1024)
    assert (cfg.vision.patch_size, cfg.vision.image_size, cfg.max_length) == (16, 224, 35)
    assert (cfg.score_mean, cfg.score_std) == (0.16717362830052426, 1.0333394966054072)
    assert cfg.mlp_hidden == (1024, 128, 64, 16)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="release directory"):
        ci.read_release_state_dict(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="ImageReward.pt"):
        ci.read_release_state_dict(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="--vocab"):
        ci.convert_release(str(tmp_path), str(tmp_path / "out"))
    with pytest.raises(FileNotFoundError, match="config.json"):
        ci.load_image_reward_arrays(str(tmp_path))
    ci.save_image_reward(str(tmp_path), CONFIG, {"mlp/layers/0/bias": np.zeros(3)})
    with pytest.raises(UserError, match="mis-shaped.*mlp/layers/0/bias"):
        ci.load_image_reward_arrays(str(tmp_path))
