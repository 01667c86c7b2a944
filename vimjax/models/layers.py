"""Transformer building blocks shared by the tokenizer and the stage-2 models.

Owns: LayerNorm (float32), Dense / `dense_matmul`, `materialize_gradient` and
`add_to_every_example` (XLA:CPU-friendly backward passes), MlpBlock, Attention
(with an autoregressive key/value cache), TransformerBlock (pre-LN; sows its
output for probes), TransformerStack (optionally scanned and rematerialised),
`block_outputs` (the sown block outputs of a stack) and the causal /
conv-shaped attention masks.

Conventions:
  * Every parameter carries logical axis names from `parallel.LOGICAL_AXES`.
  * Activations are constrained to ("activation_batch", "activation_length",
    "activation_embed") at block boundaries (a no-op outside a mesh /
    logical-rules context).
  * Masks are boolean and broadcastable to [b, heads, q_len, kv_len];
    True means "may attend" (flax convention).
  * The stack has no final LayerNorm: callers add `LayerNorm` after it, since
    VIM, Parti and the tokenizer each name and place it differently.
"""
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vimjax.models import cpu_attention
from vimjax.models import cpu_kernels
from vimjax.models import cpu_layer_norm
from vimjax.models import splash

Dtype = Any

# Remat policies selectable from the config (`model.remat_policy`), per block:
#   none: no remat, every activation is kept for the backward pass (most memory);
#   full: nothing saved, the whole block is recomputed (least memory, ~1/3 more FLOPs);
#   dots / dots_with_no_batch_dims: save matmul outputs without batch dims (the
#     weight matmuls: projections, MLP), recompute the rest (attention scores,
#     softmax, gelu, norms); the usual choice for large transformers;
#   dots_saveable: save every matmul output, attention's batched ones included.
REMAT_POLICIES = {
    "none": None,
    "full": None,
    "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_with_no_batch_dims": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
}

_dense_init = nn.initializers.xavier_uniform()
_zeros = nn.initializers.zeros_init()
_ones = nn.initializers.ones_init()


def _part(init, names):
  return nn.with_logical_partitioning(init, names)


def _constrain(x):
  return nn.with_logical_constraint(
      x, ("activation_batch", "activation_length", "activation_embed"))


def _and_masks(mask, other):
  return other if mask is None else jnp.logical_and(mask, other)


def target_platform() -> str:
  """The platform being compiled for: the mesh's in `jax.set_mesh` (e.g. "tpu" when
  `aot_compile` targets a TPU topology from a CPU host), else the default backend."""
  mesh = jax.sharding.get_abstract_mesh()
  if not mesh.empty and mesh.abstract_device is not None:
    return mesh.abstract_device.platform
  return jax.default_backend()


def make_causal_mask(length: int) -> jnp.ndarray:
  """Lower-triangular mask: query i may attend to keys j <= i.

  Args:
    length: sequence length.
  Returns:
    [1, 1, length, length] bool.
  """
  idx = jnp.arange(length)
  return (idx[None, :] <= idx[:, None])[None, None]


