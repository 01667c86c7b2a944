"""Splash attention, the Pallas TPU flash kernel, for `layers.Attention` on TPU.

`jax.experimental.pallas.ops.tpu.splash_attention` is block-sparse flash
attention: it never builds the [q, k] logits in HBM and skips the blocks that
a static mask masks out (the upper half of a causal mask). It fits when both
lengths are multiples of 128 and the mask is None (full or causal) or a NumPy
array shared by every example; padding masks and masks computed in the traced
program take `layers.heads_major_attention`. Under a mesh the kernel runs per
shard (`jax.shard_map`) over the batch and heads axes that the logical axis
rules give the activations. `Attention` runs it in Pallas' interpreter when
compiling for the CPU (tests).
"""
import math

import flax.linen as nn
import jax
import numpy as np
from jax.experimental.pallas.ops.tpu import splash_attention as splash
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

LANES = 128  # Splash's block sizes are multiples of the TPU's 128 lanes.
_ACTIVATIONS = ("activation_batch", "activation_heads", "activation_length", "activation_kv")


def fits(q_len: int, kv_len: int, mask) -> bool:
  """Whether the kernel takes these lengths and this mask (see the module docstring)."""
  static = mask is None or (isinstance(mask, np.ndarray) and mask.ndim == 4
                            and mask.shape[0] == 1)
  return static and q_len % LANES == 0 and kv_len % LANES == 0


def axis_names(axes) -> tuple[str, ...]:
  """The mesh axis names of a PartitionSpec entry (None, a name or names)."""
  return () if axes is None else (axes,) if isinstance(axes, str) else tuple(axes)


def shard_count(mesh, axes) -> int:
  """The number of shards of a PartitionSpec entry (None, a name or names)."""
  return math.prod(mesh.shape[name] for name in axis_names(axes))


def activation_spec(mesh, names: tuple[str, ...], shape: tuple[int, ...]) -> P:
  """P of activations of `shape` with these logical axis names under `mesh` and the
  logical axis rules in scope (the per-shard specs of the CPU kernels' shard_map).
  Axes that do not divide their dimension are dropped: it is replicated instead."""
  if mesh.empty:
    return P(*(None,) * len(names))
  axes = nn.logical_to_mesh_axes(names)
  return P(*(a if n % shard_count(mesh, a) == 0 else None for a, n in zip(axes, shape)))


def batch_heads_spec(mesh, batch: int, heads: int):
  """P(batch axes, heads axes, None, None) of [b, heads, length, head_dim] activations
  under `mesh` and the logical axis rules in scope, or None when their length or
  head_dim is sharded (a per-shard kernel needs whole sequences). An empty mesh
  gives P(None, None, None, None)."""
  if mesh.empty:
    return P(None, None, None, None)
  batch_axes, heads_axes, length_axes, kv_axes = nn.logical_to_mesh_axes(_ACTIVATIONS)
  if length_axes is not None or kv_axes is not None:
    return None
  # Axes that do not divide their dimension (e.g. the batch of 1 that initialises
  # the model under the mesh) are dropped: that dimension is replicated instead.
  batch_axes = batch_axes if batch % shard_count(mesh, batch_axes) == 0 else None
  heads_axes = heads_axes if heads % shard_count(mesh, heads_axes) == 0 else None
  return P(batch_axes, heads_axes, None, None)


def _block(length: int) -> int:
  return next(b for b in (512, 256, LANES) if length % b == 0)


def _mask(heads: int, q_len: int, kv_len: int, mask, causal: bool):
  if mask is None:
    one = splash.CausalMask((q_len, kv_len)) if causal else splash.FullMask((q_len, kv_len))
    return splash.MultiHeadMask([one] * heads)
  dense = np.broadcast_to(np.asarray(mask, bool), (1, heads, q_len, kv_len))[0]
  if causal:
    dense = dense & np.tril(np.ones((q_len, kv_len), bool))
  return splash.MultiHeadMask([splash.NumpyMask(head) for head in dense])


def splash_attention(query, key, value, mask=None, causal: bool = False, *,
                     interpret: bool = False):
  """Softmax attention by the splash kernel.

  Args:
    query: [b, q, heads, head_dim], already scaled.
    key, value: [b, k, heads, head_dim].
    mask: None, or a NumPy bool array broadcastable to [1, heads, q, k]; True = attend.
    causal: also mask keys after the query's position (self-attention, q == k).
    interpret: run the kernel in Pallas' interpreter (any platform; the CPU's tests).
  Returns:
    [b, q, heads, head_dim] in the values' dtype.
  """
  batch, q_len, heads, _ = query.shape
  kv_len = key.shape[1]
  if not fits(q_len, kv_len, mask):
    kind = "None" if mask is None else f"{type(mask).__name__} {getattr(mask, 'shape', '')}"
    raise ValueError(f"splash attention: lengths q={q_len}, k={kv_len} and mask {kind} do "
                     f"not fit; valid: lengths that are multiples of {LANES} and a mask "
                     "that is None or a NumPy array with a leading 1 (one for all examples).")
  if causal and q_len != kv_len:
    raise ValueError(f"splash attention: causal needs q == k lengths, got {q_len}, {kv_len}.")
  mesh = jax.sharding.get_abstract_mesh()
  spec = batch_heads_spec(mesh, batch, heads)
  if spec is None:
    raise ValueError(f"splash attention: activation length / kv sharded over "
                     f"{nn.logical_to_mesh_axes(_ACTIVATIONS)[2:]}; it shards over batch "
                     "and heads only.")
  batch_axes, heads_axes, _, _ = spec
  head_shards = shard_count(mesh, heads_axes)
  bq, bkv = _block(q_len), _block(kv_len)
  kernel = splash.make_splash_mha(
      _mask(heads, q_len, kv_len, mask, causal), head_shards=head_shards, q_seq_shards=1,
      block_sizes=splash.BlockSizes(
          block_q=bq, block_kv=bkv, block_kv_compute=bkv, block_q_dkv=bq, block_kv_dkv=bkv,
          block_kv_dkv_compute=bkv, block_q_dq=bq, block_kv_dq=bkv),
      interpret=interpret)
  q, k, v = (x.transpose(0, 2, 1, 3) for x in (query, key, value))
  attend = lambda kernel, q, k, v: jax.vmap(kernel)(q, k, v)
  if mesh.empty:
    out = attend(kernel, q, k, v)
  else:
    kernel_spec = kernel.manual_sharding_spec(NamedSharding(mesh, P(heads_axes, None)))
    out = jax.shard_map(attend, mesh=mesh, in_specs=(kernel_spec, spec, spec, spec),
                        out_specs=spec, check_vma=False)(kernel, q, k, v)
  return out.astype(value.dtype).transpose(0, 2, 1, 3)
