"""Convolutions as (strided) patches times the kernel, for XLA:CPU.

XLA:CPU runs convolution gradients badly: the input gradient of a strided
convolution, the kernel gradients inside the R1 penalty's gradient of a
gradient, and VGG's input gradients (unfused, ~32 GFLOP/s). Slices and one
matmul have gradients that are pads and matmuls. Used on the CPU only, by the
StyleGAN discriminator (`conv2d`) and LPIPS' VGG (BUILD_NOTES.md, "Speed (issue
13)"): on TPU and GPU the convolutions are native, and the patches would hold
kh * kw copies of every input (the 256 px ViT-VQGAN GAN step needed 43 GiB per
v4 chip with them, 23 without).
"""
import jax
import jax.numpy as jnp

from vimjax.models import layers

Array = jax.Array


def conv2d(x: Array, kernel: Array, stride: int) -> Array:
  """VALID convolution, NHWC x HWIO: `conv_as_matmul` on the CPU, lax's elsewhere.

  Both accumulate in float32 and return the operands' dtype (`layers.einsum`).
  """
  if layers.target_platform() == "cpu":
    return conv_as_matmul(x, kernel, stride)
  out = jax.lax.conv_general_dilated(
      x, kernel, (stride, stride), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"),
      preferred_element_type=jnp.float32)
  return out.astype(jnp.result_type(x, kernel))


def conv_as_matmul(x: Array, kernel: Array, stride: int) -> Array:
  """VALID convolution as (strided) patches times the kernel.

  In the 64 px GAN step, XLA:CPU's discriminator convolutions (their R1 kernel
  gradients) took 97% of the time (215 s of 221 s); as patches, 5 s.

  Args:
    x: [b, h, w, cin], already padded.
    kernel: [kh, kw, cin, cout].
    stride: the stride of both spatial axes.

  Returns:
    [b, (h - kh) // stride + 1, (w - kw) // stride + 1, cout].
  """
  kh, kw, cin, cout = kernel.shape
  b, h, w, _ = x.shape
  oh, ow = (h - kh) // stride + 1, (w - kw) // stride + 1
  # Patch channels ordered (i, j, c), as the HWIO kernel flattens.
  patches = [jax.lax.slice(x, (0, i, j, 0), (b, i + stride * (oh - 1) + 1,
                                             j + stride * (ow - 1) + 1, cin),
                           (1, stride, stride, 1))
             for i in range(kh) for j in range(kw)]
  patches = patches[0] if len(patches) == 1 else jnp.concatenate(patches, axis=-1)
  out = layers.einsum("bhwk,ko->bhwo", patches, kernel.reshape(kh * kw * cin, cout))
  # Its gradient written out before the kernel gradient's transposing copy: XLA:CPU
  # fused the blur's backward adds into that copy (135 ms for 8 MB).
  return layers.materialize_gradient(out)
