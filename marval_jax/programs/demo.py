"""`--mode=demo` (configs/demo.py): grids and seconds per image of the shipped teacher, MARVAL student and RL student.

The three models are params directories under marval_jax/assets/ (model.json + float16 params.npz, 23 MB each:
the `fmnist_l` models), exported from the Fashion-MNIST reproduction (docs/results.md). Each sampler is compiled
ahead of time and then run once, timed, so the printed seconds per image exclude compilation.

On several processes (a pod, `launch/run_local.sh --processes=N --mode=demo`) every process runs the demo with the
same config: `mesh` (configs/demo.py) forms the process group and lays the samplers over all processes' devices;
process 0 writes the grids and demo.json. The workdir may be gs:// (files through etils.epath).
"""
from __future__ import annotations

import json
import os
import time

import numpy as np

ASSETS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets")
ROLES = ("student", "teacher", "rl")
KV_FIELDS = ("kv_cache", "kv_reuse_after", "kv_refresh_every")  # as in the sample section (configs/common.py)


def best_teacher_cfg(assets: str) -> float:
    path = os.path.join(assets, "sampling.json")
    if os.path.exists(path):
        with open(path) as f:
            return float(json.load(f)["teacher_cfg"])
    return 1.0


def run_demo(config, workdir: str) -> dict:
    print(f"demo: sampling the shipped Fashion-MNIST teacher, MARVAL student and RL student into {workdir}; each "
          f"sampler is compiled first (about a minute on a 2-core CPU), then timed", flush=True)
    import jax  # pylint: disable=import-outside-toplevel
    from marval_jax.evaluation.grid import save_grid
    from marval_jax.sampling import ar_sampler
    from marval_jax.sampling.from_config import sampler_from_config
    from marval_jax.programs.sample import GlobalBatches, is_writer, make_predictor
    from marval_jax.checkpoints.decoders import decoder_fn
    from marval_jax.programs.assets import load_role, role_dir
    from etils import epath  # pylint: disable=import-outside-toplevel
    out = epath.Path(workdir if "://" in workdir else os.path.abspath(os.path.expanduser(workdir)))
    if is_writer():
        out.mkdir(parents=True, exist_ok=True)
    assets = config.assets or ASSETS
    if config.full:
        from marval_jax.programs import reproduce  # pylint: disable=import-outside-toplevel
        assets = os.path.join(workdir, "export")
        rc = reproduce.main([f"--workdir={workdir}", f"--export={assets}"])
        if rc:
            raise SystemExit(f"the pipeline failed (exit {rc}); logs in {workdir}")
    missing = [r for r in ROLES if not os.path.exists(os.path.join(assets, f"fmnist_{r}", "model.json"))]
    if len(missing) == len(ROLES):
        raise FileNotFoundError(f"no fmnist_teacher / fmnist_student / fmnist_rl params directories in {assets}")
    teacher_cfg = config.teacher_cfg if config.teacher_cfg > 0 else best_teacher_cfg(assets)
    labels = jax.numpy.asarray(np.repeat(np.arange(10), config.per_class).reshape(10, -1).T.reshape(-1))
    report = {"device": jax.devices()[0].device_kind, "num_iter": config.num_iter, "batch": int(labels.shape[0]),
              "assets": assets}
    for role in ROLES:
        if role in missing:
            print(f"{role}: no weights in {assets}, skipped", flush=True)
            continue
        run_cfg, cfg, graphdef, params = load_role(assets, role)
        sc = run_cfg.sample  # the role's own sampling settings (clip_denoised, t_init), with the demo's K / CFG
        sc.sampler, sc.num_iter, sc.num_sampling_steps = ("teacher" if role == "teacher" else "onestep",
                                                          config.num_iter, config.teacher_steps)
        sc.cfg = teacher_cfg if role == "teacher" else 1.0
        for field in KV_FIELDS:  # the demo config's KV cache (sample.kv_cache's fields), where it has them
            if field in config:
                sc[field] = config[field]
        spec = sampler_from_config(run_cfg, "eval")
        fn = ar_sampler.make_sampler(graphdef, spec, make_predictor(run_cfg, role_dir(assets, role)), seq_len=cfg.seq_len,
                                     buffer_size=cfg.buffer_size, token_dim=cfg.token_dim)
        rng = jax.random.PRNGKey(config.seed)
        # every process, the global mesh: params replicated, the batch split over the batch axes (padded to them)
        layout = GlobalBatches(config.mesh if "mesh" in config else run_cfg.mesh)
        n = labels.shape[0]
        lab = layout.put(layout.pad(np.asarray(labels)))
        params = layout.replicate(params)
        decode = decoder_fn(run_cfg, cfg)
        sample = jax.jit(lambda p, lb, r: decode(fn(p, lb, r)),
                         in_shardings=(layout.replicated, layout.sharding(1), layout.replicated),
                         out_shardings=layout.sharding(4))
        print(f"{role}: compiling its sampler (K = {config.num_iter}, batch {n}) ...", flush=True)
        t0 = time.time()
        compiled = sample.lower(params, lab, rng).compile()  # ahead of time: the timed call is the only run
        compile_s = time.time() - t0
        t0 = time.time()
        images = jax.block_until_ready(compiled(params, lab, rng))
        per_image = (time.time() - t0) / n
        images = layout.gather(images)[:n]
        path = str(out / f"{role}_grid.png")
        if is_writer():
            save_grid(path, images, ncol=10)
        what = (f"teacher, {config.teacher_steps} head steps, CFG {teacher_cfg:g}" if role == "teacher"
                else f"{'RL-tuned ' if role == 'rl' else ''}MARVAL student, one head call per AR step")
        report[role] = {"seconds_per_image": per_image, "compile_and_first_call_s": compile_s, "grid": path,
                        "sampler": what, "kv_cache": spec.cache.label}
        print(f"{role:8s} {what}: {per_image:.4f} s per image at batch {labels.shape[0]} "
              f"(compile {compile_s:.0f} s) -> {path}", flush=True)
    if "teacher" in report and "student" in report:
        report["speedup_student_vs_teacher"] = (report["teacher"]["seconds_per_image"]
                                                / report["student"]["seconds_per_image"])
        print(f"one-step student is {report['speedup_student_vs_teacher']:.1f}x faster per image than the teacher "
              f"here (K = {config.num_iter})", flush=True)
    if is_writer():
        (out / "demo.json").write_text(json.dumps(report, indent=1))
    return report
