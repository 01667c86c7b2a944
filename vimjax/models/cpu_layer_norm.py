"""LayerNorm on XLA:CPU: a C++ kernel (cpu_layer_norm.cc) behind jax.ffi.

`layers.LayerNorm` takes it on the CPU where it fits (`fits`): float32
[b, l, features] input, features a multiple of 16, a feature axis the mesh does
not split. Everything else stays on XLA. XLA:CPU runs a LayerNorm as several
passes over memory, mostly on one core; the kernel makes one pass per direction
on every thread. In issue 13's tokenizer step its 18 LayerNorms went from ~120 to
~20 ms of op time (BUILD_NOTES.md, "Speed (issue 13)", ninth round).

The values are XLA's to float32 rounding (two-pass statistics, as
`layers.LayerNorm` computes them). The backward pass returns the scale's and the
bias's gradients as one partial sum per block of 64 rows, summed here in order,
so runs are bitwise reproducible.

Built, cached and registered as `cpu_kernels.Library` describes (on first use,
for this machine). `VIMJAX_CPU_LAYER_NORM=0` turns it off (A/B runs); so does
`cpu_kernels.xla_reference()` while model FLOPs are counted.

Under a mesh the kernel runs per shard (`jax.shard_map`) over the batch and
length axes the logical axis rules give the activations, as the attention
kernel does.
"""
import functools
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec as P

from vimjax.models import cpu_kernels
from vimjax.models import splash

SOURCE = pathlib.Path(__file__).with_name("cpu_layer_norm.cc")
ENABLE_ENV = "VIMJAX_CPU_LAYER_NORM"
LIBRARY = cpu_kernels.Library("cpu_layer_norm", SOURCE, {
    "vimjax_layer_norm_forward": "VimjaxLayerNormForward",
    "vimjax_layer_norm_backward": "VimjaxLayerNormBackward",
}, ENABLE_ENV)
available = LIBRARY.available  # Whether enabled and registered (built on first call).
LANES = 16  # The feature axis must be a multiple of this.
ROW_BLOCK = 64  # LayerNorm rows per partial sum of the scale's and bias's gradients.
_ACTIVATIONS = ("activation_batch", "activation_length", "activation_embed")


def _spec(x) -> P:
  return splash.activation_spec(jax.sharding.get_abstract_mesh(), _ACTIVATIONS, x.shape)


def fits(x) -> bool:
  """Whether `layer_norm(x, ...)` computes this LayerNorm (see the module doc)."""
  return (x.dtype == jnp.float32 and x.ndim == 3 and x.shape[-1] % LANES == 0
          and _spec(x)[-1] is None and available())


def _per_shard(fn, in_specs, out_specs):
  """fn, or fn per shard under the mesh in scope."""
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return fn
  return jax.shard_map(fn, mesh=mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)


def _call(target, outputs, *args, **attributes):
  return jax.ffi.ffi_call(target, outputs, vmap_method="sequential")(*args, **attributes)


def _norm_forward(x, scale, bias, epsilon):
  stats = jax.ShapeDtypeStruct(x.shape[:-1], jnp.float32)
  return _call("vimjax_layer_norm_forward", (jax.ShapeDtypeStruct(x.shape, jnp.float32),
                                             stats, stats),
               x, scale, bias, eps=np.float32(epsilon))


def _norm_backward(x, scale, mean, rstd, g):
  blocks = -(-math.prod(x.shape[:-1]) // ROW_BLOCK)
  partials = jax.ShapeDtypeStruct((blocks, x.shape[-1]), jnp.float32)
  return _call("vimjax_layer_norm_backward",
               (jax.ShapeDtypeStruct(x.shape, jnp.float32), partials, partials),
               x, scale, mean, rstd, g)


def _sharded_norm_forward(x, scale, bias, epsilon):
  spec = _spec(x)
  return _per_shard(functools.partial(_norm_forward, epsilon=epsilon),
                    (spec, P(None), P(None)), (spec, P(*spec[:2]), P(*spec[:2])))(x, scale, bias)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _layer_norm(x, scale, bias, epsilon):
  return _sharded_norm_forward(x, scale, bias, epsilon)[0]


def _layer_norm_fwd(x, scale, bias, epsilon):
  y, mean, rstd = _sharded_norm_forward(x, scale, bias, epsilon)
  return y, (x, scale, mean, rstd)


def _layer_norm_bwd(_, residuals, g):
  x, scale, mean, rstd = residuals
  spec = _spec(x)
  # Each shard's partials over its own rows, stacked along the row axes.
  partials = P(splash.axis_names(spec[0]) + splash.axis_names(spec[1]) or None, None)
  dx, d_scale, d_bias = _per_shard(
      _norm_backward, (spec, P(None), P(*spec[:2]), P(*spec[:2]), spec),
      (spec, partials, partials))(x, scale, mean, rstd, g)
  return dx, jnp.sum(d_scale, axis=0), jnp.sum(d_bias, axis=0)


_layer_norm.defvjp(_layer_norm_fwd, _layer_norm_bwd)


def layer_norm(x, scale, bias, epsilon: float):
  """(x - mean) / sqrt(var + epsilon) * scale + bias over x's last axis, by the kernel.

  Args:
    x: [b, l, features] float32 (check `fits` first).
    scale, bias: [features] float32.
    epsilon: a Python float.
  Returns:
    [b, l, features] float32.
  """
  LIBRARY.require("cpu_layer_norm")  # Also registers the kernel on the first call.
  feature_axes = _spec(x)[-1]
  if feature_axes is not None:
    raise ValueError(f"cpu_layer_norm: the feature axis of {x.shape} is sharded over mesh "
                     f"axes {feature_axes}; the kernel needs whole rows (check `fits` first).")
  return _layer_norm(x, scale, bias, float(epsilon))
