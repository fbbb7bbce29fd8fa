"""Convert the released ImageReward checkpoint (`ImageReward.pt`, BLIP + MLP head) into arrays for
`marval_jax.rewards.blip.ImageReward`.

    python -m marval_jax.checkpoints.convert_image_reward --release-dir /models/ImageReward \
        --vocab /models/bert-base-uncased/vocab.txt --out /ckpt/image_reward_jax

The release directory holds `ImageReward.pt` (a torch state dict, read with `weights_only=True`: no code from the
file runs; `--trust_pickle` unpickles fully, for trusted files only) or `model.safetensors` with the same keys, and
`med_config.json` (the BERT text encoder's config; its `encoder_width` is replaced by the ViT's width, as the
release's code does). The vision tower is the release's ViT-L/16 at 224 px unless `--config` gives a whole
`ImageRewardConfig` as JSON (tests, other BLIP sizes). `vocab.txt` (bert-base-uncased's WordPiece vocabulary, which
ships in no installable package here) is taken from `--vocab` or the release directory and copied to the output.

The output directory holds `params.npz` (float32, keys are '/'-joined NNX parameter paths), `config.json`
(`ImageRewardConfig.to_dict()`) and `vocab.txt`.

Conversion is strict: every missing, unexpected and mis-shaped key is listed in one error. Keys that the score
never reads are dropped by name: BLIP's contrastive projections (`blip.vision_proj.*`, `blip.text_proj.*`) and
position-id buffers (`*.position_ids`).

The configs live here (not beside the Flax module in marval_jax.rewards) so that this converter, one layer below
the rewards, knows the parameter layout without importing them; tests/rewards/test_image_reward.py checks that
`param_spec` names exactly the module's parameters.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from typing import Any

import numpy as np

from marval_jax.checkpoints.safe_load import float32_array, load_npz, load_safetensors, torch_load
from marval_jax.models.clip import ACTIVATIONS, OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
from marval_jax.user_errors import UserError, run_cli

PARAMS_FILE, CONFIG_FILE, VOCAB_FILE = "params.npz", "config.json", "vocab.txt"
RELEASE_WEIGHTS = ("ImageReward.pt", "model.safetensors")
UNUSED_PREFIXES = ("blip.vision_proj.", "blip.text_proj.")
IGNORED_SUFFIXES = ("position_ids",)
# the head is nn.Sequential(Linear, Dropout, Linear, Dropout, Linear, Dropout, Linear, Linear): its linears' indices
MLP_RELEASE_INDICES = (0, 2, 4, 6, 7)
# med_config.json fields that set TextConfig (the rest - dropouts, type_vocab_size, add_cross_attention - do not
# change the inference computation)
MED_FIELDS = ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
              "max_position_embeddings", "layer_norm_eps", "hidden_act")

# ImageReward-v1.0 (ImageReward/ImageReward.py of the release): the score's normalisation and the head's widths.
SCORE_MEAN = 0.16717362830052426
SCORE_STD = 1.0333394966054072
MLP_HIDDEN = (1024, 128, 64, 16)
MAX_LENGTH = 35   # the release tokenizes with padding="max_length", truncation=True, max_length=35


# ----------------------------------------------------------------------------------------------- config
@dataclasses.dataclass(frozen=True)
class VisionConfig:
    """BLIP's ViT; defaults: ViT-L/16 at 224 px (create_vit('large')), LayerNorm eps 1e-6."""
    hidden_size: int = 1024
    num_hidden_layers: int = 24
    num_attention_heads: int = 16
    intermediate_size: int = 4096
    image_size: int = 224
    patch_size: int = 16
    layer_norm_eps: float = 1e-6


@dataclasses.dataclass(frozen=True)
class TextConfig:
    """BLIP's med_config.json (bert-base-uncased + [DEC] / [ENC] tokens, cross-attention width = the ViT's)."""
    vocab_size: int = 30524
    hidden_size: int = 768
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    intermediate_size: int = 3072
    max_position_embeddings: int = 512
    layer_norm_eps: float = 1e-12
    hidden_act: str = "gelu"
    encoder_width: int = 1024


