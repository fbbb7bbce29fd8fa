"""The results table of the Fashion-MNIST reproduction (docs/results.md): measure on an accelerator, render here.

    # on the accelerator: every setting's FID (10k samples vs the 10k test set), precision / recall, class accuracy
    # (independent eval classifier), reward (the RL reward classifier), seconds per image at batch 1 and 256
    python -m marval_jax.tools.results run --assets=marval_jax/assets --out=/tmp/results --num=10000
    # once per machine before runs side by side: the test split's Inception features and statistics, cached
    python -m marval_jax.tools.results reference
    # anywhere: docs/results.md, docs/results.json and the plots / grids under docs/results/
    python -m marval_jax.tools.results render --run=/tmp/results/results_run.json \
        --stages=marval_jax/assets/stages.json --metrics=workdirs/fmnist --out=docs

`run` evaluates the exported params directories `fmnist_teacher`, `fmnist_student`, `fmnist_rl` under `--assets`
(the embedded default models). Settings run in priority order and the JSON is rewritten after each one, so a
`--time-budget` cut keeps everything measured so far; a rerun into the same `--out` (same device, assets and sample
counts) keeps those rows and measures only the rest. The teacher's CFG scale is chosen by FID on `--sweep-num`
samples at K = 64 and then used for every teacher row. Samples use class labels i % 10 (balanced, as the test set).
`--set ROLE:sample.KEY=VALUE` changes a role's sampling settings for every row (e.g. the one-step input's
`student:sample.noise_scale=0.85`); the run records them, and only a run with the same items continues it.
"""
from __future__ import annotations

import argparse
import io
import json
import time

import numpy as np
from etils import epath

from marval_jax.programs.assets import FAMILY, load_role, role_dir
from marval_jax.user_errors import UserError, add_verbose_flag, run_cli


def kv_fields(cache: str) -> dict:
    """The sample section's KV-cache fields of a --cache value: "none", "exact" (causal models), "approx" (the
    config's r, R) or "r,R" (approx with these)."""
    if cache in ("none", "exact", "approx"):
        return {"kv_cache": cache}
    parts = cache.split(",")
    try:
        r, big_r = (int(x) for x in parts)
    except ValueError:
        raise UserError(f"--cache takes none, exact, approx or r,R (e.g. 2,4), got {cache!r}") from None
    if r < 0 or big_r < 1:
        raise UserError(f"--cache r,R needs r >= 0 and R >= 1, got {cache!r}")
    return {"kv_cache": "approx", "kv_reuse_after": r, "kv_refresh_every": big_r}


