r"""JAX_PLATFORMS=cpu python benchmarks/micro_convs.py

The convolution micro-benchmarks behind BUILD_NOTES.md, "Speed (issue 13)",
second round: XLA's convolution against `convolution.conv_as_matmul`
(forward + backward, and the R1-shaped kernel gradient of a squared input
gradient), three-row patches, and LPIPS' VGG input gradient as a forward
convolution with the flipped kernel; eighth round (`python benchmarks/micro_convs.py
patch_transposes`): the patches and their transpose (col2im) written as custom-VJP
pairs, by gathers or by slices and one explicit sum of pads. Milliseconds per
call, batch 16. Arguments name the sections to run (default: all).
"""
import functools
import sys

import jax
import jax.numpy as jnp
from jax import lax

from vimjax.models import convolution
from vimjax.perf.timing import milliseconds_per_call

DN = ("NHWC", "HWIO", "NHWC")


def lax_conv(stride):
  padding = "VALID" if stride > 1 else [(1, 1), (1, 1)]
  return lambda x, w: lax.conv_general_dilated(x, w, (stride, stride), padding,
                                               dimension_numbers=DN)


def patches_conv(stride):
  pad = lambda x: x if stride > 1 else jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  return lambda x, w: convolution.conv_as_matmul(pad(x), w, stride)


def row_patches_conv(x, w):
  """Stride 1, SAME: three matmuls over [b, h, w, 3c] row patches."""
  width, c = x.shape[2], x.shape[3]
  cols = jnp.pad(x, ((0, 0), (0, 0), (1, 1), (0, 0)))
  cols = jnp.concatenate([cols[:, :, j:j + width] for j in range(3)], axis=-1)
  cols = jnp.pad(cols, ((0, 0), (1, 1), (0, 0), (0, 0)))
  return sum(jnp.einsum("bhwk,ko->bhwo", cols[:, i:i + x.shape[1]], w[i].reshape(3 * c, -1))
             for i in range(3))


@jax.custom_vjp
def flipped_input_grad_conv(x, w):
  return lax_conv(1)(x, w)


def _fwd(x, w):
  return lax_conv(1)(x, w), (x, w)


def _bwd(residuals, g):
  x, w = residuals
  dx = lax_conv(1)(g, jnp.flip(w, (0, 1)).transpose(0, 1, 3, 2))
  return dx, jax.vjp(lambda w: lax_conv(1)(x, w), w)[1](g)[0]


flipped_input_grad_conv.defvjp(_fwd, _bwd)


def costs(conv, x, w):
  loss = lambda x, w: jnp.sum(jnp.square(conv(x, w)))
  both = jax.jit(jax.grad(loss, argnums=(0, 1)))
  r1 = jax.jit(jax.grad(lambda w, x: jnp.sum(jnp.square(jax.grad(loss)(x, w)))))
  return (f"fwd+bwd {milliseconds_per_call(both, x, w):7.1f}  "
          f"r1 {milliseconds_per_call(r1, w, x):7.1f}")


def _patch_pair(patches, col2im):
  """A conv whose patches (x -> [b, oh, ow, 9c]) and col2im are each other's VJP."""
  @functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
  def to_patches(x, stride):
    return patches(x, stride)

  @functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
  def from_patches(p, shape, stride):
    return col2im(p, shape, stride)

  to_patches.defvjp(lambda x, s: (patches(x, s), x.shape),
                    lambda s, shape, g: (from_patches(g, shape, s),))
  from_patches.defvjp(lambda p, shape, s: (col2im(p, shape, s), None),
                      lambda shape, s, _, g: (to_patches(g, s),))

  def conv(stride):
    pad = lambda x: x if stride > 1 else jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    return lambda x, w: jnp.einsum("bhwk,ko->bhwo", to_patches(pad(x), stride),
                                   w.reshape(-1, w.shape[-1]))
  return conv


def _out_size(size, stride):
  return (size - 3) // stride + 1


def _gather_index(h, w, stride):
  """[oh * ow * 9] flat input positions of the patches, (i, j) minor."""
  oy, ox, i, j = jnp.meshgrid(*(jnp.arange(n) for n in (
      _out_size(h, stride), _out_size(w, stride), 3, 3)), indexing="ij")
  return ((oy * stride + i) * w + ox * stride + j).reshape(-1)


def _gather_patches(x, stride):
  b, h, w, c = x.shape
  flat = jnp.take(x.reshape(b, h * w, c), _gather_index(h, w, stride), axis=1)
  return flat.reshape(b, _out_size(h, stride), _out_size(w, stride), 9 * c)


