"""Inception-v3 of the TF `inception-2015-12-05` graph: the FID / IS / sFID network.

The architecture is pytorch-fid's `FIDInceptionA/C/E_1/E_2` variant of
torchvision's Inception-v3 (itself a port of that TF graph): average pools
ignore padding (`count_include_pad=False`), the last block max-pools, and the
classifier has 1008 classes. Submodule names are torchvision's (`Mixed_6d`,
`branch1x1`, ...) so the converted weights map one to one.

Outputs, as the ADM (guided-diffusion) evaluation suite reads the TF graph:
  pool     [b, 2048]     `pool_3`, the FID / precision / recall features
  spatial  [b, h, w, 7]  `mixed_6/conv` (Mixed_6d.branch1x1), first 7 channels: sFID
  logits   [b, 1008]     pool @ softmax weights *without* the bias, as the
                         improved-GAN / ADM Inception Score code computes them

Input preprocessing (`preprocess`) is the graph's own: pixel values in
[0, 255], TF1 `ResizeBilinear` (align_corners=False, half_pixel_centers=False)
to 299x299, then (x - 128) / 128.

The network is frozen: weights come from `load_inception_params`, a .npz
written once by `python -m vimjax.convert_inception`. Parameters carry no
logical names, so they are replicated on any mesh.
"""
import functools
import os
from typing import Any, Callable

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

FID_SIZE = 299       # The graph's ResizeBilinear size.
MIN_SIZE = 75        # Smallest input the stride-2 stages leave >= 1 pixel for.
NUM_CLASSES = 1008   # The 2015 graph's classifier (1000 ImageNet classes + 8 unused).
POOL_DIM = 2048
SPATIAL_CHANNELS = 7  # ADM's sFID keeps mixed_6/conv[..., :7].
BN_EPS = 1e-3

CONVERT_HINT = ("make it once with `python -m vimjax.convert_inception "
                "--pytorch_fid_weights=pt_inception-2015-12-05-6726825d.pth --out=inception_fid.npz`")


def _flat_lecun_normal(key, shape, dtype=jnp.float32):
  # Drawn 2-D then reshaped: XLA:CPU compiles rank-4 random draws very slowly.
  flat = nn.initializers.lecun_normal()(key, (int(np.prod(shape[:-1])), shape[-1]), dtype)
  return flat.reshape(shape)


class BasicConv(nn.Module):
  """Conv without bias, inference BatchNorm (eps 1e-3), ReLU (torchvision BasicConv2d).

  Params: conv/kernel [kh, kw, in, out]; bn_scale, bn_bias, bn_mean, bn_var [out].
  """
  features: int
  kernel: tuple[int, int] = (1, 1)
  strides: int = 1
  padding: Any = "VALID"  # "VALID" or ((top, bottom), (left, right)) as torch's padding.
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    x = nn.Conv(self.features, self.kernel, strides=self.strides, padding=self.padding,
                use_bias=False, dtype=self.dtype, kernel_init=_flat_lecun_normal, name="conv")(x)
    bn = self.bn_params()
    # Inference BatchNorm folded into one multiply-add, in float32.
    scale = bn["scale"] * jax.lax.rsqrt(bn["var"] + BN_EPS)
    y = x.astype(jnp.float32) * scale + (bn["bias"] - bn["mean"] * scale)
    return nn.relu(y).astype(self.dtype)

  def bn_params(self) -> dict[str, Array]:
    shape = (self.features,)
    ones, zeros = nn.initializers.ones, nn.initializers.zeros
    return {"scale": self.param("bn_scale", ones, shape), "bias": self.param("bn_bias", zeros, shape),
            "mean": self.param("bn_mean", zeros, shape), "var": self.param("bn_var", ones, shape)}


def _pad(kh: int, kw: int):
  return ((kh // 2, kh // 2), (kw // 2, kw // 2))


def _avg_pool_same(x: Array) -> Array:
  # 3x3 / stride 1 / pad 1, averaging only real pixels (TF's SAME average pool).
  return nn.avg_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                     count_include_pad=False)


def _max_pool_same(x: Array) -> Array:
  return nn.max_pool(x, (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)))


