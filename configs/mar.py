"""MAR pretraining (the teacher).

Variants:
  tiny    a few-second CPU model on Fashion-MNIST pixel patches (tests, smoke runs)
  fmnist  the Fashion-MNIST teacher of the end-to-end reproduction (32x32 padded, 4x4 pixel patches -> 64 tokens;
          encoder/decoder 3+3 blocks of width 128, head d6 w160 as MAR's deep head: 2.16M parameters, 4.3 MB in
          float16; the embedded default until 2026-12-06)
  fmnist_l  the larger teacher of docs/reproduction.md (same 64 tokens; encoder/decoder 4+4 blocks of width 256,
            head d6 w384: 11.55M parameters, 23 MB in float16), trained across device calls (kept checkpoints give
            the FID-vs-steps curve); with its student and RL student the embedded default (docs/results.md)
  folder  your own images (data.name=folder, data.folder_dir=...): 64x64 RGB, 4x4 pixel patches -> 256 tokens, the
          fmnist model's widths; set model.class_num to the class count the data set build prints
  folder_tiny  the same data path at test size (64x64 RGB, 8x8 patches -> 64 tokens, the tiny model; CPU seconds)
  base / large / huge   the released MAR-B/L/H on ImageNet 256 with cached KL-16 latents (head d6w1024 /
                        d8w1280 / d12w1536, 207.9M / 478.3M / 942.4M parameters). Pod fit, from the TPU compiler
                        (docs/scale.md, tools/scale_check --target=tpu; mesh fsdp 16, the rest data): base fits
                        a v5e-256 slice at a per-chip batch of 32 (global 8192) in 14.00 of 16 GiB per chip and a
                        v5p-128 slice at 32 in 15.26 of 95 GiB; huge fits v5e-256 at a per-chip batch of 8 (global
                        2048) in 4.88 of 16 GiB and v5p-128 at 8 (global 512) in 8.98 of 95 GiB; large fits
                        v5e-256 at 8 (global 2048) in 3.35 of 16 GiB (v5p-128 not compiled; the rows above put a
                        v5p chip within ~2x of a v5e chip at the same fsdp 16 and per-chip batch, with 6x the HBM)
                        On one H100 80GB at a per-GPU batch of 128, base trains fastest within 45 GiB with
                        `--config.model.remat_policy=dots_saveable --config.model.remat_blocks=3`: 629 img/s at a
                        42.2 GiB allocator peak (no remat: 662 img/s, 48.3 GiB; the policy on every block: 590
                        img/s, 27.7 GiB; docs/benchmarks.md "Round two's open rows on a fourth H100")

Run:
  python -m marval_jax.main --mode=train --config=configs/mar.py:tiny --workdir=/tmp/mar_tiny
  python -m marval_jax.main --mode=train --config=configs/mar.py:fmnist --workdir=workdirs/fmnist_teacher
  python -m marval_jax.main --mode=train --config=configs/mar.py:large --workdir=gs://BUCKET/mar_large \
      --config.data.cache_dir=gs://BUCKET/imagenet_kl16_cache
  python -m marval_jax.main --mode=sample --config=configs/mar.py:fmnist --workdir=workdirs/fmnist_teacher
  python -m marval_jax.data.folder_dataset --folder_dir ~/my_images --image_size 64   # prints the class count N
  python -m marval_jax.main --mode=train --config=configs/mar.py:folder --workdir=workdirs/mine \
      --config.data.folder_dir=~/my_images --config.model.class_num=N
Override any field with --config.a.b=value; unknown fields are an error (the config is locked).
model.attention_impl: "auto" (default) runs cuDNN's fused attention where it can (GPU, bf16, no attention dropout:
sampling, GSIM's teacher passes), the Pallas flash attention of marval_jax/kernels/flash_attention.py for bf16
training with attention dropout on a GPU (dropout inside the kernel, no stored logits; docs/kernels.md), and the
reference's XLA attention elsewhere (CPU, float32); "xla" keeps the reference's numerics everywhere;
"flash" / "cudnn" force one kernel and refuse where it cannot run (docs/benchmarks.md: "Round two on one H100").
model.kernels: "xla" (default: on one H100 XLA's LayerNorm fusion + cuBLAS beat every tiling tried) or "pallas"
(each block's LayerNorm -> Linear pairs as one fused Pallas kernel, GPU only; docs/kernels.md).
"""
from __future__ import annotations

import ml_collections as mlc

from configs import common
from marval_jax.models import mar as mar_lib

VARIANTS = ("tiny", "fmnist", "fmnist_l", "folder", "folder_tiny", "base", "large", "huge")
FOLDER_PATCH = {"folder": 4, "folder_tiny": 8}  # pixel patch of the folder variants (64 px RGB)

_IMAGENET = mar_lib.IMAGENET_256
_SIZES = mar_lib.RELEASED_SIZES


