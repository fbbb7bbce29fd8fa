"""The samplers cast the Linear weights to bf16 once before the AR loop: the same model outputs, no weight converts
left in the loop body."""
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from configs import mar as mar_cfg
from marval_jax.models import transformer
from marval_jax.models.mar import MAR, MARConfig
from marval_jax.sampling import ar_sampler


def _sampler_and_state():
    c = mar_cfg.get_config("tiny").model.to_dict()
    c["dtype"] = "bfloat16"
    cfg = MARConfig(**c)
    graphdef, state = nnx.split(MAR(cfg, rngs=nnx.Rngs(0)))
    spec = ar_sampler.SamplerSpec(num_iter=4, cfg=2.0, num_buckets=1)
    kw = dict(seq_len=cfg.seq_len, buffer_size=cfg.buffer_size, token_dim=cfg.token_dim)
    return cfg, graphdef, state, spec, kw


def _loop_weight_converts(hlo: str, shape: str) -> int:
    """f32 -> bf16 converts of a weight of `shape` that the program runs inside a while loop's body."""
    return len(re.findall(r"bf16\[" + shape + r"\]\{[^}]*\} convert\([^)]*\)[^\n]*op_name=\"[^\"]*while/body", hlo))


def test_cast_once_gives_the_same_outputs_and_leaves_no_weight_convert_in_the_loop(monkeypatch):
    cfg, graphdef, state, spec, kw = _sampler_and_state()
    labels, rng = jnp.arange(2), jax.random.key(1)
    qkv = f"{cfg.decoder_embed_dim},{3 * cfg.decoder_embed_dim}"
    cast = ar_sampler.make_sampler(graphdef, spec, ar_sampler.teacher_predictor("5"), **kw)
    hlo_cast = cast.lower(state, labels, rng).compile().as_text()
    out_cast = np.asarray(cast(state, labels, rng))
    assert out_cast.shape == (2, cfg.seq_len, cfg.token_dim) and np.isfinite(out_cast).all()

    monkeypatch.setattr(ar_sampler, "cast_linear_params", lambda m: m)  # the per-step casts of nnx.Linear
    plain = ar_sampler.make_sampler(graphdef, spec, ar_sampler.teacher_predictor("5"), **kw)
    hlo_plain = plain.lower(state, labels, rng).compile().as_text()
    assert _loop_weight_converts(hlo_plain, qkv) > 0  # without the cast XLA converts the weights in the loop
    assert _loop_weight_converts(hlo_cast, qkv) == 0
    # The two samplers are two compiled programs, so their samples are not compared bit for bit: fusion differs
    # between the loop bodies, and XLA may keep bf16 intermediates in float32 inside a fusion (excess precision,
    # which can drop a f32 -> bf16 -> f32 convert pair) in one program and not the other. A rounding bound in bf16
    # over 4 AR steps x 5 diffusion steps of the whole net is of the order of the samples themselves, so it would
    # test nothing. What the cast must preserve is the model's arithmetic, checked below where it is guaranteed.


def test_cast_weights_give_bit_equal_model_outputs_eagerly():
    """Eagerly (op by op) the model with pre-cast weights runs the very same primitive executables as the one that
    casts per call: f32 -> bf16 is a deterministic, correctly rounded convert, so the same bf16 weights enter the
    same dot of the same shapes and dtypes, and every later op sees identical inputs. Bit equality is guaranteed
    there, for the encoder, the decoder and the diffusion head (all the Linear layers the samplers cast)."""
    c = mar_cfg.get_config("tiny").model.to_dict()
    cfg = MARConfig(**dict(c, dtype="bfloat16", attn_dropout=0.0, proj_dropout=0.0))
    graphdef, state = nnx.split(MAR(cfg, rngs=nnx.Rngs(0)))
    keys = jax.random.split(jax.random.key(2), 3)
    b, s = 2, cfg.seq_len
    tokens = jax.random.normal(keys[0], (b, s, cfg.token_dim))
    mask = (jnp.arange(s)[None, :] < s // 2).astype(jnp.float32).repeat(b, 0)
    t = jnp.array([0, 999])
    outs = []
    for cast in (False, True):  # merged one after the other: the cast sets the merged model's variables in place
        model = nnx.merge(graphdef, jax.tree_util.tree_map(jnp.copy, state))
        if cast:
            model = transformer.cast_linear_params(model)
            assert model.decoder_blocks[0].attn.qkv.kernel[...].dtype == jnp.bfloat16
        enc, keep, _ = model.encode(tokens, mask, model.class_embedding(jnp.arange(b)), enc_len=cfg.buffer_size + s)
        z = model.decode(enc, keep)
        head = model.head(jax.random.normal(keys[1], (b, cfg.token_dim)), t, z[:, 0])
        outs.append([np.asarray(a, np.float32) for a in (enc, z, head)])
    assert outs[0][0].dtype == np.float32
    for a, b_ in zip(*outs):
        np.testing.assert_array_equal(a, b_)


def test_cast_linear_params_touches_only_linear_weights():
    _, graphdef, state, _, _ = _sampler_and_state()
    model = transformer.cast_linear_params(nnx.merge(graphdef, state))
    for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]:
        names = [n for n in (str(getattr(k, "key", k)) for k in path) if not n.startswith(".")]
        is_linear = any(n in ("qkv", "proj", "fc1", "fc2", "z_proj", "decoder_embed", "cond_embed", "input_proj",
                              "mlp_0", "mlp_2", "linear", "time_embed_0", "time_embed_2", "adaLN_modulation_1")
                        for n in names) and names[-1] in ("kernel", "bias")
        assert leaf.dtype == (jnp.bfloat16 if is_linear else jnp.float32), names
