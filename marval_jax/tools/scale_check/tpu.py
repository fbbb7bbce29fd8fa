"""`--target=tpu`: the scale check compiled by the TPU compiler itself, ahead of time, on a machine without a TPU.

    python -m marval_jax.tools.scale_check --target=tpu --topology=v5e:16x16 --models base --steps mar,gsim,onestep \
        --mesh data=-1,fsdp=16,tensor=1 --batch 32 --json docs/scale_tpu.json --out docs/scale.md

libtpu (`pip install '.[tpu-aot]'`, the `tpu-aot` extra) describes a pod slice offline
(`jax.experimental.topologies.get_topology_desc`); a `Mesh` over its devices shards the case exactly as the training
loop (train steps) or `programs/sample.py` (the one-step sampler: parameters replicated, labels over the batch axes)
places it, and `jax.jit(...).lower(abstract args).compile()` runs the TPU compiler on this host. Nothing is
allocated and no TPU is touched. Per case it records the compiler's per-chip `memory_analysis()` (argument, output,
aliased, temporary bytes), its `cost_analysis()` (FLOPs, bytes accessed), the compile time, our own FLOP count
(`benchmarks/flops.py`) and the roofline step time those imply on the chip (a prediction, not a measurement).

Every finished case is appended to the JSON (`--json`) at once, so a long background run keeps what it measured;
the command and its cases are recorded first, so the report can say which are still missing. `--out` renders the
JSON into docs/scale.md between the TPU markers (the CPU report keeps that block when it rewrites the file).
`--bisect` finds the largest per-chip batch that fits by compiling (doubling, then bisection); without it each case
is compiled at the one `--batch` given (a fixed per-chip batch).

This module never imports libtpu or initialises a TPU backend unless `--target=tpu` is asked for; the CPU process
of a CPU/GPU user is untouched (`JAX_PLATFORMS=cpu` stays CPU: the topology is described by libtpu's compiler, not
by a backend).
"""
from __future__ import annotations

import dataclasses
import datetime
import json
import math
import os
import re
import resource
import subprocess
import sys
import time
from typing import Any

from marval_jax.user_errors import UserError

GiB = 2 ** 30

# Per chip: HBM capacity, peak dense bf16 FLOP/s and HBM bandwidth, from Google's public Cloud TPU documentation
# (system architecture pages: https://cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e; read 2026-12).
CHIP_SOURCE = ("Google Cloud TPU documentation, system architecture pages "
               "(cloud.google.com/tpu/docs/v4, /v5e, /v5p, /v6e)")


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str                 # the generation as in topology names ("v5e")
    device_kind: str          # what jax reports for its devices
    hbm_gib: float            # HBM per chip, GiB
    peak_bf16_flops: float    # dense bf16 FLOP/s per chip
    hbm_bytes_per_s: float    # HBM bandwidth per chip
    accelerator_prefix: str   # TPU_ACCELERATOR_TYPE's prefix (v5e: "v5litepod")
    cores_per_chip: int       # the accelerator type counts TensorCores (v4, v5p) or chips (v5e, v6e)


CHIPS = {
    "v4": Chip("v4", "TPU v4", 32, 275e12, 1200e9, "v4", 2),
    "v5e": Chip("v5e", "TPU v5 lite", 16, 197e12, 819e9, "v5litepod", 1),
    "v5p": Chip("v5p", "TPU v5", 95, 459e12, 2765e9, "v5p", 2),
    "v6e": Chip("v6e", "TPU v6 lite", 32, 918e12, 1640e9, "v6e", 1),
}

TPU_STEPS = ("mar", "gsim", "rl", "onestep")
STEP_LABELS = {"mar": "MAR pretraining", "gsim": "GSIM", "rl": "RL", "onestep": "one-step sampler"}
MODEL_LETTER = {"base": "B", "large": "L", "huge": "H"}
BEGIN = "<!-- scale_check --target=tpu: begin (generated from the JSON by the tool; edit the tool, not this) -->"
END = "<!-- scale_check --target=tpu: end -->"


