"""KV-cached masked-AR sampling: the loop of marval_jax/sampling/ar_sampler.py without re-running the whole
transformer every step.

The cache is an explicit pytree made by `init_cache`: {"encoder": [{"k", "v"} per block], "decoder": [...]}, each
(B, L, heads, hd) with L = buffer + S + 1 in the model's (buffer + S) layout; the last slot is a scratch row that
padded query rows write to and no query ever attends to. It is carried through the `lax.fori_loop`s with the tokens;
nothing is mutable.

Per AR step k (segments, RNG use and predictor calls exactly as `make_sampler`, so outputs are comparable):
  1. ingest: the tokens of the last w steps (static cap per segment, padded rows written to the scratch slot) go
     through encoder and decoder as queries against the caches, writing their keys/values at their positions
     (before the loop the buffer rows are ingested the same way);
  2. predict: only the positions predicted at step k go through the decoder, as mask-token queries against the
     decoder cache (their own keys/values are written into a throw-away copy); decoder_norm + diffusion position
     embedding give the head condition z of those rows, then the predictor.

Policies (`policy` argument):
  - "exact", for `attention="causal"` models: w = 1 (the previous step's tokens). Under the causal rule of
    marval_jax/models/mar.py a visible token's keys/values never change after it is generated, so this equals the
    uncached sampler up to float summation order (tests/sampling/test_cached_sampler.py, float32, 1e-5).
  - ("approx", r, R), for bidirectional models (MAR, MARVAL): every R-th step (step % R == 0, so step 0 always) is a
    refresh: the uncached pass of `make_sampler` computes z, and every block's keys/values of all rows (buffer and
    visible rows of the encoder, every position of the decoder, mask tokens included) overwrite the cache. Other
    steps ingest the tokens generated in the last max(r, 1) steps (keys/values of older tokens, and the decoder's
    mask-token keys/values from the last refresh, are reused) with bidirectional masks: ingested encoder rows attend
    to buffer + every visible token, decoder rows and mask-token queries to every position. This is an
    approximation (docs/kv_cache.md); R = 1 refreshes every step and equals `make_sampler` exactly.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from marval_jax.models.mar import MAR, MARConfig, causal_mask, kept_positions
from marval_jax.models.transformer import cast_linear_params, init_kv_cache, run_blocks
from marval_jax.parallel.compiler_options import BatchJit
from marval_jax.sampling import ar_sampler
from marval_jax.sampling.ar_sampler import Predictor, SamplerSpec
from marval_jax.sampling.schedule import ar_schedule, plan_segments

Cache = dict[str, list[dict[str, jax.Array]]]


@dataclasses.dataclass(frozen=True)
class CachePolicy:
    kind: str               # "exact" (causal models) | "approx" (bidirectional models)
    reuse_after: int = 1    # r: recompute the tokens of the last max(r, 1) steps, reuse older ones
    refresh_every: int = 1  # R: a full uncached pass refreshes the whole cache every R steps

    @property
    def window(self) -> int:
        return 1 if self.kind == "exact" else max(self.reuse_after, 1)

    @classmethod
    def parse(cls, policy) -> "CachePolicy":
        if isinstance(policy, CachePolicy):
            return policy
        if policy == "exact":
            return cls("exact")
        if isinstance(policy, (tuple, list)) and len(policy) == 3 and policy[0] == "approx":
            r, big_r = int(policy[1]), int(policy[2])
            if r < 0 or big_r < 1:
                raise ValueError(f"cache policy ('approx', r, R) needs r >= 0 and R >= 1, got {tuple(policy)}")
            return cls("approx", r, big_r)
        raise ValueError(f"cache policy must be 'exact' or ('approx', r, R), got {policy!r}")


def cache_len(cfg: MARConfig) -> int:
    """Cache rows: buffer + S positions of the model layout, plus one scratch row for padded queries."""
    return cfg.buffer_size + cfg.seq_len + 1


def init_cache(cfg: MARConfig, batch: int) -> Cache:
    """Zero caches for `batch` rows (2B with classifier-free guidance: conditional then unconditional half)."""
    n = cache_len(cfg)
    return {
        "encoder": [init_kv_cache(batch, n, cfg.encoder_num_heads, cfg.encoder_embed_dim // cfg.encoder_num_heads,
                                  cfg.jnp_dtype) for _ in range(cfg.encoder_depth)],
        "decoder": [init_kv_cache(batch, n, cfg.decoder_num_heads, cfg.decoder_embed_dim // cfg.decoder_num_heads,
                                  cfg.jnp_dtype) for _ in range(cfg.decoder_depth)],
    }


def key_ranks(gen_rank: jax.Array, buffer_size: int) -> jax.Array:
    """Generation rank of every cache row (B, L): -1 buffer, gen_rank, then a rank above all for the scratch row."""
    b, s = gen_rank.shape
    return jnp.concatenate([jnp.full((b, buffer_size), -1, jnp.int32), gen_rank.astype(jnp.int32),
                            jnp.full((b, 1), buffer_size + s, jnp.int32)], axis=1)


def _rows(a: jax.Array, idx: jax.Array) -> jax.Array:
    """a (B, N, ...) at idx (B, P) -> (B, P, ...)."""
    return jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)


def _pos_rows(table: jax.Array, lpos: jax.Array) -> jax.Array:
    """A learned (1, N, D) position table at (B, P) indices."""
    return jnp.take(table[0], lpos, axis=0)


def embed_buffer(model: MAR, class_emb: jax.Array) -> jax.Array:
    """Encoder inputs of the buffer rows (B, Bf, De), as MAR.encoder_inputs computes them."""
    cfg = model.cfg
    dt = cfg.jnp_dtype
    b = class_emb.shape[0]
    x = jnp.broadcast_to(class_emb[:, None, :].astype(dt), (b, cfg.buffer_size, class_emb.shape[-1]))
    return model.z_proj_ln(x + model.encoder_pos_embed_learned[...][:, :cfg.buffer_size].astype(dt))


def embed_tokens(model: MAR, tokens: jax.Array, lpos: jax.Array) -> jax.Array:
    """Encoder inputs (B, P, De) of token rows (B, P, C) at layout positions lpos (B, P)."""
    x = model.z_proj(tokens)
    return model.z_proj_ln(x + _pos_rows(model.encoder_pos_embed_learned[...], lpos).astype(x.dtype))


def ingest(model: MAR, cache: Cache, x: jax.Array, lpos: jax.Array, cpos: jax.Array, enc_mask: jax.Array,
           dec_mask: jax.Array) -> Cache:
    """Runs encoder input rows x (B, P, De) at layout positions lpos through encoder and decoder as queries against
    the caches, writing their keys/values at cpos (lpos, or the scratch row for padding). Returns the new cache."""
    x, enc = run_blocks(model.encoder_blocks, x, mask=enc_mask, caches=cache["encoder"], cache_positions=cpos)
    x = model.decoder_embed(model.encoder_norm(x))
    x = x + _pos_rows(model.decoder_pos_embed_learned[...], lpos).astype(x.dtype)
    _, dec = run_blocks(model.decoder_blocks, x, mask=dec_mask, caches=cache["decoder"], cache_positions=cpos)
    return {"encoder": enc, "decoder": dec}


def predict_condition(model: MAR, cache: Cache, pos: jax.Array, cpos: jax.Array, mask: jax.Array) -> jax.Array:
    """Head condition z (B, P, Dd) of positions pos (B, P): mask-token queries against the decoder cache (their own
    keys/values go to a copy of the cache that is dropped)."""
    bf = model.cfg.buffer_size
    x = jnp.broadcast_to(model.mask_token[...], pos.shape + (model.mask_token.shape[-1],))
    x = x.astype(model.cfg.jnp_dtype)
    x = x + _pos_rows(model.decoder_pos_embed_learned[...], pos + bf).astype(x.dtype)
    x, _ = run_blocks(model.decoder_blocks, x, mask=mask, caches=cache["decoder"], cache_positions=cpos)
    x = model.decoder_norm(x)
    return x + _pos_rows(model.diffusion_pos_embed_learned[...], pos).astype(x.dtype)


def refresh(model: MAR, cache: Cache, tokens: jax.Array, mask: jax.Array, class_emb: jax.Array, *,
            enc_len: int) -> tuple[jax.Array, Cache]:
    """The uncached pass (MAR.condition, bidirectional) returning z (B, S, Dd) and a cache overwritten with every
    block's keys/values: encoder rows at their kept positions, decoder rows at every position."""
    scratch = cache_len(model.cfg) - 1
    enc, keep, valid, enc_kv = model.encode(tokens, mask, class_emb, enc_len=enc_len, return_kv=True)
    z, dec_kv = model.decode(enc, keep, return_kv=True)
    idx, _, _ = kept_positions(mask, model.cfg.buffer_size, enc_len)
    cpos = jnp.where(valid, idx, scratch)
    rows = jnp.arange(tokens.shape[0])[:, None]

    def put_rows(c, kv):
        return {n: c[n].at[rows, cpos].set(kv[n].astype(c[n].dtype)) for n in ("k", "v")}

    def put_all(c, kv):
        return {n: c[n].at[:, :scratch].set(kv[n].astype(c[n].dtype)) for n in ("k", "v")}

    return z, {"encoder": [put_rows(c, kv) for c, kv in zip(cache["encoder"], enc_kv)],
               "decoder": [put_all(c, kv) for c, kv in zip(cache["decoder"], dec_kv)]}


