"""`--mode sample`: sample images from a run (teacher, student or RL) or a params checkpoint, write a PNG grid, an
npz of uint8 images and a JSON with the settings and seconds per image.

Every process of a multi-process run (a pod's hosts) runs this with the same config: the sampler is jitted over the
global mesh (`mesh.*`) with the parameters replicated and the batch split over the mesh's batch axes
(`GlobalBatches`); each device samples its share of every batch, the results are gathered to every process
(`multihost_utils.process_allgather`), and process 0 alone writes files (`is_writer`). Outputs go through
etils.epath: `--out` (or the workdir) may be gs://.
"""
from __future__ import annotations

import contextlib
import json
import logging
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from marval_jax.checkpoints.load import load_model_params
from marval_jax.data import pipeline
from marval_jax.evaluation.files import write_npz
from marval_jax.evaluation.grid import save_grid
from marval_jax.evaluation.inception_input import uint8_images
from marval_jax.parallel.compiler_options import jit_options
from marval_jax.parallel.global_batches import GlobalBatches, progress  # noqa: F401  (re-exported)
from marval_jax.sampling import ar_sampler
from marval_jax.sampling.from_config import sampler_from_config
from marval_jax.train.loop import StepProfiler, profile_window
from marval_jax.checkpoints.decoders import decoder_fn
from marval_jax.models.factory import abstract_model, model_config
from marval_jax.user_errors import UserError


def is_writer() -> bool:
    """Process 0 writes the files of sample / evaluate / demo; the others compute and gather only."""
    return jax.process_index() == 0


def onestep_settings(config, source: str = "") -> tuple[int, float]:
    """(t_init, noise_scale) of the one-step sampler: sample.t_init >= 0 / sample.noise_scale > 0 are explicit
    overrides; otherwise the values `source` records (checkpoints/params_io.recorded_generator), otherwise the
    config's generator section. An override or a config value that differs from the record is logged."""
    from marval_jax.models.generator import T_INIT
    from marval_jax.checkpoints.params_io import recorded_generator
    sc = config.sample
    gen = config.get("generator") or {}
    rec = recorded_generator(source) if source else None
    out = []
    for field, explicit, fallback in (("t_init", int(sc.get("t_init", -1)), T_INIT),
                                      ("noise_scale", float(sc.get("noise_scale", -1.0)), 1.0)):
        from_cfg = gen.get(field, -1)
        if (field == "t_init" and explicit >= 0) or (field == "noise_scale" and explicit > 0):
            if rec is not None and rec[field] != explicit:
                logging.warning("sample.%s=%s overrides the value %s recorded by %s", field, explicit, rec[field],
                                source)
            value = explicit
        elif rec is not None:
            if from_cfg is not None and from_cfg >= 0 and from_cfg != rec[field]:
                logging.warning("generator.%s=%s of the config is not used: %s records %s (set sample.%s to "
                                "override)", field, from_cfg, source, rec[field], field)
            value = rec[field]
        else:
            value = from_cfg if from_cfg is not None and from_cfg >= 0 else fallback
        out.append(value)
    return int(out[0]), float(out[1])


def make_predictor(config, source: str = ""):
    """The sample.sampler's predictor. onestep: t_init and noise_scale from `onestep_settings(config, source)`;
    sample.cfg != 1 guides it (student CFG, `losses.gsim.onestep_predictor`)."""
    sc = config.sample
    if sc.sampler == "teacher":
        return ar_sampler.teacher_predictor(sc.num_sampling_steps, sc.temperature, sc.clip_denoised)
    if sc.sampler == "onestep":
        from marval_jax.losses.gsim import onestep_predictor
        return onestep_predictor(*onestep_settings(config, source))
    raise UserError(f"sample.sampler must be 'teacher' or 'onestep', got {sc.sampler!r}")


def labels_for(config, n: int, class_num: int, rng) -> jax.Array:
    kind = config.sample.labels
    if kind == "cycle":
        return jnp.arange(n) % class_num
    if kind == "uncond":
        return -jnp.ones((n,), jnp.int32)
    if kind == "random":
        return jax.random.randint(rng, (n,), 0, class_num)
    raise UserError(f"sample.labels must be cycle, uncond or random, got {kind!r}")


