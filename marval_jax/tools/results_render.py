"""`python -m marval_jax.tools.results render`: docs/results.md, docs/results.json, plots and sample grids from the
JSON of `results run`, the stage record of `tools.reproduce` and the runs' metrics.jsonl (plots need matplotlib:
pip install -e .[docs])."""
from __future__ import annotations

import json
import os
import shutil

import numpy as np

from marval_jax.checkpoints.safe_load import open_npz

BEGIN, END = "<!-- BEGIN GENERATED RESULTS -->", "<!-- END GENERATED RESULTS -->"
LABEL = {"teacher": "MAR teacher (100-step head)", "student": "MARVAL student (one step)",
         "rl": "MARVAL-RL student (one step)"}


def _f(x, spec=".3g"):
    return "-" if x is None else format(x, spec)


def _read_jsonl(path: str) -> list[dict]:
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# The reproduction issue's criteria: (name, ratio in `checks`, "<=" or ">=", bound)
CRITERIA = (
    ("student FID / teacher FID", "student_fid_over_teacher_fid_K64", "<=", 1.15),
    ("student precision / teacher precision", "student_precision_over_teacher_K64", ">=", 0.8),
    ("student recall / teacher recall", "student_recall_over_teacher_K64", ">=", 0.7),
    ("speed-up per image at batch 1", "speedup_batch1_K64", ">=", 30.0),
    ("RL reward - student reward", "rl_reward_gain", ">=", 0.0),
    ("RL eval-classifier accuracy - student's", "rl_class_accuracy_gain", ">=", 0.0),
    ("RL FID / student FID", "rl_fid_over_student_fid", "<=", 1.15),
    ("RL recall / student recall", "rl_recall_over_student", ">=", 0.8),
)


def checks(rows: list[dict]) -> dict:
    """The end-to-end issue's criteria, computed from the measured rows (absent where a row is missing)."""
    main = {r["model"]: r for r in rows if not r.get("sweep") and r["num_iter"] == 64 and r.get("cache") == "none"}
    t, s, rl = main.get("teacher"), main.get("student"), main.get("rl")
    out = {}
    if t and s:
        out["student_fid_over_teacher_fid_K64"] = s["fid"] / t["fid"]
        out["student_precision_over_teacher_K64"] = s["precision"] / t["precision"]
        out["student_recall_over_teacher_K64"] = s["recall"] / t["recall"]
        if t.get("s_per_image_b1") and s.get("s_per_image_b1"):
            out["speedup_batch1_K64"] = t["s_per_image_b1"] / s["s_per_image_b1"]
    if s and rl:
        out["rl_reward_gain"] = rl["reward_mean"] - s["reward_mean"]
        out["rl_class_accuracy_gain"] = rl["class_accuracy"] - s["class_accuracy"]
        out["rl_fid_over_student_fid"] = rl["fid"] / s["fid"]
        out["rl_recall_over_student"] = rl["recall"] / s["recall"]
    return out


def criteria_lines(c: dict) -> list[str]:
    """One line per criterion that the rows let us compute: the value, the bound, met or missed."""
    lines = []
    for name, key, op, bound in CRITERIA:
        if key in c:
            met = c[key] <= bound if op == "<=" else c[key] >= bound
            lines.append(f"- {name}: {c[key]:.3f} (target {op} {bound:g}): **{'met' if met else 'missed'}**")
    return lines


