r"""JAX_PLATFORMS=cpu python benchmarks/micro_layer_norm.py

(With TCMalloc, as the binaries run: `LD_PRELOAD=libtcmalloc_minimal.so.4 ...`.)

The LayerNorm micro-benchmark behind BUILD_NOTES.md, "Speed (issue 13)", ninth
round: forward + backward of `layers.LayerNorm` at the tokenizer's activations
([16, 256, 256] float32), `layers_chained` dependent norms, on XLA (the module's
jnp formula, traced under `cpu_kernels.xla_reference()`) against the C++ kernel
(`models/cpu_layer_norm.py`). Milliseconds per LayerNorm.
"""
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


if __name__ == "__main__":
  layer_norm()