class Sampler:
    """The sampler of `config.sample` on the global mesh: `batches()` yields, batch by batch, the decoded images (a
    global array (bs, H, W, C) in [-1, 1], split over the batch axes), their labels (NumPy (bs,)) and how many rows
    are real (the last batch is padded). `timing` holds the compile time and, after the loop, seconds per image."""

    def __init__(self, config, source: str, layout: GlobalBatches | None = None, profile_dir: str = ""):
        self.config, self.source = config, source
        # sample.profile_batches: a jax.profiler trace of those batches into <profile_dir>/profile (as training's)
        self.profile = (config.sample.get("profile_batches", ()), profile_dir or source)
        profile_window(self.profile[0], "sample.profile_batches")   # a bad pair: refused before anything loads
        self.layout = layout or GlobalBatches(config.mesh)
        cfg = model_config(config)
        graphdef, abstract = abstract_model(cfg)
        sc = config.sample
        spec = sampler_from_config(config, "eval")  # its settings checked (sample.kv_cache ...) before any load
        params = load_model_params(source, abstract, config.model.to_dict(), use_ema=sc.use_ema)
        self.params = self.layout.replicate(params)
        fn = ar_sampler.make_sampler(graphdef, spec, make_predictor(config, source), seq_len=cfg.seq_len,
                                     buffer_size=cfg.buffer_size, token_dim=cfg.token_dim)
        decode = decoder_fn(config, cfg)
        self.rng = jax.random.PRNGKey(config.train.seed + 12345)
        self.labels = np.asarray(labels_for(config, sc.num_images, cfg.class_num, self.rng))
        self.batch_size = self.layout.round_up(min(sc.batch_size, sc.num_images))
        lay = self.layout
        self._fn = jax.jit(lambda p, lab, r: decode(fn(p, lab, r)),
                           in_shardings=(lay.replicated, lay.sharding(1), lay.replicated),
                           out_shardings=lay.sharding(4), **jit_options(self.batch_size // lay.ways))
        self.timing = {"batch_size": self.batch_size, "device": jax.devices()[0].device_kind,
                       "processes": jax.process_count(), "devices": jax.device_count(), "kv_cache": spec.cache.label}

    def batches(self):
        sc, lay = self.config.sample, self.layout
        t0 = time.time()
        first = lay.put(lay.pad(self.labels[: self.batch_size], self.batch_size))
        compiled = self._fn.lower(self.params, first, self.rng).compile()  # ahead of time: every batch runs once
        self.timing["compile_s"] = time.time() - t0
        t0 = time.time()
        profiler = StepProfiler(*self.profile, field="sample.profile_batches")
        with progress(f"sampling ({sc.sampler})", sc.num_images) as bar, contextlib.closing(profiler):
            for k, i in enumerate(range(0, sc.num_images, self.batch_size)):
                lab = self.labels[i: i + self.batch_size]
                profiler.before(k + 1)
                images = compiled(self.params, lay.put(lay.pad(lab, self.batch_size)),
                                  jax.random.fold_in(self.rng, i))
                profiler.after(k + 1, images)
                yield images, lab, len(lab)
                bar.update(len(lab))
            jax.block_until_ready(images)
        self.timing["seconds_per_image"] = (time.time() - t0) / max(sc.num_images, 1)


def generate(config, source: str, profile_dir: str = "") -> tuple[np.ndarray, np.ndarray, dict]:
    """Sample config.sample.num_images images (NHWC uint8) with their labels and timings, on every process."""
    sampler = Sampler(config, source, profile_dir=profile_dir)
    images = [sampler.layout.gather(uint8_images(x))[:n] for x, _, n in sampler.batches()]
    return np.concatenate(images), sampler.labels, sampler.timing


def sample_tag(config) -> str:
    """File name stem of a sample run: sampler and K, and the KV cache when one is used (so a cached run never
    overwrites the uncached run's files)."""
    sc = config.sample
    tag = f"{sc.sampler}_K{sc.num_iter}"
    kind = sc.get("kv_cache", "none")
    if kind == "approx":
        tag += f"_kvapprox{sc.kv_reuse_after}-{sc.kv_refresh_every}"
    elif kind != "none":
        tag += f"_kv{kind}"
    return tag


def sample_from_workdir(config, workdir: str, out: str = "", ckpt: str = "") -> dict:
    source = ckpt or config.get("init_from", "") or workdir
    images, labels, timing = generate(config, source, profile_dir=workdir)
    sc = config.sample
    report = {"source": source, "sampler": sc.sampler, "num_iter": sc.num_iter, "cfg": sc.cfg,
              "num_images": int(len(images)), **timing}
    if is_writer():
        out = epath.Path(out or epath.Path(workdir) / "samples_final")
        out.mkdir(parents=True, exist_ok=True)
        tag = sample_tag(config)
        shown = images[: min(len(images), 100)]
        save_grid(out / f"{tag}.png", _as_float(shown))
        report.update(grid_class_names(config, labels[: len(shown)]))
        write_npz(out / f"{tag}.npz", compressed=True, images=images, labels=labels)
        (out / f"{tag}.json").write_text(json.dumps(report, indent=1))
        print(json.dumps(report), flush=True)
    return report


def grid_class_names(config, labels) -> dict:
    """{"grid_classes": one list of class names per grid row, "class_names": label order}, so the PNG grid can be
    read without the data set at hand; {} where the data set's names are not known (data/pipeline.class_names)."""
    names = pipeline.class_names(config.data)
    labels = np.asarray(labels)
    if names is None or labels.size == 0 or int(labels.min()) < 0:
        return {}
    ncol = int(math.ceil(math.sqrt(len(labels))))   # evaluation/grid.make_grid's layout
    cells = [names[int(l)] for l in labels]
    return {"class_names": names, "grid_classes": [cells[i: i + ncol] for i in range(0, len(cells), ncol)]}


def _as_float(images_uint8: np.ndarray) -> np.ndarray:
    """uint8 -> [-1, 1] such that grid.to_uint8 gives the same levels back."""
    return images_uint8.astype(np.float32) / 127.5 - 1.0
