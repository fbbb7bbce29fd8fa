"""The cases of the scale check: command-line value parsing, the model table, and building one case (device count,
model, step) abstractly and compiling it on a forced-CPU mesh (`run_case`)."""
from __future__ import annotations

import dataclasses
import math
import os
import re
import sys
import time
from typing import Any
from marval_jax.user_errors import UserError


def _root() -> str:
    """The repository root (this package lives in marval_jax/tools/scale_check/)."""
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))


HBM_DEFAULT = "v5p=95,v5e=16,v4=32,h200=141"


STEPS = ("mar", "mar_fix", "gsim", "rl")


CONFIG_FILES = {"mar": "configs/mar.py", "mar_fix": "configs/mar.py", "gsim": "configs/marval.py",
                "rl": "configs/marval_rl.py"}


GB = 1e9


# PickScore_v1 is CLIP ViT-H/14 (laion2B): the reward's architecture at its real size (random-weight shapes only).
VIT_H_14 = dict(
    projection_dim=1024,
    text_config=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
                     max_position_embeddings=77, vocab_size=49408, hidden_act="gelu"),
    vision_config=dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                       image_size=224, patch_size=14, hidden_act="gelu"),
)


# ------------------------------------------------------------------------------------------------ parsing
def parse_mesh(spec: str | None) -> dict[str, int] | None:
    """"data=-1,fsdp=16,tensor=1" -> {"data": -1, "fsdp": 16, "tensor": 1}; "" or "config" -> None (the config's)."""
    if not spec or spec == "config":
        return None
    out = {"data": 1, "fsdp": 1, "tensor": 1}
    for part in spec.split(","):
        name, _, value = part.partition("=")
        if name.strip() not in out or not value:
            raise UserError(f"--mesh: expected data=D,fsdp=F,tensor=T (-1 = remaining devices), got {spec!r}")
        out[name.strip()] = int(value)
    return out


def parse_hbm(spec: str) -> dict[str, float]:
    out = {}
    for part in spec.split(","):
        name, _, value = part.partition("=")
        if not name or not value:
            raise UserError(f"--hbm: expected name=GB,... (e.g. {HBM_DEFAULT}), got {spec!r}")
        out[name.strip()] = float(value)
    return out


def parse_options(spec: str) -> dict[str, Any]:
    """"xla_gpu_autotune_level=0,xla_foo=true" -> {"xla_gpu_autotune_level": 0, "xla_foo": True}."""
    out: dict[str, Any] = {}
    for part in (spec or "").split(","):
        if not part.strip():
            continue
        name, _, value = part.partition("=")
        if not name.strip() or not value.strip():
            raise UserError(f"--compile_options: expected name=value,..., got {spec!r}")
        v = value.strip()
        if v.lower() in ("true", "false"):
            out[name.strip()] = v.lower() == "true"
        else:
            try:
                out[name.strip()] = int(v)
            except ValueError:
                try:
                    out[name.strip()] = float(v)
                except ValueError:
                    out[name.strip()] = v
    return out


def parse_list(spec: str, allowed: tuple[str, ...] | None, what: str) -> list[str]:
    items = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [s for s in items if allowed is not None and s not in allowed]
    if bad or not items:
        raise UserError(f"--{what}: unknown {bad or spec!r}; choose from {', '.join(allowed or ())}")
    return items


def case_key(devices: int, mesh: dict | None, model: str, step: str, remat: bool | None, batches) -> str:
    m = "config" if mesh is None else ",".join(f"{k}={v}" for k, v in mesh.items())
    r = "" if remat is None else (":remat" if remat else ":noremat")
    return f"n={devices}|mesh={m}|{model}|{step}{r}|b={','.join(map(str, batches))}"


