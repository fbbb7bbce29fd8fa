"""`python -m marval_jax.tools.ablate`: a grid (or a list of named variants) of GSIM distillations from one teacher,
each evaluated the same way, summarised in one table and one plot (docs/gsim.md "Running an ablation").

    python -m marval_jax.tools.ablate --base=configs/marval.py:tiny --teacher=/tmp/mar_tiny \
        --sweep gsim.weighting=none,kl,sid --sweep gsim.use_l2_term=True,False \
        --steps=200 --eval_samples=256 --out=/tmp/ablate [--set key=value ...] [--variants=variants.json]

Every variant is the base config + `--set` overrides + its own overrides, trained with `train.num_steps=--steps`
through the same library entry point as `marval_jax.main --mode=distill` (`marval_jax.main.run`), so all variants
share the teacher, the seed and the data order; then `--eval_samples` one-step samples with the same labels and keys
(`programs.sample.generate`: key from train.seed) are scored with what can be computed: FID / precision /
recall when the Inception weights and `sample.fid_ref` exist, class accuracy of the committed eval classifier for
MNIST-family data (or `sample.classifier`); other columns are "-".

Layout: OUT/runs/<variant>/ is the variant's workdir (checkpoints, metrics.jsonl) and OUT/runs/<variant>/result.json
its finished result. Resumable: a variant with result.json is not redone (a result.json of other steps, eval
samples or overrides is an error, not a row of this table); one without resumes from its workdir's
newest checkpoint (a SIGTERM saves one, stops the sweep and exits 0; rerun the same command to continue).
OUT/ablation.md, OUT/ablation.json and OUT/ablation_<metric>.png are rewritten from all result files at the end;
`--into PAGE.md` also writes a compact table between the page's GENERATED ABLATION markers (docs/results.md).
On N processes every process runs the same loop; only process 0 writes files.

`--variants FILE`: a JSON object {"name": {"gsim.distance": "l2", ...}, ...} instead of (or after) the grid.
"""
from __future__ import annotations

import argparse
import contextlib
import difflib
import importlib.util
import itertools
import json
import os
import re
import sys
import time
from typing import Callable

import numpy as np

from marval_jax.user_errors import UserError, add_verbose_flag, run_cli

RESULT = "result.json"
TIMING = "seconds.json"


# -- config handling ------------------------------------------------------------------------------------------------
def load_base(spec: str):
    """'configs/marval.py:tiny' -> the (locked) ConfigDict of that file's get_config(variant)."""
    path, _, variant = spec.partition(":")
    if not os.path.isfile(path):
        raise UserError(f"--base={spec}: config file {path} not found; give a configs/*.py file with its variant, "
                        f"e.g. --base=configs/marval.py:tiny")
    module_spec = importlib.util.spec_from_file_location(f"_ablate_base_{abs(hash(path))}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    try:
        return module.get_config(variant or None)
    except ValueError as e:
        raise UserError(f"--base={spec}: {e}") from e


def leaf_paths(cfg, prefix: str = "") -> list[str]:
    out = []
    for k in cfg.keys():
        v = cfg[k]
        p = f"{prefix}{k}"
        out += leaf_paths(v, p + ".") if hasattr(v, "keys") else [p]
    return out


def check_key(cfg, key: str, where: str) -> None:
    """A dotted config field or a one-line UserError naming the nearest fields."""
    paths = leaf_paths(cfg)
    if key in paths:
        return
    nearest = difflib.get_close_matches(key, paths, n=3, cutoff=0.5)
    hint = f"nearest: {', '.join(nearest)}" if nearest else "see the config file for its fields"
    raise UserError(f"{where}: unknown config field {key!r}; {hint}")


def _get(cfg, key: str):
    node = cfg
    for p in key.split("."):
        node = node[p]
    return node


def parse_value(cfg, key: str, text: str, where: str):
    """The string `text` as the type of the field `key` (bool, int, float or str)."""
    cur = _get(cfg, key)
    try:
        if isinstance(cur, bool):
            if text.lower() in ("true", "1", "yes"):
                return True
            if text.lower() in ("false", "0", "no"):
                return False
            raise ValueError(text)
        if isinstance(cur, int):
            return int(text)
        if isinstance(cur, float):
            return float(text)
    except ValueError:
        raise UserError(f"{where}: {key}={text!r} is not a {type(cur).__name__} (the field's type)") from None
    if cur is None or isinstance(cur, str):
        return text
    raise UserError(f"{where}: {key} is a {type(cur).__name__}; only bool / int / float / str fields can be swept")


def apply(cfg, overrides: dict):
    """A copy of `cfg` with the dotted `overrides` set (locked again)."""
    from configs.common import with_fields  # pylint: disable=import-outside-toplevel
    return with_fields(cfg, overrides)


def _pairs(items: list[str], flag: str) -> list[tuple[str, str]]:
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"{flag} {item!r}: expected key=value")
        out.append((key.strip(), value))
    return out


