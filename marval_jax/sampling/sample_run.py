"""`--mode sample`: sample images from a run (teacher, student or RL) or a params checkpoint, write a PNG grid, an
npz of uint8 images and a JSON with the settings and seconds per image."""
from __future__ import annotations

import json
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


def make_predictor(config):
    sc = config.sample
    if sc.sampler == "teacher":
        return ar_sampler.teacher_predictor(sc.num_sampling_steps, sc.temperature, sc.clip_denoised)
    if sc.sampler == "onestep":
        t_init = sc.t_init if sc.t_init >= 0 else int(config.generator.t_init)
        return ar_sampler.onestep_predictor(t_init)
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
    fn = ar_sampler.make_sampler(graphdef, spec, make_predictor(config), seq_len=cfg.seq_len,
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
