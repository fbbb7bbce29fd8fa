"""Analytic FLOP counts of MAR's passes, with the static shapes the compiled programs actually run.

Only matrix products are counted (2 m n k each: every Linear, the attention logits and the probabilities times
values); layer norms, softmax, GELU/SiLU, adds and the diffusion arithmetic are left out, as model-FLOP-utilisation
counts usually do (for MAR-B they are well under 1% of the total). `tests/benchmarks/test_flops.py` checks a block's
count against XLA's `cost_analysis()`.

Executed vs useful: the sampler pads each AR step's encoder to its segment's static length and its head rows to the
segment's largest prediction count (marval_jax.sampling.schedule.plan_segments). `executed` counts what the program
computes, padding included (that is what the chip spends its time on); `useful` counts the unpadded work (encoder
over buffer + visible tokens, head over the predicted tokens only).
"""
from __future__ import annotations

import math


from marval_jax.models.diffusion_head import FREQ_DIM
from marval_jax.models.mar import MARConfig
from marval_jax.sampling.schedule import ar_schedule, plan_segments


def linear(rows: int, din: int, dout: int) -> int:
    return 2 * rows * din * dout


def block_flops(tokens: int, dim: int, mlp_ratio: float = 4.0, key_tokens: int | None = None) -> int:
    """One pre-norm ViT block (timm Block) over `tokens` query rows of one sample."""
    tk = tokens if key_tokens is None else key_tokens
    hidden = int(dim * mlp_ratio)
    qkv = linear(tokens, dim, 3 * dim)
    attn = 2 * tokens * tk * dim * 2  # q k^T and probs v, summed over heads
    proj = linear(tokens, dim, dim)
    mlp = linear(tokens, dim, hidden) + linear(tokens, hidden, dim)
    return qkv + attn + proj + mlp


BLOCK_PARTS = ("full", "full_xla", "attention", "attention_core", "attention_core_dpa", "matmuls", "mlp")


def block_part_flops(part: str, tokens: int, dim: int, mlp_ratio: float = 4.0) -> int:
    """One call of a part of a block (the suite's block/<part> rows) over `tokens` positions of one sample: full and
    full_xla = the block (= `block_flops`), attention = qkv + core + proj, attention_core(_dpa) = q k^T + p v,
    matmuls = the four Linear layers (qkv, proj, fc1, fc2), mlp = fc1 + fc2."""
    hidden = int(dim * mlp_ratio)
    qkv, proj = linear(tokens, dim, 3 * dim), linear(tokens, dim, dim)
    core = 2 * tokens * tokens * dim * 2
    mlp = linear(tokens, dim, hidden) + linear(tokens, hidden, dim)
    parts = {"full": qkv + core + proj + mlp, "full_xla": qkv + core + proj + mlp, "attention": qkv + core + proj,
             "attention_core": core,
             "attention_core_dpa": core, "matmuls": qkv + proj + mlp, "mlp": mlp}
    if part not in parts:
        raise ValueError(f"unknown block part {part!r}: one of {', '.join(BLOCK_PARTS)}")
    return parts[part]


def encoder_flops(cfg: MARConfig, enc_len: int) -> int:
    """Per sample: z_proj over the S tokens, then encoder blocks over the static encoder length."""
    de = cfg.encoder_embed_dim
    return linear(cfg.seq_len, cfg.token_dim, de) + cfg.encoder_depth * block_flops(enc_len, de, cfg.mlp_ratio)


def decoder_flops(cfg: MARConfig, enc_len: int) -> int:
    """Per sample: decoder_embed over the encoder rows, decoder blocks over buffer + S positions."""
    de, dd = cfg.encoder_embed_dim, cfg.decoder_embed_dim
    return linear(enc_len, de, dd) + cfg.decoder_depth * block_flops(cfg.buffer_size + cfg.seq_len, dd, cfg.mlp_ratio)


def condition_flops(cfg: MARConfig, enc_len: int) -> int:
    """One transformer pass (encoder + decoder) for one sample."""
    return encoder_flops(cfg, enc_len) + decoder_flops(cfg, enc_len)


def head_flops(cfg: MARConfig) -> int:
    """One SimpleMLPAdaLN call for one token row."""
    w, c, d = cfg.diffloss_w, cfg.token_dim, cfg.decoder_embed_dim
    embed = linear(1, FREQ_DIM, w) + linear(1, w, w) + linear(1, d, w) + linear(1, c, w)
    res = cfg.diffloss_d * (linear(1, w, 3 * w) + 2 * linear(1, w, w))
    final = linear(1, w, 2 * w) + linear(1, w, 2 * c)
    return embed + res + final


