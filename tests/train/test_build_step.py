"""The pure half of a task reads no file: `build_step(config)` and `abstract_frozen(config)` build from a config
whose every weights path is missing, and the step traces on the abstract frozen inputs (what tools/scale_check
compiles, with nothing patched). The loading half names the missing file."""
import jax
import jax.numpy as jnp
import pytest

from configs import marval as marval_configs


def _config(variant, **top):
    cfg = marval_configs.get_config(variant)
    cfg.unlock()
    for k, v in top.items():
        cfg[k] = v
    cfg.tokenizer.vae_ckpt = "/nonexistent/kl16.ckpt"
    cfg.lock()
    return cfg


def test_distill_build_step_and_abstract_frozen_read_no_file():
    from marval_jax.models.factory import model_config
    from marval_jax.train import distill_task
    config = _config("tiny", teacher_ckpt="/nonexistent/teacher")
    task = distill_task.build_step(config)
    frozen = distill_task.abstract_frozen(config)
    assert task.frozen is None and task.frozen_sharded == ("teacher",)
    cfg = model_config(config)
    state = jax.eval_shape(task.init_state, jax.random.PRNGKey(0))
    assert set(state.__dataclass_fields__) == {"step", "generator", "fake", "rng"}
    batch = {"tokens": jax.ShapeDtypeStruct((2, cfg.seq_len, cfg.token_dim), jnp.float32),
             "labels": jax.ShapeDtypeStruct((2,), jnp.int32)}
    new, metrics = jax.eval_shape(task.train_step, state, batch, frozen)
    assert jax.tree.structure(new) == jax.tree.structure(state) and metrics["loss"].shape == ()
    with pytest.raises(FileNotFoundError, match="/nonexistent/teacher"):
        distill_task.load_frozen(config)


def test_abstract_vae_decoder_reads_no_file():
    """The KL-16 decoder of the ImageNet configs, abstract: weight shapes from tokenizer.vae_ch / vae_ch_mult, and
    it decodes MAR tokens to 256 x 256 RGB images (shapes only)."""
    from marval_jax.checkpoints.decoders import frozen_decoder
    from marval_jax.models.factory import model_config
    config = _config("base")
    cfg = model_config(config)
    dec = frozen_decoder(config, cfg, abstract=True)
    assert all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(dec))
    images = jax.eval_shape(lambda d, t: d(t), dec, jax.ShapeDtypeStruct((1, cfg.seq_len, cfg.token_dim),
                                                                         jnp.float32))
    assert images.shape == (1, 256, 256, 3)
    with pytest.raises(FileNotFoundError):
        frozen_decoder(config, cfg)
