"""The training loop every mode shares (MAR pretraining, GSIM distillation, RL).

A task supplies pure functions over explicit pytrees: `init_state(rng)`, `train_step(state, batch)` and
`sample_images(state, rng)`, plus `param_paths` for sharding. The loop builds the mesh, creates the state already
sharded (`jax.jit(init, out_shardings=...)`), resumes from the newest intact checkpoint in the workdir (state +
data iterator + config and batch check; `train.restore_step` picks one), runs the jitted step with donated state,
logs, writes grids, and saves on interval, preemption (SIGTERM) and at the end. The run holds
`<workdir>/workdir.lock` throughout (checkpoints/workdir_lock.py: one writer per workdir).

Several processes (a pod's hosts, or launch/run_local.sh --processes=N): every process runs every jitted call,
grid sampling included (the state is sharded across them; the images are gathered and process 0 writes the PNG);
only process 0 writes metrics, grids and the lock; all take part in checkpoint saves. A preemption is decided
together (checkpoints/manager.py `preempted`): all processes stop after the same step, save it and exit 0.
So does a metric plateau (`train.stop_on_plateau`, train/plateau.py), decided from the logged values every process
reads alike. docs/multihost.md has the whole picture.

Non-finite guard: the jitted step also updates a small on-device record, `guard` (the step count and the first step
whose loss, gradient norm or updated state had a NaN/inf), from cheap reductions over the metrics and the new
state. It comes to the host only where the loop already syncs (log steps, and before every save), so a non-finite
state is never saved, and the run stops with `NonFiniteLossError` naming the first bad step, the last finite step
and the last finite checkpoint (kept). There is no tolerance: the first non-finite step ends the run (resume from
the named checkpoint with a lower lr or a smaller grad_clip).
"""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import logging
import os
import shutil
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from marval_jax.checkpoints import manager as ckpt
from marval_jax.checkpoints import workdir_lock
from marval_jax.evaluation.grid import make_grid, save_grid
from marval_jax.parallel.compiler_options import jit_options
from marval_jax.parallel import mesh as mesh_lib
from marval_jax.parallel import sharding as shd
from marval_jax.train import live_eval as live_eval_lib
from marval_jax.train.plateau import Plateau
from marval_jax.train import writers
from marval_jax.user_errors import UserError


class NonFiniteLossError(FloatingPointError, UserError):
    """A step produced a NaN/inf loss, gradient norm or state; a user error (lr, data), printed as one line."""


@dataclasses.dataclass
class Task:
    name: str
    init_state: Callable[[jax.Array], Any]          # rng -> state (pure; jitted with out_shardings)
    train_step: Callable[[Any, Any], tuple[Any, dict]]  # (state, batch) -> (state, metrics)
    logical_axes: list                              # LOGICAL_AXES of the model (regex -> logical axes)
    sample_images: Callable[[Any, jax.Array], jax.Array] | None = None  # (state, rng) -> NHWC [-1, 1]
    uses_data: bool = True
    # host-side hook after a fresh init, (state, *frozen) -> state: initial weights of the trained roles (a
    # student, a teacher copy); reads files, called only when no checkpoint is resumed
    post_init: Callable[..., Any] | None = None
    loss_key: str = "loss"
    # Frozen inputs the step reads but never changes (distillation: the teacher; RL: the reward model, prompt
    # embeddings, GSIM's teacher and fake score; every task: the tokenizer's decoder for grids). A task module's
    # `build_step(config)` is pure (reads no file) and leaves this to its `load_frozen(config)`. With `frozen` set,
    # train_step, sample_images and post_init take it as their last argument: it is put on the devices once
    # (replicated) and passed through the jit boundary, not closed over, which would bake it into the compiled
    # programs as constants (a CLIP-H reward: ~1B parameters). Never checkpointed: loaded again from the config.
    frozen: Any = None
    # Top-level keys of `frozen` (a dict) holding MAR parameters (a distillation teacher, RL's GSIM teacher and fake
    # score): sharded like the trained state (`logical_axes`, FSDP); every other frozen input is replicated.
    frozen_sharded: tuple = ()


def state_shardings(abstract_state, task: Task, mesh, rules):
    specs = shd.param_specs(abstract_state, task.logical_axes, mesh, rules)
    return shd.named(mesh, specs)