def sampler_flops(cfg: MARConfig, *, batch: int, num_iter: int, cfg_scale: float, head_calls: int,
                  num_buckets: int = 4) -> dict:
    """FLOPs of one compiled sampler call (make_sampler) for `batch` images.

    head_calls: head evaluations per predicted row and per branch (100 for the teacher's respaced chain, 1 for the
    one-step generator). CFG (cfg_scale != 1) doubles the transformer batch and the head rows.
    """
    sched = ar_schedule(cfg.seq_len, num_iter)
    segments = plan_segments(sched, cfg.buffer_size, num_buckets)
    branches = 2 if cfg_scale != 1.0 else 1
    hf = head_flops(cfg)
    out = {"transformer": 0, "head": 0, "transformer_useful": 0, "head_useful": 0, "segments": []}
    for seg in segments:
        steps = seg.stop - seg.start
        tr = steps * branches * batch * condition_flops(cfg, seg.enc_len)
        hd = steps * branches * batch * seg.pred_cap * head_calls * hf
        out["segments"].append(dict(start=seg.start, stop=seg.stop, enc_len=seg.enc_len, pred_cap=seg.pred_cap,
                                    transformer=tr, head=hd))
        out["transformer"] += tr
        out["head"] += hd
        for k in range(seg.start, seg.stop):
            visible = cfg.seq_len - int(sched.masked_before[k])
            out["transformer_useful"] += branches * batch * condition_flops(cfg, cfg.buffer_size + visible)
            out["head_useful"] += branches * batch * int(sched.n_pred[k]) * head_calls * hf
    out["total"] = out["transformer"] + out["head"]
    out["total_useful"] = out["transformer_useful"] + out["head_useful"]
    return out


def train_encoder_length(cfg: MARConfig, mask_ratio_min: float) -> int:
    return cfg.buffer_size + cfg.seq_len - int(math.ceil(cfg.seq_len * mask_ratio_min))


def mar_train_flops(cfg: MARConfig, *, batch: int, mask_ratio_min: float = 0.7, diffusion_batch_mul: int = 4) -> dict:
    """One MAR training step: forward (transformer at the training encoder length + head over S * mul rows per
    sample), backward = 2 x forward; the matmuls rematerialisation recomputes come on top (cfg.remat_mode):
    "per_block" the transformer blocks' forward (model.remat_blocks = n: n blocks of each stack), "full" those and
    the head's (the head's time / condition embeddings, not recomputed, are counted too: an upper bound),
    "dots_saveable" none (matmul outputs are kept)."""
    enc_len = train_encoder_length(cfg, mask_ratio_min)
    tr = batch * condition_flops(cfg, enc_len)
    hd = batch * cfg.seq_len * diffusion_batch_mul * head_flops(cfg)
    forward = tr + hd
    n_enc, n_dec = ((cfg.encoder_depth, cfg.decoder_depth) if cfg.remat_blocks == -1 else
                    (min(cfg.remat_blocks, cfg.encoder_depth), min(cfg.remat_blocks, cfg.decoder_depth)))
    tr_remat = batch * (n_enc * block_flops(enc_len, cfg.encoder_embed_dim, cfg.mlp_ratio)
                        + n_dec * block_flops(cfg.buffer_size + cfg.seq_len, cfg.decoder_embed_dim, cfg.mlp_ratio))
    total = 3 * forward + {"per_block": tr_remat, "full": tr_remat + hd}.get(cfg.remat_mode, 0)
    return dict(forward=forward, transformer_forward=tr, head_forward=hd, total=total, enc_len=enc_len)


def gsim_step_flops(cfg: MARConfig, *, batch: int, mask_ratio_min: float = 0.7, guidance: bool = True) -> dict:
    """One GSIM step = one generator update + one fake-score update (marval_jax.losses.gsim).

    Costs per pass, in units of forward F: a trained network's forward + backward is 3F, a frozen network that only
    passes a gradient to its input 2F (no weight gradients), a forward without gradient 1F.
    Generator update: generator transformer + head 3F; teacher transformer (x2 with CFG) 1F, teacher head (x2) 2F;
    fake-score transformer 1F, its head 2F. Fake-score update: generator transformer + head 1F; fake-score
    transformer + head 3F.
    """
    enc_len = train_encoder_length(cfg, mask_ratio_min)
    tr = batch * condition_flops(cfg, enc_len)
    hd = batch * cfg.seq_len * head_flops(cfg)
    g = 2 if guidance else 1
    gen_update = 3 * (tr + hd) + g * tr + 2 * g * hd + tr + 2 * hd
    fake_update = (tr + hd) + 3 * (tr + hd)
    return dict(generator_update=gen_update, fake_update=fake_update, total=gen_update + fake_update,
                enc_len=enc_len)


