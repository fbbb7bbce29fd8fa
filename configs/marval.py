"""MARVAL: GSIM distillation of a MAR teacher into a one-step-per-AR-iteration generator (docs/method.md
sections 1-2, docs/gsim.md).

Variants (the model is the teacher's, from configs/mar.py):
  tiny    a few-second CPU smoke run on the tiny Fashion-MNIST MAR of configs/mar.py:tiny
  fmnist  the Fashion-MNIST student of the end-to-end reproduction (teacher: configs/mar.py:fmnist)
  fmnist_l  the student of the larger teacher configs/mar.py:fmnist_l (docs/reproduction.md): EMA decay 0.99, so
            that a run of a few thousand steps exports its trained weights, not the teacher-initialised average
  base / large / huge   MARVAL-B/L/H on ImageNet 256 with cached KL-16 latents (teachers: MAR-B/L/H). Pod fit, from
                        the TPU compiler (docs/scale.md; mesh fsdp 16, the rest data): the base GSIM step fits a
                        v5e-256 slice at a per-chip batch of 8 in 9.36 of 16 GiB per chip (v5p-128: 6.08 of 95 GiB),
                        the base one-step sampler at 32 in 4.14 GiB (v5p-128: 4.02); the huge GSIM step fits v5e-256
                        at 4 in 6.77 GiB and v5p-128 at 8 in 12.94 GiB, the huge sampler at 32 in 6.94 GiB on
                        v5e-256 and 6.80 GiB on v5p-128; the large GSIM step fits v5e-256 at 4 in 5.31 GiB (its
                        sampler and v5p-128 not compiled); the RL steps: configs/marval_rl.py

Run (teacher_ckpt is required: "" is an error at run time):
  python -m marval_jax.main --mode=distill --config=configs/marval.py:tiny --workdir=/tmp/marval_tiny \
      --config.teacher_ckpt=/tmp/mar_tiny
  python -m marval_jax.main --mode=distill --config=configs/marval.py:fmnist --workdir=workdirs/fmnist_marval \
      --config.teacher_ckpt=workdirs/fmnist_teacher
  python -m marval_jax.main --mode=distill --config=configs/marval.py:huge --workdir=gs://BUCKET/marval_huge \
      --config.teacher_ckpt=gs://BUCKET/mar_huge --config.data.cache_dir=gs://BUCKET/imagenet_kl16_cache
  python -m marval_jax.main --mode=sample --config=configs/marval.py:fmnist --workdir=workdirs/fmnist_marval

Ablation sweep over one switch (every gsim.* / generator.* field is one; see docs/gsim.md), e.g. the distance:
  for d in pseudo_huber l2 squared_l2; do
    python -m marval_jax.main --mode=distill --config=configs/marval.py:fmnist \
        --workdir=workdirs/ablate_distance_$d --config.teacher_ckpt=workdirs/fmnist_teacher \
        --config.gsim.distance=$d
  done
Override any field with --config.a.b=value; unknown fields are an error (the config is locked).
"""
from __future__ import annotations

import ml_collections as mlc

from configs import common
from configs import mar
from marval_jax.losses.gsim import GSIMSettings
from marval_jax.models.generator import T_INIT  # the one default (models/generator.py); read as marval.T_INIT

VARIANTS = mar.VARIANTS


def gsim_config(**overrides) -> mlc.ConfigDict:
    """The GSIM objective's switches; defaults of docs/method.md section 2 (equations: docs/gsim.md). The values are
    `losses.gsim.GSIMSettings`' defaults (the one source of truth); the comments say what each switch means."""
    D = GSIMSettings()
    cfg = dict(
        # d(y): "pseudo_huber" sqrt(|y|^2+r^2)-r | "l2" |y| | "squared_l2" |y|^2
        distance=D.distance,
        # r of the pseudo-Huber distance
        huber_r=D.huber_r,
        # L = L1 + L2; False drops L2 = d(y) (SiD alpha = 1 form, biased gradient)
        use_l2_term=D.use_l2_term,
        # alpha in L = L1 + alpha L2 (1: the true gradient; SiD's alpha 1.2 is -0.4)
        l2_weight=D.l2_weight,
        # True: d'(y) in L1 under stop_gradient (the SIM paper's form, biased)
        stop_grad_dprime=D.stop_grad_dprime,
        # |y| per token ("token") or over each image's masked tokens ("image")
        norm_axes=D.norm_axes,
        # diffusion timesteps of L: the bounded range [t_min, t_max] of the 1000-step chain
        t_min=D.t_min,
        t_max=D.t_max,
        # law of t on [t_min, t_max]: "uniform" | "logit_normal" (sigmoid(mean + std n))
        t_sampling=D.t_sampling,
        # logit_normal: mean of the logit (> 0 favours the noisy end)
        t_logit_mean=D.t_logit_mean,
        # logit_normal: std of the logit
        t_logit_std=D.t_logit_std,
        # "none" | "sid" x0-unit residual / mean|x0-x0_teacher| | "kl" beta_t
        weighting=D.weighting,
        # teacher CFG scale w (MAR's convention; 1 = no guidance, no null-class pass)
        guidance_scale=D.guidance_scale,
        # "constant" w | "linear" 1 + (w-1) * visible / seq_len
        guidance_schedule=D.guidance_schedule,
        # True: fake score under the teacher's CFG (w), its null branch label-dropped
        guided_fake_score=D.guided_fake_score,
        # contexts: MAR's mask ratio, truncated normal (1, 0.25) on [min, 1]
        mask_ratio_min=D.mask_ratio_min,
        # contexts' masked count: "mar" (above) | "uniform" U(0,1] | "inference"
        context_mask_ratio=D.context_mask_ratio,
        # "inference": masked count at a uniform step of MAR's K-step cosine schedule
        context_num_iter=D.context_num_iter,
        # share of each batch whose context tokens are the generator's own AR samples
        on_policy_fraction=D.on_policy_fraction,
        # AR iterations of those on-policy rollouts
        on_policy_num_iter=D.on_policy_num_iter,
        # fake-score updates before each generator update
        fake_steps_per_generator_step=1,
    )
    cfg.update(overrides)
    return mlc.ConfigDict(cfg)


