"""MARVAL-RL: reward backpropagation through the one-step generator's AR loop (docs/method.md section 4, docs/rl.md).

Starts from a distilled MARVAL generator (`student_ckpt`) and maximises a frozen differentiable reward of its
decoded samples, L = - rl.reward_scale * E[R(decode(G(z, c, K)))] + rl.reg_weight * Reg.

Variants:
  tiny    a few-second CPU smoke run: the tiny Fashion-MNIST model of configs/mar.py, K = 4, classifier reward
  fmnist  the Fashion-MNIST reproduction: classifier log-prob reward trained by marval_jax.tools.train_classifier
  fmnist_l  the same for the student of configs/marval.py:fmnist_l, EMA decay 0.95 (a 222-step run's 0.999 EMA
            exported 80% of the starting student, an 81-step run's 0.99 EMA 44%: docs/results.md)
  base / large / huge   MARVAL-B/L/H on ImageNet 256 (KL-16 latents), PickScore reward on class-name prompts.
                        Pod fit of the RL step (K = 64 AR iterations through the PickScore CLIP-H, rl.remat on), from
                        the TPU compiler (docs/scale.md; mesh fsdp 16, the rest data): base fits a v5e-256 slice at a
                        per-chip batch of 4 (global 1024) in 9.15 of 16 GiB per chip and v5p-128 at 4 in 8.46 of 95
                        GiB; huge fits v5e-256 at 4 in 11.26 of 16 GiB and v5p-128 at 4 in 9.77 of 95 GiB; large
                        is not compiled for a pod (the huge RL compile needs ~24 GB of host memory, docs/scale.md)

Run:
  python -m marval_jax.main --mode=rl --config=configs/marval_rl.py:tiny --workdir=/tmp/marval_rl_tiny
  python -m marval_jax.main --mode=rl --config=configs/marval_rl.py:fmnist --workdir=workdirs/fmnist_rl \
      --config.student_ckpt=workdirs/fmnist_marval
  python -m marval_jax.main --mode=rl --config=configs/marval_rl.py:huge --workdir=gs://BUCKET/marval_rl_huge \
      --config.student_ckpt=gs://BUCKET/marval_huge --config.rl.reward_config.checkpoint=gs://BUCKET/pickscore_jax
Override any field with --config.a.b=value; unknown fields are an error (the config is locked).

Compile time: the RL step holds one AR loop body per encoder-length bucket, each with the whole network and its
backward pass. MAR-B's compiles in 175 s by default (H200) and in 52 s with `--config.model.scan_blocks=True
--config.sample.num_buckets=2` (H100, 2026-12-08; +8% FLOPs from the padding, step time not yet measured):
docs/benchmarks.md, "Compile time on one H100 (2026-12-08)".
"""
from __future__ import annotations

import ml_collections as mlc

from configs import common, marval
from configs import mar

VARIANTS = ("tiny", "fmnist", "fmnist_l", "base", "large", "huge")

FMNIST_REWARD = "marval_jax/evaluation/weights/fashion_mnist_reward"
PROMPT_TEMPLATE = "a high-quality and harmonious picture of {class}"


def generator_config(lr: float, t_init: int = -1, trainable: str = "all") -> mlc.ConfigDict:
    """The one-step generator's role: parameterisation (t_init, noise_scale, trainable) and its Adam / EMA settings.
    t_init / noise_scale -1: the values student_ckpt records (checkpoints/params_io.recorded_generator), else
    configs/marval.py's defaults (T_INIT, 1); a value >= 0 overrides the record (a difference is logged)."""
    return mlc.ConfigDict(dict(
        t_init=t_init,          # head timestep of the one-step generator; -1: the student's (else marval.T_INIT)
        noise_scale=-1.0,       # one-step input x ~ N(0, s^2 I); -1: the student's (else 1); RL supports only 1
        trainable=trainable,    # "all" | "head_only" (only diffloss_net/... is trained)
        lr=lr,
        b1=0.0,
        b2=0.999,
        eps=1e-8,
        weight_decay=0.0,
        grad_clip=1.0,
        ema_decay=0.999,
    ))


