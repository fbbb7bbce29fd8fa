"""Scale check: per-device memory of the compiled MAR / GSIM / RL train steps on a simulated mesh of N devices.

    python -m marval_jax.tools.scale_check --devices 64,256 --models base,large,huge \
        --steps mar,mar_fix,gsim,rl --mesh data=-1,fsdp=16,tensor=1 --batches 2,4 \
        --hbm v5p=95,v5e=16,v4=32,h200=141 --out docs/scale.md --date 2026-11-29

Nothing is allocated and nothing runs: per (device count, model, step) a subprocess forces N CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=N, set before jax is imported), builds the real task from the
config (configs/mar.py, configs/marval.py, configs/marval_rl.py), takes the state's shapes with `jax.eval_shape`,
its shardings with `marval_jax.train.loop.state_shardings` (the config's logical axis rules on the mesh), and
lowers and compiles the train step exactly as the loop jits it (`in_shardings=(state, batch)`,
`out_shardings=(state, None)`, `donate_argnums=0`) on `ShapeDtypeStruct`s at two per-device batch sizes. It reads
`compiled.memory_analysis()` (sizes per device of the SPMD-partitioned program) and splits the state into
params / optimizer / EMA / frozen copies from the shardings directly.

Memory model (stated in the report): peak(b) = arguments + outputs - aliased (donated) + temporaries, measured at
two per-device batch sizes b1 < b2 and fitted as peak(b) = fixed + b * per_example. The largest per-device batch
that fits an HBM size H is floor((fraction * H - fixed) / per_example) (fraction = --hbm_fraction).

Results of every case are cached in --cache (JSON, keyed by devices / mesh / model / step / batches), so a rerun
only compiles what is missing; --out renders the cache as the markdown report (docs/scale.md).

Each compiled program is also checked for batch sharding: the report flags a step whose arrays lead with the
global batch rather than the per-device batch (every device would compute the whole batch).

Steps: `mar` (configs/mar.py, make_mar_task), `mar_fix` (the same step with a candidate diffusion-row layout,
`diffusion_loss_rows_sharded`), `gsim` (configs/marval.py, make_distill_task: frozen teacher +
generator + fake score, each trained role with Adam moments and EMA), `rl` (configs/marval_rl.py, the real
make_rl_task's train step with rl.remat on and off). The RL step's frozen reward (PickScore, CLIP ViT-H/14) and VAE
decoder parameters enter the jitted step as replicated arguments (abstract, random-weight shapes of the real sizes:
no converted checkpoint is needed), as the registry recommends for CLIP-H size rewards. Sample-grid decoders are
not part of any train step and are not built.
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import json
import math
import os
import re
import subprocess
import sys
import time
from typing import Any

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
            raise ValueError(f"--mesh: expected data=D,fsdp=F,tensor=T (-1 = remaining devices), got {spec!r}")
        out[name.strip()] = int(value)
    return out


def parse_hbm(spec: str) -> dict[str, float]:
    out = {}
    for part in spec.split(","):
        name, _, value = part.partition("=")
        if not name or not value:
            raise ValueError(f"--hbm: expected name=GB,... (e.g. {HBM_DEFAULT}), got {spec!r}")
        out[name.strip()] = float(value)
    return out


def parse_list(spec: str, allowed: tuple[str, ...] | None, what: str) -> list[str]:
    items = [s.strip() for s in spec.split(",") if s.strip()]
    bad = [s for s in items if allowed is not None and s not in allowed]
    if bad or not items:
        raise ValueError(f"--{what}: unknown {bad or spec!r}; choose from {', '.join(allowed or ())}")
    return items


def case_key(devices: int, mesh: dict | None, model: str, step: str, remat: bool | None, batches) -> str:
    m = "config" if mesh is None else ",".join(f"{k}={v}" for k, v in mesh.items())
    r = "" if remat is None else (":remat" if remat else ":noremat")
    return f"n={devices}|mesh={m}|{model}|{step}{r}|b={','.join(map(str, batches))}"


# ------------------------------------------------------------------------------------------------ worker
def _state_breakdown(abstract, shardings) -> dict[str, float]:
    """Per-device bytes of the state by kind, from the shardings (shard shape x itemsize)."""
    import jax
    from marval_jax.checkpoints.tree_paths import path_str

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


@contextlib.contextmanager
def _patched(obj, name, value):
    old = getattr(obj, name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        setattr(obj, name, old)


def _no_grid_decoder():
    """The tasks build a VAE decoder for sample grids (it loads tokenizer.vae_ckpt); no train step uses it."""
    from marval_jax.train import distill_task, mar_task, rl_task
    stub = lambda config, cfg: (lambda tokens: tokens)  # noqa: E731
    stack = contextlib.ExitStack()
    for mod in (mar_task, distill_task, rl_task):
        stack.enter_context(_patched(mod, "decoder_fn", stub))
    return stack


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
    extra: tuple = ()            # abstract frozen arguments (replicated), RL only
    extra_bytes: dict = dataclasses.field(default_factory=dict)


def build_case(step: str, config) -> Built:
    import jax
    import jax.numpy as jnp

    from marval_jax.train.mar_task import model_config
    cfg = model_config(config)
    tokens_batch = lambda b: {"tokens": jax.ShapeDtypeStruct((b, cfg.seq_len, cfg.token_dim), jnp.float32),  # noqa
                              "labels": jax.ShapeDtypeStruct((b,), jnp.int32)}
    if step in ("mar", "mar_fix"):
        from marval_jax.losses import mar_loss
        from marval_jax.train.mar_task import make_mar_task
        with _no_grid_decoder():
            task = make_mar_task(config)
        if step == "mar":
            return Built(task.init_state, task.train_step, task.logical_axes, tokens_batch)

        def train_step(state, batch):  # the same step with the candidate diffusion-row fix in place while tracing
            with _patched(mar_loss, "diffusion_loss", diffusion_loss_rows_sharded):
                return task.train_step(state, batch)
        return Built(task.init_state, train_step, task.logical_axes, tokens_batch)
    if step == "gsim":
        from marval_jax.train.distill_task import make_distill_task
        with _no_grid_decoder():
            task = make_distill_task(config)
        return Built(task.init_state, task.train_step, task.logical_axes, tokens_batch)
    if step != "rl":
        raise ValueError(f"unknown step {step!r}; choose one of {STEPS}")
    return _build_rl(config, cfg)


def diffusion_loss_rows_sharded(model, z, target, mask, rng, diffusion_batch_mul):
    """Step `mar_fix`: a candidate for losses/mar_loss.diffusion_loss measured side by side with it.

    `diffusion_loss` repeats the (B*S) head rows with `jnp.tile(rows, (mul, 1))`; the SPMD partitioner cannot shard
    a tile of a batch-sharded axis, so every device then runs the diffusion head on the GLOBAL batch's rows (its
    temporaries grow with the device count). Here each of the `mul` copies is its own (B*S, C) head call (own t
    and noise, the same loss up to which random numbers go to which copy), so the rows keep the batch sharding.
    """
    import jax
    import jax.numpy as jnp
    from marval_jax.losses.mar_loss import TRAIN_DIFFUSION

    n = target.shape[0] * target.shape[1]
    x0, zz, m = target.reshape(n, -1), z.reshape(n, -1), mask.reshape(n)
    sums: dict[str, Any] = {}
    for k in range(diffusion_batch_mul):
        r_t, r_noise = jax.random.split(jax.random.fold_in(rng, k))
        t = jax.random.randint(r_t, (n,), 0, TRAIN_DIFFUSION.num_timesteps)
        noise = jax.random.normal(r_noise, x0.shape, jnp.float32)
        xt = TRAIN_DIFFUSION.q_sample(x0, t, noise)
        terms = TRAIN_DIFFUSION.training_losses(model.head(xt, t, zz), x0, xt, t, noise)
        for key, v in terms.items():
            sums[key] = sums.get(key, 0.0) + (v * m).sum()
    denom = jnp.maximum(m.sum() * diffusion_batch_mul, 1.0)
    avg = {k: v / denom for k, v in sums.items()}
    return avg["loss"], avg


def _build_rl(config, cfg) -> Built:
    """make_rl_task's own train step, with the frozen reward / VAE decoder parameters (and the class prompts'
    text embeddings) passed through the jit boundary instead of closed over. The task is built inside the traced
    function so its reward and decoder close over the traced frozen arguments."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from marval_jax.models.mar import unpatchify
    from marval_jax.models.vae import AutoencoderKL
    from marval_jax.rewards import clip as clip_lib
    from marval_jax.rewards import registry
    from marval_jax.train import rl_task

    tok = config.tokenizer
    reward_name = config.rl.reward
    frozen: dict[str, Any] = {}
    reward_fn = None
    if reward_name in ("pickscore", "clip_score") and tok.kind == "vae":
        def abstract_clip(cc, seed=0):  # stands in for clip.random_params: shapes only, nothing allocated
            return nnx.split(nnx.eval_shape(lambda: clip_lib.CLIP(cc, rngs=nnx.Rngs(0))))[1]
        with _patched(clip_lib, "random_params", abstract_clip):
            reward = registry.make_reward(reward_name, {"clip_config": VIT_H_14, "seed": 0,
                                                         "dtype": config.rl.reward_config.dtype})
        frozen["reward"] = reward.params
        frozen["prompts"] = jax.ShapeDtypeStruct((cfg.class_num, VIT_H_14["projection_dim"]), jnp.float32)
        reward_fn = reward.fn
        vae = nnx.eval_shape(lambda: AutoencoderKL(ch=tok.vae_ch, ch_mult=tuple(tok.vae_ch_mult),
                                                   embed_dim=cfg.vae_embed_dim, rngs=nnx.Rngs(0)))
        vae_graphdef, frozen["vae"] = nnx.split(vae)
        scale = float(tok.scale)
    elif tok.kind != "pixel_patch":
        raise ValueError(f"scale check: RL with reward {reward_name!r} and tokenizer {tok.kind!r} is not modelled")

    def make_task(fz):
        if not fz:  # pixel tokens and a small reward: the real task as configured
            return rl_task.make_rl_task(config)

        def decoder(config_, cfg_):
            def decode(tokens):  # models/vae_tokenizer.make_vae_decoder with the parameters as an argument
                latents = unpatchify(tokens, cfg_.patch_size, cfg_.vae_embed_dim)
                z = jnp.transpose(latents, (0, 2, 3, 1)) / scale
                return nnx.merge(vae_graphdef, fz["vae"]).decode(z)
            return decode

        fn = lambda p, images, labels, _emb: reward_fn(p, images, labels, fz["prompts"])  # noqa: E731
        fake_make_reward = lambda name, cfg_=None: registry.Reward(reward_name, fn, fz["reward"])  # noqa: E731
        with _patched(registry, "make_reward", fake_make_reward), _patched(rl_task, "decoder_fn", decoder):
            return rl_task.make_rl_task(config)

    labels_batch = lambda b: {"labels": jax.ShapeDtypeStruct((b,), jnp.int32)}  # noqa: E731
    if not frozen:
        task = make_task(None)
        return Built(task.init_state, task.train_step, task.logical_axes, labels_batch)
    outer = make_task({"reward": frozen["reward"], "prompts": None, "vae": frozen["vae"]})

    def train_step(state, batch, fz):
        return make_task(fz).train_step(state, batch)

    extra_bytes = {"reward": _nbytes(frozen["reward"]), "vae": _nbytes(frozen["vae"]),
                   "prompts": _nbytes(frozen["prompts"])}
    return Built(outer.init_state, train_step, outer.logical_axes, labels_batch, (frozen,), extra_bytes)


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
    repl = shd.replicated(mesh)
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

    jitted = jax.jit(built.train_step, in_shardings=(shardings, batch_shd) + (repl,) * len(built.extra),
                     out_shardings=(shardings, None), donate_argnums=0)
    extra_in = tuple(jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl), e)
                     for e in built.extra)
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


