"""Random arrays for benchmarks and memory checks, made leaf by leaf without compiling any initialiser.

Jitting a model's whole initialiser (`jax.jit(lambda key: nnx.state(MAR(cfg, rngs=...)))`) makes one program of
hundreds of RNG and initializer ops; on the H200 (jax 0.11.2) XLA was still compiling that program for MAR-B when the
benchmark call was killed at 435 s (docs/benchmarks.md, Status). Timing and memory do not depend on the values, so
the shapes come from `eval_shape` and each leaf is made on its own:

- floating leaves are drawn on the host with NumPy (a `np.random.Generator` per leaf, seeded by (seed, leaf index),
  leaves drawn by a pool of threads) and copied to the device with `jax.device_put` (onto the leaf's sharding, if
  one is given): no device program at all;
- zero leaves (optimizer moments and counters) are `jnp.zeros` on the device: one tiny program per (shape, dtype,
  sharding), nothing copied;
- integer leaves are zeros, random class ids or random bits, as the rule says.

MAR-B (208M float32 parameters, 0.8 GB) takes ~5 s on a shared 2-core CPU, the MARVAL-B GSIM train state (7.5 GB,
of which 3.3 GB optimizer zeros) ~25 s there; more cores draw leaves in parallel.

A rule maps (path names, abstract leaf) to a spec: ("normal", mean, std), ("zeros",), ("randint", low, high),
("bits",) (uniform uint32, e.g. a raw PRNG key) or ("key",) (typed PRNG keys).
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

PARAM_STD = 0.02  # every floating parameter: N(mean, 0.02^2), mean 1 for norm scales, 0 otherwise

Spec = tuple
Rule = Callable[[list[str], Any], Spec]


def path_names(path) -> list[str]:
    """Key path -> names, e.g. ['generator', 'opt_state', '1', '0', 'mu', 'encoder_blocks', '0', 'norm1', 'scale']
    (flax's trailing `.value` dropped)."""
    out = []
    for k in path:
        for attr in ("key", "name", "idx"):
            if hasattr(k, attr):
                out.append(str(getattr(k, attr)))
                break
        else:
            out.append(str(k))
    return [n for n in out if n != "value"]


def _is_key(dtype) -> bool:
    return jnp.issubdtype(dtype, jax.dtypes.prng_key)


def param_rule(names: list[str], leaf) -> Spec:
    """Model parameters: N(0, 0.02^2), norm scales (flax's LayerNorm `scale`) 1 + N(0, 0.02^2); integers zero."""
    if _is_key(leaf.dtype):
        return ("key",)
    if jnp.issubdtype(leaf.dtype, jnp.floating):
        return ("normal", 1.0 if names and names[-1] == "scale" else 0.0, PARAM_STD)
    if names and names[-1] in ("rng", "key"):
        return ("bits",)
    return ("zeros",)


def train_state_rule(names: list[str], leaf) -> Spec:
    """A train state: the optimizer's state zero (what optax's init makes: Adam moments and step counts), every
    other leaf (params, EMA, frozen copies) as `param_rule`; the step counter zero, a raw rng key random bits."""
    if "opt_state" in names and not _is_key(leaf.dtype):
        return ("zeros",)
    return param_rule(names, leaf)


def data_rule(names: list[str], leaf) -> Spec:
    """A batch or frozen inputs: floats 0.5 x N(0, 1), integers a class id in [0, 10) (valid in every config)."""
    if _is_key(leaf.dtype):
        return ("key",)
    if jnp.issubdtype(leaf.dtype, jnp.floating):
        return ("normal", 0.0, 0.5)
    return ("randint", 0, 10)


def _put(x: np.ndarray, sharding):
    return jax.device_put(x, sharding) if sharding is not None else jax.device_put(x)


def make_leaf(spec: Spec, shape: tuple, dtype, rng: np.random.Generator, sharding=None, seed: int = 0):
    kind = spec[0]
    if kind == "normal":
        _, mean, std = spec
        x = rng.standard_normal(shape, dtype=np.float32)
        x *= np.float32(std)
        if mean:
            x += np.float32(mean)
        return _put(x.astype(jnp.dtype(dtype), copy=False), sharding)
    if kind == "zeros":
        return jnp.zeros(shape, dtype, device=sharding)
    if kind == "randint":
        return _put(rng.integers(spec[1], spec[2], size=shape).astype(jnp.dtype(dtype)), sharding)
    if kind == "bits":
        bits = rng.integers(0, 2 ** 32, size=shape, dtype=np.uint64).astype(np.uint32)
        return _put(bits.astype(jnp.dtype(dtype)), sharding)
    if kind == "key":
        keys = jax.random.split(jax.random.key(seed), int(np.prod(shape, dtype=np.int64)) or 1)
        keys = keys[: int(np.prod(shape, dtype=np.int64))].reshape(shape)
        if keys.dtype != dtype:
            raise ValueError(f"typed PRNG key leaf of {dtype}: only the default implementation ({keys.dtype}) is made")
        return jax.device_put(keys, sharding) if sharding is not None else keys
    raise ValueError(f"unknown leaf spec {spec!r}")


def random_like(abstract, seed: int = 0, rule: Rule = param_rule, shardings=None):
    """A tree of arrays shaped like `abstract` (ShapeDtypeStructs or arrays, any pytree, e.g. an nnx.State from
    `nnx.eval_shape`), each leaf made by `make_leaf(rule(names, leaf))`, on `shardings` (a matching tree of
    shardings, or one sharding for all) or the default device. Deterministic in `seed` (leaf i draws from
    `np.random.default_rng((seed, i))`); compiles nothing per model (only `jnp.zeros` per distinct zero shape)."""
    flat, treedef = jax.tree_util.tree_flatten_with_path(abstract)
    if shardings is None or isinstance(shardings, jax.sharding.Sharding):
        shards = [shardings] * len(flat)
    else:
        shards = jax.tree_util.tree_leaves(shardings, is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
        if len(shards) != len(flat):
            raise ValueError(f"{len(shards)} shardings for {len(flat)} leaves")

    def one(i: int):
        (path, leaf), s = flat[i], shards[i]
        return make_leaf(rule(path_names(path), leaf), tuple(leaf.shape), leaf.dtype,
                         np.random.default_rng((seed, i)), s, seed)

    workers = max(1, min(16, os.cpu_count() or 1, len(flat)))
    if workers == 1:
        leaves = [one(i) for i in range(len(flat))]
    else:  # NumPy's generators release the GIL while filling: one generator per leaf, leaves in parallel
        with ThreadPoolExecutor(workers) as pool:
            leaves = list(pool.map(one, range(len(flat))))
    return jax.tree_util.tree_unflatten(treedef, leaves)


def specs(abstract, rule: Rule = param_rule) -> list[tuple[str, tuple, str, Spec]]:
    """(path, shape, dtype, spec) of every leaf: what `random_like` makes (tests, reports)."""
    return [("/".join(path_names(p)), tuple(x.shape), str(x.dtype), rule(path_names(p), x))
            for p, x in jax.tree_util.tree_flatten_with_path(abstract)[0]]
