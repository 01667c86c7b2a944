r"""JAX_PLATFORMS=cpu python benchmarks/micro_attention.py

(With TCMalloc, as the binaries run: `LD_PRELOAD=libtcmalloc_minimal.so.4
JAX_PLATFORMS=cpu python benchmarks/micro_attention.py`; fifth round.)

The attention and decode micro-benchmarks behind BUILD_NOTES.md, "Speed
(issue 13)", second round:
- training attention, forward and forward + backward, at the tokenizer's and
  Parti's shapes: `jax.nn.dot_product_attention` against
  `layers.heads_major_attention`;
- QK^T alone at the tokenizer's shapes, in the layouts tried (fifth round);
- 256 steps x 16 chained small-M ([8, 512] x [512, 2048] and back) dots, float32
  against bfloat16 weights (second round), and float32 at 1-16 rows (fifth round);
- the weight matmuls of a Parti decode step at the issue's dims (8 layers: q, k,
  v, out, cross q, cross out, MLP in and out; 114 MB of float32), 256 steps at
  4 and 8 rows: float32, bfloat16 with a bfloat16 output, and bfloat16
  accumulated into a float32 output (`layers.einsum`; third round).
Milliseconds per call.
"""
import jax
import jax.numpy as jnp

from vimjax.models import layers
from vimjax.perf.timing import milliseconds_per_call


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
      row.append(f"{name} fwd {milliseconds_per_call(forward, q, k, v, repeats=5):5.1f} "
                 f"fwd+bwd {milliseconds_per_call(backward, q, k, v, repeats=5):5.1f}")
    print("  ".join(row), flush=True)


def qk_layouts():
  """QK^T at the tokenizer's shapes: [16, 8, 256, 32] x [16, 8, 256, 32] -> [.., 256, 256]."""
  q, k = (jax.random.normal(jax.random.key(i), (16, 8, 256, 32)) for i in range(2))
  layouts = {
      "bhqd,bhkd": lambda q, k: jnp.einsum("bhqd,bhkd->bhqk", q, k),
      "bhqd,bhdk": lambda q, k: jnp.einsum("bhqd,bhdk->bhqk", q, jnp.swapaxes(k, 2, 3)),
      "flat batch": lambda q, k: jnp.einsum("nqd,nkd->nqk", q.reshape(128, 256, 32),
                                            k.reshape(128, 256, 32)),
      "lax.map": lambda q, k: jax.lax.map(
          lambda qk: jnp.einsum("hqd,hkd->hqk", *qk), (q, k))}
  print("QK^T alone: " + "  ".join(
      f"{name} {milliseconds_per_call(jax.jit(fn), q, k, repeats=10):5.2f}"
      for name, fn in layouts.items()), flush=True)


def small_m_dots(rows=8, dtypes=(jnp.float32, jnp.bfloat16)):
  for dtype in dtypes:
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
    ms = milliseconds_per_call(jax.jit(loop), x, weights)
    print(f"small-M dots, {rows} rows, {jnp.dtype(dtype).name}: {ms:7.1f} "
          f"({ms / 4096 * 1e3:.0f} us/dot)",
          flush=True)


def decode_step_dots():
  shapes = dict(q=(512, 512), k=(512, 512), v=(512, 512), out=(512, 512),
                cross_q=(512, 512), cross_out=(512, 512), wi=(512, 2048), wo=(2048, 512))
  key = iter(jax.random.split(jax.random.key(0), 8 * len(shapes) + 1))
  f32_layers = [{name: jax.random.normal(next(key), shape) * 0.02
                 for name, shape in shapes.items()} for _ in range(8)]
  logits = jax.random.normal(next(key), (512, 1024)) * 0.02
  variants = {  # (weight dtype, matmul)
      "float32": (jnp.float32, lambda a, w: a @ w),
      "bfloat16 -> bfloat16": (jnp.bfloat16, lambda a, w: (a.astype(w.dtype) @ w)),
      "bfloat16 -> float32": (jnp.bfloat16, lambda a, w: layers.einsum(
          "bk,kn->bn", a.astype(w.dtype), w).astype(jnp.float32))}

  for name, (dtype, mm) in variants.items():
    def loop(x, params, logits, mm=mm):
      def step(_, x):
        for p in params:
          a = jnp.tanh(mm(x, p["q"])) + jnp.tanh(mm(x, p["k"])) * jnp.tanh(mm(x, p["v"]))
          x = x + mm(a, p["out"]).astype(x.dtype)
          x = x + mm(jnp.tanh(mm(x, p["cross_q"])), p["cross_out"]).astype(x.dtype)
          x = x + mm(jax.nn.gelu(mm(x, p["wi"])), p["wo"]).astype(x.dtype)
        return x + mm(x, logits)[:, :512].astype(x.dtype)
      return jax.lax.fori_loop(0, 256, step, x)
    params, cast_logits = jax.tree.map(lambda w: w.astype(dtype), (f32_layers, logits))
    row = [f"decode-step dots, {name}:"]
    for rows in (4, 8):
      x = jnp.full((rows, 512), 0.01, jnp.float32)
      ms = milliseconds_per_call(jax.jit(loop), x, params, cast_logits)
      row.append(f"{rows} rows {ms / 256:5.2f} ms/step")
    print("  ".join(row), flush=True)


if __name__ == "__main__":
  training_attention()
  qk_layouts()
  small_m_dots()
  for rows in (1, 2, 4, 16):
    small_m_dots(rows, dtypes=(jnp.float32,))
  decode_step_dots()
