"""model.scan_blocks (models/transformer.scan_blocks): the encoder's and decoder's blocks as one jax.lax.scan each.

The parameters stay one module per block, so the reference fixture's converted weights load unchanged and the
scanned model matches the reference's recorded encoder / decoder outputs to the same bound as the unrolled one; the
training loss and gradients equal the unrolled model's; the keys/values a full pass returns (the approximate cache's
refresh) are the same; and the program holds one scan per stack with one block's matmuls in its body."""
import dataclasses
import functools
import json

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
from flax import nnx

from marval_jax.checkpoints.convert_mar import load_into_model
from marval_jax.losses.mar_loss import mar_loss
from marval_jax.models.mar import MAR, MARConfig, train_encoder_len
from marval_jax.tools.parity import rel_err
from tolerances import assert_close_to_scale, assert_trees_close, mar_depth, reassociation_atol

BATCH, MUL = 3, 2


@functools.lru_cache(maxsize=None)
def _fixture_model(scan: bool):
    """The reference fixture's tiny MAR (2 encoder + 2 decoder blocks) with its converted weights."""
    from tests.conftest import FIXTURE
    with np.load(FIXTURE) as data:
        ref = {k: data[k] for k in data.files}
    cfg = MARConfig.from_dict(dict(json.loads(str(ref["config_json"])), attn_dropout=0.0, proj_dropout=0.0,
                                   scan_blocks=scan))
    model = MAR(cfg, rngs=nnx.Rngs(0))
    load_into_model(model, {k[6:]: v for k, v in ref.items() if k.startswith("param/")})
    return model, cfg, ref


def test_scanned_model_matches_the_reference_fixture():
    model, cfg, ref = _fixture_model(True)
    assert cfg.encoder_depth > 1 and cfg.decoder_depth > 1  # the scan runs (one block is not scanned)
    tokens, mask = jnp.asarray(ref["io/tokens"]), jnp.asarray(ref["io/mask"])
    ce = model.class_embedding(jnp.asarray(ref["io/labels"]))
    n_kept = ref["io/enc_out"].shape[1]
    enc, keep, _ = model.encode(tokens, mask, ce, enc_len=n_kept + 3)
    tol = reassociation_atol(mar_depth(cfg), 1.0)  # as tests/models/test_mar.py: torch vs XLA, rel_err
    assert rel_err(enc[:, :n_kept], ref["io/enc_out"]) < tol
    assert rel_err(model.decode(enc, keep), ref["io/dec_out"]) < tol


def test_full_pass_keys_and_values_equal_the_unrolled_blocks():
    """encode/decode(return_kv=True), what the approximate cache's refresh writes, through the scan."""
    (scanned, cfg, ref), (plain, _, _) = _fixture_model(True), _fixture_model(False)
    tokens, mask = jnp.asarray(ref["io/tokens"]), jnp.asarray(ref["io/mask"])
    ce = plain.class_embedding(jnp.asarray(ref["io/labels"]))
    outs = [m.encode(tokens, mask, ce, enc_len=cfg.buffer_size + cfg.seq_len, return_kv=True)
            for m in (scanned, plain)]
    assert len(outs[0][3]) == cfg.encoder_depth
    assert_close_to_scale(outs[0][0], outs[1][0], mar_depth(cfg))
    assert_trees_close(outs[0][3], outs[1][3], mar_depth(cfg))
    dec = [m.decode(o[0], o[1], return_kv=True) for m, o in zip((scanned, plain), outs)]
    assert_close_to_scale(dec[0][0], dec[1][0], mar_depth(cfg))
    assert_trees_close(dec[0][1], dec[1][1], mar_depth(cfg))


def _loss(cfg):
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: MAR(cfg, rngs=nnx.Rngs(0))))
    tokens = jax.random.normal(jax.random.key(4), (BATCH, cfg.seq_len, cfg.token_dim))
    labels = jnp.arange(BATCH) % cfg.class_num

    def loss(params):
        return mar_loss(nnx.merge(graphdef, params), tokens, labels, jax.random.key(6), mask_ratio_min=0.7,
                        diffusion_batch_mul=MUL, enc_len=train_encoder_len(cfg, 0.7))[0]
    return loss


def _training_config(scan: bool, remat: str = "none") -> MARConfig:
    _, cfg, _ = _fixture_model(False)
    return dataclasses.replace(cfg, attn_dropout=0.1, proj_dropout=0.1, scan_blocks=scan, remat_policy=remat)