def set_overrides(cfg, items: list[str], flag: str = "--set") -> dict:
    """'key=value' strings -> {key: value typed as the config's field}; a one-line UserError for a malformed item,
    an unknown key (naming the nearest) or a value of the wrong type."""
    out = {}
    for key, value in _pairs(list(items), flag):
        check_key(cfg, key, flag)
        out[key] = parse_value(cfg, key, value, flag)
    return out


def variant_name(overrides: dict) -> str:
    parts = [f"{k.split('.')[-1]}-{v}" for k, v in overrides.items()]
    name = "__".join(parts) or "base"
    return re.sub(r"[^A-Za-z0-9_.+-]", "_", name)


def plan(base, sweeps: list[str], variants_file: str = "") -> dict[str, dict]:
    """{variant name: {dotted key: typed value}}: the grid of `--sweep key=v1,v2` (product, in the order given),
    then the named variants of `variants_file`. Keys and values are checked against `base` first."""
    grid = []
    for key, values in _pairs(sweeps, "--sweep"):
        check_key(base, key, "--sweep")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not vals:
            raise UserError(f"--sweep {key}=: no values; give key=v1,v2")
        grid.append([(key, parse_value(base, key, v, "--sweep")) for v in vals])
    out: dict[str, dict] = {}
    if grid:
        if len({g[0][0] for g in grid}) != len(grid):
            raise UserError("--sweep: a key is swept twice; give its values in one --sweep key=v1,v2")
        for combo in itertools.product(*grid):
            ov = dict(combo)
            out[variant_name(ov)] = ov
    if variants_file:
        if not os.path.isfile(variants_file):
            raise UserError(f"--variants={variants_file}: file not found (a JSON object name -> overrides)")
        try:
            with open(variants_file) as f:
                named = json.load(f)
        except json.JSONDecodeError as e:
            raise UserError(f"--variants={variants_file}: not JSON ({e})") from None
        if not isinstance(named, dict) or not all(isinstance(v, dict) for v in named.values()):
            raise UserError(f"--variants={variants_file}: expected a JSON object name -> {{key: value}}")
        for name, ov in named.items():
            typed = {}
            for key, value in ov.items():
                check_key(base, key, f"--variants {name}")
                typed[key] = parse_value(base, key, str(value), f"--variants {name}")
            if re.sub(r"[^A-Za-z0-9_.+-]", "_", name) != name or name in out:
                raise UserError(f"--variants: name {name!r} must be unique and use only letters, digits, _.+-")
            out[name] = typed
    if not out:
        raise UserError("nothing to run: give --sweep key=v1,v2 and/or --variants=FILE")
    return out


# -- one variant ----------------------------------------------------------------------------------------------------
def read_metrics(workdir: str) -> list[dict]:
    path = os.path.join(workdir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def _is_writer() -> bool:
    import jax
    return jax.process_index() == 0


def _write_json(path: str, obj) -> None:
    """Atomic: a killed write never leaves a half file (a result file means a finished variant)."""
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=1, default=float)
    os.replace(tmp, path)


_SAMPLERS: dict[str, tuple] = {}


