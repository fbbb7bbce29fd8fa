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

Results of every case are cached in --cache (JSON, keyed by devices / mesh / model / step / batches, stamped with the
commit they were compiled at), so a rerun only compiles what is missing (--recompile: all of its cases); the cache
also records each command and its cases, and --out renders every recorded command's cases as the markdown report
(docs/scale.md).

Validation on a real device (`--execute`; docs/scale.md, section `H200 validation`): on one accelerator, build the
same case with random state (shapes from `jax.eval_shape(init_state)`, each leaf made on its own onto its sharding by
`marval_jax.benchmarks.random_init`: no initialiser is compiled), run a few steps on a fixed random batch and compare
the allocator's peak with the cached N = 1 CPU prediction; the JSON (default `scale_execute_<model>_<step>_b<b>.json`)
is written before the compile and after every phase. `--record FILE` adds the result to the report, also a run cut
short after its compile (its compiled peak is compared, the executed peak marked as not measured, `--note` says why).
`--device_probes 8,16` first compiles the step on the device at those batches (not run): the device-compiled
prediction of the executed batch's peak, since the CPU compiler holds bf16 activations at f32 size (docs/scale.md):

    python -m marval_jax.tools.scale_check --execute --devices 1 --models base --steps gsim \
        --mesh data=1,fsdp=1,tensor=1 --batches 8,16 --execute_batch 32 --device_probes 8,16 --execute_steps 3 \
        --compile_options xla_gpu_autotune_level=0 --out $OUT/h200_gsim.json
    python -m marval_jax.tools.scale_check --record $OUT/h200_gsim.json --out docs/scale.md

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

from marval_jax.user_errors import UserError, add_verbose_flag, run_cli

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
    from marval_jax.train import distill_task, mar_task
    stub = lambda config, cfg: (lambda tokens: tokens)  # noqa: E731
    stack = contextlib.ExitStack()
    for mod in (mar_task, distill_task):
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
        raise UserError(f"unknown step {step!r}; choose one of {STEPS}")
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
    """make_rl_task's own train step; its frozen weights (reward, class prompts' text embeddings, VAE decoder: the
    task's `frozen`) are the step's extra argument, as in the training loop. CLIP-H and the VAE are built abstract
    (shapes only, nothing allocated, no text tower run)."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from marval_jax.models.vae import AutoencoderKL
    from marval_jax.models.vae_tokenizer import vae_decode_fn
    from marval_jax.rewards import clip as clip_lib
    from marval_jax.rewards import registry
    from marval_jax.train import rl_task

    tok = config.tokenizer
    reward_name = config.rl.reward
    patches = contextlib.ExitStack()
    if reward_name in ("pickscore", "clip_score") and tok.kind == "vae":
        def abstract_clip(cc, seed=0):  # stands in for clip.random_params: shapes only, nothing allocated
            return nnx.split(nnx.eval_shape(lambda: clip_lib.CLIP(cc, rngs=nnx.Rngs(0))))[1]
        real_make_reward = registry.make_reward
        emb = jax.ShapeDtypeStruct((cfg.class_num, VIT_H_14["projection_dim"]), jnp.float32)

        def make_reward(name, _cfg=None):  # CLIP-H (PickScore's size), prompt embeddings as shapes
            r = real_make_reward(name, {"clip_config": VIT_H_14, "seed": 0, "dtype": config.rl.reward_config.dtype})
            return dataclasses.replace(r, prepare_fn=lambda params, prompts: emb)

        def decoder_parts(_config, cfg_):
            vae = nnx.eval_shape(lambda: AutoencoderKL(ch=tok.vae_ch, ch_mult=tuple(tok.vae_ch_mult),
                                                       embed_dim=cfg_.vae_embed_dim, rngs=nnx.Rngs(0)))
            graphdef, state = nnx.split(vae)
            return vae_decode_fn(graphdef, float(tok.scale), cfg_), state

        patches.enter_context(_patched(clip_lib, "random_params", abstract_clip))
        patches.enter_context(_patched(registry, "make_reward", make_reward))
        patches.enter_context(_patched(rl_task, "decoder_parts", decoder_parts))
        patches.enter_context(_patched(rl_task, "class_names", lambda c: [str(i) for i in range(cfg.class_num)]))
    elif tok.kind != "pixel_patch":
        raise ValueError(f"scale check: RL with reward {reward_name!r} and tokenizer {tok.kind!r} is not modelled")
    with patches:
        task = rl_task.make_rl_task(config)
    labels_batch = lambda b: {"labels": jax.ShapeDtypeStruct((b,), jnp.int32)}  # noqa: E731
    extra_bytes = {k: _nbytes(v) for k, v in task.frozen.items()}
    return Built(task.init_state, task.train_step, task.logical_axes, labels_batch, (task.frozen,), extra_bytes)


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


def _outside_steps(path: str) -> bool:
    """Files no train step imports (benchmarks, evaluation, CLI entry points, other tools): edits there leave the
    compiled programs unchanged, so they do not make a stamp dirty."""
    return (path.startswith(("marval_jax/benchmarks/", "marval_jax/evaluation/", "marval_jax/main.py",
                             "marval_jax/demo.py")) or
            (path.startswith("marval_jax/tools/") and path != "marval_jax/tools/scale_check.py"))


def _commit() -> str | None:
    """The repository's short commit, with "+dirty" when the code differs from it (None outside a git checkout)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=30)
        if head.returncode:
            return None
        status = subprocess.run(["git", "status", "--porcelain", "--", "marval_jax", "configs"], cwd=root,
                                capture_output=True, text=True, timeout=30).stdout.splitlines()
        dirty = [line[3:] for line in status if not line.startswith("??") and not _outside_steps(line[3:])]
        return head.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