def frozen_shardings(frozen: dict, sharded_keys, logical_axes, mesh, rules) -> dict:
    """Shardings of a task's frozen inputs: the `sharded_keys` entries by the model's logical axes, the rest
    replicated."""
    repl = shd.replicated(mesh)
    return {k: (shd.named(mesh, shd.param_specs(v, logical_axes, mesh, rules)) if k in sharded_keys
                else jax.tree_util.tree_map(lambda _: repl, v)) for k, v in frozen.items()}


def under_mesh(mesh, fn: Callable) -> Callable:
    """fn called with `mesh` as the context mesh (`jax.set_mesh`; none when mesh is None). A jitted fn is traced
    there, so the Pallas kernels see the mesh during tracing and split their calls over it with shard_map
    (kernels/sharding.py) instead of leaving XLA to gather their operands. Only the jitted calls on the mesh's
    state enter it: saving, gathering and the multi-process syncs stay outside, as before."""
    if mesh is None:
        return fn

    def call(*args):
        with jax.set_mesh(mesh):
            return fn(*args)
    return call


def config_json(config) -> dict:
    return config.to_dict() if hasattr(config, "to_dict") else dict(config)


def _data_config(data_cfg):
    d = data_cfg.to_dict()
    return {k: (None if v == "" else v) for k, v in d.items()}


class WindowAverage:
    """clu.metrics averages of every scalar metric over the logging window, merged on device (no host sync).
    clu builds dataclasses, so metric names like "gen/loss" are stored under field names m0, m1, ..."""

    def __init__(self, names):
        from clu import metrics as clu_metrics
        self.names = sorted(names)
        self.collection = clu_metrics.Collection.create(
            **{f"m{i}": clu_metrics.Average.from_output(f"m{i}") for i in range(len(self.names))})
        self.value = None

    def add(self, scalars: dict) -> None:
        update = self.collection.single_from_model_output(**{f"m{i}": scalars[n] for i, n in enumerate(self.names)})
        self.value = update if self.value is None else self.value.merge(update)

    def pop(self) -> dict:
        out = jax.device_get(self.value.compute())
        self.value = None
        return {n: out[f"m{i}"] for i, n in enumerate(self.names)}


# -- the non-finite guard ------------------------------------------------------------------------------------------
_BAD_LOSS, _BAD_GRAD, _BAD_STATE = 1, 2, 4
NO_BAD_STEP = -1


def init_guard(step: int) -> dict:
    return {"step": jnp.int32(step), "first_bad": jnp.int32(NO_BAD_STEP), "what": jnp.int32(0)}


def finite_bits(metrics: dict, state, loss_key: str = "loss") -> jax.Array:
    """Bitmask of what is non-finite: 1 a loss metric, 2 a gradient norm, 4 any float leaf of the updated state."""
    def all_finite(xs):
        xs = [x for x in xs if jnp.issubdtype(jnp.result_type(x), jnp.inexact)]
        return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in xs])) if xs else jnp.bool_(True)
    loss = all_finite([v for k, v in metrics.items() if k == loss_key or k.endswith("loss")])
    grad = all_finite([v for k, v in metrics.items() if k.endswith("grad_norm")])
    state_ok = all_finite(jax.tree_util.tree_leaves(state))
    return (jnp.where(loss, 0, _BAD_LOSS) + jnp.where(grad, 0, _BAD_GRAD) + jnp.where(state_ok, 0, _BAD_STATE)
            ).astype(jnp.int32)


def guarded(train_step: Callable, loss_key: str) -> Callable:
    """(state, guard, batch, *extra) -> (state, guard, metrics): the task's step plus the guard's update."""
    def step(state, guard, batch, *extra):
        state, metrics = train_step(state, batch, *extra)
        bits = finite_bits(metrics, state, loss_key)
        done = guard["step"] + 1
        first = (guard["first_bad"] == NO_BAD_STEP) & (bits != 0)
        guard = {"step": done, "first_bad": jnp.where(first, done, guard["first_bad"]),
                 "what": jnp.where(first, bits, guard["what"])}
        return state, guard, metrics
    return step


