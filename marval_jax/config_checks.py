"""Validate a run's whole config before anything is compiled or read: `validate(mode, config, workdir)`.

`marval_jax.main.run` calls it first, for every mode, so a bad number or a missing file fails in a second with one
`UserError` naming the field, the bad value and what is allowed -- instead of a ZeroDivisionError after the first
compile, an IndivisibleError from JAX, or a missing reference file after hours of sampling.

What is checked (only fields the code reads, per mode):

* train / distill / rl: `train.*` step counts and intervals (`num_steps`, `log_every`, `ckpt_every`,
  `global_batch_size`, `keep_checkpoints` >= 1; `warmup_steps`, `sample_every` >= 0; `grid_size`,
  `sample_num_iter` >= 1 when grids are written); `mesh.shape` / `mesh.axis_types`; `train.global_batch_size`
  divisible by the process count and by the devices of the mesh's batch axes (`mesh.logical_axis_rules` "batch",
  data x fsdp by default, -1 = the rest of the devices).
* train / distill (they read images): `data.name`, the numeric `data.*` fields; the in-memory path
  (fashion_mnist / mnist with `data.in_memory=True`) reads `data.raw_dir` only, so a `data.data_dir` (the tfds
  records) is refused there, naming `data.raw_dir`; its `data.split` must be "train" / "train[a:b]" and its raw
  files must exist; `data.cache_dir` for latent caches; `tokenizer.vae_ckpt` for VAE tokens.
* checkpoints: `init_from` (train), `teacher_ckpt` (distill), `student_ckpt` / `ref_ckpt` (rl) exist
  (`etils.epath`, so gs:// paths are checked too) as a params directory (model.json) or a run workdir
  (checkpoints/<step>); an empty `teacher_ckpt` / `student_ckpt` is refused unless the workdir already has a
  checkpoint to resume from (then they are not read). `rl.class_names_file` exists when set.
* sample / evaluate: `sample.*` numbers and choices, and the checkpoint to sample (`init_from` or the workdir).
  Sampling runs on one device (the sampler is not sharded), so `sample.batch_size` has no divisibility rule.
* evaluate, before any image is sampled: `sample.fid_ref` (a statistics .npz holding `mu` and `sigma`, or
  "raw:NAME/SPLIT" whose raw files exist), the FID Inception weights (`sample.inception`, default
  ~/.cache/marval_jax/fid_inception.npz) and `sample.classifier` when set. `check_evaluation_files` is also called
  by `marval_jax.programs.evaluate.evaluate` for library callers.
* demo: `per_class`, `num_iter` >= 1, `assets` exists when set.

Device-dependent checks (mesh, batch split) come last and ask JAX for the device and process counts, which starts
JAX's backend: `jax.distributed.initialize` (mesh.distributed_init, or mesh.coordinator_address / num_processes /
process_id) must come first, so `marval_jax.main.run` runs it before calling `validate` (and `validate` calls it
too, a no-op once done, for library callers); they compile nothing. `num_devices` / `process_count`
may be passed to check a layout other than this machine's.
"""
from __future__ import annotations

import os
import zipfile
from typing import Any

from marval_jax.user_errors import UserError

TRAIN_MODES = ("train", "distill", "rl")
DATA_MODES = ("train", "distill")       # the RL task reads no images
SAMPLERS = ("teacher", "onestep")
LABELS = ("cycle", "uncond", "random")
SMALL_DATASETS = ("fashion_mnist", "mnist")


def _field(config, dotted: str, default: Any = None) -> Any:
    node = config
    for part in dotted.split("."):
        if node is None or not hasattr(node, "get"):
            return default
        node = node.get(part, None)
    return default if node is None else node


def _int(config, dotted: str, minimum: int, what: str, required: bool = True) -> int | None:
    value = _field(config, dotted)
    if value is None and not required:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise UserError(f"{dotted}={value!r} is not allowed: {what} must be an integer >= {minimum}")
    return value