def test_training_loss_and_gradients_equal_the_unrolled_model():
    """Dropout on: block i's key is fold_in(rng, i) in both, so the same masks; values to the MAR chain's
    reassociation bound (forward, and backward with the weight gradients' sum over the head rows)."""
    model, cfg, _ = _fixture_model(False)
    params = nnx.state(model, nnx.Param)
    tokens = BATCH * cfg.seq_len * MUL
    l0, g0 = jax.jit(jax.value_and_grad(_loss(_training_config(False))))(params)
    l1, g1 = jax.jit(jax.value_and_grad(_loss(_training_config(True))))(params)
    assert_close_to_scale(l1, l0, mar_depth(cfg) + tokens)
    assert_trees_close(g1, g0, mar_depth(cfg, grad=True, tokens=tokens))


def _scans(cfg) -> list[tuple[int, int, int]]:
    """(length, matmuls in the body, rematerialised calls in the body) of every scan in the loss's jaxpr, and the
    matmuls outside scans as (0, n, 0)."""
    model, _, _ = _fixture_model(False)
    jaxpr = jax.make_jaxpr(_loss(cfg))(nnx.state(model, nnx.Param))

    def count(j, name):
        n = 0
        for eqn in j.eqns:
            n += eqn.primitive.name == name
            if eqn.primitive.name != "scan":
                n += sum(count(sub, name) for sub in jax.extend.core.jaxprs_in_params(eqn.params))
        return n

    found = [(0, count(jaxpr.jaxpr, "dot_general"), 0)]
    for eqn in jaxpr.jaxpr.eqns:
        if eqn.primitive.name == "scan":
            body = eqn.params["jaxpr"].jaxpr
            found.append((eqn.params["length"], count(body, "dot_general"), count(body, "remat2")))
    return found


def test_one_scan_per_stack_with_one_block_in_its_body():
    _, cfg, _ = _fixture_model(False)
    plain = _scans(_training_config(False))
    scanned = _scans(_training_config(True))
    remat = _scans(_training_config(True, "per_block"))
    assert len(plain) == 1  # no scan: every block's matmuls in the program
    per_block = 6  # qkv, q k^T, p v, proj, fc1, fc2
    assert [s[:2] for s in scanned[1:]] == [(cfg.encoder_depth, per_block), (cfg.decoder_depth, per_block)]
    assert scanned[0][1] == plain[0][1] - per_block * (cfg.encoder_depth + cfg.decoder_depth)
    # remat2 in the body: the two LayerNorms and the GELU (scan_blocks' recompute_elementwise), and the policy's
    # around them
    assert [s[2] for s in scanned[1:]] == [3, 3] and [s[2] for s in remat[1:]] == [4, 4]
    assert plain[0][2] == 0  # the unrolled blocks recompute nothing


def _residuals(cfg) -> tuple[int, list]:
    """(bytes, arrays) the backward pass of the bfloat16 training loss keeps: the leaves of jax.vjp's function."""
    model, _, _ = _fixture_model(False)
    _, vjp = jax.vjp(_loss(dataclasses.replace(cfg, dtype="bfloat16")), nnx.state(model, nnx.Param))
    leaves = jax.tree.leaves(vjp)
    return sum(x.size * x.dtype.itemsize for x in leaves), leaves


def test_scanned_blocks_keep_no_float32_gelu_intermediates():
    """A scan stores every value its backward pass reads as a loop output (no fusion can recompute it), so the
    scanned stacks recompute the LayerNorms and the GELU (the scan body calls Block with recompute_elementwise).
    Unrolled, jax's backward keeps the GELU's float32 exp, erfc and product at the MLP's hidden width (12 bytes per
    element of a 4x-wide activation; XLA's fusions drop them again on the GPU); scanned, none of them, and fewer bytes
    in all."""
    _, cfg, _ = _fixture_model(False)
    hidden = int(cfg.decoder_embed_dim * cfg.mlp_ratio)

    def f32_hidden(leaves):  # activations (..., BATCH, T, hidden), stacked or not; not the (depth, D, hidden) kernels
        return [x for x in leaves if x.dtype == jnp.float32 and x.ndim >= 3 and x.shape[-1] == hidden
                and BATCH in x.shape[:-2]]
    plain_bytes, plain = _residuals(_training_config(False))
    scan_bytes, scanned = _residuals(_training_config(True))
    assert f32_hidden(plain)  # the probe sees them unrolled (three per block with jax 0.10)
    assert f32_hidden(scanned) == []
    assert scan_bytes < plain_bytes
