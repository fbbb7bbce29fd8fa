"""Shared test fixtures: the reference fixture kept in the repository (tests run without ../shared).

Compile options: the suite's programs are tiny, so on a CPU compiling them costs far more than running them. XLA's
cheaper LLVM optimisation (the flags of `python -m marval_jax.benchmarks --quick`) is set here, before jax starts a
backend, for the test process and the CLI subprocesses it starts (they inherit the environment); a run that sets
its own xla_backend_optimization_level keeps it. A test whose comparison is tighter than what the optimisation
level changes pins XLA's default level in its jits' compiler_options (tests/models/test_transformer_remat.py).
"""
import os
import pathlib
import shutil

import numpy as np
import pytest

QUICK_XLA_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + QUICK_XLA_FLAGS).strip()

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "mar_reference_tiny.npz"

# The files that take longest (a minute or more each on the 2-core CI machine, longest first), run before all the
# others. tests/run_all.sh hands whole files to its pytest-xdist workers in collection order
# (`--dist loadfile --no-loadscope-reorder`): with the long files first, the last files a worker takes are short
# ones and both workers finish together. xdist's own order (most tests first) put these few-test, long files last,
# where a worker could be left running one alone. Order only: every file still runs, each in its own order.
SLOW_FIRST = (
    "losses/test_rl.py", "tools/test_scale_check.py", "train/test_pipeline_cli.py", "losses/test_gsim.py",
    "train/test_mar_train.py", "benchmarks/test_suite.py", "tools/test_ablate.py", "gcs/test_gcs_pipeline.py",
    "tpu_aot/test_tpu_aot_compile.py", "tools/test_parity.py", "data/test_folder_dataset.py",
    "train/test_rl_task.py", "sampling/test_decode.py", "sampling/test_cached_sampler.py",
    "programs/test_evaluate.py", "train/test_live_eval.py", "losses/test_gsim_toy.py",
    "evaluation/test_classifier_train.py", "rewards/test_classifier_reward.py", "losses/test_gsim_gaussian.py",
    "checkpoints/test_load_topology.py", "train/test_distill_checkpoint.py", "programs/test_demo.py",
)


def pytest_collection_modifyitems(session, config, items):
    """SLOW_FIRST's files first, in its order; the rest after them in the order collected (a stable sort)."""
    root = pathlib.Path(__file__).parent
    rank = {name: i for i, name in enumerate(SLOW_FIRST)}

    def file_rank(item):
        try:
            return rank.get(item.path.relative_to(root).as_posix(), len(rank))
        except ValueError:  # a test outside tests/
            return len(rank)
    items.sort(key=file_rank)


@pytest.fixture(scope="session")
def ref():
    with np.load(FIXTURE) as data:
        return {k: data[k] for k in data.files}


@pytest.fixture(scope="session")
def ref_model(ref):
    """(model, config) of the fixture's tiny MAR with converted reference weights, eval mode."""
    from flax import nnx
    from marval_jax.checkpoints.convert_mar import load_into_model
    from marval_jax.models.mar import MAR, MARConfig
    import json
    cfg = MARConfig.from_dict(dict(json.loads(str(ref["config_json"])), attn_dropout=0.0, proj_dropout=0.0))
    model = MAR(cfg, rngs=nnx.Rngs(0))
    load_into_model(model, {k[6:]: v for k, v in ref.items() if k.startswith("param/")})
    return model, cfg


# JAX's persistent compilation cache, for the files that run the modes end to end (`pytestmark =
# pytest.mark.usefixtures("compile_cache")`): they compile the same tiny train / distill / RL steps and samplers again
# and again (a resumed run compiles its programs anew, the session teacher's step is the GCS test's and the CLI
# tests'), and with the cache a program compiled once is loaded, in this process and in the CLI subprocesses it
# starts (they inherit the environment). Only compiles of over a second are kept (JAX's default threshold). A cache
# hit is the same executable, so the results are the same bits. One folder per run, shared by the xdist workers of
# the run (a size limit turns on JAX's file lock around reads and writes), never by two runs. Set for the module and
# restored after it: other files compile as before (tests/tools/test_ablate.py checks the cache its tool makes).
COMPILE_CACHE_MAX_BYTES = 4 * 2 ** 30


@pytest.fixture(scope="session")
def inception_npz(tmp_path_factory):
    """The FID Inception weights converted once per test process (~8 s; the conversion needs torch, a test
    requirement) for every test that evaluates; read only."""
    pytest.importorskip("torch")
    from marval_jax.tools.convert_inception import convert
    return convert(str(tmp_path_factory.mktemp("inc") / "fid_inception.npz"))


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
    import jax
    from jax.experimental.compilation_cache import compilation_cache as cc
    base = tmp_path_factory.getbasetemp()
    folder = (base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base) / "xla_compile_cache"
    folder.mkdir(exist_ok=True)
    try:  # JAX locks the cache with filelock (torch and transformers, test requirements, bring it)
        import filelock  # noqa: F401  pylint: disable=unused-import,import-outside-toplevel
        max_bytes = COMPILE_CACHE_MAX_BYTES
    except ImportError:  # no lock: a read racing a write is a miss that JAX reports and compiles anew
        max_bytes = -1
    env = {"JAX_COMPILATION_CACHE_DIR": str(folder), "JAX_COMPILATION_CACHE_MAX_SIZE": str(max_bytes)}
    saved_env = {k: os.environ.get(k) for k in env}
    saved = (jax.config.jax_compilation_cache_dir, jax.config.jax_compilation_cache_max_size)
    os.environ.update(env)
    cc.reset_cache()
    jax.config.update("jax_compilation_cache_dir", str(folder))
    jax.config.update("jax_compilation_cache_max_size", max_bytes)
    try:
        yield str(folder)
    finally:
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        jax.config.update("jax_compilation_cache_dir", saved[0])
        jax.config.update("jax_compilation_cache_max_size", saved[1])
        cc.reset_cache()


# One tiny MAR teacher run (2 steps, a checkpoint at step 2) trained once per session, shared by the training,
# distillation and ablation tests. Tests that write into a workdir take a copy (`copy_workdir`).
TEACHER_STEPS = 2


def tiny_teacher_config():
    from configs import mar as mar_configs
    cfg = mar_configs.get_config("tiny")
    cfg.unlock()
    cfg.train.update(num_steps=TEACHER_STEPS, ckpt_every=TEACHER_STEPS, sample_every=0, log_every=1)
    cfg.lock()
    return cfg


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """Workdir of `--mode=train --config=configs/mar.py:tiny` run for 2 steps (checkpoint at 2, no samples)."""
    from marval_jax.main import run
    workdir = str(tmp_path_factory.mktemp("tiny_teacher") / "run")
    run("train", tiny_teacher_config(), workdir)
    return workdir


@pytest.fixture
def copy_workdir(tiny_teacher, tmp_path):
    """A copy of the tiny teacher's workdir that a test may train on (resume) without touching the shared one."""
    def copy(name="run"):
        dst = str(tmp_path / name)
        shutil.copytree(tiny_teacher, dst)
        return dst
    return copy