def check_finite(guard: dict, metrics: dict, *, name: str, at_step: int, last_ckpt: int | None,
                 ckpt_dir: str) -> None:
    """Raise NonFiniteLossError if the (host copy of the) guard saw a non-finite step."""
    first = int(guard["first_bad"])
    if first == NO_BAD_STEP:
        return
    what = [w for bit, w in ((_BAD_LOSS, "loss"), (_BAD_GRAD, "gradient norm"), (_BAD_STATE, "updated state"))
            if int(guard["what"]) & bit]
    values = {k: float(np.asarray(v)) for k, v in metrics.items() if np.ndim(v) == 0}
    kept = f"step {last_ckpt} in {ckpt_dir}" if last_ckpt is not None else "none (no checkpoint of this run)"
    raise NonFiniteLossError(
        f"{name}: non-finite {' and '.join(what)} at step {first} (seen at the check of step {at_step}: {values}); "
        f"stopping without saving. Last finite step: {first - 1}{' (the initial state)' if first == 1 else ''}; "
        f"last finite checkpoint: {kept}. Resume from it with a lower train.lr or a smaller train.grad_clip")


def gather_to_host(x: jax.Array) -> np.ndarray:
    """The whole of a (possibly multi-process sharded) array as NumPy on every process."""
    if jax.process_count() == 1 or x.is_fully_addressable:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))


# -- setting up a run -------------------------------------------------------------------------------------------------
def _data_iterator(config, global_batch: int, seed: int):
    from marval_jax.data import pipeline, tfds_builders
    dcfg = _data_config(config.data)
    if dcfg["name"] in ("fashion_mnist", "mnist") and not dcfg.get("in_memory"):
        tfds_builders.build(dcfg.get("tfds_name") or f"{dcfg['name']}_local", dcfg.get("data_dir"))
    return pipeline.make_train_iterator(dcfg, global_batch, seed)


def _init_or_resume(task: Task, config, workdir, manager, abstract, shardings, data_iter, rng, extra=()):
    """(state, start step): the newest intact checkpoint (or train.restore_step), else a fresh init."""
    target = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                    abstract, shardings)
    state, step = ckpt.restore_run(manager, target, data_iter, config_json(config),
                                   restore_step=config.train.get("restore_step", -1))
    if step is not None:
        print(f"{task.name}: resumed from step {step} in {workdir}", flush=True)
        return state, int(step)
    state = jax.jit(task.init_state, out_shardings=shardings)(rng)
    if task.post_init is not None:
        # roles initialised from one checkpoint (or from a frozen input) share buffers: copy, since the step
        # donates each leaf
        state = jax.device_put(jax.tree_util.tree_map(jnp.copy, task.post_init(state, *extra)), shardings)
    logging.info("%s: fresh start in %s", task.name, workdir)
    return state, 0


def _drop_metrics_after(workdir: str, step: int) -> None:
    if jax.process_index() == 0:
        dropped = writers.truncate_metrics(workdir, step)
        if dropped:
            logging.warning("metrics.jsonl: dropped %d rows past step %d (written after that checkpoint)",
                            dropped, step)


# -- the profiler hook ----------------------------------------------------------------------------------------------
def profile_window(steps, field: str = "train.profile_steps") -> tuple[int, int] | None:
    """`train.profile_steps` (or `sample.profile_batches`): () or None = off; (a, b) = trace steps a..b (1-based, as
    logged), 1 <= a <= b."""
    if steps is None or len(steps) == 0:
        return None
    try:
        a, b = (int(x) for x in steps)
        ok = 1 <= a <= b and tuple(steps) == (a, b)
    except (TypeError, ValueError):
        ok = False
    if not ok:
        raise UserError(f"{field}={tuple(steps)!r}: expected two step numbers (a, b) with 1 <= a <= b, "
                        f"e.g. --config.{field}='(10, 15)', or () to turn profiling off")
    return a, b