# ------------------------------------------------------------------------------------------------ topology
def parse_topology(name: str) -> tuple[Chip, int]:
    """'v5e:16x16' -> (the v5e chip, 256 chips)."""
    m = re.fullmatch(r"(v\w+):(\d+(?:x\d+)*)", name.strip())
    if not m or m.group(1) not in CHIPS:
        raise UserError(f"--topology: expected <chip>:<AxB[xC]> with chip one of {', '.join(CHIPS)} "
                        f"(e.g. v5e:16x16), got {name!r}")
    return CHIPS[m.group(1)], math.prod(int(d) for d in m.group(2).split("x"))


def pod_name(topology: str) -> str:
    """The Cloud TPU slice name a user rents: v5e:16x16 -> v5e-256, v5p:4x4x4 -> v5p-128 (v4/v5p count cores)."""
    chip, n = parse_topology(topology)
    return f"{chip.name}-{n * chip.cores_per_chip}"


def require_libtpu() -> None:
    """A one-line error naming the extra when libtpu (the TPU compiler) is not installed."""
    try:
        import libtpu  # noqa: F401  (its Python wrapper only: sets TPU_LIBRARY_PATH; the compiler loads later)
    except ImportError:
        raise UserError("--target=tpu needs libtpu (the TPU compiler), which is not installed: "
                        "pip install '.[tpu-aot]' (marval-jax's tpu-aot extra; jax[tpu] of the same jax version)"
                        ) from None


def quiet_libtpu_env(topology: str) -> dict[str, str]:
    """Environment that keeps libtpu from probing for a TPU VM (metadata server, worker hostnames) and warning that
    it found none: the accelerator type of the described slice, this host as its only worker. Set before the
    topology is first described in the process; values already set are kept."""
    chip, n = parse_topology(topology)
    env = {"TPU_ACCELERATOR_TYPE": f"{chip.accelerator_prefix}-{n * chip.cores_per_chip}",
           "TPU_WORKER_HOSTNAMES": "localhost", "TPU_WORKER_ID": "0", "TPU_SKIP_MDS_QUERY": "1",
           # libtpu otherwise takes /tmp/libtpu_lockfile (one process per TPU host): a compile-only process touches
           # no TPU, and two of them (a background table and a test) must not exclude each other
           "ALLOW_MULTIPLE_LIBTPU_LOAD": "1"}
    for k, v in env.items():
        os.environ.setdefault(k, v)
    return env


def topology_devices(topology: str) -> list:
    """The devices of the described slice (no TPU needed), in libtpu's order."""
    require_libtpu()
    quiet_libtpu_env(topology)
    from jax.experimental import topologies
    chip, n = parse_topology(topology)
    try:
        topo = topologies.get_topology_desc(platform="tpu", topology_name=topology)
    except Exception as e:  # libtpu's own message (an unknown shape for the chip)
        raise UserError(f"--topology={topology}: libtpu cannot describe it ({str(e).splitlines()[0]}); check "
                        "the slice shape (e.g. v5e:16x16, v5p:4x4x4, v4:4x4x4, v6e:16x16)") from e
    devices = list(topo.devices)
    if len(devices) != n:
        raise UserError(f"--topology={topology}: libtpu described {len(devices)} chips, expected {n}")
    return devices


# ------------------------------------------------------------------------------------------------ one case
def case_id(topology: str, model: str, step: str, mesh: dict | None, batch, remat: bool | None = None) -> str:
    m = "config" if mesh is None else ",".join(f"{k}={v}" for k, v in mesh.items())
    r = "" if remat is None else (":remat" if remat else ":noremat")
    return f"{topology}|{model}|{step}{r}|mesh={m}|b={batch}"


def _memory(compiled) -> dict[str, int]:
    ma = compiled.memory_analysis()
    out = dict(argument=int(ma.argument_size_in_bytes), output=int(ma.output_size_in_bytes),
               alias=int(ma.alias_size_in_bytes), temp=int(ma.temp_size_in_bytes),
               generated_code=int(ma.generated_code_size_in_bytes))
    out["total"] = out["argument"] + out["output"] - out["alias"] + out["temp"]
    return out


