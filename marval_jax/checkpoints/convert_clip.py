"""Convert transformers `CLIPModel` weights (OpenAI CLIP, LAION CLIP, PickScore) into `marval_jax.models.clip`.

    python -m marval_jax.checkpoints.convert_clip --hf-dir /path/to/PickScore_v1 --out /path/to/pickscore_jax

The input is a transformers checkpoint directory (`config.json` + `model.safetensors`, a sharded
`model.safetensors.index.json`, or `pytorch_model.bin` (needs torch; read with `weights_only=True`, so no code
from the file runs; `--trust_pickle` unpickles fully, for trusted files only)), or an in-memory state dict with a
config. The output directory holds `params.npz`
(float32, keys are '/'-joined NNX parameter paths) and `config.json` (`CLIPConfig.to_dict()`); `load_clip(out)`
rebuilds the module.

Conversion is strict: every missing, unexpected and mis-shaped key is listed in one ValueError. transformers'
non-persistent `position_ids` buffers (saved by old checkpoints) are ignored.
"""
from __future__ import annotations

import argparse
import json
import os
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from marval_jax.checkpoints.safe_load import float32_array, load_npz, load_safetensors, torch_load
from marval_jax.models.clip import CLIP, CLIPConfig
from marval_jax.user_errors import UserError, run_cli

PARAMS_FILE = "params.npz"
CONFIG_FILE = "config.json"
IGNORED_SUFFIXES = ("position_ids",)


def _abstract(config: CLIPConfig):
    model = nnx.eval_shape(lambda: CLIP(config, rngs=nnx.Rngs(0)))
    return nnx.split(model)


def hf_key(path: tuple) -> str:
    """NNX parameter path -> transformers state-dict key."""
    *head, leaf = (str(p) for p in path)
    leaf = {"kernel": "weight", "scale": "weight", "embedding": "weight"}.get(leaf, leaf)
    return ".".join([*head, leaf])


