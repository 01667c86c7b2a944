"""VGG16 features and the LPIPS 'vgg' distance (Zhang et al. 2018).

Replicates lpips.LPIPS(net='vgg', version='0.1'): images in [0, 1] -> [-1, 1]
-> ScalingLayer -> VGG16 conv stack (torchvision `features`), taps after
relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 -> unit-normalise each feature
vector over channels -> squared difference -> non-negative 1x1 'lin' conv to
one channel -> spatial mean -> sum over the five layers.

The network is frozen: weights come from `load_lpips_params`, a .npz written by
`python -m vimjax.convert_weights` from the public torchvision and LPIPS files.
Its parameters carry no logical names, so they are replicated on any mesh.
"""
import functools
import os
from typing import Any, Sequence

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vimjax.models import convolution

Array = jax.Array

# Output channels of each conv, per stage; stage s ends with the relu{s}_{last} tap.
VGG16_STAGES = ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512), (512, 512, 512))
TAP_CHANNELS = tuple(stage[-1] for stage in VGG16_STAGES)
# LPIPS ScalingLayer: ImageNet mean/std re-expressed for inputs in [-1, 1].
LPIPS_SHIFT = (-0.030, -0.088, -0.188)
LPIPS_SCALE = (0.458, 0.448, 0.450)
_NORM_EPS = 1e-10  # LPIPS normalize_tensor eps.

CONVERT_HINT = ("produce it with `python -m vimjax.convert_weights "
                "--torchvision_vgg16=vgg16-397923af.pth --lpips_vgg=vgg.pth --out=vgg16_lpips.npz`")


def _flat_lecun_normal(key, shape, dtype=jnp.float32):
  # Drawn 2-D then reshaped: XLA:CPU compiles rank-4 random draws very slowly.
  flat = nn.initializers.lecun_normal()(key, (int(np.prod(shape[:-1])), shape[-1]), dtype)
  return flat.reshape(shape)


def normalize_channels(features: Array) -> Array:
  """Unit-normalises each feature vector over channels, as LPIPS does.

  Args:
    features: [b, h, w, c].

  Returns:
    [b, h, w, c] float32, x / (||x||_2 + 1e-10) per (b, h, w).
  """
  x = features.astype(jnp.float32)
  # The tiny constant inside the sqrt keeps the gradient finite where x == 0.
  norm = jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True) + _NORM_EPS ** 2)
  return x / (norm + _NORM_EPS)


class _Conv3x3(nn.Module):
  """nn.Conv(features, (3, 3), padding=1) through `convolution.conv2d`: the same
  params and values; patches @ kernel on the CPU (the GAN step takes 12% less
  time), lax's convolution elsewhere."""
  features: int
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kernel = self.param("kernel", _flat_lecun_normal, (3, 3, x.shape[-1], self.features),
                        self.param_dtype)
    bias = self.param("bias", nn.initializers.zeros_init(), (self.features,),
                      self.param_dtype)
    x = jnp.pad(x.astype(self.dtype), ((0, 0), (1, 1), (1, 1), (0, 0)))
    return convolution.conv2d(x, kernel.astype(self.dtype), 1) + bias.astype(self.dtype)


class Vgg16Features(nn.Module):
  """torchvision VGG16 `features` up to relu5_3 (no final max-pool).

  Conv submodules are named conv{stage}_{index} (conv1_1 ... conv5_3).
  """
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> list[Array]:
    """Features at the five LPIPS taps.

    Args:
      x: [b, h, w, 3] input already shifted/scaled like torchvision's ImageNet
        normalisation (see `LPIPS`).

    Returns:
      Five arrays [b, h / 2^s, w / 2^s, TAP_CHANNELS[s]] in `dtype`, s = 0..4.
    """
    taps = []
    x = x.astype(self.dtype)
    conv = functools.partial(_Conv3x3, dtype=self.dtype, param_dtype=self.param_dtype)
    for s, stage in enumerate(VGG16_STAGES):
      if s:
        x = nn.max_pool(x, (2, 2), strides=(2, 2), padding="VALID")
      for i, features in enumerate(stage):
        x = conv(features, name=f"conv{s + 1}_{i + 1}")(x)
        x = nn.relu(x)
      taps.append(x)
    return taps