# ------------------------------------------------------------------------------------------------ model / report
def fit(record: dict) -> tuple[float, float] | None:
    """(fixed, per_example) bytes of peak(b) = fixed + b * per_example from the two smallest distinct probes."""
    probes = sorted(record.get("probes", []), key=lambda p: p["per_device_batch"])
    if len(probes) < 2 or probes[0]["per_device_batch"] == probes[-1]["per_device_batch"]:
        return None
    p1, p2 = probes[0], probes[-1]
    per = (p2["peak"] - p1["peak"]) / (p2["per_device_batch"] - p1["per_device_batch"])
    return p1["peak"] - p1["per_device_batch"] * per, per


def max_batch(fixed: float, per: float, hbm_gb: float, fraction: float) -> int:
    budget = fraction * hbm_gb * GB - fixed
    if budget < per:
        return 0
    return int(budget // per) if per > 0 else 10 ** 9


def _gb(x: float) -> str:
    """Bytes as GB with 3 significant digits (tiny test models stay readable)."""
    v = x / GB
    return f"{v:.2f}" if v >= 1 else f"{v:.3g}"


def _frozen_args(rec: dict) -> float:
    """Frozen jit arguments per device (RL: reward, VAE decoder, prompts) as the compiled program keeps them."""
    kept = [p.get("frozen_args_kept") for p in rec.get("probes", []) if p.get("frozen_args_kept") is not None]
    if rec.get("frozen_args") and kept:
        return float(min(kept))
    return float(sum(rec.get("frozen_args", {}).values()))


def _step_label(rec: dict) -> str:
    if rec["step"] == "rl":
        return f"RL K={rec.get('rl_num_iter')} remat {'on' if rec.get('remat') else 'off'}"
    return {"mar": "MAR", "mar_fix": "MAR, rows fix", "gsim": "GSIM"}[rec["step"]]


def render(records: list[dict], hbm: dict[str, float], fraction: float, command: str, date: str,
           missing: list[str] = ()) -> str:
    import jax
    names = {"base": "B", "large": "L", "huge": "H"}
    lines = [
        "# Scale check: per-device memory of the train steps",
        "",
        f"Produced on {date} (jax {jax.__version__}, CPU with forced host devices; nothing allocated) by",
        "",
        f"    {command}",
        "",
        "Each case (N, model, step) is compiled in its own process and cached in the JSON next to the report",
        "(`--cache`); rerunning the command compiles only what the cache lacks and rewrites the report.",
        "",
        "What is measured. For each device count N the train step of each config is lowered and compiled for an SPMD",
        "mesh of N simulated CPU devices with the config's logical axis rules (batch over data x fsdp, `embed` over",
        "fsdp, `mlp` over tensor), exactly as `marval_jax.train.loop` jits it (state in/out shardings, donated",
        "state), on `ShapeDtypeStruct`s: no weights are allocated. `compiled.memory_analysis()` gives per-device",
        "argument, output, aliased (donated) and temporary bytes of the partitioned program; state bytes by kind come",
        "from the shardings (shard shape x itemsize). 1 GB = 1e9 bytes.",
        "",
        "Memory model. peak(b) = arguments + outputs - aliased + temporaries at per-device batch b (examples per",
        "data x fsdp shard). It is measured at two batch sizes and fitted as **peak(b) = fixed + b x per_example**",
        "(fixed = state + batch-independent temporaries such as all-gathered FSDP weights). The largest per-device",
        f"batch for an HBM size H is floor(({fraction:g} x H - fixed) / per_example); {fraction:g} leaves headroom for",
        "the runtime, fragmentation and the difference between the CPU and TPU/GPU compilers (fusion, layouts).",
        "`cfg b` is the config's global batch divided over the batch shards at N; 0 in a column means it does not",
        "fit at batch 1.",
        "",
        "Caveat: these are the CPU compiler's buffer assignments for the same partitioned HLO. TPU and GPU compilers",
        "fuse differently (bf16 kept native, different layouts and rematerialisation), so the absolute numbers are",
        "estimates. **The H200 row must still be validated on a real H200** (a later session: the device budget of",
        "this one was spent): run the MARVAL-B GSIM step there (`python -m marval_jax.main --mode=distill",
        "--config=configs/marval.py:base ...`, a few steps), read the peak from",
        "`jax.devices()[0].memory_stats()['peak_bytes_in_use']` and compare with the GSIM B row (fixed + b x",
        "per_example at the run's per-device batch); agreement within 15% validates the table for GPUs.",
        "",
        "Steps. `MAR`: `make_mar_task(configs/mar.py:V)`'s step. `MAR, rows fix`: the same step with the candidate",
        "`diffusion_loss` of `scale_check.diffusion_loss_rows_sharded` (see Findings). `GSIM`:",
        "`make_distill_task(configs/marval.py:V)`: frozen teacher + generator + fake score (three MAR copies), the two",
        "trained roles with Adam moments and EMA. `RL K=.. remat on/off`: `make_rl_task(configs/marval_rl.py:V)`'s",
        "step with rl.num_iter = K and rl.remat as stated; its frozen PickScore reward (CLIP ViT-H/14 at its real",
        "size, float32 as rl.reward_config.dtype), KL-16 VAE decoder and class-prompt embeddings enter as replicated",
        "jit arguments (jit drops the unused CLIP text tower) and count under `frozen` with the reference generator.",
        "Columns: state by kind per device (GB), `fixed` and `per ex.` of the fit (GB), the probes' peaks (GB), the",
        "config's per-device batch, and the largest per-device batch per HBM size.",
        "",
    ]
    ok = [r for r in records if "error" not in r]
    findings = _findings(ok)
    for r in records:
        if "TraceContextError" in r.get("error", "") and r.get("step") == "rl" and r.get("remat") is False:
            findings.append(
                f"N={r['devices']} {r['model']} RL remat off does not trace: with model.remat (large/huge configs) "
                "`models/transformer.run_blocks` applies `nnx.remat` to a block merged outside the AR loop's "
                "`lax.scan` body (losses/rl.py closes over the parameters when rl.remat is off), and flax refuses "
                "to update its Params from the inner trace (TraceContextError). rl.remat on (the configs' "
                "default) wraps each AR iteration in jax.checkpoint, which passes the parameters in, and works.")
    if findings:
        lines += ["## Findings", ""] + [f"- {f}" for f in findings] + [""]
    for n in sorted({r["devices"] for r in ok}):
        rows = sorted([r for r in ok if r["devices"] == n], key=lambda r: (
            ["base", "large", "huge"].index(r["model"]) if r["model"] in names else 9, STEPS.index(r["step"]),
            not r.get("remat")))
        meshes = sorted({",".join(f"{k}={v}" for k, v in r["mesh"].items()) for r in rows})
        lines += [f"## N = {n} devices (mesh {'; '.join(meshes)})", ""]
        head = ("| model | step | params | opt | EMA | frozen | state | fixed | per ex. | probes b: peak | cfg b | "
                + " | ".join(f"{k} {v:g} GB" for k, v in hbm.items()) + " |")
        lines += [head, "|" + "---|" * (11 + len(hbm))]
        for r in rows:
            s = r["state"]
            frozen = s["frozen"] + _frozen_args(r)
            f = fit(r)
            cfg_b = r["config_global_batch"] / r["batch_shards"]
            probes = ", ".join(f"{p['per_device_batch']}: {_gb(p['peak'])}" for p in r["probes"])
            if f is None:
                fixed_s = per_s = "?"
                fits = ["?"] * len(hbm)
            else:
                fixed, per = f
                fixed_s, per_s = _gb(fixed), _gb(per)
                fits = [str(max_batch(fixed, per, h, fraction)) for h in hbm.values()]
            model = f"MAR{'VAL' if r['step'] in ('gsim', 'rl') else ''}-{names.get(r['model'], r['model'])}"
            lines.append(
                f"| {model} | {_step_label(r)} | {_gb(s['params'])} | {_gb(s['optimizer'])} | "
                f"{_gb(s['ema'])} | {_gb(frozen)} | {_gb(r['state_total'] + _frozen_args(r))} | "
                f"{fixed_s} | {per_s} | {probes} | {cfg_b:g} | " + " | ".join(fits) + " |")
        lines.append("")
    cfg_rows = [r for r in ok if r.get("config_mesh_state") and "error" not in r["config_mesh_state"]]
    if cfg_rows:
        lines += ["## State per device with the configs' own mesh (from shardings, no compile)", "",
                  "| N | model | step | config mesh | params | opt | EMA | frozen | state |", "|" + "---|" * 9]
        seen = set()
        for r in sorted(cfg_rows, key=lambda r: (r["devices"], r["model"], r["step"])):
            key = (r["devices"], r["model"], r["step"])
            if key in seen:
                continue
            seen.add(key)
            c = r["config_mesh_state"]
            tot = sum(c[k] for k in ("params", "optimizer", "ema", "frozen", "other"))
            lines.append(f"| {r['devices']} | {r['model']} | {r['step']} | "
                         f"{','.join(f'{k}={v}' for k, v in c['shape'].items())} | {_gb(c['params'])} | "
                         f"{_gb(c['optimizer'])} | {_gb(c['ema'])} | {_gb(c['frozen'])} | {_gb(tot)} |")
        lines.append("")
    bad = [r for r in records if "error" in r]
    lines += ["## What ran", "",
              "| N | model | step | per-device batches | compile s (each) |", "|---|---|---|---|---|"]
    for r in sorted(ok, key=lambda r: (r["devices"], r["model"], r["step"], not r.get("remat"))):
        lines.append(f"| {r['devices']} | {r['model']} | {_step_label(r)} | "
                     f"{', '.join(str(p['per_device_batch']) for p in r['probes'])} | "
                     f"{', '.join(str(int(p['compile_s'])) for p in r['probes'])} |")
    for r in bad:
        remat = "" if r.get("remat") is None else (" remat on" if r["remat"] else " remat off")
        lines.append(f"| {r['devices']} | {r['model']} | {r['step']}{remat} | failed | {r['error'][:200]} |")
    lines.append("")
    if missing:
        lines += ["Not run yet (the command above compiles them): " + "; ".join(missing) + ".", ""]
    return "\n".join(lines)


def _findings(records: list[dict]) -> list[str]:
    """Observations computed from the records (so a rerun states its own)."""
    out = []
    by = {(r["devices"], r["model"], r["step"], r.get("remat")): r for r in records}
    for (n, model, step, remat), r in sorted(by.items(), key=lambda kv: str(kv[0])):
        if step == "mar" and (n, model, "mar_fix", None) in by:
            a, b = fit(r), fit(by[(n, model, "mar_fix", None)])
            if a and b:
                out.append(
                    f"N={n} {model}: the MAR step's per-example memory is {_gb(a[1])} GB as the code stands and "
                    f"{_gb(b[1])} GB with the diffusion rows kept batch-sharded. `losses/mar_loss.diffusion_loss` "
                    "builds the head's rows with `jnp.tile(rows, (diffusion_batch_mul, 1))`; the partitioner cannot "
                    "shard a tile of the batch-sharded axis, so each device runs the diffusion head on the global "
                    "batch's rows (memory and FLOPs grow with the device count). Fix: one head call per copy, or "
                    "copies on a leading axis (`scale_check.diffusion_loss_rows_sharded`).")
        ld = [p.get("leading_dims") for p in r.get("probes", []) if p.get("leading_dims")]
        replicated = bool(ld) and r["batch_shards"] > 1 and ld[0]["global"] > ld[0]["per_device"]
        if step == "rl" and (replicated or not ld):
            f = fit(r)
            est = f" (about {_gb(f[1] / r['batch_shards'])} GB per example once sharded, an estimate)" if f else ""
            out.append(
                f"N={n} {model} {_step_label(r)}: the step is not batch-sharded"
                + (f" ({ld[0]['global']} arrays of the compiled program lead with the global batch, "
                   f"{ld[0]['per_device']} with the per-device batch)" if ld else "")
                + ": `train/rl_task.py` draws the labels inside the step with `jax.random.randint(key, "
                "batch['labels'].shape)`, an array without the batch sharding, so the whole trajectory (K AR "
                "iterations, VAE decode, reward) is replicated and every device computes the global batch; "
                f"`per ex.` is the cost of {r['batch_shards']} examples{est}. Fix: constrain the labels (or derive "
                "them from the sharded batch) to the batch sharding.")
        elif replicated:
            out.append(f"N={n} {model} {_step_label(r)}: {ld[0]['global']} arrays lead with the global batch vs "
                       f"{ld[0]['per_device']} with the per-device batch: part of the step is not batch-sharded.")
        if r["config_global_batch"] < r["batch_shards"]:
            out.append(f"N={n} {model} {_step_label(r)}: the config's global batch {r['config_global_batch']} is "
                       f"smaller than the {r['batch_shards']} batch shards; raise train.global_batch_size to a "
                       f"multiple of {r['batch_shards']} (or use fewer data x fsdp shards) to run it at this size.")
    return out


# ------------------------------------------------------------------------------------------------ driver
def _worker_main(args) -> int:
    rec = run_case(args.devices_one, args.model_one, args.step_one, parse_mesh(args.mesh),
                   None if args.remat_one == "none" else args.remat_one == "on",
                   [int(b) for b in args.batches.split(",")], args.rl_num_iter)
    with open(args.result, "w") as f:
        json.dump(rec, f)
    return 0


def _spawn(args, n: int, model: str, step: str, remat: bool | None, result: str) -> dict:
    env = dict(os.environ)
    flags = [f for f in env.get("XLA_FLAGS", "").split() if "force_host_platform_device_count" not in f]
    flags.append(f"--xla_force_host_platform_device_count={n}")
    if args.fast_compile:
        flags.append("--xla_backend_optimization_level=0")  # LLVM -O0: same buffer assignment, ~2x faster
    env.update(XLA_FLAGS=" ".join(flags), JAX_PLATFORMS="cpu")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "marval_jax.tools.scale_check", "--_worker", "--result", result,
           "--_devices_one", str(n), "--_model_one", model, "--_step_one", step,
           "--_remat_one", "none" if remat is None else ("on" if remat else "off"),
           "--batches", args.batches, "--rl_num_iter", str(args.rl_num_iter), "--mesh", args.mesh or "config"]
    t0 = time.time()
    log_path = result + ".log"  # a file, not a pipe: the worker survives its parent (and keeps its output)
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(cmd, env=env, cwd=root, timeout=args.case_timeout, stderr=log, text=True)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {args.case_timeout}s"}
    with open(log_path) as f:
        err = f.read()
    sys.stderr.write(err[-4000:] if proc.returncode else "".join(
        l + "\n" for l in err.splitlines() if l.startswith("  b=")))
    if proc.returncode:
        lines = [l for l in err.strip().splitlines() if l.strip()]
        exc = [l for l in lines if re.match(r"^[\w.]+(Error|Exception|Exit)\b", l)]
        return {"error": f"exit {proc.returncode}: {(exc or lines or ['?'])[-1]}"}
    with open(result) as f:
        rec = json.load(f)
    rec["wall_s"] = round(time.time() - t0, 1)
    return rec


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", default="64", help="comma-separated simulated device counts, e.g. 64,256")
    p.add_argument("--models", default="base,large,huge", help="config variants")
    p.add_argument("--steps", default="mar,gsim,rl", help=f"any of {','.join(STEPS)}")
    p.add_argument("--mesh", default="config", help="'config' (each config's mesh) or data=D,fsdp=F,tensor=T")
    p.add_argument("--batches", default="1,2", help="per-device batch sizes compiled per case (two for the fit)")
    p.add_argument("--rl_remat", default="on,off", help="rl.remat values for the RL step")
    p.add_argument("--rl_num_iter", type=int, default=64, help="K, AR iterations of the RL trajectory")
    p.add_argument("--hbm", default=HBM_DEFAULT, help="name=GB,... HBM per device")
    p.add_argument("--hbm_fraction", type=float, default=0.9, help="usable fraction of HBM in the batch fit")
    p.add_argument("--cache", default="", help="JSON of case results (reused; default: --out with .json)")
    p.add_argument("--out", default="", help="markdown report (e.g. docs/scale.md); stdout if empty")
    p.add_argument("--date", default=datetime.date.today().isoformat())
    p.add_argument("--case_timeout", type=int, default=4 * 3600)
    p.add_argument("--fast_compile", type=int, default=1, help="1: XLA CPU backend at -O0 (faster, same sizes)")
    p.add_argument("--report_only", action="store_true",
                   help="render the cached cases of this command without compiling the missing ones")
    p.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", default="", help=argparse.SUPPRESS)
    p.add_argument("--_devices_one", dest="devices_one", type=int, help=argparse.SUPPRESS)
    p.add_argument("--_model_one", dest="model_one", help=argparse.SUPPRESS)
    p.add_argument("--_step_one", dest="step_one", help=argparse.SUPPRESS)
    p.add_argument("--_remat_one", dest="remat_one", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args._worker:
        return _worker_main(args)

    devices = [int(d) for d in parse_list(args.devices, None, "devices")]
    models = parse_list(args.models, None, "models")
    steps = parse_list(args.steps, STEPS, "steps")
    remats = [{"on": True, "off": False}[r] for r in parse_list(args.rl_remat, ("on", "off"), "rl_remat")]
    mesh = parse_mesh(args.mesh)
    hbm = parse_hbm(args.hbm)
    batches = [int(b) for b in args.batches.split(",")]
    if len(set(batches)) < 2:
        print("note: one per-device batch size: memory is reported, the batch fit is not", file=sys.stderr)
    cache_path = args.cache or (os.path.splitext(args.out)[0] + ".json" if args.out else "")
    cache: dict[str, dict] = {}
    if cache_path and os.path.exists(cache_path):
        with open(cache_path) as f:
            cache = json.load(f)

    cases = [(n, m, s, r) for n in devices for m in models for s in steps
             for r in (remats if s == "rl" else [None])]
    import tempfile
    for n, m, s, r in cases:
        key = case_key(n, mesh, m, s, r, batches)
        if args.report_only or (key in cache and "error" not in cache[key]):
            continue
        print(f"[scale_check] {key}", file=sys.stderr, flush=True)
        with tempfile.TemporaryDirectory() as tmp:
            rec = _spawn(args, n, m, s, r, os.path.join(tmp, "result.json"))
        rec.setdefault("devices", n), rec.setdefault("model", m), rec.setdefault("step", s)
        rec.setdefault("remat", r)
        cache[key] = rec
        if cache_path:
            with open(cache_path, "w") as f:
                json.dump(cache, f, indent=1, sort_keys=True)
    wanted = {case_key(n, mesh, m, s, r, batches): (n, m, s, r) for n, m, s, r in cases}
    records = [cache[k] for k in wanted if k in cache]
    missing = [f"N={n} {m} {s}{'' if r is None else (' remat on' if r else ' remat off')}"
               for k, (n, m, s, r) in wanted.items() if k not in cache]
    command = "python -m marval_jax.tools.scale_check " + " ".join(
        a for a in (argv if argv is not None else sys.argv[1:]) if a != "--report_only")
    text = render(records, hbm, args.hbm_fraction, command, args.date, missing)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(text)
    return 1 if any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