def _window_counts(masked_before: np.ndarray, window: int) -> np.ndarray:
    """Tokens to ingest at the start of step k: those generated in steps k - window .. k - 1."""
    k = np.arange(len(masked_before))
    return (masked_before[np.maximum(k - window, 0)] - masked_before).astype(np.int32)


def make_cached_sampler(graphdef: nnx.GraphDef, spec: SamplerSpec, predictor: Predictor, *, seq_len: int,
                        buffer_size: int, token_dim: int, policy="exact"):
    """Returns a jitted `sample(state, labels (B,), rng) -> tokens (B, S, C)` with make_sampler's signature, the
    same orders, segments and per-step predictor keys; the transformer runs only on new and predicted rows.

    policy: "exact" (attention="causal" models only) or ("approx", r, R) (bidirectional models only)."""
    pol = CachePolicy.parse(policy)
    sched = ar_schedule(seq_len, spec.num_iter)
    segments = plan_segments(sched, buffer_size, spec.num_buckets)
    use_cfg = spec.cfg != 1.0
    win = _window_counts(sched.masked_before, pol.window)
    refresh_step = (np.arange(spec.num_iter) % pol.refresh_every == 0) if pol.kind == "approx" else \
        np.zeros(spec.num_iter, bool)
    # static ingest cap per segment: the largest window among its steps that ingest (at least one row)
    win_caps = [max([int(win[k]) for k in range(sg.start, sg.stop) if not refresh_step[k]] + [1]) for sg in segments]
    sched_np = (sched.masked_before.astype(np.int32), sched.n_pred.astype(np.int32),
                sched.cfg(spec.cfg, spec.cfg_schedule).astype(np.float32), win)

    def sample(state, labels, rng):
        model = cast_linear_params(nnx.merge(graphdef, state))  # weights in bf16 once, not at every AR step
        cfg = model.cfg
        if cfg.seq_len != seq_len or cfg.buffer_size != buffer_size:
            raise ValueError(f"model has (seq_len, buffer_size) = {(cfg.seq_len, cfg.buffer_size)}, sampler was built "
                             f"for {(seq_len, buffer_size)}")
        if pol.kind == "exact" and not model.causal:
            raise ValueError("cache policy 'exact' needs a model with attention='causal'; a bidirectional model's "
                             "keys/values change every step: use ('approx', r, R)")
        if pol.kind == "approx" and model.causal:
            raise ValueError("cache policy ('approx', r, R) is for bidirectional models; a causal model caches "
                             "exactly with policy 'exact'")
        b = labels.shape[0]
        orders, rank, null, class_emb, r_loop = ar_sampler.loop_inputs(model, labels, rng, seq_len)
        dup = (lambda a: jnp.concatenate([a, a], axis=0)) if use_cfg else (lambda a: a)
        cond_emb = jnp.concatenate([class_emb, null]) if use_cfg else class_emb
        b2 = 2 * b if use_cfg else b
        orders2 = dup(orders)
        gen_rank2 = dup(seq_len - 1 - rank)
        krank = key_ranks(gen_rank2, buffer_size)                    # (B2, L)
        scratch = buffer_size + seq_len
        not_scratch = krank < scratch
        iota = jnp.arange(scratch + 1)
        sched_arrays = tuple(jnp.asarray(a) for a in sched_np)

        cache = init_cache(cfg, b2)
        if pol.kind == "exact":  # the buffer, as queries of rank -1 (they attend to the buffer only)
            lpos = jnp.broadcast_to(jnp.arange(buffer_size), (b2, buffer_size))
            m = causal_mask(jnp.full((b2, buffer_size), -1, jnp.int32), krank, not_scratch,
                            jnp.zeros((b2, buffer_size), bool))
            cache = ingest(model, cache, embed_buffer(model, cond_emb), lpos, lpos, m, m)

        def step_fn(step, carry, seg, win_cap):
            tokens, cache = carry
            masked_before, n_pred, cfg_k, n_win = (a[step] for a in sched_arrays)
            mask_next = masked_before - n_pred
            n_visible = seq_len - masked_before
            slot = jnp.arange(seg.pred_cap)
            valid = slot[None, :] < n_pred
            pos = jnp.take_along_axis(orders2, jnp.broadcast_to(jnp.minimum(mask_next + slot, seq_len - 1),
                                                                (b2, seg.pred_cap)), axis=1)
            cpos = jnp.where(valid, pos + buffer_size, scratch)
            own = iota[None, None, :] == cpos[:, :, None]

            def incremental(cache):
                wslot = jnp.arange(win_cap)
                wvalid = wslot[None, :] < n_win
                wpos = jnp.take_along_axis(orders2, jnp.broadcast_to(jnp.minimum(masked_before + wslot, seq_len - 1),
                                                                     (b2, win_cap)), axis=1)
                wl = wpos + buffer_size
                wc = jnp.where(wvalid, wl, scratch)
                x = embed_tokens(model, _rows(dup(tokens), wpos), wl)
                if pol.kind == "exact":
                    m = causal_mask(_rows(krank, wl), krank, not_scratch, jnp.zeros(wl.shape, bool))
                    cache = ingest(model, cache, x, wl, wc, m, m)
                    pm = causal_mask(_rows(krank, pos + buffer_size), krank, krank < n_visible,
                                     jnp.ones(pos.shape, bool), own)
                else:
                    enc_m = (krank < n_visible)[:, None, None, :]
                    all_m = not_scratch[:, None, None, :]
                    cache = ingest(model, cache, x, wl, wc, enc_m, all_m)
                    pm = all_m
                return predict_condition(model, cache, pos, cpos, pm), cache

            def full(cache):
                mask = (rank < masked_before).astype(jnp.float32)
                z, cache = refresh(model, cache, dup(tokens), dup(mask), cond_emb, enc_len=seg.enc_len)
                return _rows(z, pos), cache

            seg_refresh = refresh_step[seg.start:seg.stop]
            if seg_refresh.all():
                z, cache = full(cache)
            elif not seg_refresh.any():
                z, cache = incremental(cache)
            else:
                z, cache = jax.lax.cond(step % pol.refresh_every == 0, full, incremental, cache)
            z = z.reshape(b2 * seg.pred_cap, -1)
            zc, zu = jnp.split(z, 2, axis=0) if use_cfg else (z, None)
            new = predictor(model, zc, zu, cfg_k, jax.random.fold_in(r_loop, step)).reshape(b, seg.pred_cap, -1)
            pos_w = jnp.where(valid, pos[:b], seq_len)  # invalid rows go out of bounds and are dropped
            tokens = tokens.at[jnp.arange(b)[:, None], pos_w].set(new.astype(tokens.dtype), mode="drop")
            return tokens, cache

        tokens = jnp.zeros((b, seq_len, token_dim), jnp.float32)
        carry = (tokens, cache)
        for seg, cap in zip(segments, win_caps):
            carry = jax.lax.fori_loop(seg.start, seg.stop,
                                      lambda k, c, seg=seg, cap=cap: step_fn(k, c, seg, cap), carry)
        return carry[0]

    return BatchJit(sample, batch_of=lambda state, labels, rng: labels.shape[0])
