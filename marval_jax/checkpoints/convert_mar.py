"""Convert reference MAR checkpoints (PyTorch state_dict layout) into our MAR parameters.

Sources: a `.pth` with `model` / `model_ema` (needs torch; read with `torch.load(weights_only=True)` and the
reference's pickled `argparse.Namespace` allow-listed, see `safe_load`; `trust_pickle=True` unpickles fully, for
trusted files only), or the same keys in `.safetensors` / `.npz` (no torch). Conversion is strict: every missing,
unexpected and mis-shaped key is listed in one error.

Layout rules: Linear weight (out, in) -> kernel (in, out); LayerNorm weight -> scale; Embedding weight ->
embedding; nn.Sequential indices become `_N` suffixes (`time_embed.mlp.0` -> `time_embed_0`,
`adaLN_modulation.1` -> `adaLN_modulation_1`, `mlp.0` -> `mlp_0`); `diffloss.net.` -> `diffloss_net/`.
"""
from __future__ import annotations

import os
import re
from typing import Mapping

import jax
import numpy as np
from flax import nnx

from marval_jax.checkpoints.safe_load import load_npz, load_safetensors, torch_load
from marval_jax.tree_paths import flatten_state, unflatten_into_state
from marval_jax.user_errors import UserError


class CheckpointMismatchError(UserError):
    """The checkpoint does not fit the model built from the config."""


def torch_key_to_path(key: str) -> str:
    k = key.replace("diffloss.net.", "diffloss_net.")
    k = re.sub(r"time_embed\.mlp\.(\d+)", r"time_embed_\1", k)
    k = re.sub(r"adaLN_modulation\.(\d+)", r"adaLN_modulation_\1", k)
    k = re.sub(r"\.mlp\.(\d+)\.", r".mlp_\1.", k)
    return k.replace(".", "/")


def convert_state_dict(state_dict: Mapping[str, np.ndarray], target: Mapping[str, np.ndarray],
                       what: str = "checkpoint") -> dict[str, np.ndarray]:
    """Map a reference state_dict onto the flat target {path: array-like with .shape}. Strict."""
    out, unexpected, misshaped = {}, [], []
    for key, value in state_dict.items():
        value = np.asarray(value)
        base = torch_key_to_path(key)
        stem, leaf = base.rsplit("/", 1) if "/" in base else ("", base)
        prefix = f"{stem}/" if stem else ""
        if leaf == "weight" and f"{prefix}kernel" in target:
            path, value = f"{prefix}kernel", value.T
        elif leaf == "weight" and f"{prefix}scale" in target:
            path = f"{prefix}scale"
        elif leaf == "weight" and f"{prefix}embedding" in target:
            path = f"{prefix}embedding"
        elif base in target:
            path = base
        else:
            unexpected.append(key)
            continue
        if tuple(value.shape) != tuple(target[path].shape):
            misshaped.append(f"{key}: checkpoint {tuple(value.shape)} vs model {tuple(target[path].shape)} ({path})")
            continue
        out[path] = value.astype(np.float32)
    missing = sorted(set(target) - set(out) - {p for p in target if any(m.endswith(p) for m in misshaped)})
    if missing or unexpected or misshaped:
        parts = []
        for title, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped)):
            if items:
                parts.append(f"{len(items)} {title}: " + ", ".join(items[:20]) + (" ..." if len(items) > 20 else ""))
        raise CheckpointMismatchError(f"{what} does not match the model config ({'; '.join(parts)}); use the model "
                                      "config the checkpoint was trained with")
    return out


def load_state_dict(path: str, which: str = "model_ema", prefix: str = "", *,
                    trust_pickle: bool = False) -> dict[str, np.ndarray]:
    """Read `which` ("model" | "model_ema") from a .pth / .safetensors / .npz reference checkpoint.

    For .safetensors / .npz the keys may be bare (a state_dict) or prefixed with `which.` or `which/`;
    `prefix` selects a sub-tree (e.g. "param/" for the parity fixtures). A .pth is never unpickled fully unless
    `trust_pickle` (pickles can run code).
    """
    if not os.path.exists(path):
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext in (".pth", ".pt", ".ckpt"):
        obj = torch_load(path, trust_pickle=trust_pickle, what="checkpoint")
        if isinstance(obj, dict) and which in obj:
            obj = obj[which]
        elif isinstance(obj, dict) and ("model" in obj or "model_ema" in obj):
            raise UserError(f"checkpoint {path} has no {which!r}; it has "
                            f"{sorted(k for k in obj if isinstance(k, str))}: pick another --which")
        if not isinstance(obj, dict):
            raise UserError(f"checkpoint {path} holds a {type(obj).__name__}, expected a state_dict or a dict with "
                            "'model' / 'model_ema' state_dicts")
        not_tensors = [k for k, v in obj.items() if not hasattr(v, "detach")]
        if not_tensors:
            raise UserError(f"checkpoint {path}: the state_dict holds non-tensor entries {not_tensors[:5]}, "
                            "expected tensors only")
        flat = {k: v.detach().float().cpu().numpy() for k, v in obj.items()}
    elif ext == ".safetensors":
        flat = load_safetensors(path, what="checkpoint")
    elif ext == ".npz":
        flat = load_npz(path, what="checkpoint")
    else:
        raise UserError(f"unsupported checkpoint extension {ext!r} ({path}): use .pth, .safetensors or .npz")
    if prefix:
        flat = {k[len(prefix):]: v for k, v in flat.items() if k.startswith(prefix)}
    for sep in (".", "/"):
        sub = {k[len(which) + 1:]: v for k, v in flat.items() if k.startswith(which + sep)}
        if sub:
            return sub
    if not flat:
        raise CheckpointMismatchError(f"{path} holds no tensors under prefix {prefix!r}")
    return flat


def load_into_model(model: nnx.Module, state_dict: Mapping[str, np.ndarray], what: str = "checkpoint") -> None:
    """Convert and write the weights into `model`'s parameters (in place, at construction time only)."""
    params = nnx.state(model, nnx.Param)
    target = flatten_state(params)
    converted = convert_state_dict(state_dict, target, what)
    nnx.update(model, unflatten_into_state(params, {k: jax.numpy.asarray(v) for k, v in converted.items()}))