def generate_samples(config, workdir: str):
    """`programs.sample.generate` (same params, labels, keys and batches) with the compiled sampler and decoder
    kept across variants that share the model, tokenizer and sampling settings: one compile for the whole sweep.
    Returns (images NHWC [-1, 1], labels, seconds per image)."""
    import jax
    from marval_jax.checkpoints.load import load_model_params
    from marval_jax.sampling import ar_sampler
    from marval_jax.sampling.from_config import sampler_from_config
    from marval_jax.programs.sample import labels_for, make_predictor, onestep_settings
    from marval_jax.checkpoints.decoders import decoder_fn
    from marval_jax.models.factory import abstract_model, model_config
    sc = config.sample
    # t_init / noise_scale as the variant's checkpoint records them (sample.* overrides), as `--mode=sample`
    onestep = list(onestep_settings(config, workdir)) if sc.sampler == "onestep" else None
    key = json.dumps([config.model.to_dict(), config.tokenizer.to_dict(), sc.to_dict(), onestep],
                     sort_keys=True, default=str)
    if key not in _SAMPLERS:
        cfg = model_config(config)
        graphdef, abstract = abstract_model(cfg)
        spec = sampler_from_config(config, "eval")
        fn = ar_sampler.make_sampler(graphdef, spec, make_predictor(config, workdir), seq_len=cfg.seq_len,
                                     buffer_size=cfg.buffer_size, token_dim=cfg.token_dim)
        _SAMPLERS[key] = (cfg, abstract, fn, jax.jit(decoder_fn(config, cfg)))
    cfg, abstract, fn, decode = _SAMPLERS[key]
    params = load_model_params(workdir, abstract, config.model.to_dict(), use_ema=sc.use_ema)
    rng = jax.random.PRNGKey(config.train.seed + 12345)
    labels = labels_for(config, sc.num_images, cfg.class_num, rng)
    t0, images = time.time(), []
    for i in range(0, sc.num_images, sc.batch_size):
        images.append(np.asarray(decode(fn(params, labels[i: i + sc.batch_size], jax.random.fold_in(rng, i)))))
    images = np.concatenate(images)[: sc.num_images]
    return images, np.asarray(labels), (time.time() - t0) / len(images)


def evaluate_variant(config, workdir: str, cache_dir: str) -> dict:
    """The scores of `sample.num_images` one-step samples of the run's EMA generator (same labels and keys for
    every variant): FID / precision / recall where the Inception weights and sample.fid_ref exist, class accuracy
    of the eval classifier for MNIST-family data or sample.classifier."""
    from marval_jax.programs import evaluate as ev
    from marval_jax.evaluation.grid import to_uint8
    from marval_jax.evaluation.inception_input import center_crop
    from marval_jax.evaluation.inception import DEFAULT_NPZ
    sc = config.sample
    images, labels, s_per_image = generate_samples(config, workdir)
    out = {"num_images": int(len(images)), "seconds_per_image": s_per_image,
           "fid": None, "precision": None, "recall": None, "class_accuracy": None}
    inception_path = os.path.expanduser(sc.inception or DEFAULT_NPZ)
    if sc.fid_ref and os.path.exists(inception_path):
        from marval_jax.evaluation import fid as fid_lib
        from marval_jax.evaluation.inception import inception_features, load_inception
        inception = load_inception(inception_path)
        feats = inception_features(inception, center_crop(to_uint8(images), sc.crop))
        mu, sigma = fid_lib.statistics_from_features(feats)
        os.makedirs(cache_dir, exist_ok=True)
        ref_mu, ref_sigma = ev.reference_stats(sc.fid_ref, inception, cache_dir, **ev._raw_kw(config))
        out["fid"] = float(fid_lib.frechet_distance(mu, sigma, ref_mu, ref_sigma))
        if sc.pr_num_real > 0 and sc.fid_ref.startswith("raw:"):
            from marval_jax.evaluation.precision_recall import precision_recall
            real = ev.real_images(sc.fid_ref, **ev._raw_kw(config))[: sc.pr_num_real]
            pr = precision_recall(inception_features(inception, real), feats)
            out["precision"], out["recall"] = float(pr["precision"]), float(pr["recall"])
    if (sc.classifier or config.data.name in ("fashion_mnist", "mnist")) and int(np.min(labels)) >= 0:
        from marval_jax.evaluation.class_accuracy import class_accuracy
        from marval_jax.evaluation.classifier_train import load_classifier, load_default_classifier
        params, _ = (load_classifier(sc.classifier) if sc.classifier
                     else load_default_classifier(config.data.name, "eval"))
        out["class_accuracy"] = float(class_accuracy(params, images, labels))
    return out