# ------------------------------------------------------------------------------------------------ execute
def _memory_analysis(compiled) -> dict | None:
    try:
        ma = compiled.memory_analysis()
    except Exception:  # noqa: BLE001  (a backend without it)
        return None
    if ma is None:
        return None
    out = dict(argument=int(ma.argument_size_in_bytes), output=int(ma.output_size_in_bytes),
               alias=int(ma.alias_size_in_bytes), temp=int(ma.temp_size_in_bytes))
    out["peak"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    if getattr(ma, "peak_memory_in_bytes", None) is not None:
        out["compiler_peak"] = int(ma.peak_memory_in_bytes)
    return out


def _memory_stats(device) -> dict | None:
    try:
        stats = device.memory_stats()
    except Exception:  # noqa: BLE001  (CPU: None or not implemented)
        return None
    if not stats:
        return None
    return {k: int(stats[k]) for k in ("peak_bytes_in_use", "bytes_in_use", "bytes_limit", "largest_alloc_size")
            if k in stats}


def find_prediction(cache: dict, devices: int, mesh_shape: dict, model: str, step: str, remat: bool | None,
                    batch: int, batches: list[int] | None = None) -> dict | None:
    """The cached CPU case for this device count / mesh / model / step (the one compiled at `batches` if cached,
    else the one whose probes bracket `batch`) and its fit evaluated at `batch`."""
    cands = [(k, r) for k, r in cache.items() if not k.startswith("_") and isinstance(r, dict)
             and "error" not in r and r.get("devices") == devices and r.get("model") == model
             and r.get("step") == step and r.get("remat") == remat and r.get("mesh") == mesh_shape
             and fit(r) is not None]
    if not cands:
        return None

    def rank(kr):
        k, r = kr
        bs = sorted(p["per_device_batch"] for p in r["probes"])
        return (batches is None or k.split("|b=")[-1] != ",".join(map(str, batches)), not bs[0] <= batch <= bs[-1],
                -bs[-1])
    key, rec = sorted(cands, key=rank)[0]
    fixed, per = fit(rec)
    probe = next((p for p in rec["probes"] if p["per_device_batch"] == batch), None)
    return dict(key=key, fixed=fixed, per_example=per, predicted_peak=fixed + batch * per,
                probe_peak=None if probe is None else probe["peak"], cpu_jax=rec.get("jax"),
                commit=rec.get("commit"), date=rec.get("date"))


def _write_json(path: str, obj: dict) -> None:
    if not path:
        return
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


def execute_case(model: str, step: str, mesh_spec: dict | None, remat: bool | None, batch: int, num_steps: int,
                 rl_num_iter: int, devices: int, cache: dict, batches: list[int] | None, out: str = "",
                 seed: int = 0, compile_options: dict | None = None, command: str | None = None,
                 device_probes: list[int] | None = None) -> dict:
    """Runs the train step for real on the first `devices` accelerators and measures its memory.

    `device_probes` (e.g. [8, 16]): before that, the same step is compiled (not run) on this backend at each of
    these per-device batches, and the device's own fit fixed + b x per_example of their compiled peaks, plus the
    state the step does not read but the device holds (`state_not_read`), is the device-compiled prediction of the
    allocator's peak at `batch`. With `batch` outside the probes that is a prediction in the proper sense (no
    number of the executed program enters it), the way the table's GPU rows would be made on the target compiler.

    The same task, shardings and jit as the compile-only cases (and as `marval_jax.train.loop`): the step is
    compiled first (on abstract shapes, so compile-time allocations do not add to the peak), then the state is made
    leaf by leaf on its shardings (`random_init.random_like` with `train_state_rule`: parameters, EMA and frozen
    copies N(0, 0.02^2) drawn on the host, optimizer state zeros on the device; jitting `init_state` instead
    compiles one program for the three MAR copies: the benchmark suite's one-program MAR-B init was still compiling
    on the H200 when the suite was killed at 435 s, and this path's run of 2026-11-29 was killed in that phase), a
    fixed random batch is made the same way, and `num_steps` steps run with the state donated. Reports the
    compiled program's memory_analysis on this backend, the allocator's `peak_bytes_in_use` (None where the backend
    keeps no statistics, e.g. CPU) and the cached CPU prediction (fixed + batch x per_example of the matching
    compile-only case) with the relative differences. The JSON at
    `out` is written before the compile and rewritten after each phase (`phase` names the one in progress), so a
    run cut short still leaves what it measured and where it stopped. `compile_options`
    (XLA debug options, e.g. {"xla_gpu_autotune_level": 0}) go to the step's compile; one this XLA rejects is
    dropped (noted in the JSON) and the step compiled with the defaults.
    """
    import jax
    import numpy as np
    from marval_jax.parallel import mesh as mesh_lib
    from marval_jax.parallel import sharding as shd
    from marval_jax.train.loop import state_shardings

    t_start = time.time()
    all_devices = jax.devices()
    if devices > len(all_devices):
        raise RuntimeError(f"--devices {devices}: only {len(all_devices)} {all_devices[0].platform} devices here")
    devs = all_devices[:devices]
    # a first record before building the task (config, shapes, shardings: seconds), so even that is visible
    _write_json(out, dict(mode="execute", phase="build", devices=devices, model=model, step=step,
                          per_device_batch=batch, num_steps=num_steps, device_kind=getattr(devs[0], "device_kind", "?"),
                          platform=devs[0].platform, jax=jax.__version__, date=datetime.date.today().isoformat(),
                          command=command))
    config = load_config(step, model, mesh_spec, remat, rl_num_iter)
    built = build_case(step, config)
    mesh = mesh_lib.make_mesh(config.mesh, devices=devs)
    rules = config.mesh.logical_axis_rules
    abstract = jax.eval_shape(built.init_state, jax.random.PRNGKey(seed))
    shardings = state_shardings(abstract, built, mesh, rules)
    batch_shd = shd.batch_sharding(mesh, rules)
    repl = shd.replicated(mesh)
    shards = mesh.shape["data"] * mesh.shape["fsdp"]
    breakdown = _state_breakdown(abstract, shardings)
    batch_abstract = built.batch_fn(batch * shards)
    rec: dict[str, Any] = dict(
        mode="execute", devices=devices, model=model, step=step, remat=remat, mesh=dict(mesh.shape),
        per_device_batch=batch, global_batch=batch * shards, num_steps=num_steps,
        rl_num_iter=rl_num_iter if step == "rl" else None, platform=devs[0].platform,
        device_kind=getattr(devs[0], "device_kind", "?"), jax=jax.__version__,
        xla_flags=os.environ.get("XLA_FLAGS", ""), state=breakdown, state_total=sum(breakdown.values()),
        batch_bytes=_tree_bytes_per_device(batch_abstract, batch_shd), model_dtype=str(config.model.dtype),
        commit=_commit(), date=datetime.date.today().isoformat(), command=command, out=out or None)
    rec["prediction"] = pred = find_prediction(cache, devices, dict(mesh.shape), model, step, remat, batch, batches)
    phases: dict[str, float] = {}

    def phase(name: str) -> None:  # the phase about to start, written first so a kill mid-phase is visible
        rec["phase"] = name
        phases[name] = round(time.time() - t_start, 1)
        rec["phase_started_s"] = dict(phases)
        _write_json(out, rec)
        print(f"[scale_check --execute] {phases[name]:7.1f}s {name}", file=sys.stderr, flush=True)

    jitted = jax.jit(built.train_step, in_shardings=(shardings, batch_shd) + (repl,) * len(built.extra),
                     out_shardings=(shardings, None), donate_argnums=0)
    state_in = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                      abstract, shardings)
    extra_in = tuple(jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=repl), e)
                     for e in built.extra)
    rec["compile_options"] = dict(compile_options or {})

    def compile_at(b: int):
        nonlocal compile_options
        batch_in = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=batch_shd),
                                          built.batch_fn(b * shards))
        t0 = time.time()
        lowered = jitted.lower(state_in, batch_in, *extra_in)
        try:
            compiled = lowered.compile(compiler_options=compile_options or None)
        except Exception as e:  # noqa: BLE001  (an option this XLA does not know: compile with its defaults)
            if not compile_options:
                raise
            rec["compile_options_error"], rec["compile_options"] = f"{type(e).__name__}: {str(e)[:300]}", {}
            compile_options = None
            compiled = lowered.compile()
        return compiled, round(time.time() - t0, 1)

    probes_b = [b for b in (device_probes or []) if b != batch]
    if probes_b:
        rec["device_probes"] = []
        for b in probes_b:
            phase(f"probe b={b}")
            compiled, secs = compile_at(b)
            rec["device_probes"].append(dict(per_device_batch=b, compile_s=secs, **(_memory_analysis(compiled) or {})))
            del compiled
            _write_json(out, rec)
    phase("compile")
    compiled, rec["compile_s"] = compile_at(batch)
    rec["compiled"] = _memory_analysis(compiled)
    if rec["compiled"]:  # state leaves the step never reads (jit prunes them) stay allocated but are not arguments
        rec["state_not_read"] = max(0.0, rec["state_total"] + rec["batch_bytes"] - rec["compiled"]["argument"])
    rec["device_prediction"] = device_prediction(rec)
    rec["memory_after_compile"] = _memory_stats(devs[0])
    if pred is not None and rec["compiled"]:
        rec["compiled_rel_diff"] = (rec["compiled"]["peak"] - pred["predicted_peak"]) / pred["predicted_peak"]
    print(f"[scale_check --execute] compiled in {rec['compile_s']:.0f}s; compiled peak "
          f"{(rec['compiled'] or {}).get('peak', float('nan')) / GB:.2f} GB", file=sys.stderr, flush=True)
    phase("init")

    from marval_jax.benchmarks import random_init
    t0 = time.time()
    state = random_init.random_like(abstract, seed, random_init.train_state_rule, shardings)
    batch_arr = random_init.random_like(batch_abstract, seed + 1, random_init.data_rule, batch_shd)
    extra = tuple(random_init.random_like(e, seed + 2 + i, _frozen_input_rule, repl)
                  for i, e in enumerate(built.extra))
    jax.block_until_ready((state, batch_arr, extra))
    rec["init_s"] = round(time.time() - t0, 1)
    rec["init"] = "random_init.random_like (host draws + device zeros, per leaf; no compiled initialiser)"
    try:  # donation needs one buffer per leaf (XLA copies repeated outputs, but check)
        ptrs = [x.unsafe_buffer_pointer() for x in jax.tree_util.tree_leaves(state)]
        if len(set(ptrs)) < len(ptrs):
            state = jax.tree_util.tree_map(lambda x: x.copy(), state)
    except Exception:  # noqa: BLE001  (no buffer pointers on this backend: leave as is)
        pass
    rec["memory_after_init"] = _memory_stats(devs[0])

    step_s, losses = [], []
    for i in range(num_steps):
        phase(f"step {i + 1}/{num_steps}")
        t0 = time.time()
        state, metrics = compiled(state, batch_arr, *extra)
        jax.block_until_ready((state, metrics))
        step_s.append(round(time.time() - t0, 3))
        losses.append(float(np.asarray(metrics.get("loss", np.nan))))
        rec.update(step_s=step_s, loss=losses, memory=_memory_stats(devs[0]))
        _write_json(out, rec)
    measured = (rec.get("memory") or {}).get("peak_bytes_in_use")
    if pred is not None and measured is not None:
        rec["rel_diff"] = (measured - pred["predicted_peak"]) / pred["predicted_peak"]
        rec["within_15pct"] = abs(rec["rel_diff"]) <= 0.15
    dpred = rec.get("device_prediction")
    if dpred is not None and measured is not None:
        rec["device_rel_diff"] = (measured - dpred["predicted_peak"]) / dpred["predicted_peak"]
        rec["device_within_15pct"] = abs(rec["device_rel_diff"]) <= 0.15
    rec["total_s"] = round(time.time() - t_start, 1)
    rec["phase"] = "done"
    _write_json(out, rec)
    print(execute_summary(rec), flush=True)
    return rec