def _cost(compiled) -> dict[str, float]:
    ca = compiled.cost_analysis()
    ca = ca[0] if isinstance(ca, (list, tuple)) else ca
    return {"flops": float(ca.get("flops", 0.0)), "bytes_accessed": float(ca.get("bytes accessed", 0.0)),
            "transcendentals": float(ca.get("transcendentals", 0.0))}


def roofline_s(chip: Chip, flops: float, bytes_accessed: float) -> dict[str, float]:
    """The roofline step time per chip: the larger of compute time at peak and HBM traffic time (a prediction)."""
    compute, memory = flops / chip.peak_bf16_flops, bytes_accessed / chip.hbm_bytes_per_s
    return {"compute_s": compute, "memory_s": memory, "step_s": max(compute, memory),
            "bound": "compute" if compute >= memory else "memory"}


def our_flops(step: str, config, per_chip_batch: int) -> float | None:
    """benchmarks/flops.py's count of the same program for one chip's share of the batch (tensor = 1: every chip
    computes its batch shard; FSDP moves weights, not FLOPs)."""
    from marval_jax.benchmarks import flops as F
    from marval_jax.models.factory import model_config
    cfg = model_config(config)
    if step == "mar":
        return float(F.mar_train_flops(cfg, batch=per_chip_batch, mask_ratio_min=config.diffusion.mask_ratio_min,
                                       diffusion_batch_mul=config.diffusion.diffusion_batch_mul)["total"])
    if step == "gsim":
        return float(F.gsim_step_flops(cfg, batch=per_chip_batch, mask_ratio_min=config.gsim.mask_ratio_min)["total"])
    if step == "rl":
        return float(F.rl_step_flops(cfg, batch=per_chip_batch, num_iter=int(config.rl.num_iter),
                                     backprop_steps=int(config.rl.get("backprop_steps", -1)),
                                     remat=bool(config.rl.remat),
                                     num_buckets=int(config.sample.num_buckets))["total"])
    if step == "onestep":
        return float(F.sampler_flops(cfg, batch=per_chip_batch, num_iter=int(config.sample.num_iter), cfg_scale=1.0,
                                     head_calls=1, num_buckets=int(config.sample.num_buckets))["total"])
    return None


def _abstract_on(tree, shardings):
    import jax
    return jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, shardings)


def _lower_train(step: str, config, mesh, per_chip_batch: int):
    """A train step lowered as train/loop.py jits it: state in/out shardings from the config's rules, donated state,
    batch over the batch axes, frozen inputs placed as the loop places them."""
    import jax
    from marval_jax.parallel import sharding as shd
    from marval_jax.tools.scale_check.cases import build_case
    from marval_jax.train.loop import state_shardings

    built = build_case(step, config)
    rules = config.mesh.logical_axis_rules
    abstract = jax.eval_shape(built.init_state, jax.random.PRNGKey(0))
    shardings = state_shardings(abstract, built, mesh, rules)
    batch_shd = shd.batch_sharding(mesh, rules)
    extra_shd = built.extra_shardings(mesh, rules)
    shards = _batch_shards(config, mesh)
    jitted = jax.jit(built.train_step, in_shardings=(shardings, batch_shd) + extra_shd,
                     out_shardings=(shardings, None), donate_argnums=0)
    batch = jax.tree_util.tree_map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=batch_shd),
                                   built.batch_fn(per_chip_batch * shards))
    extra = tuple(_abstract_on(e, es) for e, es in zip(built.extra, extra_shd))
    return jitted.lower(_abstract_on(abstract, shardings), batch, *extra)


