r"""JAX_PLATFORMS=cpu python benchmarks/micro_layers.py [layer_norm] [batch_sum]

(With TCMalloc, as the binaries run: `LD_PRELOAD=libtcmalloc_minimal.so.4 ...`.)

The micro-benchmarks behind BUILD_NOTES.md, "Speed (issue 13)", ninth round, at
the tokenizer's activations ([16, 256, 256] float32), in milliseconds:
- `layer_norm`: forward + backward of `layers.LayerNorm`, `layers_chained`
  dependent norms, on XLA (the module's jnp formula, traced under
  `cpu_kernels.xla_reference()`) against the C++ kernel (`models/cpu_layer_norm.py`);
- `batch_sum`: the position embeddings' gradient, a sum over the batch axis, as
  XLA's reduce against a [1, b] x [b, n] matmul (tried, not landed).
Arguments name the benchmarks to run (default: all).
"""
import sys

import jax
import jax.numpy as jnp

from vimjax.models import cpu_kernels
from vimjax.models import layers
from vimjax.perf.timing import milliseconds_per_call


def layer_norm(shape=(16, 256, 256), layers_chained=4):
  norm = layers.LayerNorm()
  x = jax.random.normal(jax.random.key(0), shape) * 2 + 1
  g = jax.random.normal(jax.random.key(1), shape)
  params = norm.init(jax.random.key(2), x)

  def chain(params, x):
    def loss(params, x):
      for _ in range(layers_chained):
        x = x + norm.apply(params, x)  # A residual stream, as in the blocks.
      return jnp.sum(x * g)
    return jax.grad(loss, argnums=(0, 1))(params, x)

  row = []
  for name, reference in (("XLA", True), ("cpu_layer_norm kernel", False)):
    # A new function each time: jit's trace cache does not see xla_reference().
    fresh = lambda *args: chain(*args)
    if reference:
      with cpu_kernels.xla_reference():
        compiled = jax.jit(fresh).lower(params, x).compile()
    else:
      compiled = jax.jit(fresh).lower(params, x).compile()
    assert ("vimjax_layer_norm" in compiled.as_text()) != reference, name
    ms = milliseconds_per_call(compiled, params, x, repeats=20) / layers_chained
    row.append(f"{name} {ms:5.2f}")
  print(f"LayerNorm {list(shape)} fwd+bwd, ms per norm: " + "  ".join(row), flush=True)


def batch_sum(shape=(16, 256, 256)):
  """A sum over the batch axis (the position embeddings' gradient): XLA's reduce
  against the same sum as a [1, b] x [b, n] matmul (ninth round, not landed)."""
  g = jax.random.normal(jax.random.key(0), shape)
  sums = {"reduce": lambda g: jnp.sum(g, axis=0),
          "matmul": lambda g: (jnp.ones((1, shape[0]), g.dtype) @ g.reshape(shape[0], -1)
                               ).reshape(shape[1:])}
  row = []
  for name, total in sums.items():
    row.append(f"{name} {milliseconds_per_call(jax.jit(total), g, repeats=20):5.2f}")
  print(f"sum of {list(shape)} over axis 0, ms: " + "  ".join(row), flush=True)


if __name__ == "__main__":
  for name in sys.argv[1:] or ("layer_norm", "batch_sum"):
    globals()[name]()
