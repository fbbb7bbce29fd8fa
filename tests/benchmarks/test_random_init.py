"""marval_jax.benchmarks.random_init: the suite's and the scale check's random state is made leaf by leaf without
compiling an initialiser (jitting MAR-B's init as one program did not finish compiling on the H200 within the call's
435 s, 2026-11-29; on CPU that program alone takes ~100 s to compile)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from marval_jax.benchmarks import random_init, suite
from marval_jax.models.mar import MAR

COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


class Compiles:
    """Backend compiles (their durations) while the block runs."""

    def __enter__(self):
        self.durations = []
        self._cb = lambda event, duration, **kw: self.durations.append(duration) if event == COMPILE_EVENT else None
        jax.monitoring.register_event_duration_secs_listener(self._cb)
        return self

    def __exit__(self, *exc):
        jax.monitoring.unregister_event_duration_listener(self._cb)


def test_mar_b_random_state_compiles_no_initialiser():
    """The suite's startup for the real MAR-B config: 208M parameters in seconds, no program of the model built."""
    with Compiles() as c:
        graphdef, state = suite.random_state(suite.model_config("base"))
        jax.block_until_ready(state)
    # only small per-leaf programs (a few ms each); a jitted initialiser of the model is one ~100 s compile here
    assert max(c.durations, default=0.0) < 10.0 and len(c.durations) <= 30, c.durations
    leaves = jax.tree_util.tree_flatten_with_path(state)[0]
    assert sum(x.size for _, x in leaves) > 2.0e8
    assert all(x.dtype == jnp.float32 for _, x in leaves)
    names = {"/".join(random_init.path_names(p)): x for p, x in leaves}
    kernel = np.asarray(names["encoder_blocks/0/mlp/fc1/kernel"] if "encoder_blocks/0/mlp/fc1/kernel" in names
                        else next(x for n, x in names.items() if n.endswith("kernel") and x.size > 10 ** 5))
    assert abs(kernel.mean()) < 1e-3 and kernel.std() == pytest.approx(0.02, rel=0.02)
    scale = np.asarray(next(x for n, x in names.items() if n.endswith("norm1/scale")))
    assert scale.mean() == pytest.approx(1.0, abs=0.01) and scale.std() == pytest.approx(0.02, rel=0.3)
    model = nnx.merge(graphdef, state)  # the state fits the graph
    assert isinstance(model, MAR)


def test_train_state_rule_zero_optimizer_and_random_params():
    """The scale check's GSIM train state (tiny): optimizer state zeros (optax's init), parameters / EMA
    random, one small program per distinct zero shape at most; deterministic in the seed; onto given shardings."""
    from marval_jax.tools import scale_check as sc
    config = sc.load_config("gsim", "tiny", {"data": 1, "fsdp": 1, "tensor": 1}, None, 64)
    built = sc.build_case("gsim", config)
    abstract = jax.eval_shape(built.init_state, jax.random.PRNGKey(0))
    specs = random_init.specs(abstract, random_init.train_state_rule)
    assert {s for p, _, _, s in specs if "/opt_state/" in f"/{p}/"} == {("zeros",)}
    assert {s[0] for p, _, d, s in specs if p.split("/")[1:2] == ["params"]} == {"normal"}
    assert {s for p, _, _, s in specs if p == "rng"} == {("bits",)} and dict(
        (p, s) for p, _, _, s in specs)["step"] == ("zeros",)
    sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    with Compiles() as c:
        a = random_init.random_like(abstract, 3, random_init.train_state_rule, sharding)
        jax.block_until_ready(a)
    zero_shapes = {(shape, d) for _, shape, d, s in specs if s == ("zeros",)}
    assert len(c.durations) <= len(zero_shapes) + 3 and max(c.durations, default=0.0) < 1.0
    b = random_init.random_like(abstract, 3, random_init.train_state_rule)
    for (p, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_leaves(b)):
        assert x.shape == y.shape and x.dtype == y.dtype and np.array_equal(np.asarray(x), np.asarray(y)), p
        if "opt_state" in random_init.path_names(p):
            assert not np.any(np.asarray(x))
    assert jax.tree_util.tree_structure(a) == jax.tree_util.tree_structure(abstract)


def test_data_rule_and_specs():
    abstract = {"tokens": jax.ShapeDtypeStruct((4, 8, 2), jnp.float32), "labels": jax.ShapeDtypeStruct((4,), jnp.int32),
                "half": jax.ShapeDtypeStruct((3,), jnp.bfloat16)}
    out = random_init.random_like(abstract, 0, random_init.data_rule)
    assert out["labels"].dtype == jnp.int32 and 0 <= int(out["labels"].min()) and int(out["labels"].max()) < 10
    assert out["half"].dtype == jnp.bfloat16 and out["tokens"].shape == (4, 8, 2)
    assert random_init.param_rule(["x", "norm", "scale"], abstract["tokens"]) == ("normal", 1.0, 0.02)
    assert random_init.param_rule(["x", "fc", "kernel"], abstract["tokens"]) == ("normal", 0.0, 0.02)
    with pytest.raises(ValueError, match="unknown leaf spec"):
        random_init.random_like(abstract, 0, lambda names, leaf: ("uniform",))