def conv_shaped_causal_mask(height: int, width: int, kernel_h: int,
                            kernel_w: int) -> jnp.ndarray:
  """Local 2D causal mask over shifted-right image-token inputs (DALL-E / Parti).

  Query i predicts the token of grid cell i, (r_i, c_i) = divmod(i, width);
  the input at key position j >= 1 holds the token of cell m = j - 1 (position 0
  holds the start / condition embedding). The window is defined on the cells
  whose tokens are seen, relative to the predicted cell: key j >= 1 is visible
  iff m < i in raster order, r_i - kernel_h < r_m <= r_i (the current row and
  the kernel_h - 1 rows above) and c_i - kernel_w // 2 <= c_m <= c_i +
  (kernel_w - 1) // 2. So rows above see both left and right neighbours, the
  current row only the left ones: a causal "convolution" footprint centred on
  the predicted token. Key 0 (start) is visible to every query, so no row is
  empty. (A window on input positions would centre it on the previous token:
  shifted one column left.)

  Args:
    height, width: token grid, length = height * width.
    kernel_h, kernel_w: window size, each >= 1.
  Returns:
    [1, 1, height * width, height * width] bool.
  """
  for name, v in (("height", height), ("width", width), ("kernel_h", kernel_h),
                  ("kernel_w", kernel_w)):
    if v < 1:
      raise ValueError(f"conv_shaped_causal_mask: {name}={v}; must be >= 1.")
  query = jnp.arange(height * width)  # The cell each query predicts.
  cell = query - 1  # The cell whose token each key position holds (-1: start).
  dr = query[:, None] // width - cell[None, :] // width  # >= 0 above
  dc = cell[None, :] % width - query[:, None] % width
  window = ((cell[None, :] < query[:, None]) & (dr < kernel_h)
            & (dc >= -(kernel_w // 2)) & (dc <= (kernel_w - 1) // 2))
  mask = window.at[:, 0].set(True)
  return mask[None, None]


class LayerNorm(nn.Module):
  """LayerNorm computed in float32 (params float32), output cast to `dtype`.

  On the CPU, by the C++ kernel where it fits (models/cpu_layer_norm.py).
  """
  epsilon: float = 1e-6
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x: [..., embed] -> [..., embed] in `dtype`."""
    dim = x.shape[-1]
    scale = self.param("scale", _part(_ones, ("embed",)), (dim,), self.param_dtype)
    bias = self.param("bias", _part(_zeros, ("embed",)), (dim,), self.param_dtype)
    x = x.astype(jnp.float32)
    if (target_platform() == "cpu" and not cpu_kernels.in_xla_reference()
        and cpu_layer_norm.fits(x)):  # One pass each way instead of XLA:CPU's several.
      y = cpu_layer_norm.layer_norm(x, scale.astype(jnp.float32), bias.astype(jnp.float32),
                                    self.epsilon)
      return y.astype(self.dtype)
    mean = jnp.mean(x, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
    y = (x - mean) * jax.lax.rsqrt(var + self.epsilon)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(self.dtype)


def einsum(equation: str, a, b):
  """jnp.einsum accumulated in float32, returned in the operands' dtype.

  The same values (the matmul accumulates in float32 anyway), but XLA:CPU runs
  bfloat16 x bfloat16 matmuls fast only with a float32 output: a bfloat16
  decode step's weight matmuls, 6.9 -> 4.0 ms (`benchmarks/micro_attention.py`).
  """
  out = jnp.einsum(equation, a, b, preferred_element_type=jnp.float32)
  return out.astype(jnp.result_type(a, b))


@jax.custom_vjp
def dense_matmul(x, kernel):
  """x [..., k] @ kernel [k, n], the kernel gradient written for XLA:CPU.

  The value and the gradients of jnp.dot; only the kernel gradient's matmul is
  written the other way round, g^T x then transposed (a [n, k] transpose),
  instead of x^T g. XLA:CPU lays out the rhs of x^T g with the token axis
  minor: a transposing copy of the output gradient g. For the projections into
  the residual stream that copy fused the gradient's whole chain of adds and
  LayerNorm backwards from the layers above (quadratic in depth: 8-layer Parti
  step, unrolled, 5.4 -> 2.4 s); for the MLP's wi it is a [tokens, mlp] copy
  per layer. As the lhs, g is read in place (BUILD_NOTES.md, "Speed (issue 13)").
  """
  return einsum("...k,kn->...n", x, kernel)


def _dense_matmul_fwd(x, kernel):
  return einsum("...k,kn->...n", x, kernel), (x, kernel)


def _dense_matmul_bwd(residuals, g):
  x, kernel = residuals
  tokens_x, tokens_g = x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1])
  kernel_grad = jnp.dot(tokens_g.T, tokens_x, preferred_element_type=jnp.float32).T
  return einsum("...n,kn->...k", g, kernel).astype(x.dtype), kernel_grad.astype(kernel.dtype)


dense_matmul.defvjp(_dense_matmul_fwd, _dense_matmul_bwd)


@jax.custom_vjp
def materialize_gradient(x):
  """The identity; its gradient is computed once, where XLA:CPU cannot fuse it away.

  The gradient of a residual stream is a chain of adds, one per sublayer.
  XLA:CPU fuses that elementwise chain into each of its consumers (the
  LayerNorm backwards, once per layer and output shape) instead of writing it
  out, so every layer recomputed the sum of all the layers above it. A
  conditional is the one cheap op its fusion passes leave alone
  (`optimization_barrier` is expanded before fusion; two identical branches are
  folded): the backward pass routes the gradient through `lax.cond` between
  the identity and `g + 0.0`, the same values whichever runs. For the CPU only:
  on GPU a conditional syncs with the host. 8-layer Parti step: 2.29 ->
  2.05-2.12 s (BUILD_NOTES.md, "Speed (issue 13)").
  """
  return x


def _materialize_gradient_fwd(x):
  # Through the function itself: a gradient differentiated again (R1's gradient of
  # a gradient) meets the same rule on the forward pass it differentiates.
  return materialize_gradient(x), None


def _materialize_gradient_bwd(_, g):
  # The predicate only has to be unknown at compile time: a sum, which is defined
  # under any sharding (one scalar all-reduce). NaN stays NaN in either branch.
  return (jax.lax.cond(jnp.isnan(jnp.sum(g)), lambda g: g + 0.0, lambda g: g, g),)


materialize_gradient.defvjp(_materialize_gradient_fwd, _materialize_gradient_bwd)


@jax.custom_vjp
def add_to_every_example(x, table):
  """x [b, ...] + table [...] (position embeddings), the table's gradient a matmul.

  The same values and gradients as `x + table`. The table's gradient sums the
  output gradient over the batch: a reduce over a short major axis of a long
  array, which XLA:CPU runs ~25x slower than the same sum written as a
  [1, b] x [b, n] matmul ([16, 256, 256]: 4.5-5.0 against 0.15-0.2 ms,
  `benchmarks/micro_layers.py batch_sum`; BUILD_NOTES.md, "Speed (issue 13)").
  """
  if x.shape[1:] != table.shape:
    raise ValueError(f"add_to_every_example: table {table.shape} is not the shape of one "
                     f"example of x {x.shape}.")
  return x + table


def _add_to_every_example_fwd(x, table):
  return add_to_every_example(x, table), None


def _add_to_every_example_bwd(_, g):
  batch = g.shape[0]
  table_grad = jnp.dot(jnp.ones((batch,), g.dtype), g.reshape(batch, -1),
                       preferred_element_type=jnp.float32)
  return g, table_grad.reshape(g.shape[1:]).astype(g.dtype)


add_to_every_example.defvjp(_add_to_every_example_fwd, _add_to_every_example_bwd)


class Dense(nn.Module):
  """nn.Dense (same params, init and values) through `dense_matmul`."""
  features: int
  kernel_names: tuple[str | None, str | None] = ("mlp", "embed")
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x [..., in] -> [..., features] in `dtype`."""
    kernel = self.param("kernel", _part(_dense_init, self.kernel_names),
                        (x.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", _part(_zeros, self.kernel_names[1:]), (self.features,),
                      self.param_dtype)
    y = dense_matmul(x.astype(self.dtype), kernel.astype(self.dtype))
    return y + bias.astype(self.dtype)


class MlpBlock(nn.Module):
  """Transformer feed-forward: Dense(mlp_dim) -> gelu -> dropout -> Dense(embed)."""
  mlp_dim: int
  dropout_rate: float = 0.0
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, deterministic: bool):
    """x: [b, l, embed] -> [b, l, embed]."""
    dense = functools.partial(Dense, dtype=self.dtype, param_dtype=self.param_dtype)
    h = dense(self.mlp_dim, ("embed", "mlp"), name="wi")(x)
    h = nn.gelu(h)
    h = nn.with_logical_constraint(
        h, ("activation_batch", "activation_length", "activation_mlp"))
    h = nn.Dropout(self.dropout_rate)(h, deterministic=deterministic)
    return dense(x.shape[-1], ("mlp", "embed"), name="wo")(h)


class _Projection(nn.Module):
  """y = einsum(equation, x, kernel) + bias with a kernel created at full rank.

  nn.DenseGeneral initialises a flattened 2D kernel and reshapes it, which
  breaks 3-name logical partitioning under active axis rules; this doesn't.
  """
  kernel_shape: tuple[int, ...]
  kernel_names: tuple[str | None, ...]
  num_in_axes: int  # leading kernel axes contracted with x (fan-in)
  equation: str
  # x's trailing num_in_axes axes and the kernel's leading ones are flattened
  # into one `dense_matmul` (the einsum must contract exactly those): its kernel
  # gradient reads the output gradient in place (the output projection's is the
  # residual stream's).
  flatten: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    in_axes = tuple(range(self.num_in_axes))
    out_axes = tuple(range(self.num_in_axes, len(self.kernel_shape)))
    init = nn.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=in_axes,
                                            out_axis=out_axes)
    kernel = self.param("kernel", _part(init, self.kernel_names), self.kernel_shape,
                        self.param_dtype)
    bias = self.param("bias", _part(_zeros, self.kernel_names[self.num_in_axes:]),
                      self.kernel_shape[self.num_in_axes:], self.param_dtype)
    if self.flatten:
      fan_in = math.prod(self.kernel_shape[:self.num_in_axes])
      y = dense_matmul(
          x.astype(self.dtype).reshape(*x.shape[:x.ndim - self.num_in_axes], fan_in),
          kernel.astype(self.dtype).reshape(fan_in, -1))
      y = y.reshape(*y.shape[:-1], *self.kernel_shape[self.num_in_axes:])
    else:
      y = einsum(self.equation, x.astype(self.dtype), kernel.astype(self.dtype))
    return y + bias.astype(self.dtype)


def _decode_step_attention(query, keys, values, mask):
  """One query position against the cache: softmax(q k^T) v.

  The weighted sum of values is a multiply-and-reduce, not a matmul: XLA:CPU
  runs that [b, heads] batch of matrix-vector products as unvectorised dots
  (0.3 ms per layer and step at Parti's shapes), the reduce streams the cache
  (~15 us). The keys keep the matmul: written as a multiply-and-reduce, XLA
  turns it into a slower library fusion. The softmax's normalisation is
  applied to the [b, heads, head_dim] output.

  Args:
    query: [b, 1, heads, head_dim], already scaled by 1 / sqrt(head_dim).
    keys: [b, heads, head_dim, max_len]; values: [b, heads, max_len, head_dim].
    mask: bool, broadcastable to [b, heads, 1, max_len].
  Returns:
    [b, 1, heads, head_dim] in the values' dtype.
  """
  logits = jnp.einsum("bqhd,bhdk->bhqk", query, keys, preferred_element_type=jnp.float32)
  logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jnp.exp(logits - jnp.max(logits, axis=-1, keepdims=True))
  out = jnp.sum(weights.transpose(0, 1, 3, 2) * values, axis=2)  # [b, heads, head_dim]
  out = out / jnp.sum(weights, axis=-1)
  return out[:, None].astype(values.dtype)


def resize_decode_caches(cache, length: int):
  """Cuts or zero-pads every self-attention KV cache in a "cache" collection to
  `length` positions.

  A decode step reads its whole cache, filled or not. A sampler that runs its
  steps in segments gives each segment a cache just long enough for the
  positions it reaches (sampling.py), so the early steps read less; the
  positions a pad adds are written before they are attended to. Cross-attention
  caches (static_kv: no cache_index) and other variables are left as they are.
  Works on scanned stacks too (a leading layer axis).

  Args:
    cache: the "cache" collection (nested dicts), as `apply(..., mutable=["cache"])`
      returns it.
    length: positions to keep, > the highest cache_index that will be used.
  """
  def resize(x, axis):
    axis %= x.ndim
    if length <= x.shape[axis]:
      return jax.lax.slice_in_dim(x, 0, length, axis=axis)
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, length - x.shape[axis])
    return jnp.pad(x, pad)

  def walk(tree):
    if not hasattr(tree, "items"):
      return tree
    if "cache_index" in tree and "cached_key" in tree:  # See Attention's cache layouts.
      return {**tree, "cached_key": resize(tree["cached_key"], -1),
              "cached_value": resize(tree["cached_value"], -2)}
    return {name: walk(child) for name, child in tree.items()}
  return walk(cache)


ATTENTION_IMPLEMENTATIONS = ("auto", "dot_product_attention", "splash", "cpu_kernel", "xla")


def heads_major_attention(query, key, value, mask=None, causal=False, dropout=None):
  """Softmax attention as einsums in [b, heads, length, head_dim] layouts.

  What jax.nn.dot_product_attention's XLA path computes, arranged for XLA:CPU
  (BUILD_NOTES.md, "Speed (issue 13)"): the heads axis moves ahead of the
  length once, up front, instead of transposes around every matmul; and the
  softmax's normalisation is applied to the [b, heads, q, head_dim] output,
  not to the head_dim / k times larger weights, so no [b, heads, q, k]
  division (nor its broadcast, which the backward pass saved) is made. Together
  forward + backward take 29% less time at the tokenizer's shapes. Causal
  self-attention runs in two row blocks: the first half of the queries sees
  only the first half of the keys, so the masked quarter of the logits is not
  computed (forward + backward 41 -> 30 ms per layer at Parti's tiny dims).

  Args:
    query: [b, q, heads, head_dim], already scaled.
    key, value: [b, k, heads, head_dim].
    mask: optional bool, broadcastable to [b, heads, q, k]; True = attend.
    causal: also mask keys after the query's position.
    dropout: optional function applied to the [b, heads, q, k] weights.
  Returns:
    [b, q, heads, head_dim] in the values' dtype.
  """
  q, k, v = (x.transpose(0, 2, 1, 3) for x in (query, key, value))
  length = q.shape[2]
  if causal:
    mask = _and_masks(mask, make_causal_mask(length))
  if causal and k.shape[2] == length and length % 2 == 0:
    half = length // 2
    top = _softmax_attention(q[:, :, :half], k[:, :, :half], v[:, :, :half],
                             _mask_block(mask, slice(0, half), slice(0, half)), dropout)
    bottom = _softmax_attention(q[:, :, half:], k, v,
                                _mask_block(mask, slice(half, None), slice(None)), dropout)
    out = jnp.concatenate([top, bottom], axis=2)
  else:
    out = _softmax_attention(q, k, v, mask, dropout)
  return out.transpose(0, 2, 1, 3)


def _mask_block(mask, rows: slice, cols: slice):
  """The [rows, cols] block of a mask broadcastable to [b, heads, q, k]."""
  mask = mask if mask.shape[-2] == 1 else mask[..., rows, :]
  return mask if mask.shape[-1] == 1 else mask[..., cols]


def _softmax_attention(q, k, v, mask, dropout):
  """softmax(q k^T) v in [b, heads, length, head_dim] layouts (`heads_major_attention`)."""
  logits = jnp.einsum("bhqd,bhkd->bhqk", q, k, preferred_element_type=jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  logits = nn.with_logical_constraint(
      logits, ("activation_batch", "activation_heads", "activation_length", None))
  # softmax(l) @ v = (exp(l - max) @ v) / sum(exp(l - max)); the max is a constant.
  unnormalized = jnp.exp(logits - jax.lax.stop_gradient(jnp.max(logits, -1, keepdims=True)))
  total = jnp.sum(unnormalized, axis=-1, keepdims=True)  # [b, heads, q, 1] float32
  unnormalized = unnormalized.astype(v.dtype)
  if dropout is not None:  # Elementwise, so it commutes with the per-row division.
    unnormalized = dropout(unnormalized)
  out = jnp.einsum("bhqk,bhkd->bhqd", unnormalized, v, preferred_element_type=jnp.float32)
  return (out / total).astype(v.dtype)


class Attention(nn.Module):
  """Multi-head dot-product attention with an optional decode-time KV cache.

  Attention is `jax.nn.dot_product_attention` on GPU (cuDNN flash attention),
  the splash kernel on TPU and the C++ kernel on the CPU where they fit
  (`splash.fits`, `cpu_attention.fits`), and `heads_major_attention` elsewhere
  or with attention dropout (`implementation`).
  Decode mode follows flax's MultiHeadDotProductAttention: `init(...,
  decode=True)` on a full-length input creates a zero cache ("cache"
  collection: cached_key [b, heads, head_dim, max_len], cached_value
  [b, heads, max_len, head_dim], cache_index []); each later `apply(...,
  decode=True, mutable=["cache"])` takes exactly one new position, writes it at
  cache_index and attends over the filled positions only. A caller `mask` in
  decode steps must broadcast to [b, heads, 1, max_len] (e.g. the current row
  of a conv-shaped mask).

  With `static_kv=True` (cross-attention to a fixed encoder output), decode
  mode instead projects `inputs_kv` once, when the cache is created, stores
  cached_key [b, heads, head_dim, k] / cached_value [b, heads, k, head_dim],
  and every later decode step reuses them without re-projecting (`inputs_kv`
  is then ignored).
  """
  num_heads: int
  head_dim: int
  dropout_rate: float = 0.0
  static_kv: bool = False
  # "auto": jax.nn.dot_product_attention on GPU (cuDNN flash attention), the
  # Pallas splash kernel on TPU and the C++ kernel on the CPU where they fit
  # (models/splash.py, models/cpu_attention.py), else `heads_major_attention`;
  # "dot_product_attention" / "splash" / "cpu_kernel" / "xla" force one
  # (attention dropout always takes `heads_major_attention`).
  implementation: str = "auto"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, inputs_q, inputs_kv, mask=None, *, deterministic: bool,
               decode: bool = False, causal: bool = False):
    """Attends from inputs_q to inputs_kv.

    Args:
      inputs_q: [b, q, embed].
      inputs_kv: [b, k, embed_kv] (same as inputs_q for self-attention).
      mask: optional bool, broadcastable to [b, heads, q, k]; True = attend.
      deterministic: disables attention dropout.
      causal: query i attends to keys j <= i only (with `mask`, both apply);
        given as a flag, not a dense mask, so a fused kernel can skip the
        masked blocks. Not for decode steps (their cache mask rules).
      decode: use / fill the autoregressive cache (self-attention), or the
        once-projected encoder keys/values (`static_kv`).
    Returns:
      [b, q, embed] in `dtype`.
    """
    def proj(x, name):
      # By keyword: positionally, dtype once landed in `flatten` and q/k/v then
      # computed in param_dtype (float32 in bfloat16 configs; issue 13, sixth round).
      return _Projection((x.shape[-1], self.num_heads, self.head_dim),
                         ("embed", "heads", "kv"), 1, "bld,dhk->blhk", flatten=True,
                         dtype=self.dtype, param_dtype=self.param_dtype, name=name)(x)
    # [b, l, heads, kv] activations split over heads like their kernels (Megatron).
    split_heads = lambda x: nn.with_logical_constraint(
        x, ("activation_batch", "activation_length", "activation_heads", "activation_kv"))
    output = lambda out: _Projection(  # [b, q, heads, kv] -> [b, q, embed]
        (self.num_heads, self.head_dim, inputs_q.shape[-1]), ("heads", "kv", "embed"), 2,
        "blhk,hkd->bld", flatten=True, dtype=self.dtype, param_dtype=self.param_dtype,
        name="out")(split_heads(out))
    query = split_heads(proj(inputs_q, "query"))
    # Applied to the query, not to the [b, heads, q, k] logits (a pass over the
    # largest tensor: +9% CPU time in the tokenizer step on XLA:CPU).
    scale = jnp.asarray(self.head_dim ** -0.5, query.dtype)
    if decode and self.static_kv and self.has_variable("cache", "cached_key"):
      # Cross-attention decode step: the encoder keys/values were projected once,
      # and stored in the layouts of the self-attention cache.
      if query.shape[1] != 1:
        raise ValueError(f"Attention cross-attention decode step expects one position, "
                         f"got query shape {query.shape}.")
      out = _decode_step_attention(query * scale, self.get_variable("cache", "cached_key"),
                                   self.get_variable("cache", "cached_value"),
                                   True if mask is None else mask)
      return output(out)
    key = split_heads(proj(inputs_kv, "key"))
    value = split_heads(proj(inputs_kv, "value"))
    if decode and target_platform() == "cpu":
      # XLA:CPU writes one position of a bfloat16 cache by copying the whole cache
      # (a float32 one in place): bfloat16 sampling at issue 13's dims took 0.73
      # s/image with bfloat16 caches, 0.49 with float32 ones. TPU and GPU keep
      # caches in `dtype`.
      key, value = key.astype(jnp.float32), value.astype(jnp.float32)
    if decode and self.static_kv:
      self.put_variable("cache", "cached_key", key.transpose(0, 2, 3, 1))
      self.put_variable("cache", "cached_value", value.transpose(0, 2, 1, 3))

    if decode and not self.static_kv:
      initialized = self.has_variable("cache", "cached_key")
      b, length, heads, depth = key.shape
      # Keys [b, heads, head_dim, max_len], values [b, heads, max_len, head_dim]:
      # the operand layouts of the step's two matmuls, so the one-position write
      # is in place. Stored [b, max_len, heads, head_dim], XLA:CPU copied every
      # cache every step (4x the CPU time of a whole decode loop).
      cached_key = self.variable("cache", "cached_key", jnp.zeros, (b, heads, depth, length),
                                 key.dtype)
      cached_value = self.variable("cache", "cached_value", jnp.zeros,
                                   (b, heads, length, depth), value.dtype)
      cache_index = self.variable("cache", "cache_index",
                                  lambda: jnp.array(0, dtype=jnp.int32))
      if initialized:
        batch, heads, depth, max_len = cached_key.value.shape
        if query.shape != (batch, 1, heads, depth):
          raise ValueError(f"Attention decode step expects one position, query shape "
                           f"{(batch, 1, heads, depth)}; got {query.shape}.")
        if causal:
          raise ValueError("Attention: causal=True does not apply to a decode step (one "
                           "query against the cache); the cache mask is causal.")
        i = cache_index.value
        if mask is not None and mask.shape[-1] > max_len:
          # A cache cut short by `resize_decode_caches`: the mask's later columns
          # are positions not reached yet.
          mask = jax.lax.slice_in_dim(mask, 0, max_len, axis=mask.ndim - 1)
        zero = jnp.zeros((), jnp.int32)
        cached_key.value = jax.lax.dynamic_update_slice(
            cached_key.value, key.transpose(0, 2, 3, 1), (zero, zero, zero, i))
        cached_value.value = jax.lax.dynamic_update_slice(
            cached_value.value, value.transpose(0, 2, 1, 3), (zero, zero, i, zero))
        cache_index.value = i + 1
        filled = (jnp.arange(max_len) <= i)[None, None, None, :]
        out = _decode_step_attention(query * scale, cached_key.value, cached_value.value,
                                     _and_masks(mask, filled))
        return output(out)

    if self.implementation not in ATTENTION_IMPLEMENTATIONS:
      raise ValueError(f"Attention implementation={self.implementation!r}; valid: "
                       f"{ATTENTION_IMPLEMENTATIONS}.")
    dropout = lambda w: nn.Dropout(self.dropout_rate)(w, deterministic=deterministic)
    use_dropout = not deterministic and self.dropout_rate > 0.0
    auto = self.implementation == "auto"
    if not use_dropout and (self.implementation == "dot_product_attention" or (
        auto and target_platform() == "gpu")):
      # cuDNN flash attention on GPU. Masks stay as given (e.g. [1, 1, q, k] for a
      # local window, [b, 1, 1, k] for padding), broadcast inside.
      out = jax.nn.dot_product_attention(query * scale, key, value, mask=mask,
                                         is_causal=causal, scale=1.0)
    elif not use_dropout and (self.implementation == "splash" or (
        auto and target_platform() == "tpu"
        and splash.fits(query.shape[1], key.shape[1], mask))):
      out = splash.splash_attention(query * scale, key, value, mask, causal,
                                    interpret=target_platform() == "cpu")
    elif not use_dropout and not cpu_kernels.in_xla_reference() and (
        self.implementation == "cpu_kernel" or (auto and target_platform() == "cpu"
        and cpu_attention.fits(query, key, mask, causal))):
      if self.implementation == "cpu_kernel" and not cpu_attention.fits(
          query, key, mask, causal):  # ("auto" came here because it fits.)
        raise ValueError(
            f"Attention implementation='cpu_kernel' does not fit query {query.shape} "
            f"{query.dtype}, key {key.shape}, mask {None if mask is None else mask.shape}, "
            f"causal={causal}; valid: float32, no mask, not causal, head_dim in "
            f"{cpu_attention.HEAD_DIMS}, lengths multiples of {cpu_attention.QUERY_BLOCK} "
            f"(q) / {cpu_attention.KEY_BLOCK} (k), the kernel built (models/cpu_attention.py).")
      out = cpu_attention.cpu_attention(query, key, value, self.head_dim ** -0.5)
    else:  # XLA (CPU where the kernel does not fit, TPU where splash does not) and dropout.
      out = heads_major_attention(query * scale, key, value, mask, causal, dropout)
    return output(out)


class TransformerBlock(nn.Module):
  """Pre-LN block: self-attention, optional cross-attention, MLP; residuals.

  Arguments are positional-friendly so the block can be scanned / remat'ed:
  `block(x, encoded, mask, encoder_mask, deterministic, decode)`.
  """
  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  causal: bool = False
  cross_attention: bool = False
  # Decode mode: project the encoder keys/values once and keep them in the
  # "cache" collection (Attention static_kv) instead of every step.
  cache_cross_attention: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, encoded=None, mask=None, encoder_mask=None,
               deterministic: bool = True, decode: bool = False):
    """Args:
      x: [b, l, embed].
      encoded: [b, l_enc, embed_enc] for cross-attention (else unused).
      mask: optional self-attention mask, broadcastable to [b, h, l, l]
        (combined with the causal mask when `causal`).
      encoder_mask: optional cross-attention mask, [b, h, l, l_enc]-broadcastable.
      deterministic: disables dropout.
      decode: autoregressive decoding with the self-attention cache (and, with
        `cache_cross_attention`, the once-projected cross-attention keys/values).
    Returns:
      [b, l, embed] in `dtype`.
    """
    dim = x.shape[-1]
    if dim % self.num_heads:
      raise ValueError(f"TransformerBlock: embed dim {dim} is not divisible by "
                       f"num_heads={self.num_heads}.")
    attention = functools.partial(
        Attention, num_heads=self.num_heads, head_dim=dim // self.num_heads,
        dropout_rate=self.dropout_rate, dtype=self.dtype, param_dtype=self.param_dtype)
    norm = functools.partial(LayerNorm, dtype=self.dtype, param_dtype=self.param_dtype)
    dropout = nn.Dropout(self.dropout_rate)
    # The residual stream's gradient, written out once per sublayer on the CPU.
    residual = materialize_gradient if target_platform() == "cpu" else lambda x: x

    x = _constrain(x.astype(self.dtype))
    # In a decode step l == 1 and the cache's mask is the causal one.
    causal = self.causal and x.shape[1] > 1
    h = norm(name="pre_attention_norm")(x)
    h = attention(name="self_attention")(h, h, mask, deterministic=deterministic,
                                         decode=decode, causal=causal)
    x = residual(x + dropout(h, deterministic=deterministic))
    if self.cross_attention:
      if encoded is None:
        raise ValueError("TransformerBlock(cross_attention=True) needs `encoded`.")
      h = norm(name="pre_cross_attention_norm")(x)
      h = attention(name="cross_attention", static_kv=self.cache_cross_attention)(
          h, encoded.astype(self.dtype), encoder_mask, deterministic=deterministic,
          decode=decode and self.cache_cross_attention)
      x = residual(x + dropout(h, deterministic=deterministic))
    h = norm(name="pre_mlp_norm")(x)
    h = MlpBlock(self.mlp_dim, self.dropout_rate, dtype=self.dtype,
                 param_dtype=self.param_dtype, name="mlp")(h, deterministic=deterministic)
    x = _constrain(residual(x + dropout(h, deterministic=deterministic)))
    # The block's output for probes (e.g. the VIM linear probe): kept only when
    # "intermediates" is mutable in `apply`, a no-op otherwise.
    self.sow("intermediates", "output", x)
    return x


