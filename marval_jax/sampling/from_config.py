"""The one place a `SamplerSpec` is built from a config: `sampler_from_config(config, role)`.

Roles and the fields they read (every role takes its encoder-length buckets from sample.num_buckets, the one
buckets field):
  "eval"          sampling programs (sample, evaluate, demo, ablations, the results tool): sample.num_iter,
                  sample.cfg, sample.cfg_schedule and the KV cache (sample.kv_cache, kv_reuse_after,
                  kv_refresh_every; checked against model.attention: "exact" needs a causal model, "approx" a
                  bidirectional one). The other roles never cache (training grids and the differentiated RL loop).
  "teacher_grid"  the grid a MAR teacher's training writes: train.sample_num_iter, train.sample_cfg, linear CFG
  "onestep_grid"  the grid a MARVAL distillation writes: train.sample_num_iter, no CFG (distilled into the student)
  "rl"            the RL trajectory and its grids: rl.num_iter, no CFG
`num_iter` / `cfg` override the config's values (sweeps over K or the guidance scale).
"""
from __future__ import annotations

from typing import Any

from marval_jax.sampling.ar_sampler import SamplerSpec
from marval_jax.sampling.decode import CachePolicy
from marval_jax.user_errors import UserError

ROLES = ("eval", "teacher_grid", "onestep_grid", "rl")


def sampler_from_config(config: Any, role: str, *, num_iter: int | None = None,
                        cfg: float | None = None) -> SamplerSpec:
    """The SamplerSpec of `role` (see the module docstring) from an ml_collections config."""
    sample = config.sample
    cache = CachePolicy("none")
    if role == "eval":
        k, scale, schedule = sample.num_iter, sample.cfg, sample.cfg_schedule
        cache = cache_policy_from_config(config)
    elif role == "teacher_grid":
        k, scale, schedule = config.train.sample_num_iter, config.train.sample_cfg, "linear"
    elif role == "onestep_grid":
        k, scale, schedule = config.train.sample_num_iter, 1.0, "linear"
    elif role == "rl":
        k, scale, schedule = config.rl.num_iter, 1.0, "linear"
    else:
        raise ValueError(f"sampler role must be one of {ROLES}, got {role!r}")
    k = int(k if num_iter is None else num_iter)
    scale = float(scale if cfg is None else cfg)
    return sampler_spec(k, scale, schedule, int(sample.num_buckets), iter_field=_iter_field(role), cache=cache)


KV_CACHE_KINDS = ("none", "approx", "exact")


def cache_policy_from_config(config: Any) -> CachePolicy:
    """The decode driver's CachePolicy of sample.kv_cache (with kv_reuse_after = r and kv_refresh_every = R for
    "approx"), checked against model.attention. A config without the fields (written before they existed) samples
    uncached."""
    sample = config.sample
    kind = sample.get("kv_cache", "none")
    if kind not in KV_CACHE_KINDS:
        raise UserError(f"sample.kv_cache must be one of {', '.join(KV_CACHE_KINDS)}, got {kind!r}")
    model = config.get("model") or {}
    attention = model.get("attention", "bidirectional")
    if kind == "none":
        return CachePolicy("none")
    if kind == "exact":
        if attention != "causal":
            raise UserError(f"sample.kv_cache='exact' needs model.attention='causal', the model is {attention!r}: "
                            "a bidirectional model's keys/values change every step; use sample.kv_cache='approx' "
                            "or 'none'")
        return CachePolicy("exact")
    if attention == "causal":
        raise UserError("sample.kv_cache='approx' is for bidirectional models; model.attention='causal' caches "
                        "exactly: use sample.kv_cache='exact'")
    r, big_r = int(sample.get("kv_reuse_after", 2)), int(sample.get("kv_refresh_every", 4))
    if r < 0:
        raise UserError(f"sample.kv_reuse_after must be >= 0 (steps whose tokens are recomputed), got {r}")
    if big_r < 1:
        raise UserError(f"sample.kv_refresh_every must be >= 1 (steps between full refreshes), got {big_r}")
    return CachePolicy("approx", r, big_r)


def sampler_spec(num_iter: int, cfg: float = 1.0, cfg_schedule: str = "linear", num_buckets: int = 1, *,
                 iter_field: str = "num_iter", cache=CachePolicy("none")) -> SamplerSpec:
    """The one constructor of a SamplerSpec, with its checks; for samplers whose settings are not a config's sample
    section (the benchmark suite's flags, GSIM's on-policy rollouts, RL's default). `iter_field` names the setting
    in the error; `cache` is a cache policy as `CachePolicy.parse` takes it."""
    if int(num_iter) < 1:
        raise UserError(f"the number of AR steps must be >= 1, got {num_iter}: set {iter_field} to a positive number")
    if int(num_buckets) < 1:
        raise UserError(f"sample.num_buckets must be >= 1, got {num_buckets}")
    if cfg_schedule not in ("linear", "constant"):
        raise UserError(f"sample.cfg_schedule must be 'linear' or 'constant', got {cfg_schedule!r}")
    return SamplerSpec(num_iter=int(num_iter), cfg=float(cfg), cfg_schedule=cfg_schedule,
                       num_buckets=int(num_buckets), cache=CachePolicy.parse(cache))


def _iter_field(role: str) -> str:
    return {"eval": "sample.num_iter", "rl": "rl.num_iter"}.get(role, "train.sample_num_iter")