# ------------------------------------------------------------------------------------------------ worker
def _state_breakdown(abstract, shardings) -> dict[str, float]:
    """Per-device bytes of the state by kind, from the shardings (shard shape x itemsize)."""
    import jax
    from marval_jax.tree_paths import path_str

    out = {"params": 0.0, "optimizer": 0.0, "ema": 0.0, "frozen": 0.0, "other": 0.0}
    flat_a = jax.tree_util.tree_flatten_with_path(abstract)[0]
    flat_s = jax.tree_util.tree_leaves(shardings)
    for (path, leaf), sharding in zip(flat_a, flat_s):
        name = path_str(path)
        nbytes = math.prod(sharding.shard_shape(leaf.shape)) * leaf.dtype.itemsize
        if re.search(r"(^|/)opt_state(/|$)", name):
            kind = "optimizer"
        elif re.search(r"(^|/)ema_params(/|$)", name):
            kind = "ema"
        elif re.match(r"(teacher|ref_params)(/|$)", name):
            kind = "frozen"
        elif re.search(r"(^|/)params(/|$)", name):
            kind = "params"
        else:
            kind = "other"
        out[kind] += nbytes
    return out


def _leading_dims(hlo: str, global_batch: int, per_device: int) -> dict[str, int]:
    """How many arrays of the partitioned program lead with the global batch vs the per-device batch: a program
    whose batch is sharded has almost none of the former (a replicated one computes the global batch per device)."""
    dims = [int(m.group(1)) for m in re.finditer(r"\b(?:f32|bf16|f16|s32|u32|pred)\[(\d+)[,\]]", hlo)]
    return {"global": sum(d == global_batch for d in dims), "per_device": sum(d == per_device for d in dims)}


def _tree_bytes_per_device(tree, sharding) -> float:
    import jax
    return float(sum(math.prod(sharding.shard_shape(x.shape)) * x.dtype.itemsize
                     for x in jax.tree_util.tree_leaves(tree)))


def load_config(step: str, model: str, mesh: dict | None, remat: bool | None, rl_num_iter: int):
    import importlib
    mod = importlib.import_module(CONFIG_FILES[step][:-3].replace("/", "."))
    config = mod.get_config(model)
    with config.unlocked():
        if mesh is not None:
            for k, v in mesh.items():
                config.mesh.shape[k] = v
        config.mesh.distributed_init = False
        if step == "rl":
            config.rl.num_iter = rl_num_iter
            if remat is not None:
                config.rl.remat = remat
    return config


@dataclasses.dataclass
class Built:
    init_state: Any
    train_step: Any              # (state, batch, *extra) -> (state, metrics)
    logical_axes: list
    batch_fn: Any                # global batch size -> pytree of ShapeDtypeStruct (no sharding)
    extra: tuple = ()            # the task's frozen inputs, abstract (one dict: the step's last argument)
    extra_bytes: dict = dataclasses.field(default_factory=dict)
    frozen_sharded: tuple = ()   # keys of the frozen dict sharded like the state (Task.frozen_sharded)

    def extra_shardings(self, mesh, rules) -> tuple:
        """The frozen inputs' shardings, as the training loop places them (train/loop.py frozen_shardings)."""
        from marval_jax.train.loop import frozen_shardings
        return tuple(frozen_shardings(e, self.frozen_sharded, self.logical_axes, mesh, rules) for e in self.extra)


def build_case(step: str, config) -> Built:
    """The task's own pure step (`build_step(config)`, no file read) and its frozen inputs as abstract shapes."""
    import jax
    import jax.numpy as jnp

    from marval_jax.models.factory import model_config
    cfg = model_config(config)
    tokens_batch = lambda b: {"tokens": jax.ShapeDtypeStruct((b, cfg.seq_len, cfg.token_dim), jnp.float32),  # noqa
                              "labels": jax.ShapeDtypeStruct((b,), jnp.int32)}
    if step in ("mar", "mar_fix"):
        from marval_jax.train import mar_task as module
        # `mar_fix` measured a per-copy diffusion-row layout side by side with the tiled one; that layout is now
        # losses/mar_loss.diffusion_loss itself, so both steps compile the library's loss (kept for the records)
    elif step == "gsim":
        from marval_jax.train import distill_task as module
    elif step == "rl":
        return _build_rl(config, cfg)
    else:
        raise UserError(f"unknown step {step!r}; choose one of {STEPS}")
    task, frozen = module.build_step(config), module.abstract_frozen(config)
    return Built(task.init_state, task.train_step, task.logical_axes, tokens_batch, (frozen,),
                 {k: _nbytes(v) for k, v in frozen.items()}, task.frozen_sharded)