def _lower_onestep(config, mesh, per_chip_batch: int):
    """The one-step sampler as programs/sample.py jits it: AR loop + VAE decode, parameters (and the decoder's)
    replicated, labels over the batch axes, images out over the batch axes."""
    import jax
    import jax.numpy as jnp
    from marval_jax.checkpoints.decoders import frozen_decoder
    from marval_jax.losses.gsim import onestep_predictor
    from marval_jax.models.factory import abstract_model, model_config
    from marval_jax.parallel import sharding as shd
    from marval_jax.sampling import ar_sampler
    from marval_jax.sampling.from_config import sampler_from_config

    cfg = model_config(config)
    graphdef, params = abstract_model(cfg)
    gen = config.generator
    sampler = ar_sampler.make_sampler(graphdef, sampler_from_config(config, "eval"),
                                      onestep_predictor(int(gen.t_init), float(gen.noise_scale)),
                                      seq_len=cfg.seq_len, buffer_size=cfg.buffer_size, token_dim=cfg.token_dim)
    decoder = frozen_decoder(config, cfg, abstract=True)
    rules = config.mesh.logical_axis_rules
    rep = shd.replicated(mesh)
    jitted = jax.jit(lambda p, dec, lab, r: dec(sampler.fn(p, lab, r)),
                     in_shardings=(rep, rep, shd.batch_sharding(mesh, rules, 1), rep),
                     out_shardings=shd.batch_sharding(mesh, rules, 4))
    n = per_chip_batch * _batch_shards(config, mesh)
    with_rep = lambda t: jax.tree_util.tree_map(  # noqa: E731
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep), t)
    labels = jax.ShapeDtypeStruct((n,), jnp.int32, sharding=shd.batch_sharding(mesh, rules, 1))
    key = jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep)
    return jitted.lower(with_rep(params), with_rep(decoder), labels, key)


def _batch_shards(config, mesh) -> int:
    from marval_jax.parallel import mesh as mesh_lib
    return int(math.prod(mesh.shape[a] for a in mesh_lib.batch_axes(config.mesh)) or 1)


def compile_case(topology: str, model: str, step: str, mesh_spec: dict | None, per_chip_batch: int,
                 remat: bool | None = None, rl_num_iter: int = 64, devices=None) -> dict:
    """Lowers and compiles one case with the TPU compiler for the slice `topology`; returns its record."""
    import jax
    from marval_jax.parallel import mesh as mesh_lib
    from marval_jax.tools.scale_check.cases import load_config

    if step not in TPU_STEPS:
        raise UserError(f"--steps: unknown {step!r}; choose from {', '.join(TPU_STEPS)}")
    chip, n = parse_topology(topology)
    devices = devices if devices is not None else topology_devices(topology)
    config = load_config("gsim" if step == "onestep" else step, model, mesh_spec, remat, rl_num_iter)
    mesh = mesh_lib.make_mesh(config.mesh, devices=devices)
    t0 = time.time()
    if step == "onestep":
        lowered = _lower_onestep(config, mesh, per_chip_batch)
    else:
        lowered = _lower_train(step, config, mesh, per_chip_batch)
    t1 = time.time()
    compiled = lowered.compile()
    t2 = time.time()
    mem, cost = _memory(compiled), _cost(compiled)
    ours = our_flops(step, config, per_chip_batch)
    hbm = chip.hbm_gib * GiB
    rec = dict(topology=topology, pod=pod_name(topology), chips=n, device_kind=devices[0].device_kind,
               model=model, step=step, remat=remat if step == "rl" else None,
               rl_num_iter=rl_num_iter if step == "rl" else None,
               mesh=dict(mesh.shape), mesh_override=mesh_spec, per_chip_batch=per_chip_batch,
               global_batch=per_chip_batch * _batch_shards(config, mesh),
               memory=mem, hbm_bytes=hbm, fits=mem["total"] <= hbm, cost=cost, our_flops=ours,
               roofline=roofline_s(chip, cost["flops"], cost["bytes_accessed"]),
               lower_s=round(t1 - t0, 1), compile_s=round(t2 - t1, 1),
               # the compiling process's peak resident memory so far (Linux: KiB): what a compile host needs
               host_peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, jax=jax.__version__,
               libtpu=_libtpu_version(), commit=_commit(), date=datetime.date.today().isoformat())
    print(f"[scale_check tpu] {case_id(topology, model, step, mesh_spec, per_chip_batch, rec['remat'])}: "
          f"{mem['total'] / GiB:.2f} GiB of {chip.hbm_gib:g} (temp {mem['temp'] / GiB:.2f}), "
          f"compile {rec['compile_s']:.0f} s", file=sys.stderr, flush=True)
    return rec


