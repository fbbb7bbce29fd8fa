"""Measurements of the Fashion-MNIST reproduction that the results table lacks: the data's own floor and the
teacher's FID against training steps (issue "A reproduction that convinces", points 1 and 2).

    # on the accelerator (FID Inception weights and the raw IDX files wherever they were carried to)
    python -m marval_jax.tools.reproduce_curve floor --out=OUT/floor.json --inception=FID.npz --raw-dir=DIR
    python -m marval_jax.tools.reproduce_curve curve --workdir=W/teacher --config=configs/mar.py:fmnist_l \
        --out=OUT/curve.json --inception=FID.npz --raw-dir=DIR --num=2000
    # anywhere: the plot, generated from the committed JSON
    python -m marval_jax.tools.reproduce_curve plot --curve=docs/results/teacher_curve.json \
        --out=docs/results/teacher_fid_vs_steps.png

`floor` compares the first `--num-train` Fashion-MNIST training images with the 10k test images under the protocol of
docs/results.md (FID of the FID Inception's pool features, precision / recall with k = 3, 28x28 grey repeated to
three channels): the FID a perfect generator would reach with that many samples. `curve` samples `--num` images
(labels i % 10) from the EMA weights of every checkpoint kept in a training workdir and writes FID, precision,
recall and class accuracy per step; the JSON is rewritten after each step, so a `--time-budget` cut keeps what was
measured. Precision and recall of 2k samples against 10k real images are not those of 10k samples (recall grows
with the number of samples): compare them only within the curve.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np

from marval_jax.user_errors import UserError, add_verbose_flag, run_cli

REAL_SPEC = "raw:fashion_mnist/test"


def _write(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1, default=float)
    os.replace(tmp, path)


def _device() -> str:
    import jax  # pylint: disable=import-outside-toplevel
    return jax.devices()[0].device_kind


def compare(inception, real_feats: np.ndarray, ref: tuple, images_uint8: np.ndarray) -> dict:
    """FID / precision / recall of uint8 images (N, 28, 28, 1) against the reference features and statistics."""
    from marval_jax.evaluation import fid as fid_lib  # pylint: disable=import-outside-toplevel
    from marval_jax.evaluation.inception import inception_features  # pylint: disable=import-outside-toplevel
    from marval_jax.evaluation.precision_recall import precision_recall  # pylint: disable=import-outside-toplevel
    feats = inception_features(inception, images_uint8)
    mu, sigma = fid_lib.statistics_from_features(feats)
    row = {"fid": fid_lib.frechet_distance(mu, sigma, *ref)}
    pr = precision_recall(real_feats, feats)
    row.update({k: pr[k] for k in ("precision", "recall", "k", "num_real", "num_fake")})
    return row


def reference(inception_path: str, raw_dir: str):
    """(inception params, test features, (mu, sigma)) of the 10k test images."""
    from marval_jax.evaluation import fid as fid_lib  # pylint: disable=import-outside-toplevel
    from marval_jax.programs.evaluate import real_images  # pylint: disable=import-outside-toplevel
    from marval_jax.evaluation.inception import inception_features, load_inception  # pylint: disable=import-outside-toplevel
    inception = load_inception(inception_path or None)
    real = real_images(REAL_SPEC, raw_dir or None)
    feats = inception_features(inception, real)
    return inception, feats, fid_lib.statistics_from_features(feats)


def floor(a) -> int:
    from marval_jax.data.raw_datasets import load_raw  # pylint: disable=import-outside-toplevel
    if a.num_train <= 0:
        raise UserError(f"--num-train must be positive, got {a.num_train}")
    t0 = time.time()
    train = load_raw("fashion_mnist", "train", a.raw_dir or None)[0][..., None]
    if a.num_train > len(train):
        raise UserError(f"--num-train={a.num_train} is more than the {len(train)} training images")
    inception, real_feats, ref = reference(a.inception, a.raw_dir)
    row = {"model": "data floor: Fashion-MNIST train[:%d] vs test" % a.num_train, "num_images": a.num_train,
           **compare(inception, real_feats, ref, train[: a.num_train]), "device": _device(),
           "seconds": time.time() - t0, "date": time.strftime("%Y-%m-%d")}
    _write(a.out, row)
    print(json.dumps(row, default=float), flush=True)
    return 0


def checkpoint_steps(workdir: str) -> list[int]:
    ckdir = os.path.join(workdir, "checkpoints")
    if not os.path.isdir(ckdir):
        raise FileNotFoundError(f"{workdir} has no checkpoints/ folder (is it a training workdir?)")
    steps = sorted(int(d) for d in os.listdir(ckdir) if d.isdigit())
    if not steps:
        raise FileNotFoundError(f"{ckdir} holds no checkpoint steps yet")
    return steps


def load_step_params(workdir: str, step: int, abstract, model_config: dict):
    """EMA params of one kept checkpoint step of a teacher workdir (checkpoints.load reads only the newest)."""
    import jax  # pylint: disable=import-outside-toplevel
    import orbax.checkpoint as ocp  # pylint: disable=import-outside-toplevel
    from flax import nnx  # pylint: disable=import-outside-toplevel
    from marval_jax.checkpoints import manager as ckpt  # pylint: disable=import-outside-toplevel
    from marval_jax.checkpoints.load import _unwrap  # pylint: disable=import-outside-toplevel
    manager = ckpt.make_manager(workdir, save_interval=1, keep=1000, async_save=False)
    saved = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]
    ckpt.check_config(saved, {"model": model_config}, where=f"{workdir} step {step}")
    raw = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    if "ema_params" not in raw:
        raise UserError(f"{workdir} step {step} holds no ema_params ({list(raw)}): curve reads teacher workdirs")
    out = jax.tree_util.tree_map(lambda x: x, abstract)
    nnx.replace_by_pure_dict(out, jax.tree_util.tree_map(jax.numpy.asarray, _unwrap(raw["ema_params"])))
    return out


def load_config(spec: str, overrides: list[str]):
    """`configs/mar.py:VARIANT` with KEY=VALUE overrides (the same fields as --config.KEY=VALUE)."""
    from configs import mar  # pylint: disable=import-outside-toplevel
    path, _, variant = spec.partition(":")
    if os.path.basename(path) != "mar.py":
        raise UserError(f"--config must be configs/mar.py:VARIANT (a teacher config), got {spec!r}")
    config = mar.get_config(variant or None)
    config.unlock()
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep:
            raise UserError(f"--set wants KEY=VALUE, got {item!r}")
        node = config
        *parents, leaf = key.split(".")
        for p in parents:
            node = node[p]
        if leaf not in node:
            raise UserError(f"--set {key}: no such config field")
        old = node[leaf]
        node[leaf] = type(old)(value) if not isinstance(old, bool) else value.lower() in ("1", "true", "yes")
    return config


def evaluation_order(steps: list[int], offset: int, done: set[int]) -> list[int]:
    """The kept steps not yet in the curve (rows are keyed by step + offset), the latest first: a curve cut by
    --time-budget keeps the point that says where the run ended."""
    todo = [s for s in sorted(steps) if s + offset not in done]
    return todo[-1:] + todo[:-1]


def curve(a) -> int:
    import jax  # pylint: disable=import-outside-toplevel
    from marval_jax.evaluation.class_accuracy import class_accuracy  # pylint: disable=import-outside-toplevel
    from marval_jax.evaluation.classifier_train import load_default_classifier  # pylint: disable=import-outside-toplevel
    from marval_jax.evaluation.inception_input import center_crop  # pylint: disable=import-outside-toplevel
    from marval_jax.evaluation.grid import to_uint8  # pylint: disable=import-outside-toplevel
    from marval_jax.sampling import ar_sampler  # pylint: disable=import-outside-toplevel
    from marval_jax.sampling.from_config import sampler_from_config  # pylint: disable=import-outside-toplevel
    from marval_jax.programs.sample import make_predictor  # pylint: disable=import-outside-toplevel
    from marval_jax.checkpoints.decoders import decoder_fn  # pylint: disable=import-outside-toplevel
    from marval_jax.models.factory import abstract_model, model_config  # pylint: disable=import-outside-toplevel
    if a.num <= 0 or a.batch <= 0:
        raise UserError(f"--num and --batch must be positive, got {a.num} and {a.batch}")
    if a.step_offset < 0:
        raise UserError(f"--step-offset must be >= 0, got {a.step_offset}")
    t_start = time.time()
    steps = checkpoint_steps(a.workdir)
    if a.steps:
        wanted = {int(s) for s in a.steps.split(",")}
        missing = sorted(wanted - set(steps))
        if missing:
            raise UserError(f"--steps {missing} are not kept in {a.workdir}/checkpoints (kept: {steps})")
        steps = [s for s in steps if s in wanted]
    config = load_config(a.config, a.set)
    config.sample.sampler, config.sample.num_iter, config.sample.cfg = "teacher", a.num_iter, a.cfg
    cfg = model_config(config)
    graphdef, abstract = abstract_model(cfg)
    spec = sampler_from_config(config, "eval")
    fn = ar_sampler.make_sampler(graphdef, spec, make_predictor(config), seq_len=cfg.seq_len,
                                 buffer_size=cfg.buffer_size, token_dim=cfg.token_dim)
    decode = jax.jit(decoder_fn(config, cfg))
    inception, real_feats, ref = reference(a.inception, a.raw_dir)
    clf, _ = load_default_classifier("fashion_mnist", "eval")
    prior = json.load(open(a.out)) if os.path.exists(a.out) else {}
    payload = {"config": a.config, "overrides": a.set, "num_images": a.num, "num_iter": a.num_iter, "cfg": a.cfg,
               "batch_size": config.train.global_batch_size, "rows": prior.get("rows", [])}
    done = {r["step"] for r in payload["rows"]}
    labels_all = np.arange(a.num) % 10
    for step in evaluation_order(steps, a.step_offset, done):
        if a.time_budget and time.time() - t_start > a.time_budget:
            payload["cut"] = f"time budget {a.time_budget:.0f} s reached before step {step}"
            break
        t0 = time.time()
        params = load_step_params(a.workdir, step, abstract, config.model.to_dict())
        images = []
        for i in range(0, a.num, a.batch):
            lab = jax.numpy.asarray(np.resize(labels_all[i:i + a.batch], a.batch))
            images.append(np.asarray(decode(fn(params, lab, jax.random.fold_in(jax.random.PRNGKey(7), i)))))
        images = np.concatenate(images)[: a.num]
        row = {"step": step + a.step_offset, "images_seen": (step + a.step_offset) * config.train.global_batch_size,
               **compare(inception, real_feats, ref, center_crop(to_uint8(images), 28)),
               "class_accuracy": class_accuracy(clf, images, labels_all), "seconds": time.time() - t0}
        payload["rows"].append(row)
        payload["rows"].sort(key=lambda r: r["step"])
        payload["device"] = _device()
        payload["date"] = time.strftime("%Y-%m-%d")
        _write(a.out, payload)
        print(json.dumps(row, default=float), flush=True)
    _write(a.out, payload)
    return 0


PROTOCOL = ("config", "num_images", "num_iter", "cfg")  # what makes two curves' FIDs comparable


def merge(a) -> int:
    """One curve from the curves of a run continued across machines (each `curve --step-offset`'d): rows by step,
    each run's device and date kept as a segment. Curves of another protocol (config, samples, K, CFG) are refused:
    their FIDs do not line up."""
    curves = []
    from etils import epath  # pylint: disable=import-outside-toplevel
    for path in a.curve:
        if not epath.Path(path).exists():
            raise UserError(f"--curve={path} does not exist: give the JSON files of `reproduce_curve curve`")
        try:
            curves.append(json.loads(epath.Path(path).read_text()))
        except json.JSONDecodeError as e:
            raise UserError(f"--curve={path} is not a curve JSON ({e})") from e
    first = curves[0]
    for path, c in zip(a.curve[1:], curves[1:]):
        diff = [f"{k} {first.get(k)!r} vs {c.get(k)!r}" for k in PROTOCOL if c.get(k) != first.get(k)]
        if diff:
            raise UserError(f"{path} measured another protocol than {a.curve[0]} ({', '.join(diff)}): its FIDs "
                            "are not comparable")
    by_step = {}
    segments = []
    for path, c in zip(a.curve, curves):
        steps = [r["step"] for r in c.get("rows", [])]
        for r in c.get("rows", []):
            if r["step"] in by_step and by_step[r["step"]] != r:
                raise UserError(f"step {r['step']} is measured twice with different results ({path})")
            by_step[r["step"]] = r
        segments.append({"from": path, "device": c.get("device"), "date": c.get("date"),
                         "steps": [min(steps), max(steps)] if steps else []})
    out = {k: first.get(k) for k in PROTOCOL + ("batch_size",)}
    out["device"] = " + ".join(dict.fromkeys(str(c.get("device")) for c in curves))
    out["segments"] = segments
    out["rows"] = [by_step[s] for s in sorted(by_step)]
    _write(a.out, out)
    print(f"wrote {a.out}: {len(out['rows'])} steps from {len(curves)} curves")
    return 0


def plot(a) -> int:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    with open(a.curve) as f:
        data = json.load(f)
    rows = data.get("rows") or []
    if not rows:
        raise UserError(f"{a.curve} holds no measured steps (rows): run `curve` first")
    floor_fid = None
    if a.floor:
        with open(a.floor) as f:
            floor_fid = json.load(f)["fid"]
    steps = [r["step"] for r in rows]
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.6))
    ax[0].plot(steps, [r["fid"] for r in rows], "o-", label=f"teacher ({data['num_images']} samples)")
    if floor_fid is not None:
        ax[0].axhline(floor_fid, color="grey", ls="--", label="data floor (10k train vs test)")
    ax[0].axhline(20, color="red", ls=":", label="target FID 20")
    ax[0].set_xlabel("training step")
    ax[0].set_ylabel("FID vs 10k test images")
    ax[0].set_yscale("log")
    ax[0].legend(fontsize=8)
    for key in ("precision", "recall", "class_accuracy"):
        ax[1].plot(steps, [r[key] for r in rows], "o-", label=key)
    ax[1].set_xlabel("training step")
    ax[1].legend(fontsize=8)
    fig.suptitle(f"{data['config']} K={data['num_iter']} CFG={data['cfg']} ({data.get('device', '?')})", fontsize=9)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(a.out)), exist_ok=True)
    fig.savefig(a.out, dpi=100)
    print(f"wrote {a.out}")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m marval_jax.tools.reproduce_curve", description=__doc__.split("\n")[0])
    add_verbose_flag(p)
    sub = p.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("floor", help="FID / precision / recall of training images against the test images")
    f.add_argument("--out", required=True)
    f.add_argument("--num-train", type=int, default=10000)
    c = sub.add_parser("curve", help="FID of a teacher workdir's kept checkpoints")
    c.add_argument("--workdir", required=True)
    c.add_argument("--config", default="configs/mar.py:fmnist")
    c.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    c.add_argument("--out", required=True)
    c.add_argument("--num", type=int, default=2000)
    c.add_argument("--batch", type=int, default=500)
    c.add_argument("--num-iter", type=int, default=64)
    c.add_argument("--cfg", type=float, default=2.5)
    c.add_argument("--steps", default="", help="comma-separated steps (default: every kept checkpoint)")
    c.add_argument("--time-budget", type=float, default=0.0)
    c.add_argument("--step-offset", type=int, default=0,
                   help="steps the workdir's run started from (a warm start, train.init_from, counts from 0 again): "
                        "added to each row's step and images seen, so a continued run extends the earlier curve")
    for q in (f, c):
        q.add_argument("--inception", default="", help="FID Inception .npz (default ~/.cache/marval_jax/...)")
        q.add_argument("--raw-dir", default="", help="folder of the Fashion-MNIST IDX .gz files")
    g = sub.add_parser("plot", help="FID / precision / recall against steps, from the curve JSON")
    g.add_argument("--curve", required=True)
    g.add_argument("--floor", default="")
    g.add_argument("--out", required=True)
    m = sub.add_parser("merge", help="one curve from the curves of a run continued across machines")
    m.add_argument("--curve", action="append", required=True, help="a curve JSON (repeat, in order)")
    m.add_argument("--out", required=True)
    a = p.parse_args(argv)
    return {"floor": floor, "curve": curve, "plot": plot, "merge": merge}[a.cmd](a)


if __name__ == "__main__":
    run_cli(main)