def abstract_clip_reward(config, cfg):
    """PickScore / CLIPScore's reward at the real CLIP-H size (VIT_H_14), as a `Frozen` of abstract weights (shapes
    only, nothing allocated), and its prompt embeddings' shape (one per class)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from marval_jax.models.factory import Frozen
    from marval_jax.models import clip as clip_lib
    from marval_jax.rewards import clip as clip_reward

    cc = clip_lib.CLIPConfig.from_hf_dict(dict(VIT_H_14))
    dtype = jnp.dtype(config.rl.reward_config.get("dtype", None) or "float32")
    graphdef, params = nnx.split(nnx.eval_shape(lambda: clip_lib.CLIP(cc, rngs=nnx.Rngs(0), dtype=dtype)))
    name = config.rl.reward

    def fn(p, images, labels, prompt_embeddings):   # rewards/registry.py's pickscore / clip_score
        from marval_jax.rewards.registry import select_prompt_embeddings
        txt = select_prompt_embeddings(prompt_embeddings, labels, images.shape[0], name)
        model = nnx.merge(graphdef, p)
        img = model.encode_image(clip_lib.preprocess(images, cc.vision.image_size, mean=cc.image_mean,
                                                     std=cc.image_std))
        if name == "pickscore":
            return clip_reward.pickscore(img, txt, model.logit_scale[...])
        return clip_reward.clip_score(img, txt)

    emb = jax.ShapeDtypeStruct((cfg.class_num, VIT_H_14["projection_dim"]), jnp.float32)
    return Frozen(params, fn), emb


def _build_rl(config, cfg) -> Built:
    """rl_task.build_step's own train step; its frozen inputs (reward, class prompts' text embeddings, VAE decoder)
    are the step's extra argument, as in the training loop, built abstract: CLIP-H and the VAE as shapes, nothing
    allocated, no text tower run. The tiny/fmnist classifier reward is small: loaded as the run loads it."""
    import jax
    import jax.numpy as jnp

    from marval_jax.checkpoints.decoders import frozen_decoder
    from marval_jax.train import rl_task

    tok = config.tokenizer
    reward_name = config.rl.reward
    if reward_name in ("pickscore", "clip_score") and tok.kind == "vae":
        reward, emb = abstract_clip_reward(config, cfg)
        frozen = {"reward": reward, "prompts": emb, "decoder": frozen_decoder(config, cfg, abstract=True)}
    elif tok.kind == "pixel_patch":
        frozen = rl_task.load_frozen(config)
    else:
        raise ValueError(f"scale check: RL with reward {reward_name!r} and tokenizer {tok.kind!r} is not modelled")
    task = rl_task.build_step(config)
    labels_batch = lambda b: {"labels": jax.ShapeDtypeStruct((b,), jnp.int32)}  # noqa: E731
    extra_bytes = {k: _nbytes(v) for k, v in frozen.items()}
    return Built(task.init_state, task.train_step, task.logical_axes, labels_batch, (frozen,), extra_bytes,
                 task.frozen_sharded)


def _nbytes(tree) -> float:
    import jax
    return float(sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree_util.tree_leaves(tree)))


def run_case(devices: int, model: str, step: str, mesh_spec: dict | None, remat: bool | None, batches: list[int],
             rl_num_iter: int) -> dict:
    """Compile one (model, step) at each per-device batch size; returns the record (sizes in bytes)."""
    import jax
    from marval_jax.parallel import mesh as mesh_lib
    from marval_jax.parallel import sharding as shd
    from marval_jax.train.loop import state_shardings

    if jax.device_count() != devices:
        raise RuntimeError(f"expected {devices} devices, jax has {jax.device_count()} (XLA_FLAGS not applied?)")
    config = load_config(step, model, mesh_spec, remat, rl_num_iter)
    built = build_case(step, config)
    mesh = mesh_lib.make_mesh(config.mesh)
    rules = config.mesh.logical_axis_rules
    abstract = jax.eval_shape(built.init_state, jax.random.PRNGKey(0))
    shardings = state_shardings(abstract, built, mesh, rules)
    state_in = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                      abstract, shardings)
    batch_shd = shd.batch_sharding(mesh, rules)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]  # batch rule: ("data", "fsdp")
    breakdown = _state_breakdown(abstract, shardings)

    # The config's own mesh (no override): state per device from its shardings only (no compile).
    cfg_mesh_state = None
    if mesh_spec is not None:
        own = load_config(step, model, None, remat, rl_num_iter)
        try:
            own_mesh = mesh_lib.make_mesh(own.mesh)
            cfg_mesh_state = dict(shape=dict(own_mesh.shape),
                                  **_state_breakdown(abstract, state_shardings(abstract, built, own_mesh,
                                                                               own.mesh.logical_axis_rules)))
        except ValueError as e:
            cfg_mesh_state = {"error": str(e)}

    extra_shd = built.extra_shardings(mesh, rules)
    jitted = jax.jit(built.train_step, in_shardings=(shardings, batch_shd) + extra_shd,
                     out_shardings=(shardings, None), donate_argnums=0)
    extra_in = tuple(jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), e, es)
                     for e, es in zip(built.extra, extra_shd))
    probes = []
    for b in batches:
        batch = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=batch_shd),
                                       built.batch_fn(b * shards))
        t0 = time.time()
        lowered = jitted.lower(state_in, batch, *extra_in)
        t1 = time.time()
        compiled = lowered.compile()
        t2 = time.time()
        ma = compiled.memory_analysis()
        rec = dict(per_device_batch=b, global_batch=b * shards, lower_s=round(t1 - t0, 1),
                   compile_s=round(t2 - t1, 1),
                   argument=int(ma.argument_size_in_bytes), output=int(ma.output_size_in_bytes),
                   alias=int(ma.alias_size_in_bytes), temp=int(ma.temp_size_in_bytes))
        rec["peak"] = rec["argument"] + rec["output"] - rec["alias"] + rec["temp"]
        if getattr(ma, "peak_memory_in_bytes", None) is not None:  # the compiler's heap simulation (newer jax)
            rec["compiler_peak"] = int(ma.peak_memory_in_bytes)
        rec["batch_bytes"] = _tree_bytes_per_device(batch, batch_shd)
        rec["leading_dims"] = _leading_dims(compiled.as_text(), b * shards, b)
        # arguments the compiled program keeps (jit drops unused ones, e.g. CLIP's text tower) beyond state + batch
        rec["frozen_args_kept"] = max(0.0, rec["argument"] - sum(breakdown.values()) - rec["batch_bytes"])
        probes.append(rec)
        print(f"  b={b}: peak {rec['peak'] / GB:.2f} GB (temp {rec['temp'] / GB:.2f}), "
              f"compile {rec['compile_s']:.0f}s", file=sys.stderr, flush=True)
        del compiled, lowered
    return dict(devices=devices, model=model, step=step, remat=remat,
                mesh=dict(mesh.shape), mesh_override=mesh_spec, batch_shards=shards,
                config_global_batch=int(config.train.global_batch_size),
                state=breakdown, state_total=sum(breakdown.values()), frozen_args=built.extra_bytes,
                config_mesh_state=cfg_mesh_state, probes=probes,
                rl_num_iter=rl_num_iter if step == "rl" else None,
                jax=jax.__version__, xla_flags=os.environ.get("XLA_FLAGS", ""))
