"""The one module that knows mesh axes: mesh from config, logical-axis rules, shardings.

Model code names *logical* axes only (see `LOGICAL_AXES`); the rules in
`config.mesh.rules` map them to the physical mesh axes `data`, `fsdp`, `tensor`.

A sharding strategy is just the axis sizes (with `DEFAULT_RULES`):
  data parallel   mesh.data=-1                 batch split, weights replicated
  FSDP            mesh.fsdp=-1                 batch and every `embed` dim of params,
                                               grads and optimizer state split (kernels
                                               without one: their largest free dim)
  tensor (TP)     mesh.tensor=N, mesh.data=-1  heads / mlp / vocab / channels split
  combinations    e.g. data=2, fsdp=-1, tensor=4
"""
import math
from typing import Any, Sequence

from absl import logging
import flax.linen as nn
import jax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

MESH_AXES = ("data", "fsdp", "tensor")

# Closed vocabulary of logical axis names. Parameters name their dims with the
# first group; activations (`nn.with_logical_constraint`) with the `activation_*`
# names, so that a config can shard the two apart (as MaxText does), e.g. split
# activations' length over `tensor` without touching any weight. "batch" is
# only read from configs saved before the activation names existed.
PARAM_AXES = ("batch", "length", "embed", "mlp", "heads", "kv", "vocab", "codebook", "layers",
              "channels")
ACTIVATION_AXES = ("activation_batch", "activation_length", "activation_embed",
                   "activation_mlp", "activation_heads", "activation_kv", "activation_vocab",
                   "activation_channels")
LOGICAL_AXES = PARAM_AXES + ACTIVATION_AXES