class Evaluator:
    """Holds the loaded models, the FID network and the reference features; `measure` runs one setting."""

    def __init__(self, assets: str, inception: str, real_spec: str = "raw:fashion_mnist/test", real_num: int = 0):
        import jax  # pylint: disable=import-outside-toplevel
        from marval_jax.evaluation import fid as fid_lib
        from marval_jax.evaluation.classifier_train import load_default_classifier
        from marval_jax.programs.evaluate import real_images
        from marval_jax.evaluation.fid_reference import reference_features
        from marval_jax.evaluation.inception import inception_features, load_inception
        from marval_jax.rewards.registry import make_reward
        from marval_jax.checkpoints.decoders import decoder_fn
        self.jax = jax
        self.fid_lib = fid_lib
        self.features = inception_features
        self.models, self.assets = {}, assets
        for role in FAMILY:
            loaded = load_role(assets, role)
            if loaded is None:
                print(f"no {role} weights under {assets}: its rows are skipped", flush=True)
                continue
            self.models[role] = loaded
        if not self.models:
            raise FileNotFoundError(f"no fmnist_teacher / fmnist_student / fmnist_rl params under {assets}")
        some = next(iter(self.models.values()))
        self.decode = jax.jit(decoder_fn(some[0], some[1]))
        self.inception = load_inception(inception)
        t0 = time.time()
        self.real_feats = reference_features(real_spec, self.inception, inception_path=inception or None,
                                             num=real_num, images_of=real_images)
        self.ref = fid_lib.statistics_from_features(self.real_feats)
        print(f"reference features of {real_spec}: {len(self.real_feats)} images, {time.time() - t0:.0f} s",
              flush=True)
        self.eval_clf, _ = load_default_classifier("fashion_mnist", "eval")
        reward = make_reward("classifier_logprob", {"checkpoint": "", "dataset": "fashion_mnist"})
        self.reward = jax.jit(reward.bind())
        self.samplers = {}
        self.sets: dict[str, tuple[str, ...]] = {}   # role -> its --set items

    def set_sample(self, role: str, items: list[str]) -> None:
        """The role's sampling settings overridden (`sample.KEY=VALUE` items) for every row measured after."""
        if role not in self.models:
            raise UserError(f"--set for {role}: no {role} weights under {self.assets}")
        config, *rest = self.models[role]
        self.models[role] = (with_sample_settings(config, items), *rest)
        self.sets[role] = self.sets.get(role, ()) + tuple(items)   # part of its samplers' key

    def sampler(self, role: str, num_iter: int, cfg_scale: float, cache: str):
        """Compiled sampler (one per role family, K, CFG, cache policy and --set items; RL shares the student's
        program unless their items differ)."""
        from marval_jax.sampling import ar_sampler  # pylint: disable=import-outside-toplevel
        from marval_jax.sampling.from_config import sampler_from_config  # pylint: disable=import-outside-toplevel
        from marval_jax.programs.sample import make_predictor  # pylint: disable=import-outside-toplevel
        config, cfg, graphdef, _ = self.models[role]
        kind = "teacher" if role == "teacher" else "onestep"
        key = (kind, num_iter, cfg_scale, cache, self.sets.get(role, ()))
        if key not in self.samplers:
            config.sample.sampler, config.sample.num_iter, config.sample.cfg = kind, num_iter, cfg_scale
            config.sample.update(kv_fields(cache))  # the sample section's KV cache, as --mode sample reads it
            spec = sampler_from_config(config, "eval")
            kw = dict(seq_len=cfg.seq_len, buffer_size=cfg.buffer_size, token_dim=cfg.token_dim)
            self.samplers[key] = ar_sampler.make_sampler(graphdef, spec,
                                                         make_predictor(config, role_dir(self.assets, role)), **kw)
        return self.samplers[key]

    def _time(self, fn, params, b: int, reps: int) -> tuple[float, float]:
        """(compile + first call s, median s per image) at batch b."""
        jax = self.jax
        labels = jax.numpy.arange(b) % 10
        t0 = time.time()
        jax.block_until_ready(fn(params, labels, jax.random.PRNGKey(1)))
        first = time.time() - t0
        times = []
        for i in range(reps):
            t0 = time.time()
            jax.block_until_ready(fn(params, labels, jax.random.PRNGKey(2 + i)))
            times.append(time.time() - t0)
        return first, float(np.median(times)) / b

    def measure(self, role: str, num_iter: int, cfg_scale: float, num: int, cache: str = "none",
                batch: int = 256, timing: bool = True) -> dict:
        from marval_jax.evaluation.class_accuracy import class_accuracy  # pylint: disable=import-outside-toplevel
        from marval_jax.evaluation.inception_input import center_crop  # pylint: disable=import-outside-toplevel
        from marval_jax.evaluation.grid import to_uint8  # pylint: disable=import-outside-toplevel
        from marval_jax.evaluation.precision_recall import precision_recall  # pylint: disable=import-outside-toplevel
        jax = self.jax
        _, _, _, params = self.models[role]
        fn = self.sampler(role, num_iter, cfg_scale, cache)
        row = dict(model=role, sampler="teacher" if role == "teacher" else "onestep", num_iter=num_iter,
                   cfg=cfg_scale, cache=cache, num_images=num)
        t_start = time.time()
        if timing:
            row["batch"] = batch
            row["compile_batch_s"], row["s_per_image_batch"] = self._time(fn, params, batch, reps=2)
        images, rewards = [], []
        labels_all = np.arange(num) % 10
        for i in range(0, num, batch):
            lab = jax.numpy.asarray(np.resize(labels_all[i:i + batch], batch))  # pad the last batch to the shape
            imgs = self.decode(fn(params, lab, jax.random.fold_in(jax.random.PRNGKey(7), i)))
            rewards.append(np.asarray(self.reward(imgs, lab)))
            images.append(np.asarray(imgs))
        images = np.concatenate(images)[:num]
        reward = np.concatenate(rewards)[:num]
        row["generate_s"] = time.time() - t_start
        uint8 = center_crop(to_uint8(images), 28)
        feats = self.features(self.inception, uint8)
        mu, sigma = self.fid_lib.statistics_from_features(feats)
        row["fid"] = self.fid_lib.frechet_distance(mu, sigma, *self.ref)
        row.update({k: v for k, v in precision_recall(self.real_feats, feats).items()
                    if k in ("precision", "recall", "k")})
        row["class_accuracy"] = class_accuracy(self.eval_clf, images, labels_all)
        row["reward_mean"], row["reward_std"] = float(reward.mean()), float(reward.std())
        if timing:
            # the same jitted sampler retraces for batch 1 (its own program)
            row["compile_b1_s"], row["s_per_image_b1"] = self._time(fn, params, 1, reps=2 if role == "teacher" else 5)
        row["device"] = jax.devices()[0].device_kind
        grid_idx = np.concatenate([np.where(labels_all[:1000] == c)[0][:10] for c in range(10)])
        return row, uint8[np.sort(grid_idx)] if len(images) >= 100 else uint8[:100]