def _max_pool_reduce(x: Array) -> Array:
  return nn.max_pool(x, (3, 3), strides=(2, 2), padding="VALID")


class InceptionA(nn.Module):
  """Mixed_5b/c/d: 35x35 blocks."""
  pool_features: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = functools.partial(BasicConv, dtype=self.dtype)
    a = conv(64, name="branch1x1")(x)
    b = conv(48, name="branch5x5_1")(x)
    b = conv(64, (5, 5), padding=_pad(5, 5), name="branch5x5_2")(b)
    c = conv(64, name="branch3x3dbl_1")(x)
    c = conv(96, (3, 3), padding=_pad(3, 3), name="branch3x3dbl_2")(c)
    c = conv(96, (3, 3), padding=_pad(3, 3), name="branch3x3dbl_3")(c)
    d = conv(self.pool_features, name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([a, b, c, d], axis=-1)


class InceptionB(nn.Module):
  """Mixed_6a: 35x35 -> 17x17."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = functools.partial(BasicConv, dtype=self.dtype)
    a = conv(384, (3, 3), strides=2, name="branch3x3")(x)
    b = conv(64, name="branch3x3dbl_1")(x)
    b = conv(96, (3, 3), padding=_pad(3, 3), name="branch3x3dbl_2")(b)
    b = conv(96, (3, 3), strides=2, name="branch3x3dbl_3")(b)
    return jnp.concatenate([a, b, _max_pool_reduce(x)], axis=-1)


class InceptionC(nn.Module):
  """Mixed_6b/c/d/e: 17x17 blocks with factorised 7x7 convs."""
  channels_7x7: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> tuple[Array, Array]:
    """Returns (block output, branch1x1 output: the graph's `mixed_N/conv`)."""
    conv = functools.partial(BasicConv, dtype=self.dtype)
    c7 = self.channels_7x7
    a = conv(192, name="branch1x1")(x)
    b = conv(c7, name="branch7x7_1")(x)
    b = conv(c7, (1, 7), padding=_pad(1, 7), name="branch7x7_2")(b)
    b = conv(192, (7, 1), padding=_pad(7, 1), name="branch7x7_3")(b)
    c = conv(c7, name="branch7x7dbl_1")(x)
    c = conv(c7, (7, 1), padding=_pad(7, 1), name="branch7x7dbl_2")(c)
    c = conv(c7, (1, 7), padding=_pad(1, 7), name="branch7x7dbl_3")(c)
    c = conv(c7, (7, 1), padding=_pad(7, 1), name="branch7x7dbl_4")(c)
    c = conv(192, (1, 7), padding=_pad(1, 7), name="branch7x7dbl_5")(c)
    d = conv(192, name="branch_pool")(_avg_pool_same(x))
    return jnp.concatenate([a, b, c, d], axis=-1), a


class InceptionD(nn.Module):
  """Mixed_7a: 17x17 -> 8x8."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = functools.partial(BasicConv, dtype=self.dtype)
    a = conv(192, name="branch3x3_1")(x)
    a = conv(320, (3, 3), strides=2, name="branch3x3_2")(a)
    b = conv(192, name="branch7x7x3_1")(x)
    b = conv(192, (1, 7), padding=_pad(1, 7), name="branch7x7x3_2")(b)
    b = conv(192, (7, 1), padding=_pad(7, 1), name="branch7x7x3_3")(b)
    b = conv(192, (3, 3), strides=2, name="branch7x7x3_4")(b)
    return jnp.concatenate([a, b, _max_pool_reduce(x)], axis=-1)


class InceptionE(nn.Module):
  """Mixed_7b/c: 8x8 blocks; the pool branch averages (7b) or max-pools (7c)."""
  pool: Callable[[Array], Array]
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    conv = functools.partial(BasicConv, dtype=self.dtype)
    a = conv(320, name="branch1x1")(x)
    b = conv(384, name="branch3x3_1")(x)
    b = jnp.concatenate([conv(384, (1, 3), padding=_pad(1, 3), name="branch3x3_2a")(b),
                         conv(384, (3, 1), padding=_pad(3, 1), name="branch3x3_2b")(b)], -1)
    c = conv(448, name="branch3x3dbl_1")(x)
    c = conv(384, (3, 3), padding=_pad(3, 3), name="branch3x3dbl_2")(c)
    c = jnp.concatenate([conv(384, (1, 3), padding=_pad(1, 3), name="branch3x3dbl_3a")(c),
                         conv(384, (3, 1), padding=_pad(3, 1), name="branch3x3dbl_3b")(c)], -1)
    d = conv(192, name="branch_pool")(self.pool(x))
    return jnp.concatenate([a, b, c, d], axis=-1)


class InceptionV3(nn.Module):
  """The FID Inception-v3 on preprocessed inputs (see `preprocess`)."""
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> dict[str, Array]:
    """Features of the three ADM metrics.

    Args:
      x: [b, h, w, 3] in [-1, 1] (`preprocess`); h, w >= MIN_SIZE (299 for FID).

    Returns:
      {"pool": [b, 2048] float32, "spatial": [b, h', w', 7] float32 (17x17 at
       299 px), "logits": [b, 1008] float32 (no bias)}.
    """
    if x.ndim != 4 or min(x.shape[1:3]) < MIN_SIZE:
      raise ValueError(f"Inception needs [b, h, w, 3] inputs with h, w >= {MIN_SIZE}, "
                       f"got shape {x.shape}.")
    conv = functools.partial(BasicConv, dtype=self.dtype)
    x = x.astype(self.dtype)
    x = conv(32, (3, 3), strides=2, name="Conv2d_1a_3x3")(x)
    x = conv(32, (3, 3), name="Conv2d_2a_3x3")(x)
    x = conv(64, (3, 3), padding=_pad(3, 3), name="Conv2d_2b_3x3")(x)
    x = _max_pool_reduce(x)
    x = conv(80, name="Conv2d_3b_1x1")(x)
    x = conv(192, (3, 3), name="Conv2d_4a_3x3")(x)
    x = _max_pool_reduce(x)
    for name, pool_features in (("Mixed_5b", 32), ("Mixed_5c", 64), ("Mixed_5d", 64)):
      x = InceptionA(pool_features, dtype=self.dtype, name=name)(x)
    x = InceptionB(dtype=self.dtype, name="Mixed_6a")(x)
    spatial = None
    for name, c7 in (("Mixed_6b", 128), ("Mixed_6c", 160), ("Mixed_6d", 160),
                     ("Mixed_6e", 192)):
      x, branch = InceptionC(c7, dtype=self.dtype, name=name)(x)
      if name == "Mixed_6d":  # The TF graph's mixed_6.
        spatial = branch[..., :SPATIAL_CHANNELS]
    x = InceptionD(dtype=self.dtype, name="Mixed_7a")(x)
    x = InceptionE(_avg_pool_same, dtype=self.dtype, name="Mixed_7b")(x)
    x = InceptionE(_max_pool_same, dtype=self.dtype, name="Mixed_7c")(x)
    pool = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    # The classifier's kernel only: IS uses unbiased logits (see module docstring).
    kernel = self.param("fc_kernel", nn.initializers.lecun_normal(), (POOL_DIM, NUM_CLASSES))
    logits = jnp.dot(pool, kernel, precision=jax.lax.Precision.HIGHEST)
    return {"pool": pool, "spatial": spatial.astype(jnp.float32), "logits": logits}


def tf1_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] weights of TF1 ResizeBilinear (align_corners=False, no half-pixel centres).

  Output pixel i samples the input at i * in / out (the legacy convention the
  2015 graph uses; it differs from half-pixel-centred resizes such as
  `jax.image.resize` and torch's align_corners=False).
  """
  src = np.arange(out_size, dtype=np.float64) * (in_size / out_size)
  lo = np.floor(src).astype(np.int64)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = src - lo
  m = np.zeros((out_size, in_size), np.float64)
  m[np.arange(out_size), lo] += 1.0 - frac
  m[np.arange(out_size), hi] += frac
  return m.astype(np.float32)


def preprocess(images: Array, size: int = FID_SIZE) -> Array:
  """Images -> the network's input, as the TF graph prepares them.

  Args:
    images: [b, h, w, 3], uint8 in [0, 255] or float in [0, 1] (floats are
      quantised to 8 bits first, as saved PNGs are: see README "Evaluation protocol").
    size: output side (299 for comparable numbers; tests use less).

  Returns:
    [b, size, size, 3] float32 in [-1, 1].
  """
  if images.dtype == jnp.uint8:
    x = images.astype(jnp.float32)
  else:
    x = jnp.round(jnp.clip(images.astype(jnp.float32), 0.0, 1.0) * 255.0)
  _, h, w, _ = x.shape
  if (h, w) != (size, size):
    rows = jnp.asarray(tf1_bilinear_matrix(h, size))
    cols = jnp.asarray(tf1_bilinear_matrix(w, size))
    x = jnp.einsum("yh,bhwc,xw->byxc", rows, x, cols, precision=jax.lax.Precision.HIGHEST)
  return (x - 128.0) / 128.0


def expected_param_shapes() -> dict[str, tuple[int, ...]]:
  """Flat name -> shape of the `InceptionV3` params (what the .npz must hold)."""
  shapes = jax.eval_shape(InceptionV3().init, jax.random.key(0),
                          jnp.zeros((1, MIN_SIZE, MIN_SIZE, 3)))
  flat = flax.traverse_util.flatten_dict(shapes["params"])
  return {"/".join(k): tuple(v.shape) for k, v in flat.items()}


def random_params(seed: int = 0) -> dict[str, Any]:
  """He-initialised random weights with random BatchNorm statistics (NumPy, fast).

  For tests and smoke runs: activations stay O(1) through the 94 convs, so
  features are informative enough to compare implementations.
  """
  rng = np.random.default_rng(seed)
  flat = {}
  for name, shape in expected_param_shapes().items():
    leaf = name.rsplit("/", 1)[-1]
    if leaf in ("kernel", "fc_kernel"):
      fan_in = int(np.prod(shape[:-1]))
      x = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
    elif leaf in ("bn_scale", "bn_var"):
      x = rng.uniform(0.5, 1.5, shape)
    else:  # bn_bias, bn_mean
      x = rng.normal(0.0, 0.1, shape)
    flat[name] = x.astype(np.float32)
  return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def load_inception_params(path: str) -> dict[str, Any]:
  """Loads converted Inception weights.

  Args:
    path: .npz written by `python -m vimjax.convert_inception`.

  Returns:
    The params tree (float32 NumPy): `InceptionV3().apply({"params": tree}, x)`.

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: an array is missing, unexpected or of the wrong shape.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"Inception weights {path!r} not found; {CONVERT_HINT}.")
  with np.load(path) as data:
    arrays = {k: np.asarray(data[k], np.float32) for k in data.files}
  expected = expected_param_shapes()
  for name, shape in expected.items():
    if name not in arrays:
      raise ValueError(f"Inception weights {path!r} lack array {name!r} (shape {shape}); "
                       f"{CONVERT_HINT}.")
    if arrays[name].shape != shape:
      raise ValueError(f"Inception weights {path!r}: {name!r} has shape {arrays[name].shape}, "
                       f"expected {shape}.")
  extra = sorted(set(arrays) - set(expected))
  if extra:
    raise ValueError(f"Inception weights {path!r} hold unexpected array {extra[0]!r} "
                     f"({len(extra)} unexpected); {CONVERT_HINT}.")
  return flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in arrays.items()})