def rl_config(variant: str) -> mlc.ConfigDict:
    small = variant in ("tiny", "fmnist", "fmnist_l")
    return mlc.ConfigDict(dict(
        num_iter=4 if variant == "tiny" else 64,  # K AR iterations of the sampled trajectory
        backprop_steps=-1,          # -1: gradient through all K iterations; k: only the last k carry gradient
        remat=True,                 # jax.checkpoint per AR iteration (keep only the carried tokens)
        reward="classifier_logprob" if small else "pickscore",   # classifier_logprob|clip_score|pickscore|image_reward
        # the reward's own config (make_reward(reward, reward_config)); checkpoint = its weights directory
        reward_config=dict(checkpoint=FMNIST_REWARD if small else "", dtype="float32"),
        reward_scale=1.0,
        prompt_template=PROMPT_TEMPLATE,   # text rewards: one prompt per class name
        class_names_file="",        # text rewards: one class name per line (ImageNet names ship in no package here)
        # --mode evaluate: each sample scored against its class prompt ("" and reward != "image_reward": no column)
        image_reward_checkpoint="",  # converted ImageReward dir (convert_image_reward): the image_reward column
        regularizer="none",         # "none" | "gsim" | "l2" (tokens of the frozen reference, same noise/orders)
        reg_weight=0.0,
        # regularizer="gsim": GSIM's generator loss on real-data contexts (docs/gsim.md), frozen teacher / fake
        # score (teacher_ckpt, fake_ckpt); fake_steps_per_generator_step is unused (the fake score is not trained)
        gsim=marval.gsim_config(mask_ratio_min=mar.get_config(variant).diffusion.mask_ratio_min).to_dict(),
    ))


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    variant = common.parse_arg(arg, VARIANTS, "tiny")
    cfg = mlc.ConfigDict()
    cfg.variant = variant
    cfg.model = mar.model_config(variant)
    cfg.student_ckpt = ""   # the distilled MARVAL generator's checkpoint directory (required for a real run)
    cfg.ref_ckpt = ""       # frozen reference generator for rl.regularizer = "l2" ("" = student_ckpt)
    cfg.teacher_ckpt = ""   # rl.regularizer = "gsim": the MAR teacher's checkpoint directory (required then)
    cfg.fake_ckpt = ""      # rl.regularizer = "gsim": frozen fake score's checkpoint ("" = the teacher)
    cfg.rl = rl_config(variant)
    cfg.generator = generator_config(lr=1e-5 if variant in ("tiny", "fmnist", "fmnist_l") else 1e-6)
    cfg.mesh = common.mesh_config()
    if variant == "tiny":
        cfg.train = common.train_config(global_batch_size=8, num_steps=10, warmup_steps=0, log_every=5,
                                        ckpt_every=10, sample_every=10, sample_num_iter=4, grid_size=4)
        cfg.data = common.data_config(name="fashion_mnist", split="train[:512]", read_threads=1, prefetch=8)
        cfg.tokenizer = common.tokenizer_config("pixel_patch", patch_size=4, channels=1)
    elif variant in ("fmnist", "fmnist_l"):
        cfg.train = common.train_config(global_batch_size=64, num_steps=600, warmup_steps=0, log_every=25,
                                        ckpt_every=100, sample_every=200, sample_num_iter=64)
        cfg.data = common.data_config(name="fashion_mnist")
        cfg.tokenizer = common.tokenizer_config("pixel_patch", patch_size=4, channels=1)
        # stop at the reward plateau (train/plateau.py): the classifier reward saturates near log p = 0, and the
        # steps after that trade diversity for it. Patience: the common default of 4 windows. A window's mean
        # reward (25 steps x 64 samples, std ~0.4) has a standard error of ~0.01, twice min_delta, so 2 windows
        # without a new best happen by chance on a slowly rising reward: with 2, the l2-regularised run of
        # 2026-12-07 evening stopped at step 100 (windows -0.157, -0.106, -0.121, -0.113; docs/reproduction.md)
        cfg.train.update(stop_on_plateau="reward_mean", plateau_mode="max", plateau_min_delta=0.005)
        if variant == "fmnist_l":
            # the exported EMA must be the trained weights: the 81-step run of 2026-12-07 (time budget) exported
            # 0.99^81 = 44% of its student under decay 0.99; 0.95 keeps 0.95^81 = 1.6% (0.6% at 100 steps)
            cfg.generator.ema_decay = 0.95
    else:
        cfg.train = common.train_config(global_batch_size=64, num_steps=2000, warmup_steps=0, log_every=20,
                                        ckpt_every=200, sample_every=500, sample_num_iter=64)
        cfg.data = common.data_config(name="latent_cache", image_size=256, patch_size=1)
        cfg.tokenizer = common.tokenizer_config("vae", patch_size=1, channels=3)
        cfg.model.remat = variant != "base"   # per transformer block, on top of rl.remat per AR iteration
    # `data` is read only with rl.regularizer = "gsim" (its contexts); the RL labels are drawn uniformly per step.
    # The optimizer fields of `train` follow the generator role's (one source of truth; override generator.*).
    for name in ("lr", "b1", "b2", "eps", "weight_decay", "grad_clip", "ema_decay"):
        cfg.train[name] = cfg.generator.get_ref(name)
    cfg.train.lr_schedule = "constant"
    cfg.sample = common.sample_config(sampler="onestep", num_iter=cfg.rl.num_iter, cfg=1.0, t_init=-1, noise_scale=-1.0,
                                      num_images=16 if variant == "tiny" else 64,
                                      batch_size=16 if variant == "tiny" else 64,
                                      crop=28 if variant.startswith("fmnist") else 0,
                                      fid_ref="raw:fashion_mnist/test" if variant.startswith("fmnist") else "")
    cfg.lock()
    return cfg