class StepProfiler:
    """A jax.profiler trace of steps a..b into `<workdir>/profile` (docs/observability.md: how to open it).

    Every process traces its own devices (each host's file is named after the host). It starts before the first step
    of the window this run executes (a resume inside the window traces the rest) and stops after step b's state is
    ready, or when the loop leaves early. A gs:// workdir: traced into a local temporary folder, then copied there
    through etils.epath."""

    def __init__(self, steps, workdir: str, field: str = "train.profile_steps"):
        self.window = profile_window(steps, field)
        self.target = os.path.join(workdir, "profile") if "://" not in workdir else f"{workdir.rstrip('/')}/profile"
        self.active, self.finished, self._local = False, False, None

    def close(self) -> None:  # contextlib.closing: the loop left (end, preemption, error) inside the window
        self.stop()

    def before(self, done: int) -> None:
        if self.window and not (self.active or self.finished) and self.window[0] <= done <= self.window[1]:
            self._local = self.target if "://" not in self.target else tempfile.mkdtemp(prefix="marval_profile_")
            jax.profiler.start_trace(self._local)
            self.active = True

    def after(self, done: int, state) -> None:
        if self.active and done >= self.window[1]:
            jax.block_until_ready(state)
            self.stop()

    def stop(self) -> None:
        if not self.active:
            return
        jax.profiler.stop_trace()
        self.active, self.finished = False, True
        if self._local != self.target:
            from etils import epath
            for here, _, files in os.walk(self._local):
                for name in files:
                    rel = os.path.relpath(os.path.join(here, name), self._local)
                    out = epath.Path(self.target) / rel
                    out.parent.mkdir(parents=True, exist_ok=True)
                    out.write_bytes(open(os.path.join(here, name), "rb").read())
            shutil.rmtree(self._local, ignore_errors=True)
        logging.info("profile of steps (batches) %d-%d written to %s", *self.window, self.target)


# -- the loop -------------------------------------------------------------------------------------------------------
def train(config, workdir: str, task: Task) -> Any:
    """Runs `task` to config.train.num_steps (resuming if the workdir has checkpoints); returns the final state."""
    tc = config.train
    profile_window(tc.get("profile_steps", ()))  # a bad pair is refused before anything starts
    writers.extra_writers(tc.get("writers", ""))  # so are an unknown writer and a missing package
    live_eval_lib.check(config)                   # and live evaluation without a reference or images
    mesh_lib.maybe_initialize_distributed(config.mesh)
    ckpt.install_sigterm_handler()
    os.makedirs(workdir, exist_ok=True) if "://" not in workdir else None
    with workdir_lock.hold(workdir, tc.get("lock_stale_after_s", workdir_lock.DEFAULT_STALE_AFTER_S)) as lock:
        return _train_locked(config, workdir, task, lock)


