"""MAR encoder/decoder/head against tensors recorded from the reference implementation."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from marval_jax.models.mar import MAR, MARConfig, kept_positions, patchify, unpatchify
from marval_jax.tools.parity import rel_err
from tolerances import mar_depth, reassociation_atol


def test_patchify_matches_reference_and_inverts(ref):
    tokens = patchify(jnp.asarray(ref["io/x"]), 1)
    np.testing.assert_array_equal(tokens, ref["io/tokens"])
    np.testing.assert_array_equal(unpatchify(tokens, 1, 16), ref["io/unpatchified"])
    x = jax.random.normal(jax.random.PRNGKey(0), (2, 4, 8, 8))
    t = patchify(x, 2)
    assert t.shape == (2, 16, 16)
    # channel order inside a token is (c, p, q)
    np.testing.assert_array_equal(t[0, 0].reshape(4, 2, 2), x[0, :, :2, :2])
    np.testing.assert_array_equal(unpatchify(t, 2, 4), x)


@pytest.mark.parametrize("null", [False, True])
def test_encoder_decoder_match_reference(ref, ref_model, null):
    model, cfg = ref_model
    tokens = jnp.asarray(ref["io/tokens"])
    mask = jnp.asarray(ref["io/mask"])
    ce = model.class_embedding(None, 3) if null else model.class_embedding(jnp.asarray(ref["io/labels"]))
    sfx = "_null" if null else ""
    n_kept = ref[f"io/enc_out{sfx}"].shape[1]
    # padded to several static lengths: padding must not change the result
    for enc_len in (n_kept, n_kept + 3, cfg.buffer_size + cfg.seq_len):
        enc, keep, valid = model.encode(tokens, mask, ce, enc_len=enc_len)
        assert int(valid.sum(1).min()) == n_kept
        # torch vs XLA (and padded vs not): rel_err is max|a-b| / max|ref|, the MAR chain's reassociation bound
        # (tests/tolerances.py; the whole model's depth bounds the encoder's and the decoder's)
        assert rel_err(enc[:, :n_kept], ref[f"io/enc_out{sfx}"]) < reassociation_atol(mar_depth(cfg), 1.0)
        assert rel_err(model.decode(enc, keep), ref[f"io/dec_out{sfx}"]) < reassociation_atol(mar_depth(cfg), 1.0)


def test_head_and_cfg_match_reference(ref, ref_model):
    model, cfg = ref_model
    x, t, c = (jnp.asarray(ref[f"io/net_{n}"]) for n in "xtc")
    tol = reassociation_atol(mar_depth(cfg), 1.0)  # as above; the head's chain is part of the model's
    assert rel_err(model.head(x, t.astype(jnp.int32), c), ref["io/net_out"]) < tol
    assert rel_err(model.diffloss_net.forward_with_cfg(x, t.astype(jnp.int32), c, 3.0), ref["io/cfg_out"]) < tol


def test_kept_positions_order_and_padding():
    mask = jnp.array([[1, 0, 1, 0], [0, 0, 1, 1]], jnp.float32)
    idx, valid, keep = kept_positions(mask, 2, 6)
    np.testing.assert_array_equal(idx[0, :4], [0, 1, 3, 5])
    np.testing.assert_array_equal(valid, [[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 0, 0]])
    np.testing.assert_array_equal(keep[1], [1, 1, 1, 1, 0, 0])


def test_dropout_and_label_drop_only_with_rng(ref_model):
    model, cfg = ref_model
    import dataclasses
    from flax import nnx
    m = MAR(dataclasses.replace(cfg, attn_dropout=0.1, proj_dropout=0.1), rngs=nnx.Rngs(1))
    tok = jax.random.normal(jax.random.PRNGKey(0), (2, cfg.seq_len, cfg.token_dim))
    mask = jnp.zeros((2, cfg.seq_len)).at[:, :5].set(1)
    ce = m.class_embedding(jnp.array([0, 1]))
    a = m.condition(tok, mask, ce, enc_len=cfg.buffer_size + cfg.seq_len)
    b = m.condition(tok, mask, ce, enc_len=cfg.buffer_size + cfg.seq_len)
    c = m.condition(tok, mask, ce, enc_len=cfg.buffer_size + cfg.seq_len, rng=jax.random.PRNGKey(2))
    np.testing.assert_array_equal(a, b)  # the same eager ops on the same inputs: bit equal
    assert float(jnp.abs(a - c).max()) > 1e-3
    dropped = m.drop_labels(jnp.zeros((4000, cfg.encoder_embed_dim)), jax.random.PRNGKey(0))
    frac = float((jnp.abs(dropped).sum(1) > 0).mean())
    assert abs(frac - cfg.label_drop_prob) < 0.02


def test_head_is_zero_at_init():
    from flax import nnx
    m = MAR(MARConfig(img_size=64, encoder_embed_dim=32, decoder_embed_dim=48, encoder_depth=1, decoder_depth=1,
                      encoder_num_heads=2, decoder_num_heads=4, buffer_size=2, class_num=3, diffloss_d=1,
                      diffloss_w=16), rngs=nnx.Rngs(0))
    out = m.head(jnp.ones((3, 16)), jnp.array([0, 5, 999]), jnp.ones((3, 48)))
    np.testing.assert_array_equal(out, 0.0)
