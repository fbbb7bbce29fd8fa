"""PyTorch (LDM / MAR ``kl16.ckpt``) VAE state_dict -> ``marval_jax.models.vae.AutoencoderKL`` parameters.

The module tree mirrors the PyTorch key names, so a Flax parameter path maps to a key directly:
``encoder/down/2/block/0/conv1/kernel`` <-> ``encoder.down.2.block.0.conv1.weight``.
Rules (``docs/method.md`` section R7): Conv2d weight (out, in, kh, kw) -> kernel (kh, kw, in, out);
GroupNorm weight -> ``scale``; biases unchanged. Keys the model does not use (the real checkpoint is loaded with
``strict=False`` and may carry e.g. ``loss.*``) are ignored with one warning; missing or mis-shaped keys raise one
``ValueError`` listing all of them.
"""
from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from marval_jax.checkpoints.safe_load import load_npz, load_safetensors, torch_load
from marval_jax.models.mar import MARConfig
from marval_jax.models.vae import AutoencoderKL
from marval_jax.models.vae_tokenizer import vae_decode_fn
from marval_jax.user_errors import UserError

_NPZ_PREFIX = "vae_param/"


def _key_part(k: Any) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _torch_key(path: tuple[str, ...]) -> str:
    *mods, leaf = path
    name = {"kernel": "weight", "scale": "weight", "bias": "bias"}[leaf]
    return ".".join([*mods, name])


def _to_flax(leaf: str, value: np.ndarray) -> np.ndarray:
    if leaf == "kernel" and value.ndim == 4:
        return np.transpose(value, (2, 3, 1, 0))  # (out, in, kh, kw) -> (kh, kw, in, out)
    return value


def _expected_torch_shape(leaf: str, shape: tuple[int, ...]) -> tuple[int, ...]:
    if leaf == "kernel" and len(shape) == 4:
        kh, kw, cin, cout = shape
        return (cout, cin, kh, kw)
    return tuple(shape)


def convert_vae_state_dict(state_dict: Mapping[str, Any], model: AutoencoderKL) -> nnx.State:
    """The ``nnx.Param`` state of ``model`` filled from a PyTorch-layout VAE ``state_dict``.

    ``model`` may be abstract (``nnx.eval_shape``); only its structure and shapes are read. Values may be numpy
    arrays or anything ``np.asarray`` accepts (CPU torch tensors). Use ``nnx.update(model, state)`` or
    ``nnx.merge(graphdef, state)`` to get a loaded model (``load_vae_state_dict`` does this).
    """
    state = nnx.state(model, nnx.Param)
    pure = nnx.to_pure_dict(state)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(pure)
    paths = [tuple(_key_part(k) for k in p) for p, _ in leaves]

    used: set[str] = set()
    missing: list[str] = []
    mis_shaped: list[str] = []
    new_leaves = []
    for path, (_, target) in zip(paths, leaves):
        key = _torch_key(path)
        want = _expected_torch_shape(path[-1], tuple(target.shape))
        if key not in state_dict:
            missing.append(f"{key} (expected shape {want})")
            new_leaves.append(None)
            continue
        used.add(key)
        value = np.asarray(state_dict[key])
        if tuple(value.shape) != want:
            mis_shaped.append(f"{key}: expected shape {want}, got {tuple(value.shape)}")
            new_leaves.append(None)
            continue
        new_leaves.append(jnp.asarray(_to_flax(path[-1], value), dtype=target.dtype))

    if missing or mis_shaped:
        lines = []
        if missing:
            lines.append(f"{len(missing)} missing key(s):\n  " + "\n  ".join(missing))
        if mis_shaped:
            lines.append(f"{len(mis_shaped)} mis-shaped key(s):\n  " + "\n  ".join(mis_shaped))
        try:
            hint = f" (the state_dict looks like {infer_vae_config(state_dict)})"
        except (ValueError, KeyError, IndexError):
            hint = ""
        raise UserError("convert_vae_state_dict: the state_dict does not fit the model "
                         f"(ch={model.ch}, ch_mult={model.ch_mult}, num_res_blocks={model.num_res_blocks}, "
                         f"embed_dim={model.embed_dim}, attn_levels={model.attn_levels}){hint}.\n"
                         + "\n".join(lines))

    unknown = sorted(k for k in state_dict if k not in used)
    if unknown:
        shown = ", ".join(unknown[:20]) + (f", ... ({len(unknown) - 20} more)" if len(unknown) > 20 else "")
        warnings.warn(f"convert_vae_state_dict: ignoring {len(unknown)} key(s) the VAE does not use: {shown}",
                      stacklevel=2)

    nnx.replace_by_pure_dict(state, jax.tree_util.tree_unflatten(treedef, new_leaves))
    return state