def table(rows: list[dict]) -> str:
    head = ("| model | K | CFG | FID (10k vs test 10k) | precision | recall | class acc. (eval copy) | reward "
            "(reward copy log p) | s / image, batch 1 | s / image, batch 256 | compile s (b 256 / b 1) |\n"
            "|---|---|---|---|---|---|---|---|---|---|---|\n")
    body = ""
    for r in rows:
        if r.get("sweep"):
            continue
        cache = "" if r.get("cache", "none") == "none" else f", KV cache approx {r['cache']}"
        body += (f"| {LABEL[r['model']]}{cache} | {r['num_iter']} | {r['cfg']:g} | {r['fid']:.2f} | "
                 f"{r['precision']:.3f} | {r['recall']:.4f} | {100 * r['class_accuracy']:.1f}% | "
                 f"{r['reward_mean']:.3f} ± {r['reward_std']:.2f} | {_f(r.get('s_per_image_b1'), '.4f')} | "
                 f"{_f(r.get('s_per_image_batch'), '.5f')} | {_f(r.get('compile_batch_s'), '.0f')} / "
                 f"{_f(r.get('compile_b1_s'), '.0f')} |\n")
    return head + body


def sweep_table(rows: list[dict]) -> str:
    out = "| teacher CFG (K = 64) | FID (2k samples) | precision | recall | class acc. |\n|---|---|---|---|---|\n"
    for r in rows:
        if r.get("sweep"):
            out += (f"| {r['cfg']:g} | {r['fid']:.2f} | {r['precision']:.3f} | {r['recall']:.4f} | "
                    f"{100 * r['class_accuracy']:.1f}% |\n")
    return out


def _save(plt, fig, path: str) -> str:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plots(rows: list[dict], metrics: dict[str, list[dict]], out_dir: str) -> list[str]:
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    written = []
    curves = [("teacher", "loss", "MAR loss (mse + vb)"), ("student", "gen/loss", "GSIM generator loss"),
              ("student", "fake/loss", "fake-score loss"), ("rl", "reward_mean", "RL reward (log p)")]
    curves = [c for c in curves if metrics.get(c[0])]
    if curves:
        fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.2))
        for ax, (stage, key, title) in zip(np.atleast_1d(axes), curves):
            pts = [(m["step"], m[key]) for m in metrics[stage] if key in m]
            ax.plot(*zip(*pts), marker=".")
            ax.set_title(title, fontsize=10)
            ax.set_xlabel("step")
            ax.grid(alpha=0.3)
        written.append(_save(plt, fig, os.path.join(out_dir, "training_curves.png")))
    main = [r for r in rows if not r.get("sweep") and r.get("cache", "none") == "none"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(9, 3.4))
    for model in ("teacher", "student", "rl"):
        rs = sorted((r for r in main if r["model"] == model), key=lambda r: r["num_iter"])
        if not rs:
            continue
        a1.plot([r["num_iter"] for r in rs], [r["fid"] for r in rs], marker="o", label=LABEL[model])
        pts = [(r["s_per_image_b1"], r["fid"]) for r in rs if r.get("s_per_image_b1")]
        if pts:
            a2.plot(*zip(*pts), marker="o", label=LABEL[model])
            for r in rs:
                if r.get("s_per_image_b1"):
                    a2.annotate(f"K={r['num_iter']}", (r["s_per_image_b1"], r["fid"]), fontsize=8)
    a1.set_xlabel("AR iterations K")
    a1.set_ylabel("FID (10k)")
    a1.set_xscale("log", base=2)
    a2.set_xlabel("seconds per image, batch 1 (H200)")
    a2.set_xscale("log")
    a2.set_ylabel("FID (10k)")
    for ax in (a1, a2):
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    written.append(_save(plt, fig, os.path.join(out_dir, "fid_vs_k_and_time.png")))
    return written