def _sub(cls, d: Mapping[str, Any] | None, what: str):
    d = dict(d or {})
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
        raise UserError(f"ImageReward {what}: unknown fields {unknown} (known: {sorted(names)})")
    cfg = cls(**d)
    if cfg.hidden_size % cfg.num_attention_heads:
        raise UserError(f"ImageReward {what}: hidden_size {cfg.hidden_size} is not divisible by "
                         f"num_attention_heads {cfg.num_attention_heads}")
    return cfg


@dataclasses.dataclass(frozen=True)
class ImageRewardConfig:
    vision: VisionConfig = dataclasses.field(default_factory=VisionConfig)
    text: TextConfig = dataclasses.field(default_factory=TextConfig)
    mlp_hidden: tuple[int, ...] = MLP_HIDDEN
    score_mean: float = SCORE_MEAN
    score_std: float = SCORE_STD
    max_length: int = MAX_LENGTH
    image_mean: tuple[float, float, float] = OPENAI_CLIP_MEAN
    image_std: tuple[float, float, float] = OPENAI_CLIP_STD

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> ImageRewardConfig:
        """From `to_dict()` output (or a partial dict: missing fields take the release's values)."""
        d = dict(d)
        vision = _sub(VisionConfig, d.pop("vision", None), "vision")
        text = _sub(TextConfig, d.pop("text", None), "text")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise UserError(f"ImageReward config: unknown fields {unknown} (known: {sorted(names)})")
        for key in ("mlp_hidden", "image_mean", "image_std"):
            if key in d:
                d[key] = tuple(d[key])
        cfg = cls(vision=vision, text=text, **d)
        if cfg.text.encoder_width != cfg.vision.hidden_size:
            raise UserError(f"ImageReward config: text.encoder_width {cfg.text.encoder_width} must equal "
                             f"vision.hidden_size {cfg.vision.hidden_size} (cross-attention reads the image tokens)")
        if cfg.text.hidden_act not in ACTIVATIONS:
            raise UserError(f"ImageReward text.hidden_act: expected one of {sorted(ACTIVATIONS)}, "
                             f"got {cfg.text.hidden_act!r}")
        if cfg.max_length > cfg.text.max_position_embeddings:
            raise UserError(f"ImageReward max_length {cfg.max_length} exceeds text.max_position_embeddings "
                             f"{cfg.text.max_position_embeddings}")
        return cfg

    @classmethod
    def from_json(cls, path: str) -> ImageRewardConfig:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"ImageReward config not found: {path}")
        with open(path) as f:
            return cls.from_dict(json.load(f))

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------- layout
@dataclasses.dataclass(frozen=True)
class Entry:
    """One parameter: its '/'-joined NNX path, its release key, its shape here and how the release stores it."""
    path: str
    key: str
    shape: tuple[int, ...]
    kind: str = "copy"   # "copy" | "linear" (release (out, in) -> (in, out)) | "conv" ((out, in, kh, kw) -> HWIO)


def _linear(path: str, key: str, din: int, dout: int) -> Iterator[Entry]:
    yield Entry(f"{path}/kernel", f"{key}.weight", (din, dout), "linear")
    yield Entry(f"{path}/bias", f"{key}.bias", (dout,))


def _norm(path: str, key: str, dim: int) -> Iterator[Entry]:
    yield Entry(f"{path}/scale", f"{key}.weight", (dim,))
    yield Entry(f"{path}/bias", f"{key}.bias", (dim,))


