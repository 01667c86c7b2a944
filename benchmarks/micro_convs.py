r"""JAX_PLATFORMS=cpu python benchmarks/micro_convs.py

The convolution micro-benchmarks behind BUILD_NOTES.md, "Speed (issue 13)",
second round: XLA's convolution against `convolution.conv_as_matmul`
(forward + backward, and the R1-shaped kernel gradient of a squared input
gradient), three-row patches, and LPIPS' VGG input gradient as a forward
convolution with the flipped kernel. Milliseconds per call, batch 16.
"""
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
  main()