def model_config(variant: str) -> mlc.ConfigDict:
    """Fields of marval_jax.models.mar.MARConfig."""
    base = dict(mlp_ratio=4.0, attn_dropout=0.1, proj_dropout=0.1, label_drop_prob=0.1, dtype="bfloat16",
                remat=False, remat_policy="", remat_blocks=-1, scan_blocks=False, attention="bidirectional", attention_impl="auto",
                kernels="xla")
    if variant == "tiny":
        base.update(img_size=32, vae_stride=4, patch_size=1, vae_embed_dim=16, buffer_size=4, class_num=10,
                    encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2, decoder_embed_dim=32,
                    decoder_depth=1, decoder_num_heads=2, diffloss_d=1, diffloss_w=32, dtype="float32")
    elif variant == "fmnist":
        base.update(img_size=32, vae_stride=4, patch_size=1, vae_embed_dim=16, buffer_size=16, class_num=10,
                    encoder_embed_dim=128, encoder_depth=3, encoder_num_heads=4, decoder_embed_dim=128,
                    decoder_depth=3, decoder_num_heads=4, diffloss_d=6, diffloss_w=160)
    elif variant == "folder":
        base.update(img_size=64, vae_stride=4, patch_size=1, vae_embed_dim=48, buffer_size=16, class_num=10,
                    encoder_embed_dim=128, encoder_depth=3, encoder_num_heads=4, decoder_embed_dim=128,
                    decoder_depth=3, decoder_num_heads=4, diffloss_d=6, diffloss_w=160)
    elif variant == "folder_tiny":
        base.update(img_size=64, vae_stride=8, patch_size=1, vae_embed_dim=192, buffer_size=4, class_num=10,
                    encoder_embed_dim=32, encoder_depth=1, encoder_num_heads=2, decoder_embed_dim=32,
                    decoder_depth=1, decoder_num_heads=2, diffloss_d=1, diffloss_w=32, dtype="float32")
    elif variant == "fmnist_l":
        base.update(mar_lib.FMNIST_L)
    else:
        base.update(_IMAGENET, **_SIZES[variant])
    return mlc.ConfigDict(base)


def get_config(arg: str | None = None) -> mlc.ConfigDict:
    variant = common.parse_arg(arg, VARIANTS, "tiny")
    cfg = mlc.ConfigDict()
    cfg.variant = variant
    cfg.model = model_config(variant)
    cfg.diffusion = mlc.ConfigDict(dict(diffusion_batch_mul=4, mask_ratio_min=0.7))
    cfg.mesh = common.mesh_config()
    cfg.sample = common.sample_config()
    if variant == "tiny":
        cfg.train = common.train_config(global_batch_size=16, num_steps=20, warmup_steps=5, lr=1e-3, log_every=5,
                                        ckpt_every=10, sample_every=10, sample_num_iter=4, grid_size=4,
                                        ema_decay=0.99)
        cfg.data = common.data_config(name="fashion_mnist", split="train[:512]", read_threads=1, prefetch=8)
        cfg.tokenizer = common.tokenizer_config("pixel_patch", patch_size=4, channels=1)
        cfg.sample.update(num_iter=4, num_sampling_steps="10", num_images=16, batch_size=16)
    elif variant in ("fmnist", "fmnist_l"):
        # constant lr after warmup (MAR's schedule), so a run stopped by a time budget is a finished run + EMA
        cfg.train = common.train_config(global_batch_size=256, num_steps=20000, warmup_steps=500, blr=5e-4,
                                        ema_decay=0.999, ckpt_every=2000, sample_every=5000, log_every=200,
                                        sample_num_iter=16)
        if variant == "fmnist_l":  # a checkpoint every 1000 steps, all kept: the FID-vs-steps curve reads them
            cfg.train.update(ckpt_every=1000, keep_checkpoints=60, sample_every=0)
        cfg.data = common.data_config(name="fashion_mnist")
        cfg.tokenizer = common.tokenizer_config("pixel_patch", patch_size=4, channels=1)
        cfg.sample.update(num_iter=64, cfg=1.0, num_images=100, batch_size=100, crop=28, clip_denoised=True,
                          fid_ref="raw:fashion_mnist/test")
    elif variant in FOLDER_PATCH:
        tiny = variant == "folder_tiny"
        cfg.train = (common.train_config(global_batch_size=16, num_steps=20, warmup_steps=5, lr=1e-3, log_every=5,
                                         ckpt_every=10, sample_every=10, sample_num_iter=4, grid_size=4,
                                         ema_decay=0.99) if tiny else
                     common.train_config(global_batch_size=256, num_steps=20000, warmup_steps=500, blr=5e-4,
                                         ema_decay=0.999, ckpt_every=2000, sample_every=2000, log_every=200,
                                         sample_num_iter=16))
        cfg.data = common.data_config(name="folder", image_size=64, flip=True, in_memory=False,
                                      patch_size=FOLDER_PATCH[variant],
                                      **(dict(read_threads=1, prefetch=8) if tiny else {}))
        cfg.tokenizer = common.tokenizer_config("pixel_patch", patch_size=FOLDER_PATCH[variant], channels=3)
        if tiny:
            cfg.sample.update(num_iter=4, num_sampling_steps="10", num_images=16, batch_size=16)
        else:
            cfg.sample.update(num_iter=64, num_images=100, batch_size=100, clip_denoised=True)
    else:
        # README recipe: batch 2048, lr 8e-4 (blr 1e-4), 100 warmup epochs then constant, 400-800 epochs.
        steps_per_epoch = 1_281_167 // 2048
        cfg.train = common.train_config(global_batch_size=2048, num_steps=400 * steps_per_epoch,
                                        warmup_steps=100 * steps_per_epoch, ckpt_every=5 * steps_per_epoch,
                                        log_every=100)
        cfg.data = common.data_config(name="latent_cache", image_size=256, flip=True, patch_size=1)
        cfg.tokenizer = common.tokenizer_config("vae", patch_size=1, channels=3)
        cfg.sample.update(num_iter=64, cfg={"base": 2.9, "large": 3.0, "huge": 3.2}[variant])
        cfg.model.remat = variant != "base"
    cfg.init_from = ""  # a converted or trained checkpoint directory to start from (params only)
    cfg.lock()
    return cfg
