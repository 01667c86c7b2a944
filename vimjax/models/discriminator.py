"""StyleGAN2 residual discriminator (Karras et al. 2020, config E/F "resnet").

images -> fromRGB (1x1) -> one residual block per resolution down to 4x4 ->
minibatch-stddev -> 3x3 conv -> dense -> dense -> one logit per image.
Downsampling uses the paper's [1, 3, 3, 1] FIR blur before striding, and
leaky-ReLU(0.2) carries StyleGAN's sqrt(2) gain so activations keep unit scale.
"""
import math
from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vimjax.models.convolution import conv2d

Array = jax.Array

# Conv kernels [kh, kw, in, out]: in FSDP-split like "embed", out tensor-split.
CONV_AXES = (None, None, "embed", "channels")
RGB_CONV_AXES = (None, None, None, "channels")
_LRELU_GAIN = math.sqrt(2.0)
_SKIP_GAIN = math.sqrt(0.5)


def flat_init(init: nn.initializers.Initializer) -> nn.initializers.Initializer:
  """Draws a conv kernel as a 2-D [kh * kw * in, out] matrix, then reshapes.

  Same fan-in, same distribution; XLA:CPU compiles rank-4 partitionable
  threefry draws very slowly (seconds per kernel), rank-2 ones fast.
  """
  def wrapped(key, shape, dtype=jnp.float32):
    return init(key, (math.prod(shape[:-1]), shape[-1]), dtype).reshape(shape)
  return wrapped


def _lrelu(x: Array) -> Array:
  return nn.leaky_relu(x, 0.2) * jnp.asarray(_LRELU_GAIN, x.dtype)


_BLUR_TAPS = (1.0 / 8, 3.0 / 8, 3.0 / 8, 1.0 / 8)


def _blur_axis(x: Array, axis: int, stride: int) -> Array:
  """[1, 3, 3, 1] / 8 along one (already padded) axis: 4 strided slices, summed."""
  out = (x.shape[axis] - 4) // stride + 1
  taps = [jax.lax.slice_in_dim(x, i, i + stride * (out - 1) + 1, stride, axis)
          for i in range(4)]
  return sum(jnp.asarray(t, x.dtype) * tap for t, tap in zip(_BLUR_TAPS, taps))


def blur(x: Array, pad: int, stride: int) -> Array:
  """Depthwise [1, 3, 3, 1] x [1, 3, 3, 1] / 64 FIR filter.

  Separable, as shifted slices and adds rather than a depthwise convolution:
  XLA:CPU runs a `feature_group_count=C` convolution (and its gradients, and
  the R1 penalty's gradient of a gradient) one channel group at a time, ~100x
  slower than these elementwise ops; the values are the same up to rounding.

  Args:
    x: [b, h, w, c].
    pad: zero padding on every side.
    stride: 1 or 2.

  Returns:
    [b, (h + 2 pad - 4) // stride + 1, ..., c].
  """
  x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  return _blur_axis(_blur_axis(x, 1, stride), 2, stride)


