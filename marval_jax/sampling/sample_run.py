"""`--mode sample`: sample images from a run (teacher, student or RL) or a params checkpoint, write a PNG grid, an
npz of uint8 images and a JSON with the settings and seconds per image."""
from __future__ import annotations

import json
import logging
import os
import time

import jax
import jax.numpy as jnp
import numpy as np

from marval_jax.checkpoints.load import load_model_params
from marval_jax.evaluation.grid import save_grid, to_uint8
from marval_jax.sampling import ar_sampler
from marval_jax.train.mar_task import abstract_model, decoder_fn, model_config
from marval_jax.user_errors import UserError


def onestep_settings(config, source: str = "") -> tuple[int, float]:
    """(t_init, noise_scale) of the one-step sampler: sample.t_init >= 0 / sample.noise_scale > 0 are explicit
    overrides; otherwise the values `source` records (checkpoints/params_io.recorded_generator), otherwise the
    config's generator section. An override or a config value that differs from the record is logged."""
    from configs.marval import T_INIT
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


def generate(config, source: str) -> tuple[np.ndarray, np.ndarray, dict]:
    """Sample config.sample.num_images images (NHWC float in [-1, 1]) with their labels and timings."""
    cfg = model_config(config)
    graphdef, abstract = abstract_model(cfg)
    params = load_model_params(source, abstract, config.model.to_dict(), use_ema=config.sample.use_ema)
    sc = config.sample
    spec = ar_sampler.SamplerSpec(num_iter=sc.num_iter, cfg=sc.cfg, cfg_schedule=sc.cfg_schedule,
                                  num_buckets=sc.num_buckets)
    fn = ar_sampler.make_sampler(graphdef, spec, make_predictor(config, source), seq_len=cfg.seq_len,
                                 buffer_size=cfg.buffer_size, token_dim=cfg.token_dim)
    decode = jax.jit(decoder_fn(config, cfg))
    rng = jax.random.PRNGKey(config.train.seed + 12345)
    labels = labels_for(config, sc.num_images, cfg.class_num, rng)
    t0 = time.time()
    jax.block_until_ready(fn(params, labels[: sc.batch_size], rng))  # compile + warm-up
    compile_s = time.time() - t0
    images, t0 = [], time.time()
    for i in range(0, sc.num_images, sc.batch_size):
        lab = labels[i: i + sc.batch_size]
        images.append(np.asarray(decode(fn(params, lab, jax.random.fold_in(rng, i)))))
    elapsed = time.time() - t0
    images = np.concatenate(images)[: sc.num_images]
    timing = {"compile_and_first_batch_s": compile_s, "seconds_per_image": elapsed / len(images),
              "batch_size": sc.batch_size, "device": jax.devices()[0].device_kind}
    return images, np.asarray(labels), timing


def sample_tag(config) -> str:
    return f"{config.sample.sampler}_K{config.sample.num_iter}"


def sample_from_workdir(config, workdir: str, out: str = "", ckpt: str = "") -> dict:
    source = ckpt or config.get("init_from", "") or workdir
    images, labels, timing = generate(config, source)
    sc = config.sample
    out = out or os.path.join(workdir, "samples_final")
    os.makedirs(out, exist_ok=True)
    tag = sample_tag(config)
    save_grid(os.path.join(out, f"{tag}.png"), images[: min(len(images), 100)])
    np.savez_compressed(os.path.join(out, f"{tag}.npz"), images=to_uint8(images), labels=labels)
    report = {"source": source, "sampler": sc.sampler, "num_iter": sc.num_iter, "cfg": sc.cfg,
              "num_images": int(len(images)), **timing}
    with open(os.path.join(out, f"{tag}.json"), "w") as f:
        json.dump(report, f, indent=1)
    print(json.dumps(report), flush=True)
    return report
