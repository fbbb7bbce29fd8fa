"""The one masked-AR decode driver: every sampler (teacher, one-step, KV-cached, RL) is this loop with arguments.

The loop of the reference `sample_tokens`: random orders (`schedule.random_orders`), the cosine schedule of
marval_jax/sampling/schedule.py, one transformer pass per step (CFG fused into one batch of 2B rows) and a
per-token predictor for the tokens of that step. Its state is a `DecodeState` carried through `lax.scan`s, one per
static-shape segment of the schedule (`plan_segments`: static encoder length and predicted rows; invalid rows are
dropped on write), so the whole loop is one XLA program with no host round trip per step.

Arguments (`make_plan`):
  cache policy  "none": every step re-runs the whole transformer (`MAR.condition`).
                "exact" (attention="causal" models) and ("approx", r, R) (bidirectional models): the KV cache of
                `MAR.encode` / `MAR.decode` in row mode; see `CachePolicy` and docs/kv_cache.md.
  gradients     differentiable=True: the loop is differentiated (RL). backprop_steps k >= 1 truncates it: the first
                K - k steps run on stop_gradient'ed parameters and their tokens are stop_gradient'ed, so they keep
                no residuals; -1 keeps the gradient through all K steps.
  remat         jax.checkpoint around each differentiated step: only the carried state is kept per step.

Step k's predictor key is fold_in(rng_loop, k) and the orders come from the first half of the sampler's key, for
every policy, so the samplers are comparable sample for sample. The model is reached only through its public API
(`class_embedding`, `condition`, `encode`, `decode`, the head in the predictor); `model_of(params)` builds it inside
each step so that gradients and remat see the parameters.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from marval_jax.models.mar import MAR, cache_len, causal_mask, init_cache, kept_positions
from marval_jax.sampling.schedule import ar_schedule, plan_segments, random_orders

# predictor(model, z_cond (N, D), z_uncond (N, D) | None, cfg_scale, rng) -> tokens (N, C)
Predictor = Callable[[MAR, jax.Array, jax.Array | None, jax.Array, jax.Array], jax.Array]


@flax.struct.dataclass
class DecodeState:
    tokens: jax.Array   # (B, S, C) float32; zeros where not generated yet
    mask: jax.Array     # (B, S) float32, 1 = still masked when `step` starts
    order: jax.Array    # (B, S) generation order: its end is generated first
    step: jax.Array     # () int32, the next AR step
    cache: Any          # the model's KV cache (2B rows with CFG), or None for cache policy "none"
    rng: jax.Array      # loop key: step k's predictor draws from fold_in(rng, k)


@dataclasses.dataclass(frozen=True)
class CachePolicy:
    kind: str               # "none" | "exact" (causal models) | "approx" (bidirectional models)
    reuse_after: int = 1    # r: recompute the tokens of the last max(r, 1) steps, reuse older ones
    refresh_every: int = 1  # R: a full uncached pass refreshes the whole cache every R steps

    @property
    def label(self) -> str:
        """"none", "exact" or "approx r=.. R=..": the policy as reports and file names show it."""
        return f"approx r={self.reuse_after} R={self.refresh_every}" if self.kind == "approx" else self.kind

    @property
    def window(self) -> int:
        return 1 if self.kind == "exact" else max(self.reuse_after, 1)

    @classmethod
    def parse(cls, policy) -> "CachePolicy":
        if isinstance(policy, CachePolicy):
            return policy
        if policy in (None, "none"):
            return cls("none")
        if policy == "exact":
            return cls("exact")
        if isinstance(policy, (tuple, list)) and len(policy) == 3 and policy[0] == "approx":
            r, big_r = int(policy[1]), int(policy[2])
            if r < 0 or big_r < 1:
                raise ValueError(f"cache policy ('approx', r, R) needs r >= 0 and R >= 1, got {tuple(policy)}")
            return cls("approx", r, big_r)
        raise ValueError(f"cache policy must be 'none', 'exact' or ('approx', r, R), got {policy!r}")


@dataclasses.dataclass(frozen=True)
class Piece:
    """Steps [start, stop) of one segment on one side of the truncation boundary, with the segment's static
    shapes: encoder length, predicted rows and (cached policies) ingested rows."""
    start: int
    stop: int
    enc_len: int
    pred_cap: int
    win_cap: int
    grad: bool


@dataclasses.dataclass(frozen=True)
class DecodePlan:
    seq_len: int
    buffer_size: int
    token_dim: int
    num_iter: int
    sched: tuple[np.ndarray, ...]   # per step: masked_before, n_pred, cfg scale, tokens to ingest (cached)
    refresh_step: np.ndarray        # per step: a full pass refreshes the cache (approx policy)
    pieces: tuple[Piece, ...]
    use_cfg: bool
    policy: CachePolicy
    differentiable: bool
    remat: bool
    boundary: int                   # first step that carries gradient


def _window_counts(masked_before: np.ndarray, window: int) -> np.ndarray:
    """Tokens to ingest at the start of step k: those generated in steps k - window .. k - 1."""
    k = np.arange(len(masked_before))
    return (masked_before[np.maximum(k - window, 0)] - masked_before).astype(np.int32)


def make_plan(spec, *, seq_len: int, buffer_size: int, token_dim: int, policy=None, differentiable: bool = False,
              backprop_steps: int = -1, remat: bool = False) -> DecodePlan:
    """The static plan of a sampler: `spec` a SamplerSpec (num_iter, cfg, cfg_schedule, num_buckets, cache).
    policy: the cache policy; None takes the spec's (`spec.cache`, "none" where the spec has none)."""
    pol = CachePolicy.parse(getattr(spec, "cache", "none") if policy is None else policy)
    if pol.kind != "none" and differentiable:
        raise ValueError("the KV-cached decode is inference only: use cache policy 'none' to differentiate")
    k = spec.num_iter
    sched = ar_schedule(seq_len, k)
    segments = plan_segments(sched, buffer_size, spec.num_buckets)
    win = _window_counts(sched.masked_before, pol.window)
    refresh_step = (np.arange(k) % pol.refresh_every == 0) if pol.kind == "approx" else np.zeros(k, bool)
    boundary = 0 if backprop_steps == -1 else k - backprop_steps
    pieces = []
    for seg in segments:
        # static ingest cap: the largest window among the segment's steps that ingest (at least one row)
        cap = max([int(win[i]) for i in range(seg.start, seg.stop) if not refresh_step[i]] + [1])
        for lo, hi, grad in ((seg.start, min(seg.stop, boundary), False), (max(seg.start, boundary), seg.stop, True)):
            if lo < hi:
                pieces.append(Piece(lo, hi, seg.enc_len, seg.pred_cap, cap, grad and differentiable))
    arrays = (sched.masked_before.astype(np.int32), sched.n_pred.astype(np.int32),
              sched.cfg(spec.cfg, spec.cfg_schedule).astype(np.float32), win)
    return DecodePlan(seq_len, buffer_size, token_dim, k, arrays, refresh_step, tuple(pieces), spec.cfg != 1.0, pol,
                      differentiable, remat, boundary)