def device_prediction(rec: dict) -> dict | None:
    """The device-compiled prediction of an --execute run with --device_probes: fixed + b x per_example fitted to
    the device's compiled peaks at the probe batches, evaluated at the run's batch, plus the state the device holds
    but the program does not read (None without two distinct probes)."""
    probes = [p for p in rec.get("device_probes") or [] if "peak" in p]
    f = fit({"probes": probes})
    if f is None:
        return None
    fixed, per = f
    b = rec["per_device_batch"]
    unread = rec.get("state_not_read") or 0.0
    return dict(fixed=fixed, per_example=per, state_not_read=unread, predicted_peak=fixed + b * per + unread,
                probe_batches=sorted(p["per_device_batch"] for p in probes),
                interpolated=min(p["per_device_batch"] for p in probes) <= b <= max(p["per_device_batch"]
                                                                                     for p in probes))


def _frozen_input_rule(names, leaf):
    """Frozen jit arguments (RL: reward and VAE decoder weights, prompt embeddings): weights as parameters,
    integers a class id."""
    import jax.numpy as jnp
    from marval_jax.benchmarks import random_init
    if jnp.issubdtype(leaf.dtype, jnp.integer):
        return ("randint", 0, 10)
    return random_init.param_rule(names, leaf)


def executed_steps(rec: dict) -> int:
    return len(rec.get("step_s") or [])


def measured_key(m: dict) -> str:
    """Key of a recorded --execute run: one per device, case, date and extent (a run cut short before its steps
    stays listed beside a later complete run of the same case)."""
    extent = "steps" if executed_steps(m) else "compile-only"
    return (f"{m['device_kind']}|n={m['devices']}|{m['model']}|{m['step']}|b={m['per_device_batch']}|"
            f"{m.get('date', '?')}|{extent}")


def not_executed_reason(m: dict) -> str | None:
    """Why a recorded run has no executed peak (None if its steps ran): the --note, else what its JSON shows."""
    if executed_steps(m):
        return None
    # a JSON written before runs carried their phase: inferred from what is there
    phase = m.get("phase") or ("step 1" if "init_s" in m else "init" if m.get("compiled") else "compile")
    where = {"build": "while the task was being built", "compile": "during the step's compile",
             "init": "after the step's compile, before the state was initialised and any step ran"}
    text = "the run ended " + where.get(phase, f"during {phase}, before a step completed")
    return f"{m['note'].rstrip('.')}; {text}" if m.get("note") else text


def execute_summary(rec: dict) -> str:
    """One line: measured and compiled peaks on the device against the CPU prediction."""
    gb = lambda x: "n/a" if x is None else f"{x / GB:.2f} GB"  # noqa: E731
    measured = (rec.get("memory") or {}).get("peak_bytes_in_use")
    compiled = (rec.get("compiled") or {}).get("peak")
    pred = rec.get("prediction")
    text = (f"[scale_check --execute] {rec['device_kind']} x{rec['devices']} {rec['model']} {rec['step']} "
            f"b={rec['per_device_batch']} ({len(rec.get('step_s', []))} steps): peak_bytes_in_use {gb(measured)}, "
            f"compiled peak {gb(compiled)}, CPU prediction "
            + (f"{gb(pred['predicted_peak'])} ({pred['key']})" if pred else "n/a (no cached CPU case)"))
    if rec.get("rel_diff") is not None:
        text += (f"; measured vs prediction {100 * rec['rel_diff']:+.1f}% "
                 f"({'within' if rec['within_15pct'] else 'NOT within'} 15%)")
    if rec.get("compiled_rel_diff") is not None:
        text += f"; compiled vs prediction {100 * rec['compiled_rel_diff']:+.1f}%"
    dpred = rec.get("device_prediction")
    if dpred is not None:
        text += (f"; device-compiled prediction {gb(dpred['predicted_peak'])} (fit of b="
                 f"{','.join(map(str, dpred['probe_batches']))})")
        if rec.get("device_rel_diff") is not None:
            text += (f", measured vs it {100 * rec['device_rel_diff']:+.1f}% "
                     f"({'within' if rec['device_within_15pct'] else 'NOT within'} 15%)")
    return text


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


LEGACY = "before 5998cc3"  # cases cached before records carried their commit (the table of 2026-11-29)
H200_COMMAND = ("python -m marval_jax.tools.scale_check --execute --devices 1 --models base --steps gsim "
                "--mesh data=1,fsdp=1,tensor=1 --batches 8,16 --execute_batch 32 --device_probes 8,16 "
                "--execute_steps 3 --compile_options xla_gpu_autotune_level=0 --out $OUT/h200_gsim.json")
RECORD_COMMAND = "python -m marval_jax.tools.scale_check --record $OUT/h200_gsim.json --out docs/scale.md"