def _vision_spec(v: VisionConfig) -> Iterator[Entry]:
    p, d, key = "visual_encoder", v.hidden_size, "blip.visual_encoder"
    n = (v.image_size // v.patch_size) ** 2 + 1
    yield Entry(f"{p}/patch_embed/proj/kernel", f"{key}.patch_embed.proj.weight", (v.patch_size, v.patch_size, 3, d),
                "conv")
    yield Entry(f"{p}/patch_embed/proj/bias", f"{key}.patch_embed.proj.bias", (d,))
    yield Entry(f"{p}/cls_token", f"{key}.cls_token", (1, 1, d))
    yield Entry(f"{p}/pos_embed", f"{key}.pos_embed", (1, n, d))
    for i in range(v.num_hidden_layers):
        bp, bk = f"{p}/blocks/{i}", f"{key}.blocks.{i}"
        yield from _norm(f"{bp}/norm1", f"{bk}.norm1", d)
        yield from _linear(f"{bp}/attn/qkv", f"{bk}.attn.qkv", d, 3 * d)
        yield from _linear(f"{bp}/attn/proj", f"{bk}.attn.proj", d, d)
        yield from _norm(f"{bp}/norm2", f"{bk}.norm2", d)
        yield from _linear(f"{bp}/mlp/fc1", f"{bk}.mlp.fc1", d, v.intermediate_size)
        yield from _linear(f"{bp}/mlp/fc2", f"{bk}.mlp.fc2", v.intermediate_size, d)
    yield from _norm(f"{p}/norm", f"{key}.norm", d)


def _attention_spec(path: str, key: str, d: int, kv: int) -> Iterator[Entry]:
    yield from _linear(f"{path}/self/query", f"{key}.self.query", d, d)
    yield from _linear(f"{path}/self/key", f"{key}.self.key", kv, d)
    yield from _linear(f"{path}/self/value", f"{key}.self.value", kv, d)
    yield from _linear(f"{path}/output/dense", f"{key}.output.dense", d, d)
    yield from _norm(f"{path}/output/LayerNorm", f"{key}.output.LayerNorm", d)


def _text_spec(t: TextConfig) -> Iterator[Entry]:
    p, d, key = "text_encoder", t.hidden_size, "blip.text_encoder"
    yield Entry(f"{p}/embeddings/word_embeddings/embedding", f"{key}.embeddings.word_embeddings.weight",
                (t.vocab_size, d))
    yield Entry(f"{p}/embeddings/position_embeddings/embedding", f"{key}.embeddings.position_embeddings.weight",
                (t.max_position_embeddings, d))
    yield from _norm(f"{p}/embeddings/LayerNorm", f"{key}.embeddings.LayerNorm", d)
    for i in range(t.num_hidden_layers):
        lp, lk = f"{p}/encoder/layer/{i}", f"{key}.encoder.layer.{i}"
        yield from _attention_spec(f"{lp}/attention", f"{lk}.attention", d, d)
        yield from _attention_spec(f"{lp}/crossattention", f"{lk}.crossattention", d, t.encoder_width)
        yield from _linear(f"{lp}/intermediate/dense", f"{lk}.intermediate.dense", d, t.intermediate_size)
        yield from _linear(f"{lp}/output/dense", f"{lk}.output.dense", t.intermediate_size, d)
        yield from _norm(f"{lp}/output/LayerNorm", f"{lk}.output.LayerNorm", d)


def param_spec(config: ImageRewardConfig) -> list[Entry]:
    """Every parameter of `ImageReward(config)`, in the module's naming, with its release key."""
    widths = (config.text.hidden_size, *config.mlp_hidden, 1)
    if len(widths) - 1 != len(MLP_RELEASE_INDICES):
        raise ValueError(f"the release's head has {len(MLP_RELEASE_INDICES)} linears; mlp_hidden "
                         f"{config.mlp_hidden} gives {len(widths) - 1}")
    head = [e for i, (a, b) in enumerate(zip(widths[:-1], widths[1:]))
            for e in _linear(f"mlp/layers/{i}", f"mlp.layers.{MLP_RELEASE_INDICES[i]}", a, b)]
    return [*_vision_spec(config.vision), *_text_spec(config.text), *head]


# ----------------------------------------------------------------------------------------------- conversion
def _from_release(kind: str, w: np.ndarray) -> np.ndarray:
    if kind == "linear" and w.ndim == 2:
        return w.T
    if kind == "conv" and w.ndim == 4:
        return w.transpose(2, 3, 1, 0)
    return w


def convert_state_dict(state_dict: Mapping[str, Any], config: ImageRewardConfig) -> dict[str, np.ndarray]:
    """The release's state dict -> {NNX path: float32 array} for `ImageReward(config)` (strict: every missing,
    unexpected and mis-shaped key in one UserError)."""
    keys = {k for k in state_dict if not k.endswith(IGNORED_SUFFIXES) and not k.startswith(UNUSED_PREFIXES)}
    missing, bad_shape, out = [], [], {}
    for e in param_spec(config):
        if e.key not in keys:
            missing.append(f"{e.key} (for {e.path}, shape {e.shape})")
            continue
        keys.discard(e.key)
        w = _from_release(e.kind, float32_array(state_dict[e.key]))
        if w.shape != e.shape:
            bad_shape.append(f"{e.key}: expected {e.shape} after conversion, got {w.shape} "
                             f"(stored {tuple(np.shape(state_dict[e.key]))})")
            continue
        out[e.path] = np.ascontiguousarray(w)
    if missing or keys or bad_shape:
        v, t = config.vision, config.text
        lines = [f"ImageReward state dict does not match the config (vision {v.hidden_size} wide x "
                 f"{v.num_hidden_layers} blocks, text {t.hidden_size} wide x {t.num_hidden_layers} layers):"]
        lines += [f"  missing: {m}" for m in missing]
        lines += [f"  unexpected: {k} shape {tuple(np.shape(state_dict[k]))}" for k in sorted(keys)]
        lines += [f"  mis-shaped: {b}" for b in bad_shape]
        raise UserError("\n".join(lines))
    return out


def read_release_state_dict(release_dir: str, *, trust_pickle: bool = False) -> dict[str, np.ndarray]:
    """Tensors of `ImageReward.pt` (or `model.safetensors`) in `release_dir` as float32 numpy arrays."""
    if not os.path.isdir(release_dir):
        raise FileNotFoundError(f"ImageReward release directory not found: {release_dir}")
    pt, st = (os.path.join(release_dir, n) for n in RELEASE_WEIGHTS)
    if os.path.isfile(st):
        return {k: float32_array(v) for k, v in load_safetensors(st, what="ImageReward weights").items()}
    if os.path.isfile(pt):
        sd = torch_load(pt, trust_pickle=trust_pickle, what="ImageReward weights")
        if isinstance(sd, Mapping) and isinstance(sd.get("state_dict"), Mapping):
            sd = sd["state_dict"]
        if not isinstance(sd, Mapping):
            raise UserError(f"ImageReward weights {pt} hold a {type(sd).__name__}, expected a state dict")
        return {k: float32_array(v) for k, v in sd.items()}
    raise FileNotFoundError(f"no ImageReward weights in {release_dir}: expected {' or '.join(RELEASE_WEIGHTS)} "
                            f"(found {sorted(os.listdir(release_dir))})")


def release_config(release_dir: str, config_json: str | None = None) -> ImageRewardConfig:
    """`config_json` (a whole ImageRewardConfig) if given; else the release's ViT-L/16 and BERT from
    `med_config.json` (defaults: bert-base as the release), `encoder_width` = the ViT's width."""
    if config_json:
        return ImageRewardConfig.from_json(config_json)
    med = os.path.join(release_dir, "med_config.json")
    text: dict[str, Any] = {}
    if os.path.isfile(med):
        with open(med) as f:
            raw = json.load(f)
        text = {k: raw[k] for k in MED_FIELDS if raw.get(k) is not None}
    text["encoder_width"] = VisionConfig().hidden_size
    return ImageRewardConfig.from_dict({"text": text})


def save_image_reward(out_dir: str, config: ImageRewardConfig, arrays: Mapping[str, np.ndarray],
                      vocab: str | None = None) -> None:
    """Write params.npz, config.json and (if given) a copy of `vocab` into `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    np.savez(os.path.join(out_dir, PARAMS_FILE), **{k: np.asarray(v, np.float32) for k, v in arrays.items()})
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(config.to_dict(), f, indent=2)
    if vocab is not None:
        shutil.copyfile(vocab, os.path.join(out_dir, VOCAB_FILE))


def load_image_reward_arrays(path: str) -> tuple[ImageRewardConfig, dict[str, np.ndarray]]:
    """(config, {NNX path: float32 array}) from a directory written by `save_image_reward`, checked against
    `param_spec(config)` (names and shapes)."""
    cfg_path, npz_path = os.path.join(path, CONFIG_FILE), os.path.join(path, PARAMS_FILE)
    for p in (cfg_path, npz_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"converted ImageReward checkpoint file not found: {p} "
                                    "(write it with python -m marval_jax.checkpoints.convert_image_reward)")
    config = ImageRewardConfig.from_json(cfg_path)
    stored = load_npz(npz_path, what="converted ImageReward weights")
    spec = {e.path: e.shape for e in param_spec(config)}
    missing = sorted(set(spec) - set(stored))
    unexpected = sorted(set(stored) - set(spec))
    bad = [f"{k}: expected {spec[k]}, got {stored[k].shape}" for k in sorted(set(spec) & set(stored))
           if stored[k].shape != spec[k]]
    if missing or unexpected or bad:
        raise UserError(f"{npz_path} does not match {cfg_path}: missing {missing}, unexpected {unexpected}, "
                        f"mis-shaped {bad}")
    return config, {k: np.asarray(v, np.float32) for k, v in stored.items()}


def convert_release(release_dir: str, out_dir: str, *, vocab: str | None = None, config_json: str | None = None,
                    trust_pickle: bool = False) -> ImageRewardConfig:
    """The command line's work: read, convert (strict), write; returns the config."""
    vocab = vocab or os.path.join(release_dir, VOCAB_FILE)
    if not os.path.isfile(vocab):
        raise FileNotFoundError(f"BERT vocabulary not found: {vocab} (pass --vocab with bert-base-uncased's "
                                "vocab.txt, which the release's tokenizer uses)")
    config = release_config(release_dir, config_json)
    arrays = convert_state_dict(read_release_state_dict(release_dir, trust_pickle=trust_pickle), config)
    save_image_reward(out_dir, config, arrays, vocab)
    return config


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--release-dir", required=True, help="folder with ImageReward.pt and med_config.json")
    parser.add_argument("--out", required=True, help="output folder for params.npz + config.json + vocab.txt")
    parser.add_argument("--vocab", default=None, help="bert-base-uncased vocab.txt (default: <release-dir>/vocab.txt)")
    parser.add_argument("--config", default=None, help="a whole ImageRewardConfig as JSON (default: the release's)")
    parser.add_argument("--trust_pickle", action="store_true",
                        help="unpickle ImageReward.pt fully instead of with weights_only=True: a pickle can "
                             "execute any code it names, so only for files from a source you trust")
    parser.add_argument("--verbose", action="store_true", help="print the traceback of a user error")
    args = parser.parse_args(argv)
    config = convert_release(args.release_dir, args.out, vocab=args.vocab, config_json=args.config,
                             trust_pickle=args.trust_pickle)
    n = sum(int(np.prod(e.shape)) for e in param_spec(config))
    print(f"converted {args.release_dir} -> {args.out}: {n / 1e6:.1f}M params, image {config.vision.image_size}px, "
          f"prompts of {config.max_length} tokens")


if __name__ == "__main__":
    run_cli(main)
