"""MAR training step, optimizer decay set, resume equivalence and preemption, on the tiny config."""
import os
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import mar as mar_configs
from marval_jax.models.mar import MAR, MARConfig
from marval_jax.train.optimizer import mar_decay_mask

pytestmark = pytest.mark.usefixtures("compile_cache")  # tests/conftest.py


def tiny_config(**train):
    cfg = mar_configs.get_config("tiny")
    cfg.unlock()
    cfg.train.update(train)
    cfg.lock()
    return cfg


def test_decay_set_matches_reference_base():
    cfg = MARConfig(**mar_configs.get_config("base").model.to_dict())
    params = nnx.state(nnx.eval_shape(lambda: MAR(cfg, rngs=nnx.Rngs(0))), nnx.Param)
    mask = mar_decay_mask(params)
    leaves = jax.tree_util.tree_leaves(params)
    flags = jax.tree_util.tree_leaves(mask)
    n = sum(flags)
    size = sum(int(np.prod(x.shape)) for x, f in zip(leaves, flags) if f)
    assert n == 104 and abs(size - 171.9e6) < 0.05e6


def test_loss_falls_on_fixed_batch():
    from marval_jax.train.mar_task import make_mar_task
    task = make_mar_task(tiny_config(lr=3e-3, warmup_steps=1))
    state = jax.jit(task.init_state)(jax.random.PRNGKey(0))
    toks = jax.random.uniform(jax.random.PRNGKey(1), (16, 64, 16), minval=-1, maxval=1)
    toks = jnp.round(toks)  # a fixed, easy batch: values in {-1, 0, 1}
    batch = {"tokens": toks, "labels": jnp.arange(16) % 10}
    step = jax.jit(task.train_step)
    losses = []
    for _ in range(60):
        state, m = step(state, batch)
        losses.append(float(m["loss"]))
    assert np.isfinite(losses).all()
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10]), losses


def _params(workdir):
    import orbax.checkpoint as ocp
    from marval_jax.checkpoints import manager as ckpt
    m = ckpt.make_manager(workdir, save_interval=1, keep=5, async_save=False)
    step = m.latest_step()
    out = m.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"]
    return step, out


def test_resume_gives_identical_parameters(tmp_path, copy_workdir):
    """2n steps straight vs n steps (the session's tiny teacher: n = 2, checkpoint at n) then resumed to 2n."""
    from marval_jax.train.loop import train
    from marval_jax.train.mar_task import make_mar_task
    n = 2
    straight = str(tmp_path / "straight")
    cfg = tiny_config(num_steps=2 * n, ckpt_every=n, sample_every=0, log_every=n)
    train(cfg, straight, make_mar_task(cfg))
    resumed = copy_workdir("resumed")
    assert _params(resumed)[0] == n
    train(cfg, resumed, make_mar_task(cfg))
    (s1, a), (s2, b) = _params(straight), _params(resumed)
    assert s1 == s2 == 2 * n
    for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_checkpoint_from_another_config_is_refused(copy_workdir):
    from marval_jax.checkpoints.manager import ConfigMismatchError
    from marval_jax.train.loop import train
    from marval_jax.train.mar_task import make_mar_task
    workdir = copy_workdir()  # the tiny config trained to step 2
    other = tiny_config(num_steps=4, ckpt_every=2, sample_every=0, log_every=2)
    other.unlock()
    other.model.encoder_embed_dim = 64
    other.lock()
    with pytest.raises(ConfigMismatchError, match="encoder_embed_dim"):
        train(other, workdir, make_mar_task(other))


def _all_checkpoint_arrays(workdir):
    """{step: [every array of its state]} of every checkpoint in the workdir."""
    import orbax.checkpoint as ocp
    from marval_jax.checkpoints import manager as ckpt
    m = ckpt.make_manager(workdir, save_interval=1, keep=10, async_save=False)
    return {s: jax.tree_util.tree_leaves(
                m.restore(s, args=ocp.args.Composite(state=ocp.args.StandardRestore()))["state"])
            for s in m.all_steps()}