def grids(grids_npz: str, out_dir: str) -> list[str]:
    from marval_jax.evaluation.grid import make_grid  # pylint: disable=import-outside-toplevel
    from PIL import Image  # pylint: disable=import-outside-toplevel
    written = []
    if not os.path.exists(grids_npz):
        return written
    with open_npz(grids_npz, what="sample grids") as g:
        for name in g.files:
            if "cfg" in name and name.startswith("teacher") and name.endswith(("cfg1", "cfg1.5")):
                continue
            imgs = g[name].astype(np.float32) / 127.5 - 1.0  # uint8 -> [-1, 1] for make_grid
            path = os.path.join(out_dir, f"grid_{name}.png")
            Image.fromarray(make_grid(imgs, ncol=10)).resize((10 * 30 * 3 // 2, 10 * 30 * 3 // 2),
                                                               Image.NEAREST).save(path)
            written.append(path)
    return written


def render(a) -> int:
    with open(a.run) as f:
        run = json.load(f)
    out_dir = os.path.join(a.out, "results")
    os.makedirs(out_dir, exist_ok=True)
    stages = json.load(open(a.stages)) if a.stages and os.path.exists(a.stages) else {}
    metrics = {s: _read_jsonl(os.path.join(a.metrics, s, "metrics.jsonl")) for s in ("teacher", "student", "rl")} \
        if a.metrics else {}
    # keep the raw inputs next to the rendering, so `render` reruns from the repository alone
    for src, name in [(a.run, "results_run.json"), (a.grids or os.path.join(os.path.dirname(a.run), "grids.npz"),
                                                    "grids.npz")]:
        if os.path.exists(src) and os.path.abspath(src) != os.path.abspath(os.path.join(out_dir, name)):
            shutil.copy(src, os.path.join(out_dir, name))
    for s, ms in metrics.items():
        if ms:
            with open(os.path.join(out_dir, f"metrics_{s}.jsonl"), "w") as f:
                f.writelines(json.dumps(m) + "\n" for m in ms)
    rows = run["rows"]
    files = plots(rows, metrics, out_dir) + grids(os.path.join(out_dir, "grids.npz"), out_dir)
    summary = {"date": run["date"], "device": run["device"], "jax": run.get("jax"), "rows": rows,
               "skipped": run.get("skipped", []), "best_teacher_cfg": run.get("best_teacher_cfg"),
               "stages": stages, "checks": checks(rows), "eval_seconds": run.get("total_s")}
    with open(os.path.join(a.out, "results.json"), "w") as f:
        json.dump(summary, f, indent=1)
    c = summary["checks"]
    gen = [BEGIN, "",
           f"Measured on {run['device']} (jax {run.get('jax')}), {run['date']}; {run['num']} samples per row "
           f"(labels i % 10), FID / precision / recall (k = 3) against the 10k Fashion-MNIST test images, "
           f"28x28 center crops.", "", table(rows), "",
           f"Teacher CFG chosen by FID on {run['sweep_num']} samples at K = 64 "
           f"(best: {run.get('best_teacher_cfg')}):", "", sweep_table(rows), ""]
    if run.get("skipped"):
        gen += ["Not measured in that run: " + "; ".join(f"{s['name']} ({s['why']})" for s in run["skipped"]), ""]
    gen += ["Criteria (computed from the rows above):", ""] + criteria_lines(c) + [""]
    if stages:
        gen += ["| stage | steps | device seconds | stopped by budget | command |", "|---|---|---|---|---|"]
        for s, e in stages.items():
            gen.append(f"| {s} | {e.get('steps')} | {e.get('seconds', 0):.0f} | {e.get('stopped_by_budget')} | "
                       f"`{e.get('command')}` |")
        gen += ["", f"Evaluation run (all rows above, compiles included): {_f(run.get('total_s'), '.0f')} s.", ""]
    gen += ["Files: " + ", ".join(f"`{os.path.relpath(p, a.out)}`" for p in files), "", END]
    md_path = os.path.join(a.out, "results.md")
    text = open(md_path).read() if os.path.exists(md_path) else f"# Results\n\n{BEGIN}\n{END}\n"
    if BEGIN not in text or END not in text:
        raise ValueError(f"{md_path} lacks the {BEGIN} / {END} markers")
    pre, rest = text.split(BEGIN, 1)
    post = rest.split(END, 1)[1]
    with open(md_path, "w") as f:
        f.write(pre + "\n".join(gen) + post)
    print(f"wrote {md_path}, {a.out}/results.json and {len(files)} figures under {out_dir}")
    return 0