def _choice(config, dotted: str, allowed: tuple[str, ...]) -> None:
    value = _field(config, dotted)
    if value not in allowed:
        raise UserError(f"{dotted}={value!r} is not allowed: choose one of {', '.join(allowed)}")


def _path(path: str):
    """`path` (local, `~` expanded, or gs://...) as an etils.epath.Path."""
    from etils import epath  # pylint: disable=import-outside-toplevel
    path = os.fspath(path)
    return epath.Path(path if "://" in path else os.path.expanduser(path))


def _exists(path: str) -> bool:
    return _path(path).exists()


def _resumable(workdir: str) -> bool:
    """The workdir already has a checkpoint step (the run resumes; weights named in the config are not read)."""
    if not workdir:
        return False
    from etils import epath  # pylint: disable=import-outside-toplevel
    ckpts = epath.Path(os.path.expanduser(workdir)) / "checkpoints"
    try:
        return ckpts.exists() and any(p.name.isdigit() for p in ckpts.iterdir())
    except OSError:
        return False


def check_checkpoint(field: str, path: str, required: bool, workdir: str = "", what: str = "checkpoint") -> None:
    """`path` (the value of `field`) is a params directory (model.json) or a run workdir (checkpoints/)."""
    if not path:
        if required and not _resumable(workdir):
            raise UserError(f"{field} is empty: set --config.{field}=<{what} directory (params with model.json, "
                            f"or a run workdir)>")
        return
    if not _exists(path):
        raise UserError(f"{field}={path!r} does not exist: give the {what} directory (params with model.json, or a "
                        f"run workdir with checkpoints/)")
    from etils import epath  # pylint: disable=import-outside-toplevel
    if not ((epath.Path(os.path.expanduser(path)) / "model.json").exists() or _resumable(path)):
        raise UserError(f"{field}={path!r} is neither a params checkpoint (no model.json) nor a run workdir with a "
                        f"checkpoint (no checkpoints/<step>)")


# ---------------------------------------------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------------------------------------------
def check_train(config) -> None:
    _int(config, "train.num_steps", 1, "the number of training steps")
    _int(config, "train.global_batch_size", 1, "the global batch size")
    _int(config, "train.log_every", 1, "the logging interval in steps")
    _int(config, "train.ckpt_every", 1, "the checkpoint interval in steps")
    _int(config, "train.keep_checkpoints", 1, "the number of checkpoints kept")
    _int(config, "train.warmup_steps", 0, "the number of warmup steps", required=False)
    sample_every = _int(config, "train.sample_every", 0, "the grid interval in steps (0 = no grids)", required=False)
    if sample_every:
        _int(config, "train.grid_size", 1, "the grid side (grid_size**2 images)")
        _int(config, "train.sample_num_iter", 1, "the grid sampler's AR iterations")
    if _field(config, "train.stop_on_plateau", ""):
        from marval_jax.train.plateau import MODES  # pylint: disable=import-outside-toplevel
        _choice(config, "train.plateau_mode", MODES)
        _int(config, "train.plateau_patience", 1, "the log windows without improvement before stopping")
        delta = _field(config, "train.plateau_min_delta")
        if isinstance(delta, bool) or not isinstance(delta, (int, float)) or not delta >= 0:
            raise UserError(f"train.plateau_min_delta={delta!r} is not allowed: the smallest improvement that "
                            "counts must be a number >= 0")


def check_mesh_fields(config) -> None:
    shape = _field(config, "mesh.shape")
    if shape is None:
        return
    from marval_jax.parallel.mesh import AXES  # pylint: disable=import-outside-toplevel
    for axis in AXES:
        value = _field(config, f"mesh.shape.{axis}")
        if isinstance(value, bool) or not isinstance(value, int) or (value < 1 and value != -1):
            raise UserError(f"mesh.shape.{axis}={value!r} is not allowed: a mesh axis is an integer >= 1, or -1 for "
                            f"the rest of the devices")
    _choice(config, "mesh.axis_types", ("auto", "explicit"))
    from marval_jax.parallel.mesh import distributed_args  # pylint: disable=import-outside-toplevel
    distributed_args(config.mesh)  # coordinator_address / num_processes / process_id: all three or none


