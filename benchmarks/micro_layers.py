r"""JAX_PLATFORMS=cpu python benchmarks/micro_layers.py [layer_norm] [batch_sum] [gelu_backward]
    [first_argmax] [codebook_gradient] [kernel_gradient]

(With TCMalloc, as the binaries run: `LD_PRELOAD=libtcmalloc_minimal.so.4 ...`.)

The micro-benchmarks behind BUILD_NOTES.md, "Speed (issue 13)", ninth to eleventh
rounds, at the tokenizer's shapes (float32), in milliseconds:
- `layer_norm`: forward + backward of `layers.LayerNorm`, `layers_chained`
  dependent norms, on XLA (the module's jnp formula, traced under
  `cpu_kernels.xla_reference()`) against the C++ kernel (`models/cpu_layer_norm.py`);
- `batch_sum`: the position embeddings' gradient, a sum over the batch axis, as
  XLA's reduce against a [1, b] x [b, n] matmul (landed in the tenth round:
  `layers.add_to_every_example`);
- `gelu_backward`: four MLP blocks forward + backward with `nn.gelu` against a
  custom-VJP GELU that saves only its input, and an elementwise `x * g + 1` over
  the [16, 256, 1024] hidden layer for the memory bandwidth (tenth round, not landed);
- `first_argmax`: the quantizer's argmax over [16, 256, 1024] against max +
  the first index at the max (the same codes; tenth round, not landed);
- `codebook_gradient`: the codebook similarity and entropy penalty, forward +
  backward, with autodiff's codebook gradient against (latents^T dS)^T (tenth
  round, not landed) and over one [b * n] token axis (eleventh round, landed in
  `quantizers.py`: stand-alone it is 1-3 ms faster than autodiff's; in the step
  XLA copied dS into [k, b, n] for the first form, 10 ms in the profile);
- `kernel_gradient`: a Dense layer's kernel gradient over 4096 tokens as Eigen's
  x^T g (what XLA emits) against x^T copied out first (an optimization barrier
  keeps the copy) so that YNNPACK runs a plain matmul, for the attention's three
  [256, 256] projections sharing x, the MLP's wi and its wo (eleventh round:
  faster here for the first two, no faster in the step; not landed).
Arguments name the benchmarks to run (default: all).
"""
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp

