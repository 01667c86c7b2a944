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
  accumulated into a float32 output (`layers.einsum`; third round);
- the attention matmul's NT / NN / TN forms at the tokenizer's shapes, and the
  attention's forward + backward with two hand-written backward passes (sixth
  round: `dot_forms`, `attention_backward_designs`), and a square matmul in
  float32 against bfloat16 (`square_matmul_dtypes`); the C++ kernel among the
  designs (seventh round).
Milliseconds per call. Arguments name the benchmarks to run (default: all).
"""
import functools
import sys

import jax
import jax.numpy as jnp

from vimjax.models import cpu_attention
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


def dot_forms(sets=6):
  """The attention matmul's three forms at the tokenizer's shapes, each over `sets`
  distinct operand sets chained through a scalar (nothing cached or dropped):
  NT (Q K^T; dP = dO V^T), NN (P V; dQ = dS K), TN (dV = P^T dO; dK = dS^T Q),
  and TN written transposed (dO^T P). Run under XLA_FLAGS to compare libraries
  (sixth round)."""
  b, h, length, d = 16, 8, 256, 32
  key = iter(jax.random.split(jax.random.key(0), 3 * sets))
  big = [jax.random.normal(next(key), (b, h, length, length)) for _ in range(sets)]
  small = [jax.random.normal(next(key), (b, h, length, d)) for _ in range(sets)]
  other = [jax.random.normal(next(key), (b, h, length, d)) for _ in range(sets)]
  forms = {"NT bhqd,bhkd->bhqk": lambda s, o, p: jnp.einsum("bhqd,bhkd->bhqk", s, o),
           "NN bhqk,bhkd->bhqd": lambda s, o, p: jnp.einsum("bhqk,bhkd->bhqd", p, s),
           "TN bhqk,bhqd->bhkd": lambda s, o, p: jnp.einsum("bhqk,bhqd->bhkd", p, s),
           "TN as bhqd,bhqk->bhdk": lambda s, o, p: jnp.einsum("bhqd,bhqk->bhdk", s, p)}
  row = []
  for name, form in forms.items():
    def chain(big, small, other, form=form):
      acc = 0.0
      for p, s, o in zip(big, small, other):
        acc = acc + form(s + acc, o, p)[0, 0, 0, 0] * 1e-9
      return acc
    ms = milliseconds_per_call(jax.jit(chain), big, small, other, repeats=5) / sets
    row.append(f"{name} {ms:5.2f} ms ({2 * b * h * length * length * d / ms / 1e6:3.0f} GFLOP/s)")
  print("attention dot forms: " + "  ".join(row), flush=True)


def _probabilities_and_output(q, k, v):
  """[n, l, d] -> (unnormalised exp(s - max), row sums, output, logsumexp)."""
  s = jnp.einsum("nqd,nkd->nqk", q, k)
  m = jax.lax.stop_gradient(jnp.max(s, -1, keepdims=True))
  u = jnp.exp(s - m)
  t = jnp.sum(u, -1, keepdims=True)
  return u, t, jnp.einsum("nqk,nkd->nqd", u, v) / t, m + jnp.log(t)


def _input_grads(p, g, row_sum, q, k, v, transposed):
  """dQ, dK, dV from probabilities p (or unnormalised U, with g and row_sum scaled
  to match): dS = p * (g V^T - row_sum). `transposed`: dK and dV as (Q^T dS)^T and
  (g^T p)^T, the big operand read untransposed."""
  ds = p * (jnp.einsum("nqd,nkd->nqk", g, v) - row_sum)
  if transposed:
    dk, dv = (jnp.swapaxes(jnp.einsum("nqd,nqk->ndk", a, b), 1, 2) for a, b in ((q, ds), (g, p)))
  else:
    dk, dv = jnp.einsum("nqk,nqd->nkd", ds, q), jnp.einsum("nqk,nqd->nkd", p, g)
  return jnp.einsum("nqk,nkd->nqd", ds, k), dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _saved_u_attention(q, k, v, transposed):
  del transposed
  return _probabilities_and_output(q, k, v)[2]


def _saved_u_fwd(q, k, v, transposed):
  del transposed
  u, t, o, _ = _probabilities_and_output(q, k, v)
  return o, (q, k, v, o, u, t)


def _saved_u_bwd(transposed, res, do):
  """The softmax backward's row sum taken over [n, q, d] (sum dO * O), not [n, q, k]."""
  q, k, v, o, u, t = res
  return _input_grads(u, do / t, jnp.sum(do * o, -1, keepdims=True) / t, q, k, v, transposed)


_saved_u_attention.defvjp(_saved_u_fwd, _saved_u_bwd)