def minibatch_stddev(x: Array, group_size: int, num_channels: int = 1) -> Array:
  """Appends the minibatch standard deviation as extra feature maps.

  Groups are *contiguous* runs of `group_size` examples (StyleGAN strides
  them), so with a batch-sharded input each group lives on one device.

  Args:
    x: [n, h, w, c] features.
    group_size: examples per group; min(group_size, n) is used.
    num_channels: number of channel groups F (c must be divisible by it).

  Returns:
    [n, h, w, c + num_channels]: for each group and channel group, the mean
    over (h, w, c / F) of the population std over the group's examples.
  """
  n, h, w, c = x.shape
  g = min(group_size, n)
  if n % g:
    raise ValueError(f"minibatch_stddev: batch {n} is not divisible by group "
                     f"size {g}; use a batch that is a multiple of it.")
  if c % num_channels:
    raise ValueError(f"minibatch_stddev: {c} channels not divisible by "
                     f"num_channels={num_channels}.")
  y = x.astype(jnp.float32).reshape(n // g, g, h, w, num_channels, c // num_channels)
  y = jnp.sqrt(jnp.var(y, axis=1) + 1e-8)  # [n/g, h, w, F, c/F]
  y = jnp.mean(y, axis=(1, 2, 4))  # [n/g, F]
  y = jnp.broadcast_to(y[:, None, None, None, :], (n // g, g, h, w, num_channels))
  return jnp.concatenate([x, y.reshape(n, h, w, num_channels).astype(x.dtype)], axis=-1)


class Conv(nn.Module):
  """Conv with StyleGAN2's blur-then-stride downsampling.

  Attributes:
    features: output channels.
    kernel_size: 1 or 3.
    down: halve the resolution (blur, then stride 2).
    use_bias: add a bias.
    gain: constant multiplier on the conv output (before the bias).
    equalized_lr: store N(0, 1) weights and scale by 1/sqrt(fan_in) at runtime.
    kernel_axes: logical names of the [kh, kw, in, out] kernel.
  """
  features: int
  kernel_size: int = 3
  down: bool = False
  use_bias: bool = True
  gain: float = 1.0
  equalized_lr: bool = False
  kernel_axes: tuple = CONV_AXES
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k, cin = self.kernel_size, x.shape[-1]
    fan_in = k * k * cin
    if self.equalized_lr:
      init, scale = nn.initializers.normal(1.0), 1.0 / math.sqrt(fan_in)
    else:
      init, scale = nn.initializers.variance_scaling(1.0, "fan_in", "normal"), 1.0
    kernel = self.param("kernel", nn.with_logical_partitioning(flat_init(init),
                                                               self.kernel_axes),
                        (k, k, cin, self.features), self.param_dtype)
    kernel = (kernel * (scale * self.gain)).astype(self.dtype)
    x = x.astype(self.dtype)
    if self.down and k > 1:  # Blur keeps the size (+1), the strided conv halves it.
      x = blur(x, pad=(k + 1) // 2, stride=1)
      stride = 2
    elif self.down:  # 1x1: blur and stride together.
      x = blur(x, pad=1, stride=2)
      stride = 1
    else:
      stride = 1
      x = jnp.pad(x, ((0, 0), (k // 2, k // 2), (k // 2, k // 2), (0, 0)))
    if stride > 1:
      # The patches read all input channels (the kernel splits outputs over
      # `channels`), so gather them here. Left to itself, XLA's SPMD partitioner
      # returned wrong *input gradients* of a strided lax conv whose input was
      # split on batch over two mesh axes and on channels over a third (mesh
      # 2x2x2: tests/test_strategies.py); forward values were right.
      x = nn.with_logical_constraint(x, ("activation_batch", None, None, None))
    y = conv2d(x, kernel, stride)
    if self.use_bias:
      bias = self.param("bias", nn.with_logical_partitioning(
          nn.initializers.zeros, (self.kernel_axes[-1],)), (self.features,),
                        self.param_dtype)
      y = y + bias.astype(self.dtype)
    return y


class Dense(nn.Module):
  """Dense layer with optional equalized learning rate."""
  features: int
  kernel_axes: tuple = ("embed", "mlp")
  equalized_lr: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    fan_in = x.shape[-1]
    if self.equalized_lr:
      init, scale = nn.initializers.normal(1.0), 1.0 / math.sqrt(fan_in)
    else:
      init, scale = nn.initializers.variance_scaling(1.0, "fan_in", "normal"), 1.0
    kernel = self.param("kernel", nn.with_logical_partitioning(init, self.kernel_axes),
                        (fan_in, self.features), self.param_dtype)
    bias = self.param("bias", nn.with_logical_partitioning(
        nn.initializers.zeros, (self.kernel_axes[-1],)), (self.features,), self.param_dtype)
    y = jnp.dot(x.astype(self.dtype), (kernel * scale).astype(self.dtype))
    return y + bias.astype(self.dtype)


class DiscriminatorBlock(nn.Module):
  """Residual block: two 3x3 convs (second downsamples) + 1x1 downsampled skip."""
  hidden_channels: int
  out_channels: int
  equalized_lr: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kw = dict(equalized_lr=self.equalized_lr, dtype=self.dtype, param_dtype=self.param_dtype)
    # (x + skip) / sqrt(2): the 1/sqrt(2) is folded into both branches' gains.
    skip = Conv(self.out_channels, 1, down=True, use_bias=False, gain=_SKIP_GAIN,
                name="skip", **kw)(x)
    y = _lrelu(Conv(self.hidden_channels, 3, name="conv0", **kw)(x))
    y = _lrelu(Conv(self.out_channels, 3, down=True, name="conv1", **kw)(y))
    return skip + y * jnp.asarray(_SKIP_GAIN, y.dtype)


class Discriminator(nn.Module):
  """StyleGAN2 residual discriminator.

  Attributes:
    image_size: input height = width, a power of two >= 8 (32 demo, 256 paper).
    base_channels: channels at full resolution; they double per halving ...
    max_channels: ... up to this cap (64 and 512 give StyleGAN2's 256px widths).
    channels: optional explicit channels per resolution, from `image_size`
      down to 4 (log2(image_size) - 1 entries); overrides base/max.
    mbstd_group_size: minibatch-stddev group size (4 in StyleGAN2).
    mbstd_num_channels: minibatch-stddev feature maps (1 in StyleGAN2).
    equalized_lr: StyleGAN's runtime weight scaling (off by default).
    dtype: compute dtype; the mbstd statistics and the logits are float32.
    param_dtype: parameter dtype.
  """
  image_size: int = 256
  base_channels: int = 64
  max_channels: int = 512
  channels: Optional[Sequence[int]] = None
  mbstd_group_size: int = 4
  mbstd_num_channels: int = 1
  equalized_lr: bool = False
  dtype: jnp.dtype = jnp.float32
  param_dtype: jnp.dtype = jnp.float32

  def resolution_channels(self) -> dict[int, int]:
    """{resolution: channels} from image_size down to 4."""
    size = self.image_size
    if size < 8 or size & (size - 1):
      raise ValueError(f"Discriminator image_size={size}; must be a power of two >= 8.")
    resolutions = [size >> i for i in range(int(math.log2(size)) - 1)]
    if self.channels is not None:
      if len(self.channels) != len(resolutions):
        raise ValueError(f"Discriminator channels={tuple(self.channels)} has "
                         f"{len(self.channels)} entries; need one per resolution "
                         f"{resolutions}.")
      return dict(zip(resolutions, (int(c) for c in self.channels)))
    return {r: min(self.base_channels * (size // r), self.max_channels) for r in resolutions}

  @nn.compact
  def __call__(self, images: Array) -> Array:
    """Scores images.

    Args:
      images: [b, image_size, image_size, 3] in [0, 1] (mapped to [-1, 1]).

    Returns:
      [b] float32 logits (higher = more real).
    """
    chans = self.resolution_channels()
    if images.ndim != 4 or images.shape[1:3] != (self.image_size, self.image_size):
      raise ValueError(f"Discriminator expects [b, {self.image_size}, {self.image_size}, c] "
                       f"images, got shape {images.shape}.")
    kw = dict(equalized_lr=self.equalized_lr, dtype=self.dtype, param_dtype=self.param_dtype)
    x = images.astype(self.dtype) * 2.0 - 1.0
    x = _lrelu(Conv(chans[self.image_size], 1, kernel_axes=RGB_CONV_AXES,
                    name="from_rgb", **kw)(x))
    res = self.image_size
    while res > 4:
      x = DiscriminatorBlock(chans[res], chans[res // 2], name=f"b{res}", **kw)(x)
      x = nn.with_logical_constraint(
          x, ("activation_batch", None, None, "activation_channels"))
      res //= 2
    # Epilogue at 4x4.
    c4 = chans[4]
    x = minibatch_stddev(x, self.mbstd_group_size, self.mbstd_num_channels)
    x = _lrelu(Conv(c4, 3, name="b4_conv", **kw)(x))
    x = x.reshape(x.shape[0], -1)
    x = _lrelu(Dense(c4, kernel_axes=("embed", "mlp"), name="b4_fc", **kw)(x))
    logits = Dense(1, kernel_axes=("mlp", None), name="out", **kw)(x)
    return logits[:, 0].astype(jnp.float32)
