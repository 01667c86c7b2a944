r"""JAX_PLATFORMS=cpu python benchmarks/micro_attention.py

The attention and decode micro-benchmarks behind BUILD_NOTES.md, "Speed
(issue 13)", second round:
- training attention, forward and forward + backward, at the tokenizer's and
  Parti's shapes: `jax.nn.dot_product_attention` against
  `layers.heads_major_attention`;
- 256 steps x 16 chained small-M ([8, 512] x [512, 2048] and back) dots, float32
  against bfloat16 weights.
Milliseconds per call.
"""
import time

import jax
import jax.numpy as jnp

from vimjax.models import layers

def timed(fn, *args, repeats=5):
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(repeats):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / repeats * 1e3


def training_attention():
  implementations = {
      "dot_product_attention": lambda q, k, v, causal: jax.nn.dot_product_attention(
          q, k, v, is_causal=causal, scale=1.0),
      "heads_major_attention": lambda q, k, v, causal: layers.heads_major_attention(
          q, k, v, causal=causal)}
  for b, length, heads, dim, causal in [(16, 256, 8, 32, False), (8, 256, 8, 64, True)]:
    q, k, v, g = (jax.random.normal(jax.random.key(i), (b, length, heads, dim))
                  for i in range(4))
    row = [f"[{b}, {length}, {heads}, {dim}] causal={causal}:"]
    for name, attend in implementations.items():
      forward = jax.jit(lambda q, k, v, attend=attend: attend(q, k, v, causal))
      backward = jax.jit(jax.grad(lambda q, k, v, attend=attend: jnp.sum(
          attend(q, k, v, causal) * g), argnums=(0, 1, 2)))
      row.append(f"{name} fwd {timed(forward, q, k, v):5.1f} "
                 f"fwd+bwd {timed(backward, q, k, v):5.1f}")
    print("  ".join(row), flush=True)


def small_m_dots(rows=8):
  for dtype in (jnp.float32, jnp.bfloat16):
    weights = [(jax.random.normal(jax.random.key(i), (512, 2048)).astype(dtype) * 0.02,
                jax.random.normal(jax.random.key(9 + i), (2048, 512)).astype(dtype) * 0.02)
               for i in range(8)]
    def loop(x, weights):
      def step(_, x):
        for up, down in weights:
          x = x + jnp.tanh(x @ up) @ down
        return x
      return jax.lax.fori_loop(0, 256, step, x)
    x = jax.random.normal(jax.random.key(0), (rows, 512)).astype(dtype)
    ms = timed(jax.jit(loop), x, weights, repeats=3)
    print(f"small-M dots, {jnp.dtype(dtype).name}: {ms:7.1f} ({ms / 4096 * 1e3:.0f} us/dot)",
          flush=True)


if __name__ == "__main__":
  training_attention()
  small_m_dots()