def load_vae_state_dict(model: AutoencoderKL, state_dict: Mapping[str, Any]) -> AutoencoderKL:
    """Converts ``state_dict`` into ``model`` in place (``model`` must be concrete) and returns it."""
    nnx.update(model, convert_vae_state_dict(state_dict, model))
    return model


def infer_vae_config(state_dict: Mapping[str, Any]) -> dict[str, Any]:
    """``AutoencoderKL`` constructor arguments read off a PyTorch VAE state_dict (ch, ch_mult, num_res_blocks,
    embed_dim, attn_levels)."""
    need = ["encoder.conv_in.weight", "post_quant_conv.weight"]
    absent = [k for k in need if k not in state_dict]
    if absent:
        raise UserError(f"infer_vae_config: not a VAE state_dict, missing {absent}")
    ch = int(np.shape(state_dict["encoder.conv_in.weight"])[0])
    levels: dict[int, int] = {}
    blocks: set[int] = set()
    attn: set[int] = set()
    for k in state_dict:
        m = re.fullmatch(r"encoder\.down\.(\d+)\.block\.(\d+)\.conv1\.weight", k)
        if m:
            if m.group(2) == "0":
                levels[int(m.group(1))] = int(np.shape(state_dict[k])[0]) // ch
            if m.group(1) == "0":
                blocks.add(int(m.group(2)))
        m = re.fullmatch(r"encoder\.down\.(\d+)\.attn\.\d+\.q\.weight", k)
        if m:
            attn.add(int(m.group(1)))
    return dict(ch=ch, ch_mult=tuple(levels[i] for i in sorted(levels)), num_res_blocks=len(blocks),
                embed_dim=int(np.shape(state_dict["post_quant_conv.weight"])[0]), attn_levels=tuple(sorted(attn)))


def build_vae(state_dict: Mapping[str, Any], *, dtype: Any = jnp.float32, **config: Any) -> AutoencoderKL:
    """An ``AutoencoderKL`` holding ``state_dict``'s weights without a random initialisation first. Constructor
    arguments not given in ``config`` are inferred from the keys (``infer_vae_config``)."""
    kwargs = {**infer_vae_config(state_dict), **config}
    abstract = nnx.eval_shape(lambda: AutoencoderKL(**kwargs, dtype=dtype, rngs=nnx.Rngs(0)))
    state = convert_vae_state_dict(state_dict, abstract)
    graphdef, _ = nnx.split(abstract)
    return nnx.merge(graphdef, state)


def _torch_to_numpy(sd: Mapping[str, Any]) -> dict[str, np.ndarray]:
    import torch

    out = {}
    for k, v in sd.items():
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu()
            if v.dtype in (torch.bfloat16, torch.float16):
                v = v.float()
            out[k] = v.numpy()
    return out