# Default logical -> mesh rules (t5x/MaxText style), in priority order within
# one array. Activations: batch split over every data-like axis, the
# tensor-parallel dims over `tensor`. Weights: FSDP-split on `embed`,
# Megatron-split over `tensor` on mlp/heads/vocab. Unlisted names are replicated.
DEFAULT_RULES = (
    ("activation_batch", ("data", "fsdp")),
    ("activation_length", None),
    ("activation_embed", None),
    ("activation_mlp", "tensor"),
    ("activation_heads", "tensor"),
    ("activation_kv", None),
    ("activation_vocab", "tensor"),
    ("activation_channels", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("vocab", "tensor"),
    ("codebook", "fsdp"),
    ("channels", "tensor"),
    ("length", None),
    ("kv", None),
    ("layers", None),
)


def mesh_shape(mesh_config, num_devices: int) -> tuple[int, int, int]:
  """Resolves `mesh.{data,fsdp,tensor}` (one may be -1) against `num_devices`."""
  sizes = [int(mesh_config[a]) for a in MESH_AXES]
  bad = [f"mesh.{a}={s}" for a, s in zip(MESH_AXES, sizes) if s == 0 or s < -1]
  if bad or sizes.count(-1) > 1:
    raise ValueError(f"Invalid mesh {', '.join(bad) or dict(zip(MESH_AXES, sizes))}: each axis "
                     "must be a positive int, and at most one may be -1 (fill remaining devices).")
  known = math.prod(s for s in sizes if s != -1)
  if num_devices % known:
    raise ValueError(f"Mesh {dict(zip(MESH_AXES, sizes))} does not divide the {num_devices} "
                     f"devices: the product of the fixed axes ({known}) must divide {num_devices}.")
  sizes = [num_devices // known if s == -1 else s for s in sizes]
  if math.prod(sizes) != num_devices:
    raise ValueError(f"Mesh {dict(zip(MESH_AXES, sizes))} uses {math.prod(sizes)} devices but "
                     f"{num_devices} are available; set one axis to -1 to fill the rest.")
  return tuple(sizes)


def create_mesh(mesh_config, devices: Sequence[Any] | None = None) -> Mesh:
  """Builds the (data, fsdp, tensor) mesh described by `config.mesh`.

  On TPU and GPU the device order follows the physical topology
  (`mesh_utils.create_device_mesh`). When the topology cannot hold this mesh
  shape (it raises NotImplementedError, ValueError or AssertionError) the
  devices are used in `jax.devices()` order, with a warning: the run is correct
  but its collectives may cross slower links.
  """
  devices = jax.devices() if devices is None else list(devices)
  shape = mesh_shape(mesh_config, len(devices))
  if devices[0].platform not in ("tpu", "gpu"):  # CPU: no topology to follow.
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES)
  try:
    device_array = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  except (NotImplementedError, ValueError, AssertionError) as e:
    logging.warning("No topology-aware device order for mesh %s on %d %s devices (%s); using "
                    "jax.devices() order: correct, but collectives may be slower.",
                    dict(zip(MESH_AXES, shape)), len(devices), devices[0].device_kind,
                    str(e).splitlines()[0] if str(e) else type(e).__name__)
    device_array = np.asarray(devices).reshape(shape)
  return Mesh(device_array, MESH_AXES)


def rules_from_config(mesh_config) -> tuple[tuple[str, Any], ...]:
  """Returns the logical-axis rules, validated against the vocabulary.

  Rules saved before the `activation_*` names existed (no activation name in
  them) get each activation name mapped as its parameter name was, so an old
  workdir's config shards its activations exactly as it did.
  """
  rules = tuple((name, tuple(axes) if isinstance(axes, list) else axes)
                for name, axes in mesh_config.rules)
  for name, axes in rules:
    if name not in LOGICAL_AXES:
      raise ValueError(f"mesh.rules names unknown logical axis {name!r}; valid: {LOGICAL_AXES}.")
    for axis in (axes if isinstance(axes, tuple) else (axes,)):
      if axis is not None and axis not in MESH_AXES:
        raise ValueError(f"mesh.rules maps {name!r} to unknown mesh axis {axis!r}; "
                         f"valid: {MESH_AXES} or None.")
  if not any(name in ACTIVATION_AXES for name, _ in rules):
    rules += tuple((f"activation_{name}", axes) for name, axes in rules
                   if f"activation_{name}" in ACTIVATION_AXES)
  return rules


def data_parallel_size(mesh: Mesh) -> int:
  """Number of ways the batch is split (data x fsdp)."""
  return mesh.shape["data"] * mesh.shape["fsdp"]


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dim split over data and fsdp, the rest replicated."""
  return NamedSharding(mesh, P(("data", "fsdp")))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def _fit_spec(spec: P, shape: Sequence[int], mesh: Mesh, path: str = "") -> P:
  """Drops mesh axes from dims they do not divide (e.g. an RGB dim of 3), with a warning.

  As big_vision's fsdp rule does, each dropped axis is logged (once per array
  path, shape and axis): a replicated dim can cost a lot of memory.
  """
  fitted = []
  for i, (dim, axes) in enumerate(zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec)))):
    names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
    kept, size = [], 1
    for name in names:
      if dim % (size * mesh.shape[name]) == 0:
        kept.append(name)
        size *= mesh.shape[name]
      elif mesh.shape[name] > 1:
        _warn_once(path, shape, f"dim {i} ({dim}) is not divisible by mesh axis {name!r} "
                   f"(size {mesh.shape[name]}), so that dim is not split over it")
    fitted.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
  return P(*fitted)


_WARNED = set()


def _warn_once(path: str, shape: Sequence[int], what: str) -> None:
  key = (path, tuple(shape), what)
  if key not in _WARNED:
    _WARNED.add(key)
    logging.warning("Sharding %s %s: %s.", path or "an array", list(shape), what)


def _fsdp_fallback(spec: P, shape: Sequence[int], mesh: Mesh, path: str | None = None) -> P:
  """Splits a kernel that no logical name puts on `fsdp` over its largest free dim.

  FSDP means every weight is split over `fsdp`, but some kernels have no
  `embed` dim (a conv's [kh, kw, in, out] with tensor-split or odd channels, a
  pixel head [mlp, p*p*c]). As big_vision's fsdp sharding does, the largest
  unsharded dim that `fsdp` divides is split (a kernel with none stays
  replicated over `fsdp`, logged when `path` is given); 0- and 1-D leaves stay
  as named.
  """
  size = mesh.shape.get("fsdp", 1)
  entries = list(spec) + [None] * (len(shape) - len(spec))
  used = {a for e in entries if e for a in (e if isinstance(e, tuple) else (e,))}
  if size == 1 or len(shape) < 2 or "fsdp" in used:
    return spec
  free = [i for i, d in enumerate(shape) if entries[i] is None and d % size == 0]
  if not free:
    if path is not None:
      _warn_once(path, shape, f"no free dim is divisible by fsdp={size}, so it is replicated "
                 "over fsdp")
    return spec
  entries[max(free, key=lambda i: shape[i])] = "fsdp"
  return P(*entries)


def unbox(tree: Any) -> Any:
  """Strips `nn.Partitioned` boxes without adding sharding constraints."""
  return jax.tree.map(
      lambda x: x.unbox(apply_constraint=False) if isinstance(x, nn.Partitioned) else x,
      tree, is_leaf=lambda x: isinstance(x, nn.Partitioned))


def logical_to_shardings(abstract_tree: Any, mesh: Mesh, rules) -> Any:
  """Maps a tree that may hold `nn.Partitioned` boxes to NamedShardings.

  Leaves without logical names are replicated. Axes that do not divide a dim
  are dropped for that array (logged once per array), so small or odd dims
  never fail to shard. Kernels
  (2-D and up) that no name puts on `fsdp` get it on their largest free dim
  (`_fsdp_fallback`), so that FSDP splits every weight.
  """
  specs = nn.get_partition_spec(abstract_tree)
  mesh_specs = nn.logical_to_mesh(specs, rules)
  unboxed = unbox(abstract_tree)
  # A leaf-less node (optax's MaskedNode, the state of a frozen param group) is
  # an empty tuple, so logical_to_mesh made it a P(): keep it as the node it is.
  def sharding(path, spec, x):
    if not hasattr(x, "shape"):
      return x
    name = jax.tree_util.keystr(path)
    named = {a for e in spec if e for a in (e if isinstance(e, tuple) else (e,))}
    fitted = _fit_spec(spec, x.shape, mesh, name)
    # A kernel whose named fsdp dim did not fit was logged already: one line per array.
    return NamedSharding(mesh, _fsdp_fallback(fitted, x.shape, mesh,
                                              None if "fsdp" in named else name))
  return jax.tree_util.tree_map_with_path(sharding, mesh_specs, unboxed,
                                          is_leaf=lambda s: isinstance(s, P))