def rl_step_flops(cfg: MARConfig, *, batch: int, num_iter: int, backprop_steps: int = -1, remat: bool = True,
                  num_buckets: int = 4) -> dict:
    """One RL step through the one-step generator's AR loop (reward model excluded): forward F over all K steps;
    the iterations that carry gradient cost 2F more (backward) and, with remat, 1F more (recompute)."""
    sched = ar_schedule(cfg.seq_len, num_iter)
    segments = plan_segments(sched, cfg.buffer_size, num_buckets)
    boundary = 0 if backprop_steps == -1 else num_iter - backprop_steps
    hf = head_flops(cfg)
    fwd, grad_fwd = 0, 0
    for seg in segments:
        per_step = batch * (condition_flops(cfg, seg.enc_len) + seg.pred_cap * hf)
        fwd += (seg.stop - seg.start) * per_step
        grad_fwd += max(0, seg.stop - max(seg.start, boundary)) * per_step
    total = fwd + 2 * grad_fwd + (grad_fwd if remat else 0)
    return dict(forward=fwd, total=total)


def cached_sampler_flops(cfg: MARConfig, *, batch: int, num_iter: int, cfg_scale: float, head_calls: int,
                         num_buckets: int = 4, policy="exact") -> dict:
    """FLOPs of one compiled KV-cached sampler call (marval_jax.sampling.cached_sampler.make_cached_sampler), with
    the static shapes it runs: per step either a refresh (the uncached pass at the segment's encoder length; policy
    ("approx", r, R) at step % R == 0) or an incremental step: the segment's ingest cap W of new token rows through
    every block and the P predicted rows through the decoder blocks, each query over all L = buffer + S + 1 cache
    rows; the exact policy first ingests the buffer rows. The head is counted as in `sampler_flops`."""
    from marval_jax.sampling.from_config import sampler_spec
    from marval_jax.sampling.cached_sampler import cache_len
    from marval_jax.sampling.decode import make_plan
    # the sampler's own static plan: its pieces (one per segment, inference), ingest caps and refresh steps
    plan = make_plan(sampler_spec(num_iter, cfg_scale, num_buckets=num_buckets), seq_len=cfg.seq_len,
                     buffer_size=cfg.buffer_size, token_dim=cfg.token_dim, policy=policy)
    rows = (2 if plan.use_cfg else 1) * batch
    refresh = plan.refresh_step
    n_keys = cache_len(cfg)
    de, dd, c, r = cfg.encoder_embed_dim, cfg.decoder_embed_dim, cfg.token_dim, cfg.mlp_ratio

    def through_blocks(n: int) -> int:  # n query rows through encoder and decoder against the caches
        return (linear(n, c, de) + cfg.encoder_depth * block_flops(n, de, r, key_tokens=n_keys)
                + linear(n, de, dd) + cfg.decoder_depth * block_flops(n, dd, r, key_tokens=n_keys))

    hf = head_flops(cfg)
    out = {"transformer": 0, "head": 0, "refresh_steps": int(refresh.sum()), "segments": []}
    if plan.policy.kind == "exact":
        out["transformer"] += rows * (through_blocks(cfg.buffer_size) - linear(cfg.buffer_size, c, de))
    for seg in plan.pieces:
        w = seg.win_cap
        incremental = through_blocks(w) + cfg.decoder_depth * block_flops(seg.pred_cap, dd, r, key_tokens=n_keys)
        tr = sum(condition_flops(cfg, seg.enc_len) if refresh[k] else incremental for k in range(seg.start, seg.stop))
        tr *= rows
        hd = (seg.stop - seg.start) * rows * seg.pred_cap * head_calls * hf
        out["segments"].append(dict(start=seg.start, stop=seg.stop, enc_len=seg.enc_len, pred_cap=seg.pred_cap,
                                    ingest_cap=w, transformer=tr, head=hd))
        out["transformer"] += tr
        out["head"] += hd
    out["total"] = out["transformer"] + out["head"]
    return out