def _train_locked(config, workdir: str, task: Task, lock) -> Any:
    tc = config.train
    mesh = mesh_lib.make_mesh(config.mesh)
    rules = config.mesh.logical_axis_rules
    rng = jax.random.PRNGKey(tc.seed)
    # before the data, the state and the first compile: a missing Inception / reference fails in seconds
    live = live_eval_lib.LiveEval(config, task, mesh, rules, rng) if live_eval_lib.enabled(tc) else None
    abstract = jax.eval_shape(task.init_state, rng)
    shardings = state_shardings(abstract, task, mesh, rules)
    batch_shd, replicated = shd.batch_sharding(mesh, rules), shd.replicated(mesh)
    manager = ckpt.make_manager(workdir, save_interval=tc.ckpt_every, keep=tc.keep_checkpoints,
                                async_save=tc.async_checkpoints)
    data_iter = _data_iterator(config, tc.global_batch_size, tc.seed) if task.uses_data else None
    cfg_json = config_json(config)
    extra, extra_shd = (), ()
    if task.frozen is not None:
        extra_shd = (frozen_shardings(task.frozen, task.frozen_sharded, task.logical_axes, mesh, rules),)
        extra = (jax.device_put(task.frozen, extra_shd[0]),)
    state, start = _init_or_resume(task, config, workdir, manager, abstract, shardings, data_iter, rng, extra)
    _drop_metrics_after(workdir, start)

    guard_shd = jax.tree_util.tree_map(lambda _: replicated, init_guard(0))
    step_fn = under_mesh(mesh, jax.jit(guarded(task.train_step, task.loss_key),
                                       in_shardings=(shardings, guard_shd, batch_shd) + extra_shd,
                                       out_shardings=(shardings, guard_shd, None), donate_argnums=(0, 1),
                                       **jit_options(tc.global_batch_size // mesh.size)))
    if task.uses_data:
        from marval_jax.data.pipeline import make_global_batch
        batches = (make_global_batch(b, batch_shd) for b in data_iter)
    else:
        dummy = {"labels": jnp.zeros((tc.global_batch_size,), jnp.int32)}
        batches = (jax.device_put(dummy, batch_shd) for _ in itertools.count())
    run = _Run(task, tc, workdir, manager, lock, step_fn, extra, data_iter, cfg_json, rng, last_ckpt=start or None,
               live_eval=live, mesh=mesh)
    try:
        return run.steps(state, jax.device_put(init_guard(start), guard_shd), batches, start)
    finally:
        manager.wait_until_finished()  # an async save in flight completes, on success, error or preemption


@dataclasses.dataclass
class _Run:
    task: Task
    tc: Any
    workdir: str
    manager: Any
    lock: Any
    step_fn: Callable
    extra: tuple
    data_iter: Any
    cfg_json: dict
    rng: jax.Array
    last_ckpt: int | None
    live_eval: Any = None   # live_eval.LiveEval (train.eval_every > 0) or None
    mesh: Any = None        # the training mesh: the grid sampler is traced under it, as the step is

    def steps(self, state, guard, batches, start: int):
        tc, task = self.tc, self.task
        sample_fn = under_mesh(self.mesh, jax.jit(task.sample_images)) if task.sample_images is not None else None
        profiler = StepProfiler(tc.get("profile_steps", ()), self.workdir)
        plateau = Plateau.from_config(tc)   # train.stop_on_plateau: None when off
        with writers.MultiWriter(self.workdir, hparams=self.cfg_json, extra=tc.get("writers", "")) as writer, \
                contextlib.closing(profiler):
            t0, seen, window = time.time(), 0, None
            for step in range(start, tc.num_steps):
                profiler.before(step + 1)
                state, guard, metrics = self.step_fn(state, guard, next(batches), *self.extra)
                profiler.after(step + 1, state)
                if window is None:
                    window = WindowAverage([k for k, v in metrics.items() if jnp.ndim(v) == 0])
                window.add(metrics)
                seen += tc.global_batch_size
                done = step + 1
                scheduled = (done % tc.ckpt_every == 0) or done == tc.num_steps
                # read once: a signal between reads must not skip the save. Every process gets the same answer;
                # with several, a local flag is gathered only at the steps where the loop syncs anyway
                stop = ckpt.preempted(self.manager, done, agree=scheduled or done % tc.log_every == 0)
                must_save, plateaued = scheduled or stop, False
                evaluate = self.live_eval is not None and not stop and live_eval_lib.due(tc, done)
                if done % tc.log_every == 0 or must_save or evaluate:  # a non-finite state is never evaluated
                    m, g = jax.device_get((metrics, guard))  # the one sync point: log steps and saves
                    check_finite(g, m, name=task.name, at_step=done, last_ckpt=self.last_ckpt,
                                 ckpt_dir=str(self.manager.directory))
                    rate = seen / max(time.time() - t0, 1e-9)
                    eta = (tc.num_steps - done) * tc.global_batch_size / max(rate, 1e-9)
                    scalars = window.pop()
                    writer.write_scalars(done, {**scalars, "images_per_s": rate, "eta_s": eta})
                    self.lock.heartbeat()
                    t0, seen = time.time(), 0
                    if plateau is not None and plateau.update(scalars) and not stop:  # same answer on every process
                        stop = plateaued = must_save = True
                if tc.sample_every and done % tc.sample_every == 0 and sample_fn:
                    # every process enters the jitted sampler (the state is sharded across them); process 0 writes
                    images = gather_to_host(sample_fn(state, jax.random.fold_in(self.rng, 10_000 + done),
                                                      *self.extra))
                    if jax.process_index() == 0:
                        save_grid(os.path.join(self.workdir, "samples", f"step_{done:08d}.png"), images)
                        writer.write_images(done, {"samples": make_grid(images)})
                if evaluate:
                    scores = self.live_eval(state, *self.extra)   # every process; process 0's writers write
                    writer.write_scalars(done, scores)
                    t0 += scores["eval/seconds"]                  # not counted as training time in images_per_s
                if must_save and ckpt.save(self.manager, done, state, self.data_iter, self.cfg_json, force=True):
                    self.last_ckpt = done
                if stop:
                    self.manager.wait_until_finished()
                    why = f"stopped: {plateau.describe()}" if plateaued else "preempted"
                    print(f"{task.name}: {why} at step {done}; checkpoint saved, exiting cleanly", flush=True)
                    return state
        return state