def conditioned_embeddings(model: MAR, labels: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(class embedding (B, De), null embedding (B, De)); labels < 0 take the null class (unconditional)."""
    null = model.class_embedding(None, labels.shape[0])
    return jnp.where((labels >= 0)[:, None], model.class_embedding(jnp.maximum(labels, 0)), null), null


def _dup(plan: DecodePlan):
    return (lambda a: jnp.concatenate([a, a], axis=0)) if plan.use_cfg else (lambda a: a)


def _rows(a: jax.Array, idx: jax.Array) -> jax.Array:
    """a (B, N, ...) at idx (B, P) -> (B, P, ...)."""
    return jnp.take_along_axis(a, idx.reshape(idx.shape + (1,) * (a.ndim - 2)), axis=1)


def _uncached_rows(model, state, rank, labels, pos, piece, plan):
    """Head conditions (B2 * P, D) of positions pos (B2, P): the whole transformer on the current tokens."""
    class_emb, null = conditioned_embeddings(model, labels)
    s = state.order.shape[1]
    gen_rank = s - 1 - rank  # orders are generated from their end backwards (used by causal attention only)
    tokens, mask = state.tokens, state.mask
    if plan.use_cfg:
        z = model.condition(jnp.concatenate([tokens, tokens]), jnp.concatenate([mask, mask]),
                            jnp.concatenate([class_emb, null]), enc_len=piece.enc_len,
                            gen_rank=jnp.concatenate([gen_rank, gen_rank]))
    else:
        z = model.condition(tokens, mask, class_emb, enc_len=piece.enc_len, gen_rank=gen_rank)
    return _rows(z, pos).reshape(pos.shape[0] * piece.pred_cap, -1), None


def refresh(model: MAR, cache, tokens: jax.Array, mask: jax.Array, class_emb: jax.Array, *, enc_len: int):
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


def ingest(model: MAR, cache, tokens: jax.Array | None, cond_emb: jax.Array, lpos: jax.Array, cpos: jax.Array,
           enc_mask: jax.Array, dec_mask: jax.Array):
    """Rows (tokens (B, P, C) at layout positions lpos; None: buffer rows) through encoder and decoder as queries
    against the cache, writing their keys/values at cpos (lpos, or the scratch row for padding)."""
    x, cache = model.encode(tokens, None, cond_emb, positions=lpos, cache=cache, cache_positions=cpos,
                            attn_mask=enc_mask)
    _, cache = model.decode(x, None, positions=lpos, cache=cache, cache_positions=cpos, attn_mask=dec_mask)
    return cache


def predict_condition(model: MAR, cache, pos: jax.Array, cpos: jax.Array, mask: jax.Array) -> jax.Array:
    """Head condition z (B, P, Dd) of positions pos (B, P): mask-token queries against the decoder cache (their own
    keys/values go to a copy of the cache that is dropped)."""
    z, _ = model.decode(None, None, positions=pos + model.cfg.buffer_size, cache=cache, cache_positions=cpos,
                        attn_mask=mask)
    return z


def key_ranks(gen_rank: jax.Array, buffer_size: int) -> jax.Array:
    """Generation rank of every cache row (B, L): -1 buffer, gen_rank, then a rank above all for the scratch row."""
    b, s = gen_rank.shape
    return jnp.concatenate([jnp.full((b, buffer_size), -1, jnp.int32), gen_rank.astype(jnp.int32),
                            jnp.full((b, 1), buffer_size + s, jnp.int32)], axis=1)


def _cached_rows(model, state, rank, labels, pos, masked_before, piece, plan, n_win, valid):
    """Head conditions (B2 * P, D) of positions pos (B2, P) and the new cache: an incremental step (ingest the
    window's tokens, mask-token queries against the cache) or, on the approx policy's refresh steps, a full pass
    that rewrites the cache."""
    s, bf, pol = plan.seq_len, plan.buffer_size, plan.policy
    dup = _dup(plan)
    class_emb, null = conditioned_embeddings(model, labels)
    cond_emb = jnp.concatenate([class_emb, null]) if plan.use_cfg else class_emb
    orders2 = dup(state.order)
    b2 = orders2.shape[0]
    krank = key_ranks(dup(s - 1 - rank), bf)
    scratch = bf + s
    not_scratch = krank < scratch
    n_visible = s - masked_before
    cpos = jnp.where(valid, pos + bf, scratch)
    own = jnp.arange(scratch + 1)[None, None, :] == cpos[:, :, None]

    def incremental(cache):
        wslot = jnp.arange(piece.win_cap)
        wpos = jnp.take_along_axis(orders2, jnp.broadcast_to(jnp.minimum(masked_before + wslot, s - 1),
                                                             (b2, piece.win_cap)), axis=1)
        wl = wpos + bf
        wc = jnp.where(wslot[None, :] < n_win, wl, scratch)
        rows = _rows(dup(state.tokens), wpos)
        if pol.kind == "exact":
            m = causal_mask(_rows(krank, wl), krank, not_scratch, jnp.zeros(wl.shape, bool))
            cache = ingest(model, cache, rows, cond_emb, wl, wc, m, m)
            pm = causal_mask(_rows(krank, pos + bf), krank, krank < n_visible, jnp.ones(pos.shape, bool), own)
        else:
            pm = not_scratch[:, None, None, :]
            cache = ingest(model, cache, rows, cond_emb, wl, wc, (krank < n_visible)[:, None, None, :], pm)
        return predict_condition(model, cache, pos, cpos, pm), cache

    def full(cache):
        z, cache = refresh(model, cache, dup(state.tokens), dup(state.mask), cond_emb, enc_len=piece.enc_len)
        return _rows(z, pos), cache

    seg_refresh = plan.refresh_step[piece.start:piece.stop]
    if seg_refresh.all():
        z, cache = full(state.cache)
    elif not seg_refresh.any():
        z, cache = incremental(state.cache)
    else:
        z, cache = jax.lax.cond(state.step % pol.refresh_every == 0, full, incremental, state.cache)
    return z.reshape(b2 * piece.pred_cap, -1), cache


def decode_step(model: MAR, state: DecodeState, rank: jax.Array, labels: jax.Array, *, piece: Piece,
                plan: DecodePlan, predictor: Predictor) -> DecodeState:
    """One AR step with the static shapes of `piece`: predicts the step's tokens and writes them."""
    sched = tuple(jnp.asarray(a) for a in plan.sched)
    masked_before, n_pred, cfg_k, n_win = (a[state.step] for a in sched)
    mask_next = masked_before - n_pred
    b, s, _ = state.tokens.shape
    slot = jnp.arange(piece.pred_cap)
    valid = slot[None, :] < n_pred
    order = _dup(plan)(state.order)  # (B2, S): with CFG the conditional then the unconditional half
    pos = jnp.take_along_axis(order, jnp.minimum(mask_next + slot, s - 1)[None, :].repeat(order.shape[0], 0), axis=1)
    if plan.policy.kind == "none":
        z, cache = _uncached_rows(model, state, rank, labels, pos, piece, plan)
    else:
        z, cache = _cached_rows(model, state, rank, labels, pos, masked_before, piece, plan, n_win, valid)
    zc, zu = jnp.split(z, 2, axis=0) if plan.use_cfg else (z, None)
    new = predictor(model, zc, zu, cfg_k, jax.random.fold_in(state.rng, state.step)).reshape(b, piece.pred_cap, -1)
    pos_w = jnp.where(valid, pos[:b], s)  # invalid rows go out of bounds and are dropped
    tokens = state.tokens.at[jnp.arange(b)[:, None], pos_w].set(new.astype(state.tokens.dtype), mode="drop")
    return state.replace(tokens=tokens, mask=(rank < mask_next).astype(jnp.float32), step=state.step + 1,
                         cache=cache)


def init_state(model: MAR, labels: jax.Array, rng: jax.Array, plan: DecodePlan) -> tuple[DecodeState, jax.Array]:
    """(the state before step 0, rank (B, S): each position's index in its order). The exact policy's cache starts
    with the buffer rows ingested (queries of rank -1: they attend to the buffer only)."""
    b, s, bf = labels.shape[0], plan.seq_len, plan.buffer_size
    r_order, r_loop = jax.random.split(rng)
    orders = random_orders(r_order, b, s)
    rank = jnp.argsort(orders, axis=1)
    cache = None
    if plan.policy.kind != "none":
        cfg = model.cfg
        if cfg.seq_len != s or cfg.buffer_size != bf:
            raise ValueError(f"model has (seq_len, buffer_size) = {(cfg.seq_len, cfg.buffer_size)}, sampler was "
                             f"built for {(s, bf)}")
        if plan.policy.kind == "exact" and not model.causal:
            raise ValueError("cache policy 'exact' needs a model with attention='causal'; a bidirectional model's "
                             "keys/values change every step: use ('approx', r, R)")
        if plan.policy.kind == "approx" and model.causal:
            raise ValueError("cache policy ('approx', r, R) is for bidirectional models; a causal model caches "
                             "exactly with policy 'exact'")
        b2 = 2 * b if plan.use_cfg else b
        cache = init_cache(cfg, b2)
        if plan.policy.kind == "exact":
            class_emb, null = conditioned_embeddings(model, labels)
            cond_emb = jnp.concatenate([class_emb, null]) if plan.use_cfg else class_emb
            krank = key_ranks(_dup(plan)(s - 1 - rank), bf)
            lpos = jnp.broadcast_to(jnp.arange(bf), (b2, bf))
            m = causal_mask(jnp.full((b2, bf), -1, jnp.int32), krank, krank < bf + s, jnp.zeros((b2, bf), bool))
            cache = ingest(model, cache, None, cond_emb, lpos, lpos, m, m)
    state = DecodeState(tokens=jnp.zeros((b, s, plan.token_dim), jnp.float32), mask=jnp.ones((b, s), jnp.float32),
                        order=orders, step=jnp.zeros((), jnp.int32), cache=cache, rng=r_loop)
    return state, rank


def decode(model_of: Callable[[Any], MAR], params: Any, labels: jax.Array, rng: jax.Array, plan: DecodePlan,
           predictor: Predictor) -> DecodeState:
    """Runs the K steps of `plan` and returns the final state (tokens (B, S, C), order (B, S), ...).

    model_of(params) -> MAR is called inside every step (so gradients and remat see `params`; a merge of a graphdef
    is free). labels (B,) int, < 0 = unconditional. Traced: call it under the caller's jit."""
    state, rank = init_state(model_of(params), labels, rng, plan)
    frozen = jax.lax.stop_gradient(params) if plan.differentiable else params  # no tangents, no residuals
    for piece in plan.pieces:
        if plan.differentiable and piece.grad and piece.start == plan.boundary:
            state = state.replace(tokens=jax.lax.stop_gradient(state.tokens))  # end of the truncated prefix

        def step(p, st, piece=piece):
            return decode_step(model_of(p), st, rank, labels, piece=piece, plan=plan, predictor=predictor)
        if plan.remat and piece.grad:
            step = jax.checkpoint(step)  # keep only the carried state per AR iteration

        def body(st, _, step=step, p=params if piece.grad or not plan.differentiable else frozen):
            return step(p, st), None

        state, _ = jax.lax.scan(body, state, None, length=piece.stop - piece.start)
    return state

