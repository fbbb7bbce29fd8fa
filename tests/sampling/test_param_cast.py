"""The samplers cast the Linear weights to bf16 once before the AR loop: the same samples, no weight converts left in
the loop body."""
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


def test_cast_once_gives_the_same_samples_and_leaves_no_weight_convert_in_the_loop(monkeypatch):
    cfg, graphdef, state, spec, kw = _sampler_and_state()
    labels, rng = jnp.arange(2), jax.random.key(1)
    qkv = f"{cfg.decoder_embed_dim},{3 * cfg.decoder_embed_dim}"
    cast = ar_sampler.make_sampler(graphdef, spec, ar_sampler.teacher_predictor("5"), **kw)
    hlo_cast = cast.lower(state, labels, rng).compile().as_text()
    out_cast = np.asarray(cast(state, labels, rng))

    monkeypatch.setattr(ar_sampler, "cast_linear_params", lambda m: m)  # the per-step casts of nnx.Linear
    plain = ar_sampler.make_sampler(graphdef, spec, ar_sampler.teacher_predictor("5"), **kw)
    hlo_plain = plain.lower(state, labels, rng).compile().as_text()
    np.testing.assert_array_equal(out_cast, np.asarray(plain(state, labels, rng)))
    assert _loop_weight_converts(hlo_plain, qkv) > 0  # without the cast XLA converts the weights in the loop
    assert _loop_weight_converts(hlo_cast, qkv) == 0


def test_cast_linear_params_touches_only_linear_weights():
    _, graphdef, state, _, _ = _sampler_and_state()
    model = transformer.cast_linear_params(nnx.merge(graphdef, state))
    for path, leaf in jax.tree_util.tree_flatten_with_path(nnx.state(model))[0]:
        names = [n for n in (str(getattr(k, "key", k)) for k in path) if not n.startswith(".")]
        is_linear = any(n in ("qkv", "proj", "fc1", "fc2", "z_proj", "decoder_embed", "cond_embed", "input_proj",
                              "mlp_0", "mlp_2", "linear", "time_embed_0", "time_embed_2", "adaLN_modulation_1")
                        for n in names) and names[-1] in ("kernel", "bias")
        assert leaf.dtype == (jnp.bfloat16 if is_linear else jnp.float32), names