def _code(rec: dict) -> str:
    return rec.get("commit") or LEGACY


def _commands_block(commands) -> list[str]:
    if isinstance(commands, str):
        commands = [dict(command=commands)]
    out = []
    for c in commands:
        out += [f"    {c['command']}" + (f"    # {c['date']}" if c.get("date") else ""), ""]
    return out


def render(records: list[dict], hbm: dict[str, float], fraction: float, commands, date: str = "",
           missing: list[str] = (), measured: list[dict] = ()) -> str:
    """The markdown report. `commands`: the command line (str) or [{"command", "date"}, ...] of every command
    whose cases are in `records`; `measured`: `--execute` results recorded with --record."""
    import jax
    names = {"base": "B", "large": "L", "huge": "H"}
    if isinstance(commands, str):
        commands = [dict(command=commands, date=date)]
    lines = [
        "# Scale check: per-device memory of the train steps",
        "",
        f"Produced with jax {jax.__version__} on CPU with forced host devices (nothing allocated) by the commands below",
        "(each with the date it was last run; the `code` column of `What ran` gives the commit each case was compiled",
        "at):",
        "",
        *_commands_block(commands),
        "Each case (N, model, step) is compiled in its own process and cached in the JSON next to the report",
        "(`--cache`), which also records the commands; rerunning any of them compiles only what the cache lacks",
        "(`--recompile`: everything it names) and rewrites the report from every recorded command.",
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
        "estimates. One device's numbers can be checked against a real run: a 64-device mesh does not fit on one",
        "H200, so the `N = 1` section compiles the MARVAL-B GSIM step for a single device (the same program an H200",
        "runs), and `--execute` runs that step on the accelerator (section `H200 validation`).",
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
    findings = _findings(ok) + _error_findings([r for r in records if "error" in r])
    if findings:
        lines += ["## Findings", ""] + [f"- {f}" for f in findings] + [""]
    for n in sorted({r["devices"] for r in ok}):
        rows = sorted([r for r in ok if r["devices"] == n], key=lambda r: (
            ["base", "large", "huge"].index(r["model"]) if r["model"] in names else 9, STEPS.index(r["step"]),
            not r.get("remat")))
        meshes = sorted({",".join(f"{k}={v}" for k, v in r["mesh"].items()) for r in rows})
        title = "1 device (one H200" if n == 1 else f"{n} devices ("
        lines += [f"## N = {title}{'; ' if n == 1 else ''}mesh {'; '.join(meshes)})", ""]
        dev_rows = [(m, _cpu_case(ok, m)) for m in _device_compiled_runs(measured) if m["devices"] == n]
        if n == 1:
            lines += ["The single-device program that a real run on one accelerator executes; its CPU-compiled GSIM",
                      "row is the CPU prediction the `H200 validation` section compares with."]
        lines += _device_rows_intro([m for m, _ in dev_rows], [m for m in measured if m.get("devices") == n])
        if n == 1 or dev_rows:
            lines.append("")
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
        for m, cpu in dev_rows:
            lines.append(_device_compiled_row(m, cpu, hbm, fraction))
        lines.append("")
    lines += _validation_section(measured, ok)
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
              "| N | model | step | per-device batches | compile s (each) | code |", "|---|---|---|---|---|---|"]
    for r in sorted(ok, key=lambda r: (r["devices"], r["model"], r["step"], not r.get("remat"))):
        lines.append(f"| {r['devices']} | {r['model']} | {_step_label(r)} | "
                     f"{', '.join(str(p['per_device_batch']) for p in r['probes'])} | "
                     f"{', '.join(str(int(p['compile_s'])) for p in r['probes'])} | {_code(r)} |")
    for r in bad:
        remat = "" if r.get("remat") is None else (" remat on" if r["remat"] else " remat off")
        lines.append(f"| {r['devices']} | {r['model']} | {r['step']}{remat} | failed | {r['error'][:200]} | "
                     f"{_code(r)} |")
    lines.append("")
    if missing:
        lines += ["Not run yet (the commands above compile them): " + "; ".join(missing) + ".", ""]
    return "\n".join(lines)


def _cpu_cases(records: list[dict], m: dict) -> list[dict]:
    """The compile-only CPU cases of a recorded run's device count, model, step, remat and mesh."""
    return [r for r in records if (r.get("devices"), r.get("model"), r.get("step"), r.get("remat"), r.get("mesh"))
            == (m["devices"], m["model"], m["step"], m.get("remat"), m.get("mesh"))]


def _cpu_case(records: list[dict], m: dict) -> dict | None:
    """The CPU case whose row a recorded run's device-compiled row stands beside (the one its prediction used)."""
    cases = _cpu_cases(records, m)
    key = (m.get("prediction") or {}).get("key", "")
    keyed = [r for r in cases if key.endswith("|b=" + ",".join(str(p["per_device_batch"]) for p in r["probes"]))]
    return (keyed or cases or [None])[0]


def _cpu_probe(records: list[dict], m: dict) -> dict | None:
    """The compile-only CPU probe of the run's case at the run's per-device batch (its prediction's source)."""
    for r in _cpu_cases(records, m):
        for p in r.get("probes", []):
            if p["per_device_batch"] == m["per_device_batch"]:
                return p
    return None


def _device_name(kind: str) -> str:
    """A recorded run's device_kind as the tables name it: 'NVIDIA H200' -> 'H200'."""
    return re.sub(r"^(NVIDIA|AMD)\s+", "", kind or "?")


def _device_compiled_runs(measured) -> list[dict]:
    """The recorded --execute runs with a device-compiled prediction (--device_probes), the newest per device and
    case (by date, then executed steps, then the order they were recorded in)."""
    newest: dict[tuple, dict] = {}
    for m in sorted(measured, key=lambda m: (m.get("date", ""), executed_steps(m))):
        if device_prediction(m) is not None:
            mesh = tuple(sorted((m.get("mesh") or {}).items()))
            newest[(m["device_kind"], m["devices"], m["model"], m["step"], m.get("remat"), mesh)] = m
    return list(newest.values())


def _device_row_label(m: dict) -> str:
    d = device_prediction(m)
    return (f"{_step_label(m)}, {_device_name(m['device_kind'])}-compiled "
            f"(b={','.join(map(str, d['probe_batches']))})")


def _device_allocator_diff(m: dict) -> float | None:
    """The allocator's peak of an executed run relative to its device-compiled prediction (None if not measured)."""
    mem = (m.get("memory") or {}).get("peak_bytes_in_use")
    d = device_prediction(m)
    if mem is None or d is None or not executed_steps(m):
        return None
    return (mem - d["predicted_peak"]) / d["predicted_peak"]