def _chunked_attention(q, k, v, rows=8):
  """Flash-style: lax.map over `rows` (batch x head) rows at a time, so a chunk's
  [rows, l, l] probabilities stay in cache; saves logsumexp, recomputes them."""
  chunk = lambda x: x.reshape(-1, rows, *x.shape[1:])
  unchunk = lambda x: x.reshape(-1, *x.shape[2:])

  @jax.custom_vjp
  def attend(q, k, v):
    return fwd(q, k, v)[0]

  def fwd(q, k, v):
    o, lse = jax.lax.map(lambda a: _probabilities_and_output(*a)[2:], tuple(map(chunk, (q, k, v))))
    return unchunk(o), (q, k, v, unchunk(o), unchunk(lse))

  def bwd_chunk(q, k, v, o, lse, do):
    p = jnp.exp(jnp.einsum("nqd,nkd->nqk", q, k) - lse)
    return _input_grads(p, do, jnp.sum(do * o, -1, keepdims=True), q, k, v, False)

  def bwd(res, do):
    out = jax.lax.map(lambda a: bwd_chunk(*a), tuple(map(chunk, res + (do,))))
    return tuple(map(unchunk, out))

  attend.defvjp(fwd, bwd)
  return attend(q, k, v)


def attention_backward_designs(layers_chained=4):
  """Forward + backward of the tokenizer's attention ([16, 256, 8, 32]) per layer,
  `layers_chained` dependent layers on distinct inputs: heads_major_attention
  (autodiff) against the hand-written backward passes tried in the sixth round
  (not landed): the row sum over dO * O with U saved (dK, dV as TN matmuls or
  written transposed), and flash-style chunks; and the C++ kernel that landed in
  the seventh round (`models/cpu_attention.py`)."""
  b, length, heads, d = 16, 256, 8, 32
  heads_first = lambda core: lambda q, k, v: core(*(
      x.transpose(0, 2, 1, 3).reshape(b * heads, length, d) for x in (q, k, v))).reshape(
          b, heads, length, d).transpose(0, 2, 1, 3)
  designs = {"heads_major_attention": layers.heads_major_attention,
             "cpu_attention kernel (C++, seventh round)": cpu_attention.cpu_attention,
             "saved U, row sum over dO*O": heads_first(
                 functools.partial(_saved_u_attention, transposed=False)),
             "same, dK dV transposed": heads_first(
                 functools.partial(_saved_u_attention, transposed=True)),
             "chunked (flash-style)": heads_first(_chunked_attention)}
  inputs = [tuple(jax.random.normal(jax.random.key(3 * i + j), (b, length, heads, d)) / 3
                  for j in range(3)) for i in range(layers_chained)]
  g = jax.random.normal(jax.random.key(99), (b, length, heads, d))
  row = []
  for name, attend in designs.items():
    grad = jax.grad(lambda q, k, v, attend=attend: jnp.sum(attend(q, k, v) * g), (0, 1, 2))
    def chain(inputs, grad=grad):
      acc = 0.0
      for q, k, v in inputs:
        acc = acc + sum(x[0, 0, 0, 0] for x in grad(q + acc, k, v))
      return acc
    ms = milliseconds_per_call(jax.jit(chain), inputs, repeats=5) / layers_chained
    row.append(f"{name} {ms:5.1f}")
  print("attention fwd+bwd, ms per layer: " + "  ".join(row), flush=True)


def square_matmul_dtypes(n=2048):
  """An [n, n] x [n, n] matmul in float32 and bfloat16 (sixth round: XLA:CPU's
  bfloat16 matmuls do not use the CPU's AMX / AVX512-BF16 units)."""
  row = []
  for dtype in (jnp.float32, jnp.bfloat16):
    a, b = (jax.random.normal(jax.random.key(i), (n, n)).astype(dtype) for i in range(2))
    ms = milliseconds_per_call(jax.jit(jnp.matmul), a, b, repeats=5)
    row.append(f"{jnp.dtype(dtype).name} {2 * n ** 3 / ms / 1e6:4.0f} GFLOP/s")
  print(f"{n}^3 matmul: " + "  ".join(row), flush=True)


if __name__ == "__main__":
  if len(sys.argv) > 1:  # Only the named benchmarks, e.g. `attention_backward_designs`.
    for name in sys.argv[1:]:
      globals()[name]()
    sys.exit()
  training_attention()
  qk_layouts()
  small_m_dots()
  for rows in (1, 2, 4, 16):
    small_m_dots(rows, dtypes=(jnp.float32,))
  decode_step_dots()
  dot_forms()
  attention_backward_designs()
  square_matmul_dtypes()