SWITCHES = "gsim_switches"   # the frozen-input key of the traced switch values


def distill_task(config):
    """`--mode=distill`'s task (train/distill_task.py) with GSIM's real-valued switches (losses.gsim.NUMERIC_SWITCHES:
    l2_weight, guidance_scale, huber_r, t range, logit-normal law, noise_scale) passed into the jitted step as
    arguments (the loop's `frozen` slot) instead of baked constants: variants that differ only in them compile the
    same program, which the persistent compilation cache (`shared_compiles`) then serves to every one."""
    import dataclasses
    from marval_jax.losses import gsim
    from marval_jax.train.distill_task import make_distill_task
    from marval_jax.models.factory import model_config
    task = make_distill_task(config)
    values = gsim.switch_values(gsim.settings_from_config(config.gsim, config.generator, model_config(config)))
    step, sample = task.train_step, task.sample_images

    def split(frozen):
        rest = dict(frozen)
        return rest, rest.pop(SWITCHES)

    def train_step(state, batch, frozen):
        rest, switches = split(frozen)
        with gsim.traced_switches(switches):
            return step(state, batch, rest)

    def sample_images(state, rng, frozen):
        return sample(state, rng, split(frozen)[0])   # the one-step sampler reads no switch

    return dataclasses.replace(task, train_step=train_step, frozen={**(task.frozen or {}), SWITCHES: values},
                               sample_images=sample_images if sample is not None else None)


def train_distill(config, workdir: str):
    """`marval_jax.main.run("distill", ...)` (same validation, process group, loop) with `distill_task`."""
    from marval_jax import config_checks
    from marval_jax.parallel import mesh as mesh_lib
    from marval_jax.train.loop import train
    mesh_lib.maybe_initialize_distributed(config.mesh)
    config_checks.validate("distill", config, workdir, "")
    return train(config, workdir, distill_task(config))


@contextlib.contextmanager
def shared_compiles(cache_dir: str):
    """JAX's persistent compilation cache in `cache_dir` for the sweep (unless one is configured already), so that a
    program compiled for one variant (or before a SIGTERM) is not compiled again; the setting is restored after."""
    import jax
    from jax.experimental.compilation_cache import compilation_cache
    if jax.config.jax_compilation_cache_dir:
        yield
        return
    compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", cache_dir)
    try:
        yield
    finally:
        jax.config.update("jax_compilation_cache_dir", None)
        compilation_cache.reset_cache()


def run_variant(name: str, overrides: dict, config, workdir: str, cache_dir: str) -> dict | None:
    """Train (or resume) and evaluate one variant; None when training stopped early (SIGTERM / preemption)."""
    os.makedirs(workdir, exist_ok=True)
    timing_path = os.path.join(workdir, TIMING)
    before = json.load(open(timing_path)) if os.path.exists(timing_path) else {"train_s": 0.0, "runs": 0}
    t0 = time.time()
    state = train_distill(config, workdir)
    train_s = before["train_s"] + time.time() - t0
    runs = before["runs"] + 1
    if _is_writer():
        _write_json(timing_path, {"train_s": train_s, "runs": runs})
    if int(state.step) < int(config.train.num_steps):
        return None
    t1 = time.time()
    scores = evaluate_variant(config, workdir, cache_dir)
    metrics = read_metrics(workdir)
    train_rows = [m for m in metrics if "loss" in m]   # live-evaluation rows (eval/*) share the steps
    last = train_rows[-1] if train_rows else {}
    eval_s = time.time() - t1
    return {"name": name, "overrides": overrides, "steps": int(config.train.num_steps),
            "final": {k: last.get(k) for k in ("loss", "fake_loss", "gen/l1", "gen/l2")},
            **scores, **live_fid(metrics), "train_s": train_s, "eval_s": eval_s, "seconds": train_s + eval_s,
            "train_runs": runs}


