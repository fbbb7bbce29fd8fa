"""Params-only checkpoints (converted reference weights, exported EMA weights, the embedded default models).

A directory with `model.json` (the MARConfig fields it was built with) and the arrays either as `params/` (orbax, a
pure-dict pytree; large models, sharded restore) or as `params.npz` (one flat file of "a/b/c" keys, optionally
stored in float16: the small embedded models, and files that must travel as single files). Loading checks the model
config first, so a checkpoint of another architecture gives one clear error, then casts to the model's dtypes.

A one-step generator's parameterisation (`GENERATOR_RECORD`: generator.t_init, generator.noise_scale) is part of its
weights' meaning: a run workdir records it in every checkpoint's config, and an export records it under "generator"
in model.json (taken from the source it was exported from). `recorded_generator` reads it back from either, for
the consumers (sampling, evaluation, RL's student, demo, tools) that must sample with the values it was trained with.
Directories are etils.epath paths: local or gs:// (a remote params.npz is read through a local temporary copy).
"""
from __future__ import annotations

import io
import json
import os
import re
import tempfile

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import nnx

from marval_jax.checkpoints.manager import check_config
from marval_jax.checkpoints.safe_load import load_npz
from marval_jax.tree_paths import flatten_state, unflatten_into_state
from marval_jax.user_errors import UserError


def _dir(directory) -> epath.Path:
    """Local paths made absolute (orbax wants them so); URLs (gs://...) as given."""
    directory = os.fspath(directory)
    return epath.Path(directory if "://" in directory else os.path.abspath(os.path.expanduser(directory)))


def save_params(directory: str, params: nnx.State, model_config: dict, extra: dict | None = None,
                fmt: str = "orbax", dtype: str | None = None) -> str:
    """fmt "orbax" (params/) or "npz" (params.npz); dtype e.g. "float16" stores floating leaves in that type (npz).

    The generator record (`GENERATOR_RECORD` fields) is `extra["generator"]` when given, else the one of
    `extra["exported_from"]` (a run workdir or params directory) when that has one."""
    directory = _dir(directory)
    source = (extra or {}).get("exported_from")
    if source and "generator" not in extra:
        record = recorded_generator(source)
        if record is not None:
            extra = {**extra, "generator": record}
    directory.mkdir(parents=True, exist_ok=True)
    if fmt == "npz":
        flat = {k: np.asarray(jax.device_get(v)) for k, v in flatten_state(params).items()}
        if dtype:
            flat = {k: v.astype(dtype) if np.issubdtype(v.dtype, np.floating) else v for k, v in flat.items()}
        buf = io.BytesIO()
        np.savez(buf, **flat)
        (directory / "params.npz").write_bytes(buf.getvalue())
        extra = {**(extra or {}), "stored_dtype": dtype or "as trained"}
    elif fmt == "orbax":
        if dtype:
            raise ValueError("dtype conversion is only for fmt='npz'")
        with ocp.StandardCheckpointer() as ckptr:
            ckptr.save(directory / "params", nnx.to_pure_dict(params), force=True)
    else:
        raise ValueError(f"fmt must be 'orbax' or 'npz', got {fmt!r}")
    (directory / "model.json").write_text(json.dumps({"model": model_config, **(extra or {})}, indent=1,
                                                     sort_keys=True))
    return str(directory)


def read_model_config(directory: str) -> dict:
    path = _dir(directory) / "model.json"
    if not path.exists():
        raise FileNotFoundError(f"{directory} is not a params checkpoint (no model.json); convert one with "
                                f"python -m marval_jax.tools.convert_mar or export one from a run")
    return json.loads(path.read_text())["model"]


def load_params(directory: str, abstract_params: nnx.State, model_config: dict) -> nnx.State:
    """Params of `directory` as an nnx.State shaped like `abstract_params` (checked against `model_config`)."""
    directory = _dir(directory)
    check_config({"model": read_model_config(directory)}, {"model": model_config},
                 where=f"(params) {directory}")
    npz = directory / "params.npz"
    if npz.exists():
        if "://" in str(npz):  # the safe reader checks a local file: read a local copy of the object
            with tempfile.TemporaryDirectory() as tmp:
                local = os.path.join(tmp, "params.npz")
                with open(local, "wb") as f:
                    f.write(npz.read_bytes())
                flat = load_npz(local, what=f"params file {npz}")
        else:
            flat = load_npz(npz, what="params file")
        want = flatten_state(abstract_params)
        missing, extra = sorted(set(want) - set(flat)), sorted(set(flat) - set(want))
        if missing or extra:
            raise UserError(f"{npz} does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
        for k, v in want.items():
            if tuple(flat[k].shape) != tuple(v.shape):
                raise UserError(f"{npz}: {k} has shape {flat[k].shape}, the model wants {tuple(v.shape)}")
        return unflatten_into_state(abstract_params,
                                    {k: jax.numpy.asarray(flat[k], dtype=v.dtype) for k, v in want.items()})
    # each leaf restored into its current sharding (replicated over all devices where it has none), never the
    # saved one: an export written by 1 process x 8 devices loads on 2 processes x 4 and the other way round
    target = jax.tree_util.tree_map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=current_sharding(x)),
                                    nnx.to_pure_dict(abstract_params))
    with ocp.StandardCheckpointer() as ckptr:
        pure = ckptr.restore(directory / "params", target)
    out = jax.tree_util.tree_map(lambda x: x, abstract_params)
    nnx.replace_by_pure_dict(out, pure)
    return out


def current_sharding(x) -> jax.sharding.Sharding:
    """`x`'s own sharding, or one replicating it over every device of every process (an abstract leaf without one)."""
    s = getattr(x, "sharding", None)
    if isinstance(s, jax.sharding.Sharding):
        return s
    mesh = jax.sharding.Mesh(np.asarray(jax.devices()), ("all",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


GENERATOR_RECORD = ("t_init", "noise_scale")   # the one-step generator's fields a checkpoint records


def _latest_step_dir(workdir: epath.Path) -> epath.Path | None:
    root = workdir / "checkpoints"
    if not root.is_dir():
        return None
    steps = sorted((int(p.name) for p in root.iterdir() if re.fullmatch(r"\d+", p.name)
                    and (p / "config" / "metadata").exists()), reverse=True)
    return root / str(steps[0]) if steps else None


def recorded_generator(path: str) -> dict | None:
    """{t_init, noise_scale} a checkpoint records for its one-step generator, or None where it records none (a
    teacher, an export from before the record existed, a missing path). `path` (local or gs://): a params directory
    (model.json's "generator") or a run workdir (the latest checkpoint's config section `generator`; noise_scale 1
    where the run predates that field)."""
    if not path:
        return None
    path = _dir(path)
    meta = path / "model.json"
    if meta.exists():
        rec = json.loads(meta.read_text()).get("generator")
    else:
        step_dir = _latest_step_dir(path)
        if step_dir is None:
            return None
        rec = json.loads((step_dir / "config" / "metadata").read_text()).get("generator")
        if rec is None or int(rec.get("t_init", -1)) < 0:
            return None
        rec = {"t_init": rec["t_init"], "noise_scale": rec.get("noise_scale", 1.0)}
    if not rec:
        return None
    return {"t_init": int(rec["t_init"]), "noise_scale": float(rec.get("noise_scale", 1.0))}