def parse_sets(items: list[str]) -> list[tuple[str, str]]:
    """--set ROLE:sample.KEY=VALUE items -> [(role, "sample.KEY=VALUE")]: sampling settings only (a role's trained
    weights and architecture come from its export), checked before any model loads."""
    out = []
    for item in items:
        role, sep, kv = item.partition(":")
        if not sep or role not in FAMILY or not kv.startswith("sample.") or "=" not in kv:
            raise UserError(f"--set {item!r}: expected ROLE:sample.KEY=VALUE with ROLE one of {', '.join(FAMILY)}")
        out.append((role, kv))
    return out


def with_sample_settings(config, items: list[str]):
    """A copy of a role's loaded config with its `sample.KEY=VALUE` items set, typed and checked as --set of
    tools.ablate checks them (an unknown key names the nearest; a wrong type is an error)."""
    from marval_jax.tools.ablate import apply, set_overrides  # pylint: disable=import-outside-toplevel
    return apply(config, set_overrides(config, items))


def plan(num: int, sweep_num: int, sweep: list[float], small_k: int, cache: str) -> list[dict]:
    """Settings in priority order; "best" is replaced by the sweep's best CFG once known."""
    rows = [dict(role="teacher", num_iter=64, cfg=c, num=sweep_num, timing=False, sweep=True) for c in sweep]
    rows += [dict(role="teacher", num_iter=64, cfg="best", num=num),
             dict(role="student", num_iter=64, cfg=1.0, num=num),
             dict(role="rl", num_iter=64, cfg=1.0, num=num),
             dict(role="student", num_iter=small_k, cfg=1.0, num=num),
             dict(role="teacher", num_iter=small_k, cfg="best", num=num),
             dict(role="student", num_iter=64, cfg=1.0, num=num, cache=cache),
             dict(role="rl", num_iter=small_k, cfg=1.0, num=num)]
    return rows


def _write_outputs(out: epath.Path, report: dict, grids: dict | None = None) -> None:
    """results_run.json (and grids.npz) into `--out`, local or gs://: each a whole-object write through epath."""
    (out / "results_run.json").write_text(json.dumps(report, indent=1))
    if grids is not None:
        buf = io.BytesIO()
        np.savez_compressed(buf, **grids)
        (out / "grids.npz").write_bytes(buf.getvalue())


# what a run into an --out must share with the earlier run there, so that their rows can stand in one table; the
# value is what a results_run.json written before that key existed meant (every run was timed before --no-timing)
SAME_RUN = {"device": None, "assets": None, "num": None, "sweep_num": None, "real_num": None, "timing": True,
            "set": []}