LIVE_FID = "eval/fid"   # train/live_eval.py's metric (train.eval_every > 0)


def live_fid(metrics: list[dict]) -> dict:
    """The live FID curve of a run's metrics.jsonl rows: its last point and its best (lowest) point with the step;
    None where the run had no live evaluation."""
    curve = [(m["step"], float(m[LIVE_FID])) for m in metrics if LIVE_FID in m]
    if not curve:
        return {"live_fid_last": None, "live_fid_best": None, "live_fid_best_step": None}
    best_step, best = min(curve, key=lambda p: p[1])
    return {"live_fid_last": curve[-1][1], "live_fid_best": best, "live_fid_best_step": best_step}


# -- the table and the plot -----------------------------------------------------------------------------------------
COLUMNS = [("gen loss", lambda r: r["final"].get("loss"), ".4g"),
           ("fake loss", lambda r: r["final"].get("fake_loss"), ".4g"),
           ("FID", lambda r: r.get("fid"), ".2f"),
           ("live FID (last)", lambda r: r.get("live_fid_last"), ".2f"),
           ("live FID (best)", lambda r: r.get("live_fid_best"), ".2f"),
           ("precision", lambda r: r.get("precision"), ".3f"),
           ("recall", lambda r: r.get("recall"), ".3f"),
           ("class acc.", lambda r: r.get("class_accuracy"), ".3f"),
           ("seconds", lambda r: r.get("seconds"), ".0f")]


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def differing_keys(rows: list[dict]) -> list[str]:
    keys = []
    for r in rows:
        keys += [k for k in r["overrides"] if k not in keys]
    return [k for k in keys if len({json.dumps(r["overrides"].get(k)) for r in rows}) > 1]


def table_markdown(rows: list[dict], header: str) -> str:
    keys = differing_keys(rows)
    cols = ["variant"] + [f"`{k}`" for k in keys] + [c[0] for c in COLUMNS]
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [r["name"]] + [str(r["overrides"].get(k, "(base)")) for k in keys]
        cells += [_fmt(get(r), spec) for _, get, spec in COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def log_scale(curves: dict[str, list[tuple[int, float]]]) -> bool:
    """A logarithmic y axis when the positive values span more than 4x: one diverging variant (squared L2's FID
    of ~370 beside the others' ~40) would otherwise flatten every other curve into one line."""
    ys = [y for pts in curves.values() for _, y in pts if np.isfinite(y)]
    return bool(ys) and min(ys) > 0 and max(ys) > 4 * min(ys)


def plot_curves(curves: dict[str, list[tuple[int, float]]], metric: str, path: str) -> str:
    """One line per variant of `metric` over steps: matplotlib when installed ([docs] extra), else a plain PIL
    line plot (same data, no axis labels beyond the title and the legend). Both use a log axis under `log_scale`."""
    log = log_scale(curves)
    try:
        import matplotlib  # pylint: disable=import-outside-toplevel
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    except ImportError:
        return _plot_pil(curves, metric, path, log)
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, pts in curves.items():
        if pts:
            ax.plot(*zip(*pts), marker=".", label=name)
    ax.set_xlabel("step")
    ax.set_ylabel(metric + (" (log scale)" if log else ""))
    if log:
        ax.set_yscale("log")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


_COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
           (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207)]