def bisect_batch(fits_at, hi: int) -> tuple[int, dict[int, bool]]:
    """The largest b in [1, hi] with fits_at(b) true, assuming fit is monotone in b: doubling from 1, then
    bisection between the last fit and the first miss. Returns (best, {b: fits}); best 0 when b = 1 does not fit."""
    seen: dict[int, bool] = {}

    def probe(b):
        if b not in seen:
            seen[b] = bool(fits_at(b))
        return seen[b]

    lo, b = 0, 1
    while b <= hi and probe(b):
        lo, b = b, 2 * b
    up = min(b, hi + 1)  # first known miss (or past hi)
    while up - lo > 1:
        mid = (lo + up) // 2
        if probe(mid):
            lo = mid
        else:
            up = mid
    return lo, seen


def _libtpu_version() -> str:
    try:
        from importlib.metadata import version
        return version("libtpu")
    except Exception:  # noqa: BLE001 (a build without metadata)
        return "?"


_COMMIT: list[str] = []


def _commit() -> str:
    """The checkout's commit when first asked (main asks before compiling: a compile takes an hour here, and the
    checkout may move meanwhile)."""
    if not _COMMIT:
        _COMMIT.append(_git_head())
    return _COMMIT[0]


def _git_head() -> str:
    try:
        root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
    except Exception:  # noqa: BLE001
        return ""


# ------------------------------------------------------------------------------------------------ JSON + report
def load_json(path: str) -> dict:
    if path and os.path.exists(path):
        with open(path) as f:
            return json.load(f)
    return {"cases": {}, "commands": {}}


def save_json(path: str, data: dict) -> None:
    if not path:
        return
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)


def _gib(x: float) -> str:
    return f"{x / GiB:.2f}"


def _tf(x: float | None) -> str:
    return "-" if not x else f"{x / 1e12:.2f}"


def _ratio(a: float, b: float | None) -> str:
    return "-" if not b else f"{a / b:.2f}"


def _rss(r: dict) -> str:
    return f" ({r['host_peak_rss_bytes'] / GiB:.1f} GiB host)" if r.get("host_peak_rss_bytes") else ""


def _ms(s: float) -> str:
    return f"{1e3 * s:.1f}"


def row_label(r: dict) -> str:
    step = STEP_LABELS[r["step"]]
    if r["step"] == "rl":
        step += f" K={r['rl_num_iter']} remat {'on' if r['remat'] else 'off'}"
    prefix = "MAR" if r["step"] == "mar" else "MARVAL"
    return f"{prefix}-{MODEL_LETTER.get(r['model'], r['model'])} {step}"


def fit_sentence(r: dict) -> str:
    m = r["memory"]
    head = (f"{row_label(r)} on {r['pod']} (mesh data/fsdp/tensor "
            f"{'/'.join(str(r['mesh'][a]) for a in ('data', 'fsdp', 'tensor'))})")
    if r.get("best_batch") is not None:
        return (f"{head}: largest per-chip batch that fits {r['best_batch']} (bisected; "
                f"{_gib(m['total'])} of {r['hbm_bytes'] / GiB:g} GiB)" if r["best_batch"] else
                f"{head}: does not fit at per-chip batch 1")
    verdict = "fits" if r["fits"] else "**does not fit**"
    return (f"{head} {verdict} at per-chip batch {r['per_chip_batch']} (global {r['global_batch']}): "
            f"{_gib(m['total'])} of {r['hbm_bytes'] / GiB:g} GiB ({100 * m['total'] / r['hbm_bytes']:.0f}%)")