def _earlier(out: epath.Path, report: dict) -> tuple[list, dict, float | None]:
    """Rows, grids and best teacher CFG of an earlier `run` into the same --out with the same settings: a rerun
    after a time-budget cut, a crash or a lost machine continues where it stopped instead of measuring again. A
    results_run.json of other settings there is an error (its rows would mix with this run's)."""
    path = out / "results_run.json"
    if not path.exists():
        return [], {}, None
    prev = json.loads(path.read_text())
    theirs, ours = {k: prev.get(k, old) for k, old in SAME_RUN.items()}, {k: report[k] for k in SAME_RUN}
    if theirs != ours:
        diff = ", ".join(f"{k} {theirs[k]!r} there, {ours[k]!r} here" for k in SAME_RUN if theirs[k] != ours[k])
        raise UserError(f"--out={out} holds the results of another run ({diff}); give another --out or remove "
                        f"{path} to measure again")
    grids = {}
    if (out / "grids.npz").exists():
        with np.load(io.BytesIO((out / "grids.npz").read_bytes())) as z:
            grids = {k: z[k] for k in z.files}
    return prev.get("rows", []), grids, prev.get("best_teacher_cfg")


def run(a) -> int:
    out = epath.Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    t_begin = time.time()
    sets = parse_sets(a.set)
    ev = Evaluator(a.assets, a.inception, real_num=a.real_num)
    for role in dict.fromkeys(r for r, _ in sets):
        ev.set_sample(role, [kv for r, kv in sets if r == role])
    report = {"date": time.strftime("%Y-%m-%d"), "device": ev.jax.devices()[0].device_kind,
              "jax": ev.jax.__version__, "assets": str(a.assets), "num": a.num, "sweep_num": a.sweep_num,
              "real_num": a.real_num, "timing": not a.no_timing, "set": list(a.set), "rows": [], "skipped": []}
    report["rows"], grids, best = _earlier(out, report)
    if best is not None:
        report["best_teacher_cfg"] = best
    done = {(r["name"], bool(r["sweep"])) for r in report["rows"]}
    sweep = [float(x) for x in a.sweep.split(",")]
    only = [t for t in a.only.split(",") if t]
    for item in plan(a.num, a.sweep_num, sweep, a.small_k, a.cache):
        role = item["role"]
        cfg_scale = item["cfg"]
        if cfg_scale == "best":
            cfg_scale = best if best is not None else sweep[0]
        name = f"{role}_K{item['num_iter']}_cfg{cfg_scale:g}" + (f"_cache{item['cache']}" if item.get("cache") else "")
        if only and not any(tok in name for tok in only):
            continue  # not asked for (a follow-up run of rows an earlier run skipped)
        if (name, bool(item.get("sweep"))) in done:
            print(f"{name}: measured by the earlier run into {out}; kept", flush=True)
            continue
        elapsed = time.time() - t_begin
        if role not in ev.models or (a.time_budget and elapsed > a.time_budget):
            report["skipped"].append({"name": name, "why": "no weights" if role not in ev.models else
                                      f"time budget ({elapsed:.0f} s used)"})
            continue
        t0 = time.time()
        try:
            row, grid = ev.measure(role, item["num_iter"], cfg_scale, item["num"], item.get("cache", "none"),
                                   batch=a.batch, timing=item.get("timing", True) and not a.no_timing)
        except Exception as e:  # pylint: disable=broad-except
            report["skipped"].append({"name": name, "why": f"{type(e).__name__}: {e}"[:500]})
            print(f"{name}: FAILED {type(e).__name__}: {e}", flush=True)
            continue
        row["name"], row["sweep"], row["wall_s"] = name, bool(item.get("sweep")), time.time() - t0
        report["rows"].append(row)
        grids[name] = grid
        if item.get("sweep"):
            sweep_rows = [r for r in report["rows"] if r["sweep"]]
            best = min(sweep_rows, key=lambda r: r["fid"])["cfg"]
            report["best_teacher_cfg"] = best
        print(json.dumps({k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}), flush=True)
        _write_outputs(out, report, grids)
    report["total_s"] = time.time() - t_begin
    _write_outputs(out, report)
    return 0