def _device_compiled_row(m: dict, cpu: dict | None, hbm: dict[str, float], fraction: float) -> str:
    """The table row of a recorded run's device-compiled fit (`device_prediction`): `fixed` includes the state the
    device holds but the step does not read, so fixed + b x per_example is the device-compiled prediction; the
    state columns are the run's (the CPU case's where the run lacks them), `cfg b` the CPU case's."""
    names = {"base": "B", "large": "L", "huge": "H"}
    d = device_prediction(m)
    fixed, per = d["fixed"] + d["state_not_read"], d["per_example"]
    src = m if m.get("state") else (cpu or {})
    s = src.get("state")
    frozen_args = _frozen_args(cpu) if cpu else 0.0
    if s:
        state_s = (f"{_gb(s['params'])} | {_gb(s['optimizer'])} | {_gb(s['ema'])} | {_gb(s['frozen'] + frozen_args)}"
                   f" | {_gb(src['state_total'] + frozen_args)}")
    else:
        state_s = " | ".join(["?"] * 5)
    cfg_b = f"{cpu['config_global_batch'] / cpu['batch_shards']:g}" if cpu else "?"
    probes = ", ".join(f"{p['per_device_batch']}: {_gb(p['peak'])}"
                       for p in sorted(m["device_probes"], key=lambda p: p["per_device_batch"]) if "peak" in p)
    # only the device's own HBM column: another chip's compiler lays the program out differently
    dev = _device_name(m["device_kind"]).lower()
    fits = [str(max_batch(fixed, per, h, fraction)) if dev in name.lower() else "-" for name, h in hbm.items()]
    model = f"MAR{'VAL' if m['step'] in ('gsim', 'rl') else ''}-{names.get(m['model'], m['model'])}"
    return (f"| {model} | {_device_row_label(m)} | {state_s} | {_gb(fixed)} | {_gb(per)} | {probes} | {cfg_b} | "
            + " | ".join(fits) + " |")


def _cpu_vs_device(measured: list[dict], kind: str) -> list[float]:
    """Recorded runs on `kind`: their allocator and compiled peaks relative to the CPU prediction."""
    out = []
    for m in measured:
        if m.get("device_kind") != kind or not m.get("prediction"):
            continue
        pred = m["prediction"]["predicted_peak"]
        if m.get("rel_diff") is not None and executed_steps(m):
            out.append(m["rel_diff"])
        if (m.get("compiled") or {}).get("peak"):
            out.append((m["compiled"]["peak"] - pred) / pred)
    return out


def _range(lo: float, hi: float, sign: str = "") -> str:
    """Percentages rounded to integers as 'lo% to hi' (the caller appends the last '%'); one number where both
    round alike."""
    a, b = f"{lo:{sign}.0f}", f"{hi:{sign}.0f}"
    return a if a == b else f"{a}% to {b}"


def _device_rows_intro(runs: list[dict], measured: list[dict]) -> list[str]:
    """Sentences above a table with device-compiled rows: what the CPU rows are on that device (from the recorded
    runs) and which row the executed run validates."""
    out = []
    for m in runs:
        dev, d = _device_name(m["device_kind"]), device_prediction(m)
        rels = _cpu_vs_device(measured, m["device_kind"])
        if rels and max(rels) < 0:
            where = "GPUs" if m.get("platform") == "gpu" else f"the {dev}"
            out.append(f"The CPU-compiled rows are upper bounds on {where}: XLA's CPU compiler holds the bf16 "
                       f"activations at near-f32 size, and the {dev} runs recorded in `H200 validation` peak "
                       f"{_range(-100 * max(rels), -100 * min(rels))}% below their CPU prediction (allocator and "
                       "compiled peaks).")
        elif rels:
            out.append(f"The {dev} runs recorded in `H200 validation` peak "
                       f"{_range(100 * min(rels), 100 * max(rels), '+')}% from their CPU prediction (allocator and "
                       "compiled peaks).")
        text = (f"The `{_device_row_label(m)}` row fits the step compiled on the {dev} (not run) at b = "
                f"{', '.join(map(str, d['probe_batches']))}; its `fixed` includes the {_gb(d['state_not_read'])} GB "
                "of state the device holds but the step does not read; it describes the step's code at "
                f"{m.get('commit') or '?'} and fills only the {dev}'s HBM column")
        rel = _device_allocator_diff(m)
        if rel is None:
            text += "; no allocator peak has been measured against it yet."
        else:
            mem = m["memory"]["peak_bytes_in_use"]
            text += (f". It is the row validated against the executed run ({m.get('date', '?')}, "
                     f"{m.get('commit') or '?'}): {_gb(d['predicted_peak'])} GB at b = {m['per_device_batch']}, "
                     f"the allocator's peak {_gb(mem)} GB is {_pct(rel)} from it "
                     f"({'within' if abs(rel) <= 0.15 else 'not within'} 15%).")
        out.append(text)
    return ["", " ".join(out)] if out else []


def _validation_summary(measured: list[dict]) -> list[str]:
    """Per device and case, the newest executed run with a device-compiled prediction: which prediction its
    allocator peak is within 15% of (computed from the run's JSON)."""
    out = []
    for m in _device_compiled_runs(measured):
        rel = _device_allocator_diff(m)
        if rel is None:
            continue
        d, mem, pred = device_prediction(m), m["memory"]["peak_bytes_in_use"], m.get("prediction")
        dev = _device_name(m["device_kind"])
        text = (f"**Which prediction holds** ({m['device_kind']} x{m['devices']}, b = {m['per_device_batch']}, run "
                f"of {m.get('date', '?')}, {m.get('commit') or '?'}): the allocator's peak {_gb(mem)} GB is "
                f"**{'within' if abs(rel) <= 0.15 else 'not within'} 15% of the {dev}-compiled prediction** "
                f"{_gb(d['predicted_peak'])} GB ({_pct(rel)}; the `{_device_row_label(m)}` row of the N = "
                f"{m['devices']} table)")
        if pred:
            crel = (mem - pred["predicted_peak"]) / pred["predicted_peak"]
            text += (f" and **{'within' if abs(crel) <= 0.15 else 'not within'} 15% of the CPU-compiled "
                     f"prediction** {_gb(pred['predicted_peak'])} GB ({_pct(crel)}; the CPU `{_step_label(m)}` row)")
        out.append(text + ".")
    return out


def _pct(x: float) -> str:
    return f"{100 * x:+.1f}%"