def _from_hf(leaf: str, w: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and w.ndim == 2:  # Linear (out, in) -> (in, out)
        return w.T
    if leaf == "kernel" and w.ndim == 4:  # Conv2d (out, in, kh, kw) -> (kh, kw, in, out)
        return w.transpose(2, 3, 1, 0)
    return w


def convert_state_dict(state_dict: Mapping[str, Any], config: CLIPConfig) -> nnx.State:
    """transformers `CLIPModel.state_dict()` -> float32 NNX param state for `CLIP(config)` (strict)."""
    graphdef, abstract = _abstract(config)
    flat = list(nnx.to_flat_state(abstract))
    keys = {k for k in state_dict if not k.endswith(IGNORED_SUFFIXES)}
    missing, bad_shape, out = [], [], []
    for path, var in flat:
        key = hf_key(path)
        if key not in keys:
            missing.append(f"{key} (expected for {'/'.join(map(str, path))}, shape {tuple(var.shape)})")
            continue
        keys.discard(key)
        w = _from_hf(str(path[-1]), float32_array(state_dict[key]))
        if w.shape != tuple(var.shape):
            bad_shape.append(f"{key}: expected {tuple(var.shape)} after conversion, got {w.shape} "
                             f"(stored {tuple(np.shape(state_dict[key]))})")
            continue
        out.append((path, var.replace(jnp.asarray(w))))
    if missing or keys or bad_shape:
        lines = [f"CLIP state dict does not match the config (projection_dim={config.projection_dim}, "
                 f"text hidden={config.text.hidden_size}, vision hidden={config.vision.hidden_size}):"]
        lines += [f"  missing: {m}" for m in missing]
        lines += [f"  unexpected: {k} shape {tuple(np.shape(state_dict[k]))}" for k in sorted(keys)]
        lines += [f"  mis-shaped: {b}" for b in bad_shape]
        raise ValueError("\n".join(lines))
    return nnx.from_flat_state(out)


def read_hf_state_dict(hf_dir: str, *, trust_pickle: bool = False) -> dict[str, np.ndarray]:
    """Tensors of a transformers checkpoint directory as float32 numpy arrays (pytorch_model.bin is unpickled
    fully only with `trust_pickle`)."""
    if not os.path.isdir(hf_dir):
        raise FileNotFoundError(f"transformers checkpoint directory not found: {hf_dir}")
    st_file, st_index = os.path.join(hf_dir, "model.safetensors"), os.path.join(hf_dir, "model.safetensors.index.json")
    pt_file, pt_index = os.path.join(hf_dir, "pytorch_model.bin"), os.path.join(hf_dir, "pytorch_model.bin.index.json")
    if os.path.isfile(st_file) or os.path.isfile(st_index):
        files = [st_file] if os.path.isfile(st_file) else _shards(st_index)
        out = {}
        for f in files:
            out.update({k: float32_array(v) for k, v in load_safetensors(f, what="CLIP weights").items()})
        return out
    if os.path.isfile(pt_file) or os.path.isfile(pt_index):
        files = [pt_file] if os.path.isfile(pt_file) else _shards(pt_index)
        out = {}
        for f in files:
            sd = torch_load(f, trust_pickle=trust_pickle, what="CLIP weights")
            if not isinstance(sd, Mapping):
                raise UserError(f"CLIP weights {f} hold a {type(sd).__name__}, expected a state dict")
            out.update({k: float32_array(v) for k, v in sd.items()})
        return out
    raise FileNotFoundError(f"no weights in {hf_dir}: expected model.safetensors, model.safetensors.index.json, "
                            f"pytorch_model.bin or pytorch_model.bin.index.json (found {sorted(os.listdir(hf_dir))})")


def _shards(index_path: str) -> list[str]:
    with open(index_path) as f:
        names = sorted(set(json.load(f)["weight_map"].values()))
    files = [os.path.join(os.path.dirname(index_path), n) for n in names]
    for f in files:
        if not os.path.isfile(f):
            raise FileNotFoundError(f"shard {f} listed in {index_path} is missing")
    return files


def convert_hf_dir(hf_dir: str, *, trust_pickle: bool = False) -> tuple[CLIPConfig, nnx.State]:
    """A transformers CLIP directory -> (config, params); image mean / std from `preprocessor_config.json`."""
    cfg_path = os.path.join(hf_dir, "config.json")
    if not os.path.isfile(cfg_path):
        raise FileNotFoundError(f"transformers CLIP config not found: {cfg_path}")
    with open(cfg_path) as f:
        hf_config = json.load(f)
    pre_path = os.path.join(hf_dir, "preprocessor_config.json")
    if os.path.isfile(pre_path):
        with open(pre_path) as f:
            pre = json.load(f)
        for key in ("image_mean", "image_std"):
            if pre.get(key) is not None:
                hf_config[key] = pre[key]
    config = CLIPConfig.from_hf_dict(hf_config)
    return config, convert_state_dict(read_hf_state_dict(hf_dir, trust_pickle=trust_pickle), config)


def save_clip(out_dir: str, config: CLIPConfig, params: nnx.State) -> None:
    os.makedirs(out_dir, exist_ok=True)
    arrays = {"/".join(map(str, p)): np.asarray(v.get_value() if hasattr(v, "get_value") else v.value)
              for p, v in nnx.to_flat_state(params)}
    np.savez(os.path.join(out_dir, PARAMS_FILE), **arrays)
    with open(os.path.join(out_dir, CONFIG_FILE), "w") as f:
        json.dump(config.to_dict(), f, indent=2)


def load_clip_params(path: str) -> tuple[CLIPConfig, nnx.State]:
    """(config, float32 params) from a directory written by `save_clip` / the command line."""
    cfg_path, npz_path = os.path.join(path, CONFIG_FILE), os.path.join(path, PARAMS_FILE)
    for p in (cfg_path, npz_path):
        if not os.path.isfile(p):
            raise FileNotFoundError(f"converted CLIP checkpoint file not found: {p} "
                                    "(write it with python -m marval_jax.checkpoints.convert_clip)")
    config = CLIPConfig.from_json(cfg_path)
    _, abstract = _abstract(config)
    stored = load_npz(npz_path, what="converted CLIP weights")
    out, missing, bad = [], [], []
    for p, var in nnx.to_flat_state(abstract):
        key = "/".join(map(str, p))
        if key not in stored:
            missing.append(key)
            continue
        w = stored.pop(key)
        if w.shape != tuple(var.shape):
            bad.append(f"{key}: expected {tuple(var.shape)}, got {w.shape}")
            continue
        out.append((p, var.replace(jnp.asarray(w, jnp.float32))))
    if missing or stored or bad:
        raise ValueError(f"{npz_path} does not match {cfg_path}: missing {missing}, unexpected {sorted(stored)}, "
                         f"mis-shaped {bad}")
    return config, nnx.from_flat_state(out)


def load_clip(path: str, dtype: Any = jnp.float32) -> CLIP:
    """The `CLIP` module with converted weights (float32 params; compute `dtype`)."""
    config, params = load_clip_params(path)
    graphdef, _ = nnx.split(nnx.eval_shape(lambda: CLIP(config, rngs=nnx.Rngs(0), dtype=dtype)))
    return nnx.merge(graphdef, params)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hf-dir", required=True, help="transformers CLIPModel directory (config.json + weights)")
    parser.add_argument("--out", required=True, help="output directory for params.npz + config.json")
    parser.add_argument("--trust_pickle", action="store_true",
                        help="unpickle pytorch_model.bin fully instead of with weights_only=True: a pickle can "
                             "execute any code it names, so only for files from a source you trust")
    parser.add_argument("--verbose", action="store_true", help="print the traceback of a user error")
    args = parser.parse_args(argv)
    config, params = convert_hf_dir(args.hf_dir, trust_pickle=args.trust_pickle)
    save_clip(args.out, config, params)
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(params))
    print(f"converted {args.hf_dir} -> {args.out}: {n / 1e6:.1f}M params, image {config.vision.image_size}px, "
          f"projection {config.projection_dim}")


if __name__ == "__main__":
    run_cli(main)