def render(data: dict) -> str:
    """The TPU section of docs/scale.md (between BEGIN and END) from the JSON."""
    cases = list(data.get("cases", {}).values())
    lines = [BEGIN, "", "## TPU: compiled by the TPU compiler (ahead of time, no TPU)", "",
             "Produced by `--target=tpu` (libtpu from the `tpu-aot` extra) on a CPU-only machine: each case is lowered",
             "on a mesh over the devices of the described slice and compiled by the TPU compiler; the numbers are",
             "the compiler's own per-chip `memory_analysis()` and `cost_analysis()`. `total` = arguments + outputs -",
             "aliased (donated) + temporaries; `fits` compares it with the chip's HBM (1 GiB = 2^30 bytes). Chips",
             f"(HBM, peak bf16, HBM bandwidth per chip; {CHIP_SOURCE}): "
             + "; ".join(f"{c.name} {c.hbm_gib:g} GiB, {c.peak_bf16_flops / 1e12:g} TFLOP/s, "
                         f"{c.hbm_bytes_per_s / 1e9:g} GB/s" for c in CHIPS.values()) + ".",
             "`TPU FLOPs` is the compiler's `cost_analysis()` per chip, `ours` benchmarks/flops.py's count for the",
             "chip's batch shard; `roofline ms` is **a prediction**: max(FLOPs / peak, bytes accessed / HBM",
             "bandwidth) per chip, no overlap or efficiency loss modelled. The batch is a fixed per-chip batch unless",
             "the row says `bisected` (the largest that fits, found by compiling). `TPU / ours` near 1 cross-checks",
             "benchmarks/flops.py; XLA's cost analysis counts a loop body once where it cannot see the trip count",
             "(the samplers' and RL's AR loops), so a ratio far below 1 there is the loop, not a miscount.", "",
             "How the rows are made: on the shared 2-core machine the compiles are slow (the issue measured 447 s",
             "for MAR-B's step on v5e:2x4), so the commands below run in the background one after another at the",
             "lowest priority (`nice -n 19`), each appending its cases to `docs/scale_tpu.json` as they finish;",
             "`--report_only --out docs/scale.md` then renders this block from the JSON (a command given with",
             "`--report_only` and its `--topology` is recorded with its cases without compiling, so the block",
             "lists what is not measured yet). The CI test (tests/tpu_aot) compiles the tiny MAR step and the",
             "one-step sampler for v5e:2x2. `compile s` is the TPU compile's wall time (with the compiling",
             "process's peak resident memory when recorded: a 256-chip MAR-B compile held ~10 GiB of host memory).",
             ""]
    if cases:
        lines += ["| pod (topology) | program | mesh (data/fsdp/tensor) | per-chip batch (global) | args GiB | "
                  "temp GiB | total GiB | HBM GiB | fits | TPU FLOPs (T) | ours (T) | TPU / ours | "
                  "roofline ms (bound) | compile s | code |", "|" + "---|" * 15]
        for r in sorted(cases, key=lambda r: (r["pod"], r["model"], r["step"], r.get("remat") or False,
                                              r["per_chip_batch"])):
            mesh = "/".join(str(r["mesh"][a]) for a in ("data", "fsdp", "tensor"))
            m, rf = r["memory"], r["roofline"]
            best = f"; bisected best {r['best_batch']}" if r.get("best_batch") is not None else ""
            lines.append(
                f"| {r['pod']} ({r['topology']}) | {row_label(r)} | {mesh} | {r['per_chip_batch']} "
                f"({r['global_batch']}){best} | {_gib(m['argument'])} | {_gib(m['temp'])} | {_gib(m['total'])} | "
                f"{r['hbm_bytes'] / GiB:g} | {'yes' if r['fits'] else '**no**'} | {_tf(r['cost']['flops'])} | "
                f"{_tf(r.get('our_flops'))} | {_ratio(r['cost']['flops'], r.get('our_flops'))} | "
                f"{_ms(rf['step_s'])} ({rf['bound']}) | {r['compile_s']:.0f}{_rss(r)} | "
                f"{r.get('commit') or '?'}, jax {r['jax']}, libtpu {r.get('libtpu', '?')} |")
        lines += ["", "Which fit (per-chip batch as compiled; a fixed batch, not the largest, unless bisected):", ""]
        lines += [f"- {fit_sentence(r)}" for r in sorted(cases, key=lambda r: (r["pod"], r["model"], r["step"]))]
        lines.append("")
    else:
        lines += ["No case compiled yet.", ""]
    commands = data.get("commands", {})
    if commands:
        lines += ["Commands (each case is appended to `docs/scale_tpu.json` as it finishes):", ""]
        lines += [f"    {c}    # {e.get('date', '')}" for c, e in commands.items()]
        lines.append("")
    missing = [label for e in commands.values() for key, label in e.get("cases", [])
               if key not in data.get("cases", {})]
    errors = data.get("errors", {})
    if errors:
        lines += ["Failed to compile (the compiler's message):", ""]
        lines += [f"- `{k}`: {e['error']}" for k, e in sorted(errors.items())]
        lines.append("")
    missing = [label for label in missing if label not in {lb for e in commands.values()
                                                           for key, lb in e.get("cases", []) if key in errors}]
    if missing:
        times = sorted(r["compile_s"] for r in cases)
        limit = (f" The measured compile times per case on this 2-core shared machine were "
                 f"{', '.join(f'{t:.0f}' for t in times)} s (one compile at a time)." if times else "")
        lines += [f"Not measured yet (recorded by the commands above, not compiled by the time of writing): "
                  f"{'; '.join(dict.fromkeys(missing))}.{limit}", ""]
    if data.get("note"):
        lines += [data["note"], ""]
    lines.append(END)
    return "\n".join(lines) + "\n"