def _validation_notes(m: dict, records: list[dict]) -> list[str]:
    """What one recorded run shows, computed from its JSON (so a rerun states its own)."""
    out = []
    run = f"{m['device_kind']} ({m.get('date', '?')}, jax {m.get('jax', '?')}, {m.get('commit') or '?'})"
    why = not_executed_reason(m)
    if why:
        out.append(f"{run}: executed peak **not measured**: {why}. Only the compiled program's memory is compared.")
    elif m.get("note"):
        out.append(f"{run}: {m['note'].rstrip('.')}.")
    comp, pred = m.get("compiled"), m.get("prediction")
    if comp:
        opts = m.get("compile_options") or {}
        out.append(f"The step compiled on the device in {m.get('compile_s', float('nan')):.0f} s"
                   + (f" ({', '.join(f'{k}={v}' for k, v in opts.items())})" if opts else "") + ".")
    cpu = _cpu_probe(records, m)
    if comp and cpu:
        parts = [(k, comp[k], cpu[k]) for k in ("argument", "output", "alias", "temp")]
        same = [k for k, g, c in parts[:3] if c and abs(g - c) <= 0.01 * c]
        text = ("Device vs CPU buffer assignment at b = {b}: ".format(b=m["per_device_batch"])
                + ", ".join(f"{k} {_gb(g)} vs {_gb(c)} GB" for k, g, c in parts) + ".")
        if len(same) == 3:
            text += (f" Arguments, outputs and aliased (donated) bytes agree to 1%: the whole difference is in the "
                     f"temporaries ({_pct((comp['temp'] - cpu['temp']) / cpu['temp'])}).")
        out.append(text)
    if comp and pred:
        rel = (comp["peak"] - pred["predicted_peak"]) / pred["predicted_peak"]
        text = (f"Compiled peak on the device {_gb(comp['peak'])} GB vs the CPU prediction "
                f"{_gb(pred['predicted_peak'])} GB: {_pct(rel)}")
        unread = m.get("state_not_read") or 0.0
        if unread:
            with_unread = (comp["peak"] + unread - pred["predicted_peak"]) / pred["predicted_peak"]
            text += (f" ({_gb(comp['peak'] + unread)} GB, {_pct(with_unread)}, with the {_gb(unread)} GB of state "
                     "the step does not read but the device holds)")
        if rel < -0.15:
            text += (". **The CPU-compiled table over-predicts this step's memory on the device by "
                     f"{-100 * rel:.0f}% of its prediction**, outside the 15% agreement asked for: the table is "
                     "conservative for GPUs (its batch limits are below what the GPU-compiled program allows). This "
                     "is the direction stated before the run (the CPU compiler computes bf16 ops in f32 and fuses "
                     "less); the run does not separate the two causes.")
        elif rel > 0.15:
            text += (". The CPU-compiled table under-predicts this step's memory on the device, outside the 15% "
                     "agreement asked for: its batch limits are too optimistic for GPUs.")
        else:
            text += ": within the 15% agreement asked for (compiled peaks)."
        out.append(text)
    if m.get("rel_diff") is not None:
        out.append(f"Allocator peak vs the CPU prediction: {_pct(m['rel_diff'])} "
                   f"({'within' if m.get('within_15pct') else 'not within'} 15%).")
    dpred = m.get("device_prediction")
    if dpred:
        probes = ", ".join(f"b = {p['per_device_batch']}: {_gb(p['peak'])} GB ({p['compile_s']:.0f} s)"
                           for p in m.get("device_probes", []) if "peak" in p)
        text = (f"Device-compiled prediction: the step compiled on the device (not run) at {probes}; fit "
                f"{_gb(dpred['fixed'])} + b x {_gb(dpred['per_example'])} GB, at b = {m['per_device_batch']} "
                f"({'inside' if dpred['interpolated'] else 'outside'} the probes) plus {_gb(dpred['state_not_read'])}"
                f" GB of state not read: {_gb(dpred['predicted_peak'])} GB")
        if m.get("device_rel_diff") is not None:
            text += (f"; the allocator's peak is {_pct(m['device_rel_diff'])} from it "
                     f"({'within' if m.get('device_within_15pct') else 'not within'} 15%)")
        out.append(text + ".")
    return out


def _validation_section(measured: list[dict], records: list[dict] = ()) -> list[str]:
    lines = ["## H200 validation: the MARVAL-B GSIM step run on one device", "",
             "`--execute` builds the N = 1 case's task, shardings and jit, compiles the step, makes the state on the",
             "device leaf by leaf (`marval_jax.benchmarks.random_init`: parameters, EMA and teacher N(0, 0.02^2) drawn",
             "on the host and copied onto their shardings, optimizer state zeros on the device; no initialiser is",
             "compiled), draws a fixed random batch and runs a few steps with the state donated. It compares the",
             "allocator's `peak_bytes_in_use` (`jax.devices()[0].memory_stats()`) with the N = 1 row's fixed + b x",
             "per_example at the run's batch (which equals the CPU probe's peak at b = 16), and reports the device",
             "compiler's own memory_analysis beside it. Agreement within 15% validates the table for GPUs. Its JSON",
             "is written before the compile and after every phase (`phase`: the one in progress), so a run cut short",
             "can still be recorded: its compiled peak is compared and its executed peak marked as not measured",
             "(`--note` says why). With `--device_probes 8,16` the step is first compiled (not run) on the device at",
             "those batches; their compiled peaks fitted as fixed + b x per_example, evaluated at the executed batch",
             "(32: outside the probes, so nothing of the executed program enters it) plus the state the device holds",
             "but the step does not read, make the device-compiled prediction, compared with the allocator's peak",
             "too. Command (on one H200, from the repository root, ~7 min: three compiles of ~2 min), then record",
             "its JSON here:", "",
             f"    {H200_COMMAND}", f"    {RECORD_COMMAND}", "",
             "Expected differences, stated before the run: the CPU compiler runs bf16 dots and elementwise ops in f32",
             "(so some bf16 activations get f32 copies) and fuses less than the GPU compiler, which points to a",
             "prediction above the GPU's compiled peak; the allocator's peak adds what the program does not own (the",
             "batch is counted in both; cuBLAS / autotuning workspace and allocator rounding are not in the",
             "prediction), and so do state leaves the step never reads: jit prunes them from the program (GSIM: the",
             "fake score's EMA copy, ema_decay 0; 0.83 GB for B, `state_not_read` in the JSON) but they stay",
             "allocated on the device. The command compiles without GEMM autotuning (`xla_gpu_autotune_level=0`, to",
             "keep the GPU compile short); autotuning chooses kernels and their workspace, not the program's buffers.",
             "The comparison is reported as it comes out.", ""]
    if not measured:
        return lines + ["Not run yet.", ""]
    names = {"base": "B", "large": "L", "huge": "H"}
    lines += ["| device | jax | step | b | steps run (s each) | peak_bytes_in_use | device compiled peak | "
              "CPU prediction (fixed + b x per ex.) | allocator vs prediction | within 15% | compiled vs prediction "
              "| device-compiled prediction | allocator vs it | run |", "|" + "---|" * 14]
    for m in sorted(measured, key=lambda m: (m.get("date", ""), executed_steps(m))):
        mem = (m.get("memory") or {}).get("peak_bytes_in_use")
        comp = (m.get("compiled") or {}).get("peak")
        pred = m.get("prediction")
        step = f"MARVAL-{names.get(m['model'], m['model'])} {_step_label(m)}"
        rel = m.get("rel_diff")
        crel = (comp - pred["predicted_peak"]) / pred["predicted_peak"] if comp and pred else None
        ran = executed_steps(m)
        steps = f"{ran}: {', '.join(f'{t:.2f}' for t in m['step_s'])}" if ran else "none"
        if ran:
            peak = "n/a" if mem is None else _gb(mem)
        else:
            peak = "not measured"
        pred_s = ("n/a" if not pred else f"{_gb(pred['predicted_peak'])} ({_gb(pred['fixed'])} + "
                  f"{m['per_device_batch']} x {_gb(pred['per_example'])})")
        dpred, drel = m.get("device_prediction"), m.get("device_rel_diff")
        dpred_s = ("n/a" if not dpred else f"{_gb(dpred['predicted_peak'])} ({_gb(dpred['fixed'])} + "
                   f"{m['per_device_batch']} x {_gb(dpred['per_example'])} + {_gb(dpred['state_not_read'])}; "
                   f"fit of b = {', '.join(map(str, dpred['probe_batches']))})")
        drel_s = "n/a" if drel is None else f"{_pct(drel)} ({'within' if m.get('device_within_15pct') else 'not within'} 15%)"
        lines.append(
            f"| {m['device_kind']} x{m['devices']} | {m['jax']} | {step} | {m['per_device_batch']} | {steps} | "
            f"{peak} | {'n/a' if comp is None else _gb(comp)} | {pred_s} | "
            f"{'n/a' if rel is None else _pct(rel)} | "
            f"{'n/a' if rel is None else ('yes' if m.get('within_15pct') else 'no')} | "
            f"{'n/a' if crel is None else _pct(crel)} | {dpred_s} | {drel_s} | "
            f"{m.get('date', '?')}, {m.get('commit') or '?'} |")
    lines.append("")
    summary = _validation_summary(measured)
    if summary:
        lines += [*summary, ""]
    for m in sorted(measured, key=lambda m: (m.get("date", ""), executed_steps(m))):
        lines += [f"- {t}" for t in _validation_notes(m, records)]
    lines.append("")
    if not any(executed_steps(m) for m in measured):  # only runs cut short before their steps
        compile_s = max((m.get("compile_s") or 0) for m in measured)
        state = max((m.get("state_total") or 0) for m in measured)
        lines += [
            "Next call (a proposal; no executed peak exists yet): rerun the command above with room for the steps.",
            f"The compile took {compile_s:.0f} s; the state ({_gb(state)} GB) is now made leaf by leaf with no",
            "compile (~25 s for MARVAL-B GSIM's on a shared 2-core CPU; the GPU host has 16 cores) instead of by a",
            "compiled `init_state`; the steps are not timed yet (MARVAL-B GSIM at b = 16: ~17 TFLOP per step by",
            "`benchmarks/flops.py`). A limit of 300 s around the command (e.g. `timeout 300`) should leave margin.",
            "Record it with `--record`: the allocator's peak then shows what the runtime adds to the compiled peak.",
            "If the gap to the CPU table stays outside 15%, the table could be made useful for GPUs by a",
            "GPU-calibrated column (the N = 1 case compiled on the GPU at the two probe batches and fitted there as",
            "fixed + b x per_example) or by a documented correction factor for the CPU rows, derived from several",
            "measured steps and batches rather than from this one point.", ""]
    return lines