def check_batch_split(config, field: str, num_devices: int, process_count: int) -> None:
    """`field` (a global batch) splits evenly over the processes and over the devices of the mesh's batch axes."""
    from marval_jax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
    batch = int(_field(config, field))
    ways = mesh_lib.batch_devices(config.mesh, num_devices)   # mesh.shape errors name mesh.shape
    axes = " x ".join(mesh_lib.batch_axes(config.mesh)) or "none"
    if batch % ways:
        raise UserError(f"{field}={batch} does not split over the mesh's batch axes ({axes}: {ways} devices of "
                        f"{num_devices}, mesh.shape={dict(config.mesh.shape)}): use a multiple of {ways}")
    if batch % process_count:
        raise UserError(f"{field}={batch} does not split over the {process_count} processes: use a multiple of "
                        f"{process_count}")


def check_data(config) -> None:
    from marval_jax.data import raw_datasets  # pylint: disable=import-outside-toplevel
    from marval_jax.data.pipeline import KNOWN_NAMES  # pylint: disable=import-outside-toplevel
    _choice(config, "data.name", KNOWN_NAMES)
    for name in ("pad_to", "patch_size", "num_workers", "read_threads", "prefetch"):
        _int(config, f"data.{name}", 0, f"data.{name}", required=False)
    _int(config, "data.image_size", 1, "the image size", required=False)
    name = _field(config, "data.name")
    if name in SMALL_DATASETS and _field(config, "data.in_memory", False):
        data_dir, raw_dir = _field(config, "data.data_dir", ""), _field(config, "data.raw_dir", "") or None
        if data_dir:
            raise UserError(f"data.data_dir={data_dir!r} is not read by the in-memory path (data.in_memory=True "
                            f"reads the raw files in data.raw_dir): set data.raw_dir to the folder of the raw "
                            f"{name} files, or data.in_memory=False to read tfds records from data.data_dir")
        from marval_jax.data.pipeline import parse_in_memory_split  # pylint: disable=import-outside-toplevel
        base, _, _ = parse_in_memory_split(str(_field(config, "data.split", "train")))
        if base not in raw_datasets.SPLITS[name]:
            raise UserError(f"data.split={_field(config, 'data.split')!r}: {name} has splits "
                            f"{', '.join(raw_datasets.SPLITS[name])}")
        for path in raw_datasets.raw_files(name, base, raw_dir):
            if not os.path.isfile(path):
                where = f"data.raw_dir={raw_dir!r}" if raw_dir else "data.raw_dir is empty: the installed copy"
                raise UserError(f"raw {name} file {path} not found ({where}); set data.raw_dir to the folder that "
                                f"holds it")
    if name == "folder":
        folder = _field(config, "data.folder_dir", "")
        if not folder:
            raise UserError("data.name='folder' needs data.folder_dir: a folder of <class>/ sub-folders of images "
                            "(or one flat folder = one class); see docs/data.md")
        if not _exists(folder):
            raise UserError(f"data.folder_dir={folder!r} does not exist; set it to your image folder")
    if name == "latent_cache":
        cache_dir = _field(config, "data.cache_dir", "")
        if not cache_dir:
            raise UserError("data.name='latent_cache' needs data.cache_dir (written by "
                            "python -m marval_jax.tools.cache_latents)")
        if not _exists(cache_dir):
            raise UserError(f"data.cache_dir={cache_dir!r} does not exist")
    if _field(config, "tokenizer.kind") == "vae":
        vae = _field(config, "tokenizer.vae_ckpt", "")
        if not vae:
            raise UserError("tokenizer.kind='vae' needs tokenizer.vae_ckpt (MAR's kl16.ckpt or a converted .npz)")
        if not _exists(vae):
            raise UserError(f"tokenizer.vae_ckpt={vae!r} does not exist")


