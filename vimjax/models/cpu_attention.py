"""Fused softmax attention on XLA:CPU: a C++ kernel (cpu_attention.cc) behind jax.ffi.

`layers.Attention` takes it on the CPU where it fits (`fits`): float32, no mask,
not causal, no attention dropout, head_dim 16, 32 or 64, query lengths that are
multiples of 8 and key lengths multiples of 32 (the ViT tokenizer's attention).
Everything else takes `layers.heads_major_attention`. At issue 13's tokenizer
dims the forward + backward of a layer takes 21 ms here against 43 for XLA's
batched matmuls, transposes and softmax (BUILD_NOTES.md, "Speed (issue 13)",
seventh round; `benchmarks/micro_attention.py attention_backward_designs`).

The kernel is built, cached and registered as `cpu_kernels.Library` describes
(on first use, for this machine). `VIMJAX_CPU_ATTENTION=0` turns it off (A/B
runs); so does `cpu_kernels.xla_reference()` while model FLOPs are counted.

Under a mesh the kernel runs per shard (`jax.shard_map`) over the batch and
heads axes the logical axis rules give the activations, as splash does on TPU;
a sharded length or head_dim falls back to XLA.
"""
import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from vimjax.models import cpu_kernels
from vimjax.models import splash

SOURCE = pathlib.Path(__file__).with_name("cpu_attention.cc")
HEAD_DIMS = (16, 32, 64)
QUERY_BLOCK, KEY_BLOCK = 8, 32  # Lengths must be multiples of these.
ENABLE_ENV = "VIMJAX_CPU_ATTENTION"
LIBRARY = cpu_kernels.Library("cpu_attention", SOURCE,
                              {"vimjax_attention_forward": "VimjaxAttentionForward",
                               "vimjax_attention_backward": "VimjaxAttentionBackward"},
                              ENABLE_ENV)
available = LIBRARY.available  # Whether enabled and registered (built on first call).
library_path = LIBRARY.path


def fits(query, key, mask, causal: bool) -> bool:
  """Whether `cpu_attention(query, key, value)` computes this attention (see module doc)."""
  if mask is not None or causal:
    return False
  batch, q_len, heads, head_dim = query.shape
  if (query.dtype != jnp.float32 or key.dtype != jnp.float32 or head_dim not in HEAD_DIMS
      or q_len % QUERY_BLOCK or key.shape[1] % KEY_BLOCK):
    return False
  if splash.batch_heads_spec(jax.sharding.get_abstract_mesh(), batch, heads) is None:
    return False
  return available()


def _call(target, outputs, *args, scale: float):
  return jax.ffi.ffi_call(target, outputs, vmap_method="sequential")(
      *args, scale=np.float32(scale))


def _forward(query, key, value, scale):
  batch, q_len, heads, _ = query.shape
  return _call("vimjax_attention_forward",
               (jax.ShapeDtypeStruct(query.shape, jnp.float32),
                jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32)),
               query, key, value, scale=scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(query, key, value, scale):
  return _forward(query, key, value, scale)[0]


def _attention_fwd(query, key, value, scale):
  out, lse = _forward(query, key, value, scale)
  return out, (query, key, value, out, lse)


def _attention_bwd(scale, residuals, d_out):
  query, key, value, _, _ = residuals
  shapes = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (query, key, value))
  return tuple(_call("vimjax_attention_backward", shapes, *residuals, d_out, scale=scale))


_attention.defvjp(_attention_fwd, _attention_bwd)


def cpu_attention(query, key, value, scale: float = 1.0):
  """softmax(scale query key^T) value by the kernel (check `fits` first).

  Args:
    query: [b, q, heads, head_dim] float32.
    key, value: [b, k, heads, head_dim] float32.
    scale: of the logits, applied inside the kernel (a Python float).
  Returns:
    [b, q, heads, head_dim] float32.
  """
  LIBRARY.require("cpu_attention")  # Also registers the kernel on the first call.
  attention = functools.partial(_attention, scale=float(scale))
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return attention(query, key, value)
  per_shard = splash.batch_heads_spec(mesh, query.shape[0], query.shape[2])
  if per_shard is None:
    raise ValueError("cpu_attention: activation length / head_dim are sharded; the kernel "
                     "shards over batch and heads only (check cpu_attention.fits first).")
  batch_axes, heads_axes, _, _ = per_shard
  spec = jax.sharding.PartitionSpec(batch_axes, None, heads_axes, None)
  return jax.shard_map(attention, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=False)(query, key, value)