def load_vae_checkpoint(path: str | os.PathLike, *, trust_pickle: bool = False,
                        trust_hint: str = "--trust_pickle") -> dict[str, np.ndarray]:
    """Reads a VAE state_dict as ``{PyTorch key: numpy array}``.

    * ``.ckpt`` / ``.pth`` / ``.pt`` / ``.bin`` (MAR's ``kl16.ckpt``): a torch pickle; the state_dict is under
      ``"model"`` (``"state_dict"``, as in Lightning checkpoints, and a bare state_dict are accepted too). Needs
      torch (imported lazily). Read with ``torch.load(weights_only=True)`` (``safe_load.torch_load``): tensors,
      containers, primitives and the allow-listed ``safe_load.SAFE_GLOBALS`` only. ``trust_pickle=True`` unpickles
      fully, which can execute code from the file: only for files from a source you trust. ``trust_hint`` is what
      the refusal message tells the user to set (a tool's flag or a config field).
    * ``.safetensors``: the same keys, read with ``safetensors.numpy`` (no torch).
    * ``.npz``: the same keys; if any key starts with ``vae_param/`` (the reference fixture), only those are used,
      with the prefix removed.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"load_vae_checkpoint: no such file: {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".safetensors":
        return load_safetensors(path, what="VAE weights")
    if ext == ".npz":
        data = load_npz(path, what="VAE weights")
        if any(k.startswith(_NPZ_PREFIX) for k in data):
            return {k[len(_NPZ_PREFIX):]: v for k, v in data.items() if k.startswith(_NPZ_PREFIX)}
        return data
    if ext in (".ckpt", ".pth", ".pt", ".bin"):
        ckpt = torch_load(path, trust_pickle=trust_pickle, what="VAE checkpoint", trust_hint=trust_hint)
        if isinstance(ckpt, Mapping):
            for key in ("model", "state_dict"):
                if key in ckpt and isinstance(ckpt[key], Mapping):
                    return _torch_to_numpy(ckpt[key])
            return _torch_to_numpy(ckpt)
        raise UserError(f"load_vae_checkpoint: {path} holds a {type(ckpt).__name__}, expected a dict with a "
                        "'model' state_dict")
    raise UserError(f"load_vae_checkpoint: unsupported extension {ext!r} for {path}; "
                    "expected .ckpt/.pth/.pt/.bin, .safetensors or .npz")


def load_vae(path: str | os.PathLike, *, dtype: Any = jnp.float32, trust_pickle: bool = False,
             trust_hint: str = "--trust_pickle", **config: Any) -> AutoencoderKL:
    """``build_vae(load_vae_checkpoint(path))``."""
    return build_vae(load_vae_checkpoint(path, trust_pickle=trust_pickle, trust_hint=trust_hint), dtype=dtype,
                     **config)


def vae_decoder_parts(tok_cfg, mar_cfg: MARConfig):
    """(decode(params, tokens) -> NHWC images, params): the KL-16 decoder as a pure function of its weights, for jitted
    steps that take the weights as an argument (closed over, they would be baked into the program as constants).
    tok_cfg: tokenizer config (vae_ckpt: kl16.ckpt / .safetensors / .npz; scale; trust_pickle, default False: a .ckpt
    is read with torch.load(weights_only=True), and fully unpickled, which can run code from the file, only when
    tokenizer.trust_pickle is True)."""
    if not tok_cfg.vae_ckpt:
        raise UserError("tokenizer.kind='vae' needs tokenizer.vae_ckpt (MAR's kl16.ckpt or a converted .npz)")
    trust = bool(getattr(tok_cfg, "trust_pickle", False))
    graphdef, state = nnx.split(load_vae(tok_cfg.vae_ckpt, trust_pickle=trust,
                                         trust_hint="tokenizer.trust_pickle=True in the config"))
    return vae_decode_fn(graphdef, float(tok_cfg.scale), mar_cfg), state


def make_vae_decoder(tok_cfg, mar_cfg: MARConfig):
    """tokens -> images with the weights closed over (grids and small programs)."""
    decode, params = vae_decoder_parts(tok_cfg, mar_cfg)
    return lambda tokens: decode(params, tokens)


def _max_rel_err(a: Any, b: Any) -> float:
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"vae_parity: shape mismatch {a.shape} vs reference {b.shape}")
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def vae_parity(fixture: Mapping[str, Any]) -> list[tuple[str, float]]:
    """Max relative error (max|a - b| / max|b|) of this VAE against a reference fixture (``mar_reference_*.npz``
    layout) for ``post_mean``, ``post_logvar`` (encode of ``vae_io/image``) and ``decoded`` (decode of
    ``vae_io/z``), in float32.

    The model is built from ``config_json`` (``vae_ch``, ``vae_ch_mult``; embed_dim from ``post_quant_conv``, else
    ``vae_embed_dim``, else 16); the attention levels are read off the ``vae_param/`` keys.
    """
    raw = fixture["config_json"]
    raw = raw.item() if hasattr(raw, "item") else raw
    cfg = json.loads(raw.decode() if isinstance(raw, bytes) else str(raw))
    sd = {k[len(_NPZ_PREFIX):]: np.asarray(fixture[k]) for k in fixture.keys() if k.startswith(_NPZ_PREFIX)}
    if "post_quant_conv.weight" in sd:
        embed_dim = int(sd["post_quant_conv.weight"].shape[0])
    else:
        embed_dim = int(cfg.get("vae_embed_dim", 16))
    attn_levels = tuple(sorted({int(m.group(1)) for k in sd
                                if (m := re.fullmatch(r"encoder\.down\.(\d+)\.attn\.\d+\.q\.weight", k))}))
    vae = build_vae(sd, ch=int(cfg["vae_ch"]), ch_mult=tuple(int(m) for m in cfg["vae_ch_mult"]),
                    num_res_blocks=2, embed_dim=embed_dim, attn_levels=attn_levels)

    def nhwc(name: str) -> np.ndarray:
        return np.transpose(np.asarray(fixture[name], np.float32), (0, 2, 3, 1))

    image = nhwc("vae_io/image")
    if image.shape[1] != int(cfg.get("vae_img", image.shape[1])):
        raise ValueError(f"vae_parity: vae_io/image is {image.shape[1]} px, "
                         f"config_json says vae_img={cfg['vae_img']}")
    graphdef, state = nnx.split(vae)

    @jax.jit
    def run(state, image, z):
        model = nnx.merge(graphdef, state)
        return model.encode(image), model.decode(z)

    posterior, decoded = run(state, image, nhwc("vae_io/z"))
    return [
        ("post_mean", _max_rel_err(posterior.mean, nhwc("vae_io/post_mean"))),
        ("post_logvar", _max_rel_err(posterior.logvar, nhwc("vae_io/post_logvar"))),
        ("decoded", _max_rel_err(decoded, nhwc("vae_io/decoded"))),
    ]