from vimjax import losses
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
  against the same sum as a [1, b] x [b, n] matmul (`layers.add_to_every_example`)."""
  g = jax.random.normal(jax.random.key(0), shape)
  sums = {"reduce": lambda g: jnp.sum(g, axis=0),
          "matmul": lambda g: (jnp.ones((1, shape[0]), g.dtype) @ g.reshape(shape[0], -1)
                               ).reshape(shape[1:])}
  row = []
  for name, total in sums.items():
    row.append(f"{name} {milliseconds_per_call(jax.jit(total), g, repeats=20):5.2f}")
  print(f"sum of {list(shape)} over axis 0, ms: " + "  ".join(row), flush=True)


@jax.custom_vjp
def _gelu_saving_input(x):
  return nn.gelu(x)


_gelu_saving_input.defvjp(lambda x: (nn.gelu(x), x),
                          lambda x, g: jax.vjp(nn.gelu, x)[1](g))


def gelu_backward(shape=(16, 256, 256), hidden=1024, blocks=4):
  key = iter(jax.random.split(jax.random.key(0), 6))
  x, gy = (jax.random.normal(next(key), shape) for _ in range(2))
  params = (jax.random.normal(next(key), (shape[-1], hidden)) * 0.05, jnp.full(hidden, 0.1),
            jax.random.normal(next(key), (hidden, shape[-1])) * 0.05, jnp.zeros(shape[-1]))

  def grads(activation):
    def loss(params, x):
      w1, b1, w2, b2 = params
      for _ in range(blocks):
        x = x + activation(layers.dense_matmul(x, w1) + b1) @ w2 + b2
      return jnp.sum(x * gy)
    return jax.jit(jax.grad(loss, argnums=(0, 1)))

  variants = {"nn.gelu": grads(nn.gelu), "custom VJP": grads(_gelu_saving_input)}
  results = [jax.tree.leaves(f(params, x)) for f in variants.values()]
  difference = max(float(jnp.max(jnp.abs(a - b))) for a, b in zip(*results))
  row = [f"{name} {milliseconds_per_call(f, params, x, repeats=10):6.1f}"
         for name, f in variants.items()]
  row.append(f"gradients' largest difference {difference:.1e}")
  h, g = (jax.random.normal(next(key), (*shape[:-1], hidden)) for _ in range(2))
  row.append(f"x * g + 1 on {[*shape[:-1], hidden]} "
             f"{milliseconds_per_call(jax.jit(lambda h: h * g + 1.0), h, repeats=20):5.2f}")
  print(f"{blocks} MLP blocks fwd+bwd, ms: " + "  ".join(row), flush=True)


def first_argmax(shape=(16, 256, 1024)):
  s = jax.random.normal(jax.random.key(0), shape)

  def max_then_first_index(s):
    iota = jax.lax.broadcasted_iota(jnp.int32, s.shape, s.ndim - 1)
    return jnp.min(jnp.where(s == jnp.max(s, -1, keepdims=True), iota, s.shape[-1]), -1)

  forms = {"argmax": lambda s: jnp.argmax(s, -1).astype(jnp.int32),
           "max + first index": max_then_first_index}
  codes = [jax.jit(f)(s) for f in forms.values()]
  assert bool(jnp.all(codes[0] == codes[1]))
  print(f"argmax over {list(shape)}, ms: " + "  ".join(
      f"{name} {milliseconds_per_call(jax.jit(f), s, repeats=30):5.2f}"
      for name, f in forms.items()), flush=True)


@jax.custom_vjp
def _similarity_transposed_gradient(latents, codebook):
  return jnp.einsum("bnd,kd->bnk", latents, codebook)


def _similarity_bwd(residuals, ds):
  latents, codebook = residuals
  return (jnp.einsum("bnk,kd->bnd", ds, codebook),
          jnp.einsum("bnd,bnk->dk", latents, ds).T)


_similarity_transposed_gradient.defvjp(
    lambda latents, codebook: (_similarity_transposed_gradient(latents, codebook),
                               (latents, codebook)), _similarity_bwd)


def codebook_gradient(tokens=(16, 256), codebook_size=1024, lookup_dim=32):
  unit = lambda x: x / jnp.linalg.norm(x, axis=-1, keepdims=True)
  latents = unit(jax.random.normal(jax.random.key(0), (*tokens, lookup_dim)))
  codebook = unit(jax.random.normal(jax.random.key(1), (codebook_size, lookup_dim)))

  def one_token_axis(l, c):
    return jnp.einsum("td,kd->tk", l.reshape(-1, l.shape[-1]), c).reshape(*l.shape[:-1], -1)

  forms = {"autodiff": lambda l, c: jnp.einsum("bnd,kd->bnk", l, c),
           "(latents^T dS)^T": _similarity_transposed_gradient,
           "one token axis": one_token_axis}
  row = []
  for name, similarity in forms.items():
    grads = jax.jit(jax.grad(lambda l, c, similarity=similarity: losses.entropy_penalty(
        similarity(l, c), 0.01), argnums=(0, 1)))
    row.append(f"{name} {milliseconds_per_call(grads, latents, codebook, repeats=20):5.2f}")
  print(f"similarity + entropy penalty fwd+bwd, {codebook_size} codes, ms: " + "  ".join(row),
        flush=True)


def kernel_gradient(tokens=4096, dim=256, hidden=1024):
  keys = iter(jax.random.split(jax.random.key(0), 5))
  x = jax.random.normal(next(keys), (tokens, dim))
  h = jax.random.normal(next(keys), (tokens, hidden))
  gs = [jax.random.normal(next(keys), (tokens, dim)) for _ in range(3)]
  eigen = lambda x, g: jax.lax.dot_general(x, g, (((0,), (0,)), ((), ())))  # x^T g
  copied = lambda x: jax.lax.optimization_barrier(x.T)  # XLA keeps the transposing copy.

  def three_with_one_copy(x, *gs):
    xt = copied(x)
    return [xt @ g for g in gs]

  cases = {
      f"3 x [{dim}, {dim}] (q, k, v)": (
          lambda x, *gs: [eigen(x, g) for g in gs], three_with_one_copy, (x, *gs)),
      f"[{dim}, {hidden}] (wi)": (eigen, lambda x, g: copied(x) @ g, (x, h)),
      f"[{hidden}, {dim}] (wo)": (eigen, lambda x, g: copied(x) @ g, (h, gs[0])),
  }
  for name, (plain, with_copy, args) in cases.items():
    got, want = jax.jit(with_copy)(*args), jax.jit(plain)(*args)
    assert all(jnp.allclose(a, b, rtol=1e-4, atol=1e-2) for a, b in
               zip(jax.tree.leaves(got), jax.tree.leaves(want))), name
    row = [f"{label} {milliseconds_per_call(jax.jit(f), *args, repeats=30):5.2f}"
           for label, f in (("x^T g", plain), ("copy of x^T, then a matmul", with_copy))]
    print(f"kernel gradient {name} over {tokens} tokens, ms: " + "  ".join(row), flush=True)


if __name__ == "__main__":
  for name in sys.argv[1:] or ("layer_norm", "batch_sum", "gelu_backward", "first_argmax",
                                "codebook_gradient", "kernel_gradient"):
    globals()[name]()
