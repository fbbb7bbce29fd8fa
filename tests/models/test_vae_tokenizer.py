"""VAE token decoder: MAR tokens of the fixture's latent decode to the reference's image."""
import pathlib
import ml_collections as mlc
import numpy as np
import jax.numpy as jnp

from marval_jax.models.mar import MARConfig, patchify
from marval_jax.checkpoints.convert_vae import make_vae_decoder
from marval_jax.tools.parity import rel_err
from tolerances import reassociation_atol, vae_depth
FIXTURE = pathlib.Path(__file__).parents[1] / "fixtures" / "mar_reference_tiny.npz"


def test_tokens_decode_like_reference(ref):
    tok = mlc.ConfigDict(dict(vae_ckpt=str(FIXTURE), scale=0.2325))
    cfg = MARConfig(img_size=64, vae_stride=16, patch_size=1, vae_embed_dim=16)
    decode = make_vae_decoder(tok, cfg)
    tokens = patchify(jnp.asarray(ref["vae_io/z"]) * 0.2325, 1)
    images = decode(tokens)
    # torch vs XLA: the decoder's chain to the reassociation bound (tests/tolerances.py) on the image's scale
    tol = reassociation_atol(vae_depth(32, (1, 1, 2, 2, 4), 64, decoder=True), 1.0)
    assert rel_err(np.transpose(np.asarray(images), (0, 3, 1, 2)), ref["vae_io/decoded"]) < tol


def test_missing_vae_ckpt_is_clear():
    import pytest
    with pytest.raises(ValueError, match="vae_ckpt"):
        make_vae_decoder(mlc.ConfigDict(dict(vae_ckpt="", scale=0.2325)), MARConfig())