def check_sample(config) -> None:
    _choice(config, "sample.sampler", SAMPLERS)
    _choice(config, "sample.labels", LABELS)
    _int(config, "sample.num_images", 1, "the number of images")
    _int(config, "sample.batch_size", 1, "the sampling batch")
    _int(config, "sample.num_iter", 1, "the AR iterations K")
    _int(config, "sample.num_buckets", 1, "the encoder-length buckets")
    _int(config, "sample.crop", 0, "the center crop (0 = none)", required=False)
    _int(config, "sample.pr_num_real", 0, "the real images of precision/recall (0 = none)", required=False)


def _zip_names(field: str, path: str) -> list[str]:
    """Array names of an .npz (a zip of NAME.npy) without loading any array (local or gs://: zipfile reads only the
    archive's directory at its end, through epath's seekable file)."""
    try:
        with _path(path).open("rb") as f, zipfile.ZipFile(f) as z:
            return [n[:-4] if n.endswith(".npy") else n for n in z.namelist()]
    except (zipfile.BadZipFile, OSError) as e:
        raise UserError(f"{field}={path!r} is not a readable .npz ({e})") from None


def check_fid_ref(config, raw_dir: str | None = None) -> None:
    from marval_jax.data import raw_datasets  # pylint: disable=import-outside-toplevel
    spec = _field(config, "sample.fid_ref", "")
    if not spec:
        raise UserError("sample.fid_ref is empty: --mode evaluate needs a statistics .npz (mu, sigma) or "
                        "raw:NAME/SPLIT (e.g. raw:fashion_mnist/test)")
    if spec.endswith(".npz"):
        if not _path(spec).is_file():
            raise UserError(f"sample.fid_ref={spec!r} not found; make one with `python -m marval_jax.tools.fid stats "
                            f"--images X --out {spec}` or use raw:NAME/SPLIT")
        names = _zip_names("sample.fid_ref", spec)
        if "mu" not in names or "sigma" not in names:
            raise UserError(f"sample.fid_ref={spec!r} holds {sorted(names)[:6]}, not the statistics 'mu' and "
                            f"'sigma'; compute them with `python -m marval_jax.tools.fid stats --images X --out Y`")
        return
    if not spec.startswith("raw:") or "/" not in spec:
        raise UserError(f"sample.fid_ref={spec!r} is neither a statistics .npz nor raw:NAME/SPLIT "
                        f"(e.g. raw:fashion_mnist/test)")
    name, split = spec[4:].split("/", 1)
    if name not in raw_datasets.SPLITS:
        raise UserError(f"sample.fid_ref={spec!r}: unknown raw data set {name!r}; known: "
                        f"{', '.join(raw_datasets.SPLITS)}")
    if split not in raw_datasets.SPLITS[name]:
        raise UserError(f"sample.fid_ref={spec!r}: {name} has splits {', '.join(raw_datasets.SPLITS[name])}")
    for path in raw_datasets.raw_files(name, split, raw_dir):
        if not _path(path).is_file():
            raise UserError(f"sample.fid_ref={spec!r} needs the raw file {path}, not found (data.raw_dir="
                            f"{raw_dir or ''!r})")


def check_inception(config) -> None:
    from marval_jax.evaluation.inception import CONVERT_COMMAND, DEFAULT_NPZ  # pylint: disable=import-outside-toplevel
    given = _field(config, "sample.inception", "")
    path = os.fspath(_path(given or DEFAULT_NPZ))
    where = f"sample.inception={given!r}" if given else f"sample.inception is empty, default {path}"
    if not _path(path).is_file():
        raise UserError(f"FID Inception weights not found ({where}): convert them once with "
                        f"`{CONVERT_COMMAND} --out {path}` or set sample.inception")
    names = _zip_names("sample.inception", path)
    if not any(n.endswith(".weight") for n in names):
        raise UserError(f"{where}: {path} holds no Inception weights ({sorted(names)[:4]}); re-run "
                        f"`{CONVERT_COMMAND} --out {path}`")