def role_config(lr: float = 1e-5, ema_decay: float = 0.0, **extra) -> mlc.ConfigDict:
    """One trained role's Adam settings (defaults: betas (0, 0.999), no weight decay, grad clip 1)."""
    return mlc.ConfigDict(dict(
        **extra,
        lr=lr,                  # constant after train.warmup_steps
        b1=0.0,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        grad_clip=1.0,          # global-norm clip of this role's gradient
        ema_decay=ema_decay,    # 0 = no EMA copy
    ))


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    variant = common.parse_arg(arg, VARIANTS, "tiny")
    teacher = mar.get_config(variant)
    cfg = mlc.ConfigDict()
    cfg.variant = variant
    cfg.model = mar.model_config(variant)   # same architecture as the teacher (all three roles)
    cfg.teacher_ckpt = ""   # the teacher's checkpoint directory (trained or converted); "" is an error at run time
    cfg.gsim = gsim_config(mask_ratio_min=teacher.diffusion.mask_ratio_min)
    cfg.generator = role_config(
        t_init=T_INIT,          # head timestep of the one-step generator (alpha_bar ~ 0.14)
        trainable="all",        # "all" | "head_only" (only diffloss_net/... gets gradient and updates)
        noise_scale=1.0,        # the one-step input x ~ N(0, noise_scale^2 I), head still called at t_init
        lr=1e-5, ema_decay=0.999)
    cfg.fake_score = role_config(
        init="teacher",         # "teacher" copy | "fresh_head" teacher transformer, newly initialised head
        lr=1e-5, ema_decay=0.0)
    cfg.data = mlc.ConfigDict(teacher.data.to_dict())
    cfg.tokenizer = mlc.ConfigDict(teacher.tokenizer.to_dict())
    cfg.mesh = common.mesh_config()
    if variant == "tiny":
        cfg.train = common.train_config(global_batch_size=16, num_steps=20, warmup_steps=0, log_every=5,
                                        ckpt_every=10, sample_every=10, sample_num_iter=4, grid_size=4)
    elif variant in ("fmnist", "fmnist_l"):
        # a 2.2M-parameter model tolerates a larger step than the ImageNet defaults (1e-5)
        cfg.generator.lr = cfg.fake_score.lr = 5e-5
        cfg.train = common.train_config(global_batch_size=256, num_steps=6000, warmup_steps=0, log_every=100,
                                        ckpt_every=1000, sample_every=2000, sample_num_iter=16)
        if variant == "fmnist_l":
            # The generator starts as the teacher's head at t_init, i.e. a blurred conditional mean; with decay
            # 0.999 a 1252-step run exported an EMA holding 0.999^1252 = 29% of that start (docs/results.md: the
            # collapsed, blurred student of 2026-11-29). 0.99 forgets it within a few hundred steps.
            cfg.generator.ema_decay = 0.99
    else:
        # 30 ImageNet epochs per scale (the reported budget); the batch size is not reported [I].
        steps_per_epoch = 1_281_167 // 512
        cfg.train = common.train_config(global_batch_size=512, num_steps=30 * steps_per_epoch, warmup_steps=0,
                                        log_every=100, ckpt_every=2000, sample_every=5000, sample_num_iter=64)
        cfg.model.remat = variant != "base"
    cfg.train.lr_schedule = "constant"
    # The optimizer fields of `train` follow the generator role's (one source of truth; override generator.*);
    # the fake score has its own section.
    for name in ("lr", "b1", "b2", "eps", "weight_decay", "grad_clip", "ema_decay"):
        cfg.train[name] = cfg.generator.get_ref(name)
    # sample.t_init / sample.noise_scale: -1 = the values the sampled checkpoint records (else generator.*); set,
    # they override the record (logged). sample.cfg: student CFG of the one-step sampler (1 = none, the default:
    # the teacher's guidance is distilled in; w != 1 guides the one head call, losses/gsim.onestep_predictor).
    cfg.sample = common.sample_config(sampler="onestep", cfg=1.0, t_init=-1, noise_scale=-1.0,
                                      num_iter=teacher.sample.num_iter,
                                      num_images=teacher.sample.num_images, batch_size=teacher.sample.batch_size,
                                      crop=teacher.sample.crop, fid_ref=teacher.sample.fid_ref,
                                      clip_denoised=teacher.sample.clip_denoised)
    cfg.lock()
    return cfg