def _plot_pil(curves, metric, path, log=False):
    from PIL import Image, ImageDraw  # pylint: disable=import-outside-toplevel
    w, h, left, top, bottom = 720, 420, 60, 30, 40
    right = 250
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    pts_all = [p for pts in curves.values() for p in pts if np.isfinite(p[1])]
    draw.text((left, 8), f"{metric} over steps" + (" (log scale)" if log else ""), fill="black")
    f = np.log10 if log else float   # the drawn coordinate; the labels keep the values
    if pts_all:
        xs, ys = [p[0] for p in pts_all], [p[1] for p in pts_all]
        x0, x1 = min(xs), max(max(xs), min(xs) + 1)
        y0, y1 = min(ys), max(ys)
        y1 = y1 if y1 > y0 else y0 + 1.0
        sx = lambda x: left + (x - x0) / (x1 - x0) * (w - left - right)
        sy = lambda y: h - bottom - (f(y) - f(y0)) / (f(y1) - f(y0)) * (h - top - bottom)
        draw.rectangle([left, top, w - right, h - bottom], outline="black")
        draw.text((left, h - bottom + 5), f"step {x0}", fill="black")
        draw.text((w - right - 60, h - bottom + 5), f"step {x1}", fill="black")
        draw.text((2, top), f"{y1:.3g}", fill="black")
        draw.text((2, h - bottom - 10), f"{y0:.3g}", fill="black")
        for i, (name, pts) in enumerate(curves.items()):
            color = _COLORS[i % len(_COLORS)]
            xy = [(sx(x), sy(y)) for x, y in pts if np.isfinite(y)]
            if len(xy) > 1:
                draw.line(xy, fill=color, width=2)
            for x, y in xy:
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
            draw.text((w - right + 10, top + 14 * i), name, fill=color)
    img.save(path)
    return path


def write_outputs(out_dir: str, rows: list[dict], metric: str, command: str, unfinished: list[str] = ()) -> dict:
    curves = {r["name"]: [(m["step"], float(m[metric])) for m in read_metrics(os.path.join(out_dir, "runs",
                                                                                            r["name"]))
                          if metric in m] for r in rows}
    header = (f"# Ablation\n\n`{command}`\n\nFinal losses: the last logged window of metrics.jsonl (gen loss = "
              f"`loss`, fake loss = `fake_loss`). \"-\": not computed (FID / precision / recall need the Inception "
              f"weights and sample.fid_ref); live FID: the last and the lowest `eval/fid` of the training "
              f"(`--set train.eval_every=N`; `--metric=eval/fid` plots the curves). seconds: training (all resumed "
              f"runs) + evaluation.")
    plot = plot_curves(curves, metric, os.path.join(out_dir, f"ablation_{metric.replace('/', '_')}.png"))
    md = table_markdown(rows, header) + f"\n![{metric}]({os.path.basename(plot)})\n"
    if unfinished:
        md += (f"\nNot finished: {', '.join(unfinished)} (the sweep was stopped; rerunning its command continues "
               f"them).\n")
    summary = {"command": command, "switches": differing_keys(rows), "metric": metric, "plot": plot, "rows": rows,
               "unfinished": list(unfinished)}
    with open(os.path.join(out_dir, "ablation.md"), "w") as f:
        f.write(md)
    _write_json(os.path.join(out_dir, "ablation.json"), summary)
    return summary


INTO_BEGIN, INTO_END = "<!-- BEGIN GENERATED ABLATION -->", "<!-- END GENERATED ABLATION -->"


def compact_table(rows: list[dict]) -> str:
    """One line per variant: its switches against the base (k=v), FID, precision, recall, class accuracy."""
    lines = ["| variant | switches | FID | precision | recall | class acc. |", "|---|---|---|---|---|---|"]
    for r in rows:
        switches = ", ".join(f"`{k}={v}`" for k, v in r["overrides"].items()) or "(base)"
        acc = r.get("class_accuracy")
        lines.append(f"| {r['name']} | {switches} | {_fmt(r.get('fid'), '.2f')} | {_fmt(r.get('precision'), '.3f')} "
                     f"| {_fmt(r.get('recall'), '.3f')} | {_fmt(None if acc is None else 100 * acc, '.1f')}"
                     f"{'' if acc is None else '%'} |")
    return "\n".join(lines) + "\n"