def test_lr_1e39_saves_no_non_finite_checkpoint(copy_workdir):
    """lr=1e39 with a checkpoint every step: step 3's update overflows, the run stops naming step 2 as the last
    finite step and checkpoint, and no checkpoint holds a NaN/inf (step 3's state used to be saved)."""
    from marval_jax.train.loop import NonFiniteLossError, train
    from marval_jax.train.mar_task import make_mar_task
    from marval_jax.user_errors import UserError
    workdir = copy_workdir()  # the tiny config trained to step 2
    bad = tiny_config(num_steps=6, ckpt_every=1, sample_every=0, log_every=1, lr=1e39)
    with pytest.raises(NonFiniteLossError) as e:
        train(bad, workdir, make_mar_task(bad))
    msg = str(e.value)
    assert isinstance(e.value, UserError) and "non-finite" in msg and " at step 3 " in msg, msg
    assert "Last finite step: 2;" in msg and "last finite checkpoint: step 2 in" in msg, msg
    arrays = _all_checkpoint_arrays(workdir)
    assert sorted(arrays) == [2]
    assert all(np.isfinite(np.asarray(a)).all() for leaves in arrays.values() for a in leaves
               if np.issubdtype(np.asarray(a).dtype, np.inexact))


def test_corrupt_latest_checkpoint_resumes_from_previous_and_metrics_hold_each_step_once(copy_workdir, caplog,
                                                                                         capsys):
    """The copied run gets a step-3 checkpoint with a zero-byte manifest.ocdbt and metrics rows for steps 3-5
    (as a run killed after logging past its last good save leaves them): the resume warns naming step 3, continues
    from step 2, and metrics.jsonl ends with every step once."""
    import json
    import logging
    import shutil
    from marval_jax.train.loop import train
    from marval_jax.train.mar_task import make_mar_task
    workdir = copy_workdir()  # the tiny config trained to step 2
    ckpts = os.path.join(workdir, "checkpoints")
    shutil.copytree(os.path.join(ckpts, "2"), os.path.join(ckpts, "3"))
    open(os.path.join(ckpts, "3", "state", "manifest.ocdbt"), "w").close()
    with open(os.path.join(workdir, "metrics.jsonl"), "a") as f:
        f.writelines(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (3, 4, 5))
    cfg = tiny_config(num_steps=4, ckpt_every=2, sample_every=0, log_every=1)
    with caplog.at_level(logging.WARNING):
        train(cfg, workdir, make_mar_task(cfg))
    assert "checkpoints/3 cannot be read (ValueError: DATA_LOSS" in caplog.text, caplog.text
    assert "resumed from step 2" in capsys.readouterr().out
    assert _params(workdir)[0] == 4
    assert os.path.isdir(os.path.join(workdir, "checkpoints_set_aside", "3"))
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        assert [json.loads(line)["step"] for line in f] == [1, 2, 3, 4]


def test_cli_sigterm_saves_and_resumes(tmp_path):
    """The CLI, killed with SIGTERM mid-run, saves and exits 0; the next run resumes at that step."""
    wd = str(tmp_path / "run")
    cmd = [sys.executable, "-m", "marval_jax.main", "--mode=train", "--config=configs/mar.py:tiny",
           f"--workdir={wd}", "--config.train.num_steps=100000", "--config.train.log_every=1",
           "--config.train.sample_every=0", "--config.train.ckpt_every=100000"]
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    metrics = os.path.join(wd, "metrics.jsonl")
    deadline = time.time() + 240
    while time.time() < deadline and not (os.path.exists(metrics) and os.path.getsize(metrics) > 0):
        time.sleep(0.5)
    assert os.path.exists(metrics), proc.communicate()[0][-3000:]
    proc.send_signal(signal.SIGTERM)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    assert "preempted at step" in out
    step, _ = _params(wd)
    assert step >= 1
    cmd2 = [c.replace("num_steps=100000", f"num_steps={step + 2}") for c in cmd]
    out2 = subprocess.run(cmd2, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert out2.returncode == 0, out2.stdout[-3000:] + out2.stderr[-3000:]
    assert f"resumed from step {step}" in out2.stdout
    assert _params(wd)[0] == step + 2


def test_config_typo_is_an_error():
    out = subprocess.run([sys.executable, "-m", "marval_jax.main", "--config=configs/mar.py:tiny",
                          "--workdir=/tmp/never", "--config.train.num_stpes=3"],
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0 and "num_stpes" in out.stderr