def splice(old: str, block: str) -> str:
    """`old` with its TPU block replaced by `block` (appended when it has none)."""
    if BEGIN in old and END in old:
        head, rest = old.split(BEGIN, 1)
        return head + block.rstrip("\n") + rest.split(END, 1)[1]
    return old.rstrip("\n") + "\n\n" + block


def keep_block(old: str, new: str) -> str:
    """The CPU report `new` with the TPU block of the file it replaces (`old`) kept."""
    if BEGIN in old and END in old and BEGIN not in new:
        block = BEGIN + old.split(BEGIN, 1)[1].split(END, 1)[0] + END + "\n"
        return new.rstrip("\n") + "\n\n" + block
    return new


def write_report(out: str, data: dict) -> None:
    old = open(out).read() if os.path.exists(out) else ""
    with open(out, "w") as f:
        f.write(splice(old, render(data)))
    print(f"wrote {out}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------ command line
# the order flags are recorded in, whatever order they were typed in (unknown flags follow, as given)
COMMAND_ORDER = ("--target", "--topology", "--models", "--steps", "--rl_remat", "--rl_num_iter", "--mesh", "--batch",
                 "--bisect", "--hbm", "--hbm_fraction")


def command_line(argv: list[str]) -> str:
    """The command as recorded in the JSON: without where its output goes (--json, --out), --report_only, --note
    and --verbose (the same command compiles or plans the same cases), its flags in one order, so that a command
    typed twice in two orders is one entry."""
    items, i = [], 0
    while i < len(argv):
        a = argv[i]
        flag = a.split("=", 1)[0]
        with_value = "=" not in a and i + 1 < len(argv) and not argv[i + 1].startswith("--")
        item = argv[i:i + 2] if with_value else [a]
        i += len(item)
        if flag not in ("--json", "--out", "--note", "--verbose", "--report_only"):
            items.append((COMMAND_ORDER.index(flag) if flag in COMMAND_ORDER else len(COMMAND_ORDER), item))
    items.sort(key=lambda t: t[0])   # stable: unknown flags keep their order
    return " ".join(["python -m marval_jax.tools.scale_check", *(x for _, item in items for x in item)])


def _plan(args) -> tuple[list[tuple], dict, dict | None, Any]:
    """The command's cases (topology, model, step, remat), their JSON keys, the mesh override and the batch key."""
    from marval_jax.tools.scale_check.cases import parse_list, parse_mesh
    topologies = parse_list(args.topology, None, "topology")
    for t in topologies:
        parse_topology(t)
    models = parse_list(args.models, None, "models")
    steps = parse_list(args.steps, TPU_STEPS, "steps")
    remats = [{"on": True, "off": False}[r] for r in parse_list(args.rl_remat, ("on", "off"), "rl_remat")]
    mesh = parse_mesh(args.mesh)
    if args.batch < 1:
        raise UserError(f"--batch: the per-chip batch must be >= 1, got {args.batch}")
    if mesh is not None:  # the mesh must fit every slice (a UserError before anything is recorded)
        from types import SimpleNamespace
        from marval_jax.parallel.mesh import mesh_shape
        for t in topologies:
            mesh_shape(SimpleNamespace(shape=mesh), parse_topology(t)[1])
    cases = [(t, m, s, r) for t in topologies for m in models for s in steps
             for r in (remats if s == "rl" else [None])]
    batch_key = f"best<={args.bisect}" if args.bisect else args.batch
    return cases, {c: case_id(c[0], c[1], c[2], mesh, batch_key, c[3]) for c in cases}, mesh, batch_key


def _compile_one(args, case, mesh, devices) -> dict:
    """One case's record: compiled at --batch, or bisected over compiled programs up to --bisect."""
    t, m, s, r = case
    if not args.bisect:
        return compile_case(t, m, s, mesh, args.batch, r, args.rl_num_iter, devices)
    recs: dict[int, dict] = {}

    def fits_at(b):
        recs[b] = compile_case(t, m, s, mesh, b, r, args.rl_num_iter, devices)
        return recs[b]["fits"]

    best, _ = bisect_batch(fits_at, args.bisect)
    return dict(recs[best] if best else recs[1], best_batch=best,
                probes={str(b): recs[b]["memory"]["total"] for b in sorted(recs)})


def main(args, argv: list[str]) -> int:
    """`--target=tpu`: compile each (topology, model, step) case the JSON lacks, appending each as it finishes.
    With --report_only nothing is compiled (libtpu not needed): a command that names --topology is recorded with its
    cases (so the report lists them as not measured yet) and the JSON is rendered into --out."""
    data = load_json(args.json)
    if args.report_only and not args.out:
        raise UserError("--report_only needs --out (the markdown file to render the JSON into)")
    if not args.report_only:
        require_libtpu()
    if args.report_only and args.note:  # a sentence of the report's own (e.g. the state of a background run)
        data["note"] = args.note
        save_json(args.json, data)
    if args.report_only and not any(a.startswith("--topology") for a in argv):
        write_report(args.out, data)
        return 0
    cases, ids, mesh, batch_key = _plan(args)
    _commit()  # the code that compiles is the code at the start
    # every slice described before the command is recorded: one libtpu cannot describe is a UserError
    devices_of = {} if args.report_only else {t: topology_devices(t) for t in dict.fromkeys(c[0] for c in cases)}
    command = command_line(argv)
    entry = dict(date=datetime.date.today().isoformat(), cases=[
        [ids[c], f"{pod_name(c[0])} {row_label(dict(model=c[1], step=c[2], remat=c[3], rl_num_iter=args.rl_num_iter))}"
         f" at per-chip batch {batch_key}"] for c in cases])
    data.setdefault("commands", {})[command] = entry
    save_json(args.json, data)
    failed = 0
    for c in ([] if args.report_only else cases):
        if ids[c] in data.get("cases", {}) and not args.recompile:
            continue
        try:
            rec = _compile_one(args, c, mesh, devices_of[c[0]])
        except UserError:
            raise
        except Exception as e:  # noqa: BLE001 (one case's compiler error must not lose the others)
            failed += 1
            rec = {"error": f"{type(e).__name__}: {str(e).splitlines()[0][:300]}"}
            print(f"[scale_check tpu] {ids[c]} failed: {rec['error']}", file=sys.stderr, flush=True)
        data = load_json(args.json) if args.json else data  # another run may have appended meanwhile
        data.setdefault("errors" if "error" in rec else "cases", {})[ids[c]] = rec
        if "error" not in rec:
            data.get("errors", {}).pop(ids[c], None)
        data.setdefault("commands", {})[command] = entry
        save_json(args.json, data)
    if args.out:
        write_report(args.out, data)
    elif not args.json:
        print(render(data))
    return 1 if failed else 0