def _findings(records: list[dict]) -> list[str]:
    """Observations computed from the records (so a rerun states its own)."""
    out = []
    by = {(r["devices"], r["model"], r["step"], r.get("remat")): r for r in records}
    for (n, model, step, remat), r in sorted(by.items(), key=lambda kv: str(kv[0])):
        legacy = "commit" not in r
        if step == "mar" and (n, model, "mar_fix", None) in by:
            a, b = fit(r), fit(by[(n, model, "mar_fix", None)])
            if a and b and a[1] > 1.5 * b[1]:
                out.append(
                    f"N={n} {model}: the MAR step's per-example memory is {_gb(a[1])} GB as compiled "
                    f"({_code(r)}) and {_gb(b[1])} GB with the diffusion rows kept batch-sharded. "
                    + ("The MAR row predates the fix (5998cc3: `losses/mar_loss.diffusion_loss` makes one head call "
                       "per copy), which the `MAR, rows fix` row describes; recompile it with --recompile. "
                       if legacy else "")
                    + "A `jnp.tile(rows, (diffusion_batch_mul, 1))` of the head's rows cannot be sharded along the "
                    "batch-sharded axis, so each device runs the diffusion head on the global batch's rows (memory and "
                    "FLOPs grow with the device count).")
            elif a and b:
                out.append(f"N={n} {model}: the MAR step ({_code(r)}) and the `MAR, rows fix` candidate agree "
                           f"({_gb(a[1])} vs {_gb(b[1])} GB per example): the diffusion head's rows stay "
                           "batch-sharded (one head call per copy since 5998cc3).")
        ld = [p.get("leading_dims") for p in r.get("probes", []) if p.get("leading_dims")]
        replicated = bool(ld) and r["batch_shards"] > 1 and ld[0]["global"] > ld[0]["per_device"]
        if step == "rl" and (replicated or not ld):
            f = fit(r)
            est = f" (about {_gb(f[1] / r['batch_shards'])} GB per example once sharded, an estimate)" if f else ""
            out.append(
                f"N={n} {model} {_step_label(r)}: the step as compiled ({_code(r)}) is not batch-sharded"
                + (f" ({ld[0]['global']} arrays of the compiled program lead with the global batch, "
                   f"{ld[0]['per_device']} with the per-device batch)" if ld else "")
                + ": labels drawn inside the step with `jax.random.randint(key, batch['labels'].shape)` carry no "
                "batch sharding, so the whole trajectory (K AR iterations, VAE decode, reward) is replicated and "
                f"every device computes the global batch; `per ex.` is the cost of {r['batch_shards']} examples{est}."
                + (" The row predates the fix (5998cc3: `train/rl_task.py` derives the labels from the batch-sharded "
                   "input); recompile it with --recompile." if legacy else ""))
        elif step == "rl" and r["batch_shards"] > 1:
            f = fit(r)
            out.append(f"N={n} {model} {_step_label(r)} ({_code(r)}) is batch-sharded ({ld[0]['global']} arrays "
                       f"lead with the global batch, {ld[0]['per_device']} with the per-device batch)"
                       + (f": {_gb(f[1])} GB per example" if f else "") + ".")
        elif replicated:
            out.append(f"N={n} {model} {_step_label(r)}: {ld[0]['global']} arrays lead with the global batch vs "
                       f"{ld[0]['per_device']} with the per-device batch: part of the step is not batch-sharded.")
        if r["config_global_batch"] < r["batch_shards"]:
            out.append(f"N={n} {model} {_step_label(r)}: the config's global batch {r['config_global_batch']} is "
                       f"smaller than the {r['batch_shards']} batch shards; raise train.global_batch_size to a "
                       f"multiple of {r['batch_shards']} (or use fewer data x fsdp shards) to run it at this size.")
    return out


def _error_findings(records: list[dict]) -> list[str]:
    out = []
    for r in records:
        if "TraceContextError" in r.get("error", "") and r.get("step") == "rl" and r.get("remat") is False:
            text = (f"N={r['devices']} {r['model']} RL remat off did not trace as compiled ({_code(r)}): with "
                    "model.remat (large/huge configs) `models/transformer.run_blocks` applied `nnx.remat` to a block "
                    "merged outside the AR loop's `lax.scan` body (losses/rl.py closes over the parameters when "
                    "rl.remat is off), and flax refused to update its Params from the inner trace "
                    "(TraceContextError).")
            if "commit" not in r:
                text += (" Fixed since: run_blocks applies `jax.checkpoint` to a pure function of the block's "
                         "parameters (tests/losses/test_rl.py::test_block_remat_traces_and_keeps_the_gradients, "
                         "tests/models/test_transformer_remat.py); the case has not been recompiled.")
            out.append(text)
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
    root = _root()
    env["PYTHONPATH"] = root + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "marval_jax.tools.scale_check", "--_worker", "--result", result,
           "--_devices_one", str(n), "--_model_one", model, "--_step_one", step,
           "--_remat_one", "none" if remat is None else ("on" if remat else "off"),
           "--batches", args.batches, "--rl_num_iter", str(args.rl_num_iter), "--mesh", args.mesh or "config"]
    t0 = time.time()
    commit = _commit()  # the code this case is compiled from (read before the worker starts)
    log_path = result + ".log"  # a file, not a pipe: the worker survives its parent (and keeps its output)
    with open(log_path, "w") as log:
        try:
            proc = subprocess.run(cmd, env=env, cwd=root, timeout=args.case_timeout, stderr=log, text=True)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {args.case_timeout}s", "commit": commit, "date": args.date}
    with open(log_path) as f:
        err = f.read()
    sys.stderr.write(err[-4000:] if proc.returncode else "".join(
        l + "\n" for l in err.splitlines() if l.startswith("  b=")))
    if proc.returncode:
        lines = [l for l in err.strip().splitlines() if l.strip()]
        exc = [l for l in lines if re.match(r"^[\w.]+(Error|Exception|Exit)\b", l)]
        return {"error": f"exit {proc.returncode}: {(exc or lines or ['?'])[-1]}", "commit": commit,
                "date": args.date}
    with open(result) as f:
        rec = json.load(f)
    rec["wall_s"] = round(time.time() - t0, 1)
    rec["commit"], rec["date"] = commit, args.date
    return rec


