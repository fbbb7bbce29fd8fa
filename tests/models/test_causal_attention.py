"""MAR with attention="causal" (causal in generation order, marval_jax/models/mar.py): a visible token's encoder and
decoder outputs do not depend on tokens generated after it, so a KV cache of them is exact."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from marval_jax.models.mar import MAR, MARConfig, causal_mask, gen_rank_from_orders, kept_positions
from tolerances import assert_close_to_scale, mar_depth_parts

CFG = MARConfig(img_size=16, vae_stride=4, vae_embed_dim=4, encoder_embed_dim=16, encoder_depth=2,
                encoder_num_heads=2, decoder_embed_dim=16, decoder_depth=2, decoder_num_heads=2, buffer_size=2,
                class_num=4, diffloss_d=1, diffloss_w=16, attn_dropout=0.0, proj_dropout=0.0, attention="causal")
S, BF = CFG.seq_len, CFG.buffer_size
N_VISIBLE = 7


@pytest.fixture(scope="module")
def setup():
    model = MAR(CFG, rngs=nnx.Rngs(0))
    orders = jnp.argsort(jax.random.uniform(jax.random.PRNGKey(1), (2, S)), axis=1)
    gen_rank = gen_rank_from_orders(orders)
    mask = (gen_rank >= N_VISIBLE).astype(jnp.float32)  # the sampler's state after N_VISIBLE tokens
    tokens = jax.random.normal(jax.random.PRNGKey(2), (2, S, CFG.token_dim))
    return model, orders, gen_rank, mask, tokens, model.class_embedding(jnp.array([1, 3]))


def _outputs(model, tokens, mask, ce, gen_rank):
    enc, keep, valid = model.encode(tokens, mask, ce, enc_len=BF + S, gen_rank=gen_rank)
    idx, _, _ = kept_positions(mask, BF, BF + S)
    enc_full = jnp.zeros((tokens.shape[0], BF + S, enc.shape[-1])).at[jnp.arange(2)[:, None], idx].set(
        jnp.where(valid[:, :, None], enc, 0.0))
    return enc_full[:, BF:], model.decode(enc, keep, gen_rank=gen_rank)


def test_gen_rank_is_reverse_order_index():
    orders = jnp.array([[2, 0, 3, 1]])
    # generated last-to-first: position 1 first (rank 0), then 3, 0, 2
    np.testing.assert_array_equal(gen_rank_from_orders(orders), [[2, 0, 3, 1]])


def test_visible_token_ignores_tokens_generated_later(setup):
    model, orders, gen_rank, mask, tokens, ce = setup
    early, late = orders[:, S - 3], orders[:, S - 5]  # generated 3rd and 5th (gen_rank 2 and 4), both visible
    enc0, dec0 = _outputs(model, tokens, mask, ce, gen_rank)
    bumped = tokens.at[jnp.arange(2), late].add(3.0)
    enc1, dec1 = _outputs(model, bumped, mask, ce, gen_rank)
    rows = jnp.arange(2)
    earlier = gen_rank < 4  # visible tokens generated before `late`
    # one program on two inputs: the masked keys' softmax weights are exact zeros, so the rows of earlier tokens
    # add the same terms in the same order and are bit equal
    for a, b in ((enc0, enc1), (dec0, dec1)):
        np.testing.assert_array_equal(jnp.where(earlier[:, :, None], a, 0), jnp.where(earlier[:, :, None], b, 0))
        assert float(jnp.abs(a[rows, late] - b[rows, late]).min()) > 1e-3      # the token itself changes
    assert float(jnp.abs(enc0[rows, early] - enc1[rows, early]).max()) == 0.0
    masked_q = mask > 0.5                                                           # mask tokens see every visible
    assert float(jnp.abs(jnp.where(masked_q[:, :, None], dec0 - dec1, 0)).max()) > 1e-3


def test_bidirectional_model_does_depend_on_later_tokens(setup):
    _, orders, gen_rank, mask, tokens, ce = setup
    model = MAR(dataclasses.replace(CFG, attention="bidirectional"), rngs=nnx.Rngs(0))
    early, late = orders[:, S - 3], orders[:, S - 5]
    enc0, _ = _outputs(model, tokens, mask, ce, None)
    enc1, _ = _outputs(model, tokens.at[jnp.arange(2), late].add(3.0), mask, ce, None)
    assert float(jnp.abs(enc0[jnp.arange(2), early] - enc1[jnp.arange(2), early]).min()) > 1e-4


def test_padding_does_not_change_causal_outputs(setup):
    model, _, gen_rank, mask, tokens, ce = setup
    a, _, _ = model.encode(tokens, mask, ce, enc_len=BF + N_VISIBLE, gen_rank=gen_rank)
    b, _, _ = model.encode(tokens, mask, ce, enc_len=BF + S, gen_rank=gen_rank)
    # two programs (other key lengths: the padded keys' zero softmax weights change the reductions' tiling):
    # the encoder chain's float32 bound on the outputs' scale (tests/tolerances.py)
    assert_close_to_scale(a, b[:, :BF + N_VISIBLE], mar_depth_parts(CFG)["encoder"])


def test_mask_rule():
    # buffer (rank -1), visible ranks 0 and 1, one masked query (rank 5)
    r = jnp.array([[-1, 0, 1, 5]])
    kept = jnp.array([[True, True, True, False]])
    m = causal_mask(r, r, kept, ~kept, jnp.eye(4, dtype=bool)[None])[0, 0]
    np.testing.assert_array_equal(m, [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1]])


def test_causal_needs_gen_rank_and_a_known_mode(setup):
    model, _, _, mask, tokens, ce = setup
    with pytest.raises(ValueError, match="gen_rank"):
        model.condition(tokens, mask, ce, enc_len=BF + S)
    with pytest.raises(ValueError, match="gen_rank must have shape"):
        model.condition(tokens, mask, ce, enc_len=BF + S, gen_rank=jnp.zeros((2, S - 1), jnp.int32))
    with pytest.raises(ValueError, match="attention"):
        MARConfig(attention="sideways")
