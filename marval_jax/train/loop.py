"""The training loop every mode shares (MAR pretraining, GSIM distillation, RL).

A task supplies pure functions over explicit pytrees: `init_state(rng)`, `train_step(state, batch)` and
`sample_images(state, rng)`, plus `param_paths` for sharding. The loop builds the mesh, creates the state already
sharded (`jax.jit(init, out_shardings=...)`), resumes from the latest checkpoint in the workdir (state + data
iterator + config check), runs the jitted step with donated state, logs, writes grids, and saves on interval,
preemption (SIGTERM) and at the end. Metrics come to the host only every `log_every` steps and before saves; a
non-finite loss stops the run with an error and never overwrites the last good checkpoint.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from marval_jax.checkpoints import manager as ckpt
from marval_jax.evaluation.grid import save_grid
from marval_jax.parallel.compiler_options import jit_options
from marval_jax.parallel import mesh as mesh_lib
from marval_jax.parallel import sharding as shd
from marval_jax.train.writers import MultiWriter


class NonFiniteLossError(FloatingPointError):
    pass


@dataclasses.dataclass
class Task:
    name: str
    init_state: Callable[[jax.Array], Any]          # rng -> state (pure; jitted with out_shardings)
    train_step: Callable[[Any, Any], tuple[Any, dict]]  # (state, batch) -> (state, metrics)
    logical_axes: list                              # LOGICAL_AXES of the model (regex -> logical axes)
    sample_images: Callable[[Any, jax.Array], jax.Array] | None = None  # (state, rng) -> NHWC [-1, 1]
    uses_data: bool = True
    post_init: Callable[[Any], Any] | None = None   # host-side hook after a fresh init (e.g. load a teacher)
    loss_key: str = "loss"
    # Frozen weights the step reads but never changes (RL: the reward model, prompt embeddings, the tokenizer's
    # decoder). With `frozen` set, train_step and sample_images take it as their last argument: it is put on the
    # devices once (replicated) and passed through the jit boundary, not closed over, which would bake it into the
    # compiled programs as constants (a CLIP-H reward: ~1B parameters). Not checkpointed: rebuilt from the config.
    frozen: Any = None


def state_shardings(abstract_state, task: Task, mesh, rules):
    specs = shd.param_specs(abstract_state, task.logical_axes, mesh, rules)
    return shd.named(mesh, specs)


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


def _finite(metrics: dict, key: str) -> bool:
    return all(np.all(np.isfinite(np.asarray(v))) for k, v in metrics.items() if k == key or k.endswith("loss"))


def train(config, workdir: str, task: Task) -> Any:
    """Runs `task` to config.train.num_steps (resuming if the workdir has checkpoints); returns the final state."""
    tc = config.train
    mesh_lib.maybe_initialize_distributed(config.mesh)
    mesh = mesh_lib.make_mesh(config.mesh)
    rules = config.mesh.logical_axis_rules
    ckpt.install_sigterm_handler()
    os.makedirs(workdir, exist_ok=True) if "://" not in workdir else None
    rng = jax.random.PRNGKey(tc.seed)

    abstract = jax.eval_shape(task.init_state, rng)
    shardings = state_shardings(abstract, task, mesh, rules)
    batch_shd = shd.batch_sharding(mesh, rules)
    manager = ckpt.make_manager(workdir, save_interval=tc.ckpt_every, keep=tc.keep_checkpoints,
                                async_save=tc.async_checkpoints)
    data_iter = None
    if task.uses_data:
        from marval_jax.data import pipeline, tfds_builders
        dcfg = _data_config(config.data)
        if dcfg["name"] in ("fashion_mnist", "mnist") and not dcfg.get("in_memory"):
            tfds_builders.build(dcfg.get("tfds_name") or f"{dcfg['name']}_local", dcfg.get("data_dir"))
        data_iter = pipeline.make_train_iterator(dcfg, tc.global_batch_size, tc.seed)

    cfg_json = config_json(config)
    latest = manager.latest_step()
    if latest is None:
        state = jax.jit(task.init_state, out_shardings=shardings)(rng)
        if task.post_init is not None:
            # roles initialised from one checkpoint share buffers: copy, since the step donates each leaf
            state = jax.device_put(jax.tree_util.tree_map(jnp.copy, task.post_init(state)), shardings)
        start = 0
        logging.info("%s: fresh start in %s", task.name, workdir)
    else:
        target = jax.tree_util.tree_map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                        abstract, shardings)
        state = ckpt.restore(manager, latest, target, data_iter, cfg_json)
        start = int(latest)
        print(f"{task.name}: resumed from step {start} in {workdir}", flush=True)

    extra, extra_shd = (), ()
    if task.frozen is not None:
        extra_shd = (shd.replicated(mesh),)
        extra = (jax.device_put(task.frozen, extra_shd[0]),)
    step_fn = jax.jit(task.train_step, in_shardings=(shardings, batch_shd) + extra_shd,
                      out_shardings=(shardings, None), donate_argnums=0,
                      **jit_options(tc.global_batch_size // mesh.size))
    sample_fn = jax.jit(task.sample_images) if task.sample_images is not None else None
    dummy_batch = {"labels": jnp.zeros((tc.global_batch_size,), jnp.int32)}
    last_good = start if latest is not None else None

    def save(step, force=False):
        nonlocal last_good
        saved = ckpt.save(manager, step, state, data_iter, cfg_json, force=force)
        if saved:
            last_good = step
        return saved

    with MultiWriter(workdir) as writer:
        t0, seen, step = time.time(), 0, start
        window = None
        for step in range(start, tc.num_steps):
            if data_iter is not None:
                from marval_jax.data.pipeline import make_global_batch
                batch = make_global_batch(next(data_iter), batch_shd)
            else:
                batch = jax.device_put(dummy_batch, batch_shd)
            state, metrics = step_fn(state, batch, *extra)
            if window is None:
                window = WindowAverage([k for k, v in metrics.items() if jnp.ndim(v) == 0])
            window.add(metrics)
            seen += tc.global_batch_size
            done = step + 1
            stop = ckpt.preempted(manager, done)  # read once: a signal between two reads must not skip the save
            must_save = (done % tc.ckpt_every == 0) or done == tc.num_steps or stop
            if done % tc.log_every == 0 or must_save:
                m = jax.device_get(metrics)
                if not _finite(m, task.loss_key):
                    manager.wait_until_finished()
                    raise NonFiniteLossError(
                        f"{task.name}: non-finite loss at step {done} ({ {k: float(np.asarray(v)) for k, v in m.items()} }); "
                        f"stopping. The last good checkpoint (step {last_good}) in {workdir} is kept.")
                dt = time.time() - t0
                rate = seen / max(dt, 1e-9)
                eta = (tc.num_steps - done) * tc.global_batch_size / max(rate, 1e-9)
                writer.write_scalars(done, {**window.pop(), "images_per_s": rate, "eta_s": eta})
                t0, seen = time.time(), 0
            if tc.sample_every and done % tc.sample_every == 0 and sample_fn is not None and jax.process_index() == 0:
                images = sample_fn(state, jax.random.fold_in(rng, 10_000 + done), *extra)
                save_grid(os.path.join(workdir, "samples", f"step_{done:08d}.png"), np.asarray(images))
            if must_save:
                save(done, force=True)
            if stop:
                manager.wait_until_finished()
                print(f"{task.name}: preempted at step {done}; checkpoint saved, exiting cleanly", flush=True)
                return state
        manager.wait_until_finished()
    return state