def reference(a) -> int:
    """The reference's Inception features and FID statistics into the shared cache (evaluation/fid_reference.py),
    computed once: processes started after it side by side (students with live evaluation, results runs) read
    them instead of each running the Inception pass over the same images."""
    from marval_jax.evaluation import fid_reference  # pylint: disable=import-outside-toplevel
    from marval_jax.evaluation.inception import load_inception  # pylint: disable=import-outside-toplevel
    t0 = time.time()
    inception = load_inception(a.inception or None)
    features = fid_reference.reference_features(a.real_spec, inception, inception_path=a.inception or None)
    fid_reference.reference_stats(a.real_spec, inception, inception_path=a.inception or None)  # from the features
    print(f"reference of {a.real_spec}: {len(features)} images cached in {fid_reference.stats_cache_dir()}, "
          f"{time.time() - t0:.0f} s", flush=True)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m marval_jax.tools.results", description=__doc__.split("\n")[0])
    add_verbose_flag(p)
    sub = p.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run", help="measure every setting on this machine's accelerator")
    r.add_argument("--assets", default="marval_jax/assets")
    r.add_argument("--out", required=True)
    r.add_argument("--inception", default="", help="FID Inception npz (default ~/.cache/marval_jax/...)")
    r.add_argument("--num", type=int, default=10000)
    r.add_argument("--real-num", type=int, default=0, help="> 0: only this many test images (smoke runs)")
    r.add_argument("--sweep-num", type=int, default=2000)
    r.add_argument("--sweep", default="1.0,1.5,2.0,3.0", help="teacher CFG scales tried at K = 64")
    r.add_argument("--small-k", type=int, default=16)
    r.add_argument("--batch", type=int, default=256, help="generation batch (also the timed large batch)")
    r.add_argument("--cache", default="1,4", help="KV cache of the cache row (sample.kv_cache): r,R (approx with "
                   "these), approx (the config's r, R), exact (causal models) or none")
    r.add_argument("--no-timing", action="store_true", help="quality columns only, no seconds per image (e.g. "
                   "comparing two exports on a CPU, where the batch-256 timing alone takes minutes)")
    r.add_argument("--time-budget", type=float, default=0.0, help="skip settings once this many s are used")
    r.add_argument("--only", default="", help="comma list: run only rows whose name contains one of these, e.g. "
                   "'_cache,rl_K16' (teacher 'best' rows then use the first --sweep scale: pass --sweep=2.5)")
    r.add_argument("--set", action="append", default=[], metavar="ROLE:sample.KEY=VALUE",
                   help="a sampling setting of one role for every row, e.g. student:sample.noise_scale=0.85 "
                        "(repeatable; recorded in results_run.json, and a rerun into the same --out must repeat it)")
    f = sub.add_parser("reference", help="the reference's Inception features and statistics into the cache, once")
    f.add_argument("--inception", default="", help="FID Inception npz (default ~/.cache/marval_jax/...)")
    f.add_argument("--real-spec", default="raw:fashion_mnist/test", help="the reference images (raw:NAME/SPLIT)")
    d = sub.add_parser("render", help="docs/results.md, docs/results.json, plots and grids")
    d.add_argument("--run", required=True, help="results_run.json of `run`")
    d.add_argument("--grids", default="", help="grids.npz of `run` (default: next to --run)")
    d.add_argument("--stages", default="", help="stages.json of marval_jax.programs.reproduce")
    d.add_argument("--metrics", default="", help="folder with <stage>/metrics.jsonl (training curves)")
    d.add_argument("--out", default="docs")
    a = p.parse_args(argv)
    if a.cmd == "run":
        kv_fields(a.cache)  # bad values are errors before any model loads
        parse_sets(a.set)
        return run(a)
    if a.cmd == "reference":
        return reference(a)
    from marval_jax.tools.results_render import render  # pylint: disable=import-outside-toplevel
    return render(a)


if __name__ == "__main__":
    run_cli(main)
