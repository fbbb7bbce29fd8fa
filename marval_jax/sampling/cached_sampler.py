"""KV-cached masked-AR sampling: the decode driver (marval_jax/sampling/decode.py) with a cache policy, without
re-running the whole transformer every step.

The cache is an explicit pytree made by `MAR`'s `init_cache`: {"encoder": [{"k", "v"} per block], "decoder": [...]},
each (B, L, heads, hd) with L = buffer + S + 1 in the model's (buffer + S) layout; the last slot is a scratch row
that padded query rows write to and no query ever attends to. It is carried in the driver's `DecodeState`; nothing
is mutable. The model is reached through `MAR.encode` / `MAR.decode` in row mode (rows at layout positions against
a cache).

Per AR step k (segments, RNG use and predictor calls exactly as the uncached sampler, so outputs are comparable):
  1. ingest: the tokens of the last w steps (static cap per segment, padded rows written to the scratch slot) go
     through encoder and decoder as queries against the caches, writing their keys/values at their positions
     (before the loop the buffer rows are ingested the same way);
  2. predict: only the positions predicted at step k go through the decoder, as mask-token queries against the
     decoder cache (their own keys/values are written into a throw-away copy); decoder_norm + diffusion position
     embedding give the head condition z of those rows, then the predictor.

Policies (`policy` argument):
  - "exact", for `attention="causal"` models: w = 1 (the previous step's tokens). Under the causal rule of
    marval_jax/models/mar.py a visible token's keys/values never change after it is generated, so this equals the
    uncached sampler up to float summation order (tests/sampling/test_cached_sampler.py).
  - ("approx", r, R), for bidirectional models (MAR, MARVAL): every R-th step (step % R == 0, so step 0 always) is a
    refresh: the uncached pass computes z, and every block's keys/values of all rows (buffer and visible rows of
    the encoder, every position of the decoder, mask tokens included) overwrite the cache. Other steps ingest the
    tokens generated in the last max(r, 1) steps (keys/values of older tokens, and the decoder's mask-token
    keys/values from the last refresh, are reused) with bidirectional masks: ingested encoder rows attend to buffer
    + every visible token, decoder rows and mask-token queries to every position. This is an approximation
    (docs/kv_cache.md); R = 1 refreshes every step and equals the uncached sampler.
"""
from __future__ import annotations

from flax import nnx

from marval_jax.models.mar import Cache, cache_len, init_cache  # noqa: F401  (re-exported)
from marval_jax.sampling.ar_sampler import Predictor, SamplerSpec, make_sampler
from marval_jax.sampling.decode import (CachePolicy, _window_counts, ingest, key_ranks,  # noqa: F401
                                        predict_condition, refresh)


def make_cached_sampler(graphdef: nnx.GraphDef, spec: SamplerSpec, predictor: Predictor, *, seq_len: int,
                        buffer_size: int, token_dim: int, policy="exact"):
    """Returns a jitted `sample(state, labels (B,), rng) -> tokens (B, S, C)` with make_sampler's signature, the
    same orders, segments and per-step predictor keys; the transformer runs only on new and predicted rows.

    policy: "exact" (attention="causal" models only) or ("approx", r, R) (bidirectional models only)."""
    pol = CachePolicy.parse(policy)
    if pol.kind == "none":
        raise ValueError("make_cached_sampler needs cache policy 'exact' or ('approx', r, R); 'none' is "
                         "ar_sampler.make_sampler")
    return make_sampler(graphdef, spec, predictor, seq_len=seq_len, buffer_size=buffer_size, token_dim=token_dim,
                        policy=pol)