def write_into(path: str, rows: list[dict], command: str) -> None:
    """Replaces the part of the markdown file `path` between INTO_BEGIN and INTO_END with the compact table, so a
    results page carries the sweep's numbers as generated from its runs' JSON, not copied by hand."""
    if not os.path.isfile(path):
        raise UserError(f"--into={path} is not a file: give the markdown page that holds the table's markers")
    with open(path) as f:
        text = f.read()
    if INTO_BEGIN not in text or INTO_END not in text:
        raise UserError(f"--into={path} lacks the markers {INTO_BEGIN} / {INTO_END} around the table's place")
    pre, rest = text.split(INTO_BEGIN, 1)
    post = rest.split(INTO_END, 1)[1]
    body = f"{INTO_BEGIN}\n\n(generated by `{command}`)\n\n{compact_table(rows)}\n{INTO_END}"
    with open(path, "w") as f:
        f.write(pre + body + post)


# -- the sweep ------------------------------------------------------------------------------------------------------
def ablate(base_spec: str, sweeps: list[str], *, steps: int, eval_samples: int, out: str, sets: list[str] = (),
           teacher: str = "", variants_file: str = "", metric: str = "loss", command: str = "",
           on_variant: Callable[[str, dict], None] | None = None) -> dict | None:
    """Run the sweep; returns the summary (also in OUT/ablation.json), or None when stopped by SIGTERM (and on
    processes other than 0). `on_variant(name, result)` is called after each variant finishes (progress)."""
    if steps < 1 or eval_samples < 1:
        raise UserError(f"--steps and --eval_samples must be >= 1, got {steps}, {eval_samples}")
    base = load_base(base_spec)
    common = set_overrides(base, list(sets))
    if teacher:
        common["teacher_ckpt"] = teacher
    todo = plan(base, list(sweeps), variants_file)
    runs_dir = os.path.join(out, "runs")
    if _is_writer():
        os.makedirs(runs_dir, exist_ok=True)
        _write_json(os.path.join(out, "plan.json"), {"base": base_spec, "set": common, "variants": todo})
    with shared_compiles(os.path.join(out, "xla_cache")):
        rows = _run_all(todo, base, common, runs_dir, out, steps, eval_samples, on_variant)
    if rows is None or not _is_writer():
        return None
    summary = write_outputs(out, rows, metric, command or "ablate")
    print(f"ablate: wrote {os.path.join(out, 'ablation.md')}, ablation.json and {summary['plot']}", flush=True)
    return summary


def report_finished(base_spec: str, sweeps: list[str], *, out: str, variants_file: str = "", metric: str = "loss",
                    command: str = "") -> dict:
    """The table and plot of the variants of a stopped sweep that finished (their runs/NAME/result.json), in the
    sweep's order, naming the unfinished ones; nothing is trained or evaluated."""
    todo = plan(load_base(base_spec), list(sweeps), variants_file)
    rows, unfinished = [], []
    for name in todo:
        path = os.path.join(out, "runs", name, RESULT)
        if os.path.exists(path):
            with open(path) as f:
                rows.append(json.load(f))
        else:
            unfinished.append(name)
    if not rows:
        raise UserError(f"--report_only: no finished variant under {os.path.join(out, 'runs')} (no {RESULT} there); "
                        f"check --out and the sweep's --sweep / --variants")
    return write_outputs(out, rows, metric, command or "ablate", unfinished)


def _same_variant(result: dict, path: str, overrides: dict, steps: int, eval_samples: int) -> dict:
    """A finished variant is reused only if this sweep asks for the same thing: a rerun with other --steps,
    --eval_samples or overrides into the same --out would otherwise mix rows of different runs in one table."""
    theirs = {"steps": result.get("steps"), "eval samples": result.get("num_images"),
              "overrides": json.loads(json.dumps(result.get("overrides", {})))}
    ours = {"steps": steps, "eval samples": eval_samples, "overrides": json.loads(json.dumps(overrides))}
    if theirs != ours:
        diff = "; ".join(f"{k} {theirs[k]!r} there, {ours[k]!r} here" for k in ours if theirs[k] != ours[k])
        raise UserError(f"{path} is a finished variant of another sweep ({diff}); give another --out or remove it "
                        "to train it again")
    return result