def check_classifier(config) -> None:
    path = _field(config, "sample.classifier", "")
    if not path:
        return
    from marval_jax.evaluation.classifier_train import META_FILE, PARAMS_FILE  # pylint: disable=import-outside-toplevel
    if not _path(path).is_dir():
        raise UserError(f"sample.classifier={path!r} is not a directory (train one with "
                        f"python -m marval_jax.tools.train_classifier, or leave it empty for the default)")
    for f in (META_FILE, PARAMS_FILE):
        if not (_path(path) / f).is_file():
            raise UserError(f"sample.classifier={path!r} lacks {f} (expected {META_FILE} and {PARAMS_FILE})")


def check_evaluation_files(config) -> None:
    """The files --mode evaluate reads after sampling, checked before it samples."""
    check_fid_ref(config, _field(config, "data.raw_dir", "") or None)
    check_inception(config)
    check_classifier(config)


def check_demo(config) -> None:
    if _field(config, "mesh") is not None:
        check_mesh_fields(config)
    _int(config, "per_class", 1, "the images per class")
    _int(config, "num_iter", 1, "the AR iterations K")
    assets = _field(config, "assets", "")
    if assets and not _exists(assets):
        raise UserError(f"assets={assets!r} does not exist (the folder of fmnist_teacher / fmnist_student / "
                        f"fmnist_rl params)")


# ---------------------------------------------------------------------------------------------------------------
# Entry point
# ---------------------------------------------------------------------------------------------------------------
def validate(mode: str, config, workdir: str, out: str = "", *, num_devices: int | None = None,
             process_count: int | None = None) -> None:
    """Raise a UserError for the first bad field of `config` for `mode`; compiles nothing, reads no data."""
    if mode == "demo":
        check_demo(config)
        return
    if mode in TRAIN_MODES:
        check_train(config)
        check_mesh_fields(config)
        if mode in DATA_MODES:
            check_data(config)
        if mode == "train":
            check_checkpoint("init_from", _field(config, "init_from", ""), required=False)
        elif mode == "distill":
            check_checkpoint("teacher_ckpt", _field(config, "teacher_ckpt", ""), True, workdir, "teacher")
        else:
            check_checkpoint("student_ckpt", _field(config, "student_ckpt", ""), True, workdir, "student")
            check_checkpoint("ref_ckpt", _field(config, "ref_ckpt", ""), required=False, what="reference")
            names = _field(config, "rl.class_names_file", "")
            if names and not _exists(names):
                raise UserError(f"rl.class_names_file={names!r} does not exist")
    elif mode in ("sample", "evaluate"):
        check_sample(config)
        source = _field(config, "init_from", "") or workdir
        check_checkpoint("init_from" if _field(config, "init_from", "") else "--workdir", source, True,
                         what="checkpoint")
        if mode == "evaluate":
            check_evaluation_files(config)
        return
    else:
        raise UserError(f"--mode={mode!r} is not a mode; choose one of train, distill, rl, sample, evaluate, demo")
    # device-dependent checks last: they start JAX's backend (no compilation)
    import jax  # pylint: disable=import-outside-toplevel
    from marval_jax.parallel import mesh as mesh_lib  # pylint: disable=import-outside-toplevel
    if num_devices is None or process_count is None:
        mesh_lib.maybe_initialize_distributed(config.mesh)
    num_devices = jax.device_count() if num_devices is None else num_devices
    process_count = jax.process_count() if process_count is None else process_count
    check_batch_split(config, "train.global_batch_size", num_devices, process_count)