def _gather_col2im(p, shape, stride):
  """Each input position sums the patch entries that read it: up to 9 gathers."""
  b, h, w, c = shape
  index = _gather_index(h, w, stride)
  order = jnp.argsort(index, stable=True)  # Entries grouped by input position.
  counts = jnp.bincount(index, length=h * w)
  starts = jnp.cumsum(counts) - counts
  flat = p.reshape(b, -1, c)
  out = 0
  for t in range(9):  # The t-th reader of each position, or nothing (fill 0).
    source = jnp.where(t < counts, order[jnp.minimum(starts + t, index.size - 1)], index.size)
    out = out + jnp.take(flat, source, axis=1, mode="fill", fill_value=0)
  return out.reshape(shape)


def _slice_patches(x, stride):
  b, h, w, c = x.shape
  oh, ow = _out_size(h, stride), _out_size(w, stride)
  return jnp.concatenate([lax.slice(x, (0, i, j, 0), (b, i + stride * (oh - 1) + 1,
                                                      j + stride * (ow - 1) + 1, c),
                                    (1, stride, stride, 1))
                          for i in range(3) for j in range(3)], axis=-1)


def _pads_col2im(p, shape, stride):
  """One expression: nine (interior-)padded slices of the patches, summed."""
  _, h, w, c = shape
  oh, ow = p.shape[1:3]
  parts = [lax.pad(p[..., t * c:(t + 1) * c], jnp.zeros((), p.dtype),
                   ((0, 0, 0), (i, h - i - stride * (oh - 1) - 1, stride - 1),
                    (j, w - j - stride * (ow - 1) - 1, stride - 1), (0, 0, 0)))
           for t, (i, j) in enumerate((i, j) for i in range(3) for j in range(3))]
  return sum(parts[1:], parts[0])


def patch_transposes():
  key = jax.random.key(0)
  designs = {"patches (landed)": patches_conv,
             "gather pair": _patch_pair(_gather_patches, _gather_col2im),
             "slices + sum of pads pair": _patch_pair(_slice_patches, _pads_col2im)}
  print("Patches and col2im as custom-VJP pairs (fwd, fwd+bwd, r1):")
  for size, cin, cout, stride in [(64, 64, 64, 1), (32, 128, 128, 1), (67, 64, 128, 2)]:
    x = jax.random.normal(key, (16, size, size, cin))
    w = jax.random.normal(key, (3, 3, cin, cout)) * 0.05
    rows = [f"{name} fwd {milliseconds_per_call(jax.jit(make(stride)), x, w):6.1f} "
            f"{costs(make(stride), x, w)}" for name, make in designs.items()]
    print(f"  {size}px {cin}->{cout} stride {stride}: " + " | ".join(rows), flush=True)


def main():
  key = jax.random.key(0)
  print("3x3 stride 2 (discriminator down-sampling), padded input:")
  for size, cin, cout in [(67, 64, 128), (35, 128, 256), (19, 256, 256)]:
    x = jax.random.normal(key, (16, size, size, cin))
    w = jax.random.normal(key, (3, 3, cin, cout)) * 0.05
    print(f"  {size}px {cin}->{cout}: lax {costs(lax_conv(2), x, w)} | "
          f"patches {costs(patches_conv(2), x, w)}", flush=True)
  print("3x3 stride 1, SAME:")
  for size, c in [(64, 64), (32, 128), (16, 256)]:
    x = jax.random.normal(key, (16, size, size, c))
    w = jax.random.normal(key, (3, 3, c, c)) * 0.05
    print(f"  {size}px {c}: lax {costs(lax_conv(1), x, w)} | patches "
          f"{costs(patches_conv(1), x, w)} | row patches {costs(row_patches_conv, x, w)}",
          flush=True)
  print("VGG input gradient only (frozen weights):")
  for size, c in [(64, 64), (32, 128), (16, 256), (8, 512)]:
    x = jax.random.normal(key, (16, size, size, c))
    w = jax.random.normal(key, (3, 3, c, c)) * 0.05
    grads = [jax.jit(jax.grad(lambda x, conv=conv: jnp.sum(jnp.square(conv(x, w)))))
             for conv in (lax_conv(1), flipped_input_grad_conv)]
    print(f"  {size}px {c}: lax {milliseconds_per_call(grads[0], x):6.1f} | flipped forward "
          f"{milliseconds_per_call(grads[1], x):6.1f}", flush=True)


if __name__ == "__main__":
  if len(sys.argv) > 1:  # Only the named sections, e.g. `patch_transposes`.
    for name in sys.argv[1:]:
      globals()[name]()
  else:
    main()
    patch_transposes()