def _root() -> str:
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _command_key(argv: list[str]) -> str:
    """The command line without the switches that do not change its cases (--date, --report_only, --recompile)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
            continue
        if a in ("--report_only", "--recompile"):
            continue
        if a == "--date":
            skip = True
            continue
        if a.startswith("--date="):
            continue
        out.append(a)
    return "python -m marval_jax.tools.scale_check " + " ".join(out)


def _save_cache(path: str, cache: dict) -> None:
    if path:
        _write_json(path, cache)


def _execute_main(args) -> int:
    devices = int(args.devices)
    (model,) = parse_list(args.models, None, "models")
    (step,) = parse_list(args.steps, STEPS, "steps")
    remat = {"on": True, "off": False}[parse_list(args.rl_remat, ("on", "off"), "rl_remat")[0]] \
        if step == "rl" else None
    cache_path = args.cache or os.path.join(_root(), "docs", "scale.json")
    cache = {}
    if os.path.exists(cache_path):
        with open(cache_path) as f:
            cache = json.load(f)
    batches = [int(b) for b in args.batches.split(",")] if args.batches else None
    out = args.out or default_execute_out(model, step, args.execute_batch)
    print(f"[scale_check --execute] writing {out} (before the compile and after every phase)", file=sys.stderr,
          flush=True)
    probes = [int(b) for b in args.device_probes.split(",") if b.strip()]
    if probes and len(set(probes) - {args.execute_batch}) < 2:
        raise UserError(f"--device_probes needs two batches other than --execute_batch, got {args.device_probes!r}")
    execute_case(model, step, parse_mesh(args.mesh), remat, args.execute_batch, args.execute_steps,
                 args.rl_num_iter, devices, cache, batches, out=out,
                 compile_options=parse_options(args.compile_options), command=_command_key(list(args.argv or [])),
                 device_probes=probes)
    return 0


def default_execute_out(model: str, step: str, batch: int) -> str:
    """--execute without --out: a JSON in the working directory named after the case."""
    return f"scale_execute_{model}_{step}_b{batch}.json"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_verbose_flag(p)
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
    p.add_argument("--out", default="", help="markdown report (e.g. docs/scale.md); stdout if empty. With "
                                             "--execute: the result JSON")
    p.add_argument("--date", default=datetime.date.today().isoformat())
    p.add_argument("--case_timeout", type=int, default=4 * 3600)
    p.add_argument("--fast_compile", type=int, default=1, help="1: XLA CPU backend at -O0 (faster, same sizes)")
    p.add_argument("--report_only", action="store_true",
                   help="render the cached cases without compiling the missing ones (still records the command)")
    p.add_argument("--recompile", action="store_true", help="compile this command's cases even when cached")
    p.add_argument("--execute", action="store_true",
                   help="run the step for real on this machine's accelerator (one --devices count, one model, one "
                        "step) at --execute_batch and compare its peak memory with the cached CPU prediction; "
                        "writes the JSON to --out")
    p.add_argument("--execute_batch", type=int, default=16, help="per-device batch of --execute")
    p.add_argument("--execute_steps", type=int, default=3, help="train steps of --execute")
    p.add_argument("--device_probes", default="", help="--execute: per-device batches at which the step is first "
                   "compiled (not run) on the device, for the device-compiled prediction, e.g. 8,16")
    p.add_argument("--compile_options", default="",
                   help="--execute: XLA options for the step's compile, name=value,... (e.g. "
                        "xla_gpu_autotune_level=0: no GEMM autotuning, a shorter GPU compile)")
    p.add_argument("--record", default="", help="an --execute JSON to add to the cache's measurements; rewrites "
                                                "--out from the recorded commands (compiles nothing). A run cut "
                                                "short after its compile is recorded with its compiled peak")
    p.add_argument("--note", default="", help="--record: a sentence stored with the run and shown in the report "
                                              "(e.g. why its steps did not run)")
    p.add_argument("--_worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", default="", help=argparse.SUPPRESS)
    p.add_argument("--_devices_one", dest="devices_one", type=int, help=argparse.SUPPRESS)
    p.add_argument("--_model_one", dest="model_one", help=argparse.SUPPRESS)
    p.add_argument("--_step_one", dest="step_one", help=argparse.SUPPRESS)
    p.add_argument("--_remat_one", dest="remat_one", help=argparse.SUPPRESS)
    argv = list(argv if argv is not None else sys.argv[1:])
    args = p.parse_args(argv)
    args.argv = argv
    if args._worker:
        return _worker_main(args)
    if args.execute:
        return _execute_main(args)

    hbm = parse_hbm(args.hbm)
    cache_path = args.cache or (os.path.splitext(args.out)[0] + ".json" if args.out else "")
    cache: dict[str, Any] = {}
    if cache_path and os.path.exists(cache_path):
        with open(cache_path) as f:
            cache = json.load(f)
    registry = cache.setdefault("_commands", {})
    compiled_now: list[str] = []
    if args.record:
        with open(args.record) as f:
            m = json.load(f)
        if args.note:
            m["note"] = args.note
        cache.setdefault("_measured", {})[measured_key(m)] = m
        _save_cache(cache_path, cache)
    else:
        devices = [int(d) for d in parse_list(args.devices, None, "devices")]
        models = parse_list(args.models, None, "models")
        steps = parse_list(args.steps, STEPS, "steps")
        remats = [{"on": True, "off": False}[r] for r in parse_list(args.rl_remat, ("on", "off"), "rl_remat")]
        mesh = parse_mesh(args.mesh)
        batches = [int(b) for b in args.batches.split(",")]
        if len(set(batches)) < 2:
            print("note: one per-device batch size: memory is reported, the batch fit is not", file=sys.stderr)
        cases = [(n, m, s, r) for n in devices for m in models for s in steps
                 for r in (remats if s == "rl" else [None])]
        command = _command_key(argv)
        registry[command] = dict(date=args.date, cases=[
            [case_key(n, mesh, m, s, r, batches), f"N={n} {m} {s}{'' if r is None else (' remat on' if r else ' remat off')}"]
            for n, m, s, r in cases])
        _save_cache(cache_path, cache)
        import tempfile
        for n, m, s, r in cases:
            key = case_key(n, mesh, m, s, r, batches)
            if args.report_only or (key in cache and "error" not in cache[key] and not args.recompile):
                continue
            print(f"[scale_check] {key}", file=sys.stderr, flush=True)
            with tempfile.TemporaryDirectory() as tmp:
                rec = _spawn(args, n, m, s, r, os.path.join(tmp, "result.json"))
            rec.setdefault("devices", n), rec.setdefault("model", m), rec.setdefault("step", s)
            rec.setdefault("remat", r)
            cache[key] = rec
            compiled_now.append(key)
            _save_cache(cache_path, cache)
    records, missing, seen = [], [], set()
    for entry in registry.values():
        for key, label in entry["cases"]:
            if key in seen:
                continue
            seen.add(key)
            if key in cache:
                records.append(cache[key])
            else:
                missing.append(label)
    commands = [dict(command=c, date=e.get("date", "")) for c, e in registry.items()]
    text = render(records, hbm, args.hbm_fraction, commands, missing=missing,
                  measured=list(cache.get("_measured", {}).values()))
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)
        print(f"wrote {args.out}", file=sys.stderr)
    else:
        print(text)
    return 1 if any("error" in cache[k] for k in compiled_now) else 0


if __name__ == "__main__":
    run_cli(main)