class LPIPS(nn.Module):
  """LPIPS 'vgg' v0.1 distance.

  Params: {"vgg": {conv1_1 ... conv5_3: {kernel [3, 3, in, out], bias [out]}},
  "lin_0" ... "lin_4": {kernel [1, 1, C, 1]}}. Random init gives random VGG
  weights and all-ones lin weights (LPIPS's "baseline" channel sum).
  """
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def setup(self):
    self.vgg = Vgg16Features(dtype=self.dtype, param_dtype=self.param_dtype)
    # Non-negative 1x1 convs to one channel, no bias (LPIPS NetLinLayer).
    self.lin = [nn.Conv(1, (1, 1), use_bias=False, dtype=jnp.float32,
                        param_dtype=self.param_dtype, kernel_init=nn.initializers.ones)
                for _ in TAP_CHANNELS]

  def features(self, images: Array) -> list[Array]:
    """The five VGG taps of images in [0, 1] ([b, h, w, 3])."""
    x = images.astype(jnp.float32) * 2.0 - 1.0
    x = (x - jnp.array(LPIPS_SHIFT)) / jnp.array(LPIPS_SCALE)
    return self.vgg(x)

  def distance_from_features(self, features0: Sequence[Array],
                             features1: Sequence[Array]) -> Array:
    """LPIPS head on given taps.

    Args:
      features0: five arrays [b, h_l, w_l, TAP_CHANNELS[l]].
      features1: same shapes.

    Returns:
      [b] float32 distance.
    """
    total = 0.0
    for lin, f0, f1 in zip(self.lin, features0, features1):
      diff = jnp.square(normalize_channels(f0) - normalize_channels(f1))
      total = total + jnp.mean(lin(diff)[..., 0], axis=(1, 2))
    return total

  def __call__(self, images0: Array, images1: Array) -> Array:
    """LPIPS distance.

    Args:
      images0: [b, h, w, 3] in [0, 1]; h, w >= 16 (five VGG stages).
      images1: [b, h, w, 3] in [0, 1].

    Returns:
      [b] float32 distance, 0 for identical images.
    """
    if images0.shape != images1.shape:
      raise ValueError(f"LPIPS inputs differ in shape: {images0.shape} vs {images1.shape}.")
    if images0.ndim != 4 or min(images0.shape[1:3]) < 16:
      raise ValueError(f"LPIPS needs [b, h, w, 3] images with h, w >= 16 (four VGG "
                       f"poolings), got shape {images0.shape}.")
    # Two VGG passes, not one over the two batches concatenated: under batch
    # sharding, slicing the halves back out moves every tap between devices
    # (18.6 GB of collective-permutes per chip per step for ViT-VQGAN SS on 8 chips).
    return self.distance_from_features(self.features(images0), self.features(images1))


def flatten_params(tree: Any) -> dict[str, np.ndarray]:
  """{"vgg/conv1_1/kernel": array, ...} from a (possibly {"params": ...}) tree."""
  tree = flax.core.unfreeze(tree)
  tree = tree.get("params", tree)
  return {"/".join(k): np.asarray(v) for k, v in
          flax.traverse_util.flatten_dict(tree).items()}


def expected_param_shapes() -> dict[str, tuple[int, ...]]:
  """Flat name -> shape of the `LPIPS` params (what the .npz must hold)."""
  shapes = jax.eval_shape(LPIPS().init, jax.random.key(0),
                          jnp.zeros((1, 16, 16, 3)), jnp.zeros((1, 16, 16, 3)))
  flat = flax.traverse_util.flatten_dict(shapes["params"])
  return {"/".join(k): tuple(v.shape) for k, v in flat.items()}


def load_lpips_params(path: str) -> dict[str, Any]:
  """Loads converted LPIPS weights.

  Args:
    path: .npz written by `python -m vimjax.convert_weights`.

  Returns:
    The params tree (float32 NumPy arrays): `LPIPS().apply({"params": tree}, a, b)`.

  Raises:
    FileNotFoundError: `path` does not exist.
    ValueError: a key is missing or unexpected, or a shape is wrong.
  """
  if not os.path.exists(path):
    raise FileNotFoundError(f"LPIPS weights {path!r} not found; {CONVERT_HINT}.")
  with np.load(path) as data:
    arrays = {k: np.asarray(data[k], np.float32) for k in data.files}
  expected = expected_param_shapes()
  for name, shape in expected.items():
    if name not in arrays:
      raise ValueError(f"LPIPS weights {path!r} lack array {name!r} (shape {shape}); "
                       f"{CONVERT_HINT}.")
    if arrays[name].shape != shape:
      raise ValueError(f"LPIPS weights {path!r}: {name!r} has shape {arrays[name].shape}, "
                       f"expected {shape}.")
  extra = sorted(set(arrays) - set(expected))
  if extra:
    raise ValueError(f"LPIPS weights {path!r} hold unexpected array {extra[0]!r} "
                     f"({len(extra)} unexpected); valid names: vgg/conv*_*/{{kernel,bias}}, "
                     "lin_*/kernel.")
  tree = flax.traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in arrays.items()})
  return tree
