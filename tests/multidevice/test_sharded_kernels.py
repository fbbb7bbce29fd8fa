"""The Pallas kernels on a mesh: under `jax.set_mesh`, flash_attention and ln_linear run their call inside
shard_map (kernels/sharding.py), one slice per device, and give the single-device call's outputs and gradients;
the dropout bits are the single-device ones because the hash streams are computed on the global shapes.

8 forced CPU devices (tests/run_all.sh runs this directory in its own process with
XLA_FLAGS=--xla_force_host_platform_device_count=8); the kernels in interpret mode on tiny shapes.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import AbstractMesh, AxisType, NamedSharding, PartitionSpec as P

from configs import common
from marval_jax.kernels import sharding
from marval_jax.kernels.flash_attention import flash_attention
from marval_jax.kernels.fused_linear import ln_linear
from marval_jax.parallel import mesh as mesh_lib
from tolerances import ULP_TRANSCENDENTAL, assert_close_to_scale, assert_trees_close, max_abs

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs 8 devices (run via tests/run_all.sh)")

B, T, H, HD = 8, 16, 2, 16      # flash attention: q, k, v (B, T, H, HD), T = L
K, N = 32, 64                   # ln_linear: x (B, T, K) -> (B, T, N)
RATE = 0.25
# data=2, tensor=4: the tensor axis does not divide H = 2, so attention's operands are replicated over it and its
# gradients go through shard_map's transpose of an input that a mesh axis does not split. axis_types="explicit":
# shard_map takes operands only already laid out as its specs say (kernels/sharding.py reshards them first).
SHAPES = [dict(data=8), dict(data=4, tensor=2), dict(data=2, fsdp=2, tensor=2), dict(data=2, tensor=4),
          dict(data=2, fsdp=2, tensor=2, axis_types="explicit")]
BATCH = ("data", "fsdp")


def _mesh(shape):
    cfg = common.mesh_config(**{a: n for a, n in shape.items() if a in mesh_lib.AXES})
    cfg.axis_types = shape.get("axis_types", "auto")
    return mesh_lib.make_mesh(cfg)


def _ways(shape, axes):
    n = 1
    for a in axes:
        n *= shape.get(a, 1)
    return n


def _pallas_operand_shapes(jaxpr) -> list[tuple[int, ...]]:
    """The shape of the first operand of every pallas_call in a jaxpr, sub-jaxprs (jit, shard_map, custom_vjp)
    included: what one kernel invocation sees."""
    shapes = []

    def walk(jp):
        for eqn in jp.eqns:
            if eqn.primitive.name == "pallas_call":
                shapes.append(tuple(eqn.invars[0].aval.shape))
            for v in eqn.params.values():
                for sub in (v if isinstance(v, (tuple, list)) else (v,)):
                    if hasattr(sub, "eqns"):
                        walk(sub)
                    elif hasattr(sub, "jaxpr") and hasattr(sub.jaxpr, "eqns"):
                        walk(sub.jaxpr)
    walk(jaxpr.jaxpr)
    return shapes


def _forward_and_vjp(f, args, ct):
    out, vjp = jax.vjp(f, *args)
    return out, vjp(ct)


# ---------------------------------------------------------------- flash attention

def _flash_inputs():
    ks = jax.random.split(jax.random.key(0), 5)
    q, k, v = (jax.random.normal(kk, (B, T, H, HD)) for kk in ks[:3])
    key_mask = (jax.random.uniform(ks[3], (B, T)) > 0.3).at[:, 0].set(True)  # every row keeps a key
    ct = jax.random.normal(ks[4], (B, T, H, HD))
    return (q, k, v), key_mask, ct


def _flash_step(q, k, v, key_mask, ct):
    """Forward and (q, k, v) cotangents of flash attention with dropout and a key mask, in one program."""
    def f(q, k, v):
        return flash_attention(q, k, v, dropout_rate=RATE, seed=jnp.uint32(1234), key_mask=key_mask, block_q=8,
                               block_k=8, interpret=True)
    return _forward_and_vjp(f, (q, k, v), ct)


@pytest.fixture(scope="module")
def flash_single():
    qkv, key_mask, ct = _flash_inputs()
    with jax.default_device(jax.devices()[0]):
        return qkv, key_mask, ct, jax.jit(_flash_step)(*qkv, key_mask, ct)


def _flash_depth():
    """flash_attention's test depth (tests/kernels/test_flash_attention.py): q.k over HD, the scale, the max
    subtraction, exp, the row sum and p.v over L, the division and the dropout scale."""
    return HD + 2 * T + ULP_TRANSCENDENTAL + 4


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_flash_attention_on_a_mesh_is_the_single_device_call(flash_single, shape):
    (q, k, v), key_mask, ct, (want_out, want_grads) = flash_single
    mesh = _mesh(shape)
    heads = "tensor" if H % shape.get("tensor", 1) == 0 else None
    qkv_shd = NamedSharding(mesh, P(BATCH, None, heads, None))
    args = [jax.device_put(x, qkv_shd) for x in (q, k, v)]
    args += [jax.device_put(key_mask, NamedSharding(mesh, P(BATCH))), jax.device_put(ct, qkv_shd)]
    with jax.set_mesh(mesh):
        step = jax.jit(_flash_step)
        out, grads = step(*args)
        kernel_shapes = _pallas_operand_shapes(jax.make_jaxpr(_flash_step)(*args))
    # One kernel call per device's slice: the forward, dk/dv and dq kernels each see q's local block.
    local = (B // _ways(shape, BATCH), T, H // _ways(shape, (heads,) if heads else ()), HD)
    assert len(kernel_shapes) == 3 and set(kernel_shapes) == {local}, kernel_shapes
    # Per (batch, head) the same kernel on the same bits; the dropout mask is a hash of the global indices, so a
    # device that drew its own slice's bits would move outputs by O(scale), far above this bound.
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) * HD ** -0.5
    scale = max_abs(v) * (1.0 + max_abs(logits)) / (1.0 - RATE)
    assert_close_to_scale(out, want_out, _flash_depth(), scale=scale)
    assert_trees_close(jax.device_get(grads), jax.device_get(want_grads), 3 * _flash_depth())


# ---------------------------------------------------------------- LayerNorm -> Linear -> GELU

def _ln_inputs():
    ks = jax.random.split(jax.random.key(1), 6)
    x = jax.random.normal(ks[0], (B, T, K))
    gamma = 1.0 + 0.2 * jax.random.normal(ks[1], (K,))
    beta = 0.2 * jax.random.normal(ks[2], (K,))
    w = jax.random.normal(ks[3], (K, N)) * K ** -0.5
    b = 0.3 * jax.random.normal(ks[4], (N,))
    return (x, gamma, beta, w, b), jax.random.normal(ks[5], (B, T, N))


def _ln_step(x, gamma, beta, w, b, ct):
    f = functools.partial(ln_linear, activation="gelu", interpret=True, block_m=16)
    return _forward_and_vjp(f, (x, gamma, beta, w, b), ct)


@pytest.fixture(scope="module")
def ln_single():
    args, ct = _ln_inputs()
    with jax.default_device(jax.devices()[0]):
        return args, ct, jax.jit(_ln_step)(*args, ct)


def _ln_depth():
    """ln_linear's test depth (tests/kernels/test_fused_linear.py): LayerNorm over K (2K + 3), the dot over K, the
    bias add, GELU."""
    return 2 * K + 3 + K + 1 + ULP_TRANSCENDENTAL + 3


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_ln_linear_on_a_mesh_is_the_single_device_call(ln_single, shape):
    (x, gamma, beta, w, b), ct, (want_out, want_grads) = ln_single
    mesh = _mesh(shape)
    rows, cols = NamedSharding(mesh, P(BATCH)), NamedSharding(mesh, P(None, "tensor"))
    args = (jax.device_put(x, rows), gamma, beta, jax.device_put(w, cols),
            jax.device_put(b, NamedSharding(mesh, P("tensor"))),
            jax.device_put(ct, NamedSharding(mesh, P(BATCH, None, "tensor"))))  # laid out as the output is
    with jax.set_mesh(mesh):
        out, grads = jax.jit(_ln_step)(*args)
        kernel_shapes = _pallas_operand_shapes(jax.make_jaxpr(_ln_step)(*args))
    # The kernel sees x's local rows flattened, (B T / batch ways, K); its backward is XLA's (no kernel).
    assert kernel_shapes == [(B * T // _ways(shape, BATCH), K)], kernel_shapes
    assert_close_to_scale(out, want_out, _ln_depth())
    # The weight gradients sum over the B * T rows in per-device partial sums plus an all-reduce.
    assert_trees_close(jax.device_get(grads), jax.device_get(want_grads), 3 * _ln_depth() + B * T)


# ---------------------------------------------------------------- the splitting rule

def test_split_axes_takes_the_axes_that_divide():
    mesh = AbstractMesh((2, 2, 2), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    assert sharding.split_axes(mesh, 8, BATCH) == ("data", "fsdp")
    assert sharding.split_axes(mesh, 2, BATCH) == ("data",)       # fsdp would not divide: replicated over it
    assert sharding.split_axes(mesh, 3, BATCH) == ()
    assert sharding.split_axes(mesh, 6, ("tensor",)) == ("tensor",)
    assert sharding.split_axes(None, 8, BATCH) == ()
    ones = AbstractMesh((8, 1, 1), ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)
    assert sharding.split_axes(ones, 8, BATCH) == ("data",)       # a size-1 axis is left out of the spec


def test_no_mesh_one_device_or_inside_a_shard_map_is_a_plain_call():
    assert sharding.context_mesh() is None
    with jax.set_mesh(mesh_lib.make_mesh(common.mesh_config(data=1), devices=jax.devices()[:1])):
        assert sharding.context_mesh() is None
    mesh = _mesh(dict(data=8))
    seen = []

    def body(x):
        seen.append(sharding.context_mesh())
        return x
    with jax.set_mesh(mesh):
        assert sharding.context_mesh() is not None
        jax.jit(jax.shard_map(body, in_specs=P("data"), out_specs=P("data")))(jnp.zeros(8))
    assert seen == [None]   # every axis is manual already: the kernel runs on the slice it is given


def test_the_training_loop_traces_its_step_under_the_mesh(tmp_path):
    """train/loop.py runs its jitted step under jax.set_mesh, so a kernel in the step sees the mesh while the step
    is traced (and splits itself); through the real loop (mesh, orbax, lock) with a one-kernel task, 8 devices."""
    from configs import mar as mar_configs
    from marval_jax.train.loop import Task, train
    seen = []

    def train_step(state, batch):
        seen.append(sharding.context_mesh())
        x = jnp.broadcast_to(batch["labels"].astype(jnp.float32)[:, None, None], (B, T, K))
        x = x + jnp.arange(K, dtype=jnp.float32)
        out = ln_linear(x, jnp.ones((K,)), jnp.zeros((K,)), state["w"], jnp.zeros((N,)), interpret=True)
        return state, {"loss": jnp.mean(out), "grad_norm": jnp.float32(0.0)}

    task = Task("kernel", lambda rng: {"w": jnp.ones((K, N)) / K}, train_step, logical_axes=[], uses_data=False)
    cfg = mar_configs.get_config("tiny")
    cfg.unlock()
    cfg.train.update(dict(num_steps=1, ckpt_every=1, log_every=1, sample_every=0, async_checkpoints=False,
                          global_batch_size=B))
    cfg.lock()
    train(cfg, str(tmp_path / "run"), task)
    assert len(seen) == 1 and seen[0] is not None and dict(seen[0].shape)["data"] == 8, seen