def _scan_body(block, x, *args):
  return block(x, *args), None


class TransformerStack(nn.Module):
  """`num_layers` TransformerBlocks, no final LayerNorm (callers add one).

  Params: unscanned -> "layers_0" ... "layers_{n-1}"; scanned -> one "layers"
  subtree with every leaf stacked on a leading axis named "layers". The decode
  cache and the blocks' sown "intermediates" (see `block_outputs`) are stacked
  the same way when scanned.
  """
  num_layers: int
  num_heads: int
  mlp_dim: int
  dropout_rate: float = 0.0
  causal: bool = False
  cross_attention: bool = False
  # Decode mode: project the encoder keys/values once and keep them in the
  # "cache" collection (Attention static_kv) instead of every step.
  cache_cross_attention: bool = False
  scan_layers: bool = False
  remat_policy: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, encoded=None, mask=None, encoder_mask=None, *,
               deterministic: bool, decode: bool = False):
    """x: [b, l, embed] -> [b, l, embed]; other args as in TransformerBlock."""
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"Unknown remat_policy {self.remat_policy!r}; valid: "
                       f"{sorted(REMAT_POLICIES)}.")
    block_cls = TransformerBlock
    if self.remat_policy != "none":
      # Args (self=0, x, encoded, mask, encoder_mask, deterministic, decode).
      block_cls = nn.remat(block_cls, policy=REMAT_POLICIES[self.remat_policy],
                           prevent_cse=not self.scan_layers, static_argnums=(5, 6))
    block = functools.partial(
        block_cls, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
        dropout_rate=self.dropout_rate, causal=self.causal,
        cross_attention=self.cross_attention,
        cache_cross_attention=self.cache_cross_attention, dtype=self.dtype,
        param_dtype=self.param_dtype)
    args = (encoded, mask, encoder_mask, deterministic, decode)
    if self.scan_layers:
      scan = nn.scan(
          _scan_body,
          variable_axes={"params": 0, "cache": 0, "intermediates": 0},
          split_rngs={"params": True, "dropout": True},
          in_axes=(nn.broadcast,) * len(args),
          length=self.num_layers,
          metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = scan(block(name="layers"), x, *args)
    else:
      for i in range(self.num_layers):
        x = block(name=f"layers_{i}")(x, *args)
    return x


def block_outputs(intermediates, num_layers: int) -> jax.Array:
  """The sown outputs of a TransformerStack's blocks, scanned or not.

  Args:
    intermediates: the stack's subtree of the "intermediates" collection (from
      `apply(..., mutable=["intermediates"])`), e.g. state["intermediates"]["decoder"].
    num_layers: the stack's number of blocks.
  Returns:
    [num_layers, b, l, embed]: entry i is the output of block i + 1.
  """
  if "layers" in intermediates:  # Scanned: one entry, stacked on a leading layers axis.
    (stacked,) = intermediates["layers"]["output"]
    return stacked
  return jnp.stack([intermediates[f"layers_{i}"]["output"][0] for i in range(num_layers)])