def _run_all(todo: dict, base, common: dict, runs_dir: str, out: str, steps: int, eval_samples: int,
             on_variant) -> list[dict] | None:
    """Every unfinished variant in order; the rows of all, or None when a SIGTERM stopped one."""
    rows = []
    for name, ov in todo.items():
        workdir = os.path.join(runs_dir, name)
        result_path = os.path.join(workdir, RESULT)
        if os.path.exists(result_path):
            with open(result_path) as f:
                rows.append(_same_variant(json.load(f), result_path, ov, steps, eval_samples))
            print(f"ablate: {name} finished earlier ({result_path}); skipped", flush=True)
            continue
        batch = min(eval_samples, int(base.sample.batch_size))
        config = apply(base, {**common, **ov, "train.num_steps": steps, "sample.num_images": eval_samples,
                              "sample.batch_size": batch})
        print(f"ablate: {name} ({ov})", flush=True)
        result = run_variant(name, ov, config, workdir, os.path.join(out, "eval_cache"))
        if result is None:
            print(f"ablate: stopped during {name} (checkpoint saved); rerun the same command to continue", flush=True)
            return None
        if _is_writer():
            _write_json(result_path, result)
        rows.append(result)
        if on_variant is not None:
            on_variant(name, result)
    return rows


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m marval_jax.tools.ablate", description=__doc__.split("\n\n")[0])
    p.add_argument("--base", required=True, help="config file and variant, e.g. configs/marval.py:tiny")
    p.add_argument("--sweep", action="append", default=[], help="key=v1,v2 (repeat: the grid is the product)")
    p.add_argument("--variants", default="", help="JSON file: {name: {key: value}} named variants")
    p.add_argument("--set", action="append", default=[], dest="sets", help="key=value for every variant")
    p.add_argument("--teacher", default="", help="teacher checkpoint (= --set teacher_ckpt=...)")
    p.add_argument("--steps", type=int, required=True, help="train.num_steps of every variant")
    p.add_argument("--eval_samples", type=int, required=True, help="one-step samples evaluated per variant")
    p.add_argument("--out", required=True, help="output directory (runs/, ablation.md, ablation.json, plot)")
    p.add_argument("--metric", default="loss", help="metrics.jsonl key plotted over steps (default: gen loss)")
    p.add_argument("--report_only", action="store_true", help="write the table and plot of the finished variants of "
                   "a stopped sweep (same --base / --sweep / --variants / --out); train nothing")
    p.add_argument("--into", default="", help="also write the finished variants' compact table into this markdown "
                   f"file, between its {INTO_BEGIN} / {INTO_END} markers (e.g. docs/results.md)")
    add_verbose_flag(p)
    return p.parse_args(argv)


def _sweep_args(argv: list[str]) -> list[str]:
    """The command line without --into (where the table goes is not part of the sweep)."""
    out, skip = [], False
    for x in argv:
        if skip or x.startswith("--into="):
            skip = False
            continue
        skip = x == "--into"
        if not skip:
            out.append(x)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    a = parse_args(argv)
    command = "python -m marval_jax.tools.ablate " + " ".join(_sweep_args(argv))
    if a.report_only:
        summary = report_finished(a.base, a.sweep, out=a.out, variants_file=a.variants, metric=a.metric,
                                  command=command.replace(" --report_only", ""))
        print(f"ablate: wrote {os.path.join(a.out, 'ablation.md')} ({len(summary['rows'])} finished, "
              f"{len(summary['unfinished'])} not)", flush=True)
    else:
        summary = ablate(a.base, a.sweep, steps=a.steps, eval_samples=a.eval_samples, out=a.out, sets=a.sets,
                         teacher=a.teacher, variants_file=a.variants, metric=a.metric, command=command)
    if a.into and summary is not None and _is_writer():   # one process writes the page
        write_into(a.into, summary["rows"], command.replace(" --report_only", "") + f" --report_only --into={a.into}")
        print(f"ablate: wrote the table into {a.into}", flush=True)
    return 0


if __name__ == "__main__":
    run_cli(main)
