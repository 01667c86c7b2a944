"""Mesh construction, rule validation and logical -> physical shardings."""
import logging
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import ml_collections
import pytest

from vimjax import parallel


def _mesh_config(data, fsdp, tensor, rules=parallel.DEFAULT_RULES):
  return ml_collections.ConfigDict(dict(data=data, fsdp=fsdp, tensor=tensor, rules=rules))


@pytest.mark.parametrize("axes,expected", [((-1, 1, 1), (8, 1, 1)), ((2, -1, 2), (2, 2, 2)),
                                           ((1, 8, 1), (1, 8, 1)), ((2, 2, 2), (2, 2, 2))])
def test_mesh_shape_fills_minus_one(axes, expected):
  assert parallel.mesh_shape(_mesh_config(*axes), 8) == expected


@pytest.mark.parametrize("axes,match", [((3, -1, 1), "does not divide"), ((2, 2, 1), "uses 4"),
                                        ((-1, -1, 1), "at most one"), ((0, 1, 1), "positive")])
def test_mesh_shape_errors_name_the_mesh(axes, match):
  with pytest.raises(ValueError, match=match):
    parallel.mesh_shape(_mesh_config(*axes), 8)


def test_rules_reject_unknown_names():
  with pytest.raises(ValueError, match="unknown logical axis 'embedding'"):
    parallel.rules_from_config(_mesh_config(-1, 1, 1, (("embedding", "fsdp"),)))
  with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
    parallel.rules_from_config(_mesh_config(-1, 1, 1, (("embed", "model"),)))


class _Mlp(nn.Module):
  @nn.compact
  def __call__(self, x):
    init = nn.initializers.lecun_normal()
    x = nn.Dense(64, kernel_init=nn.with_logical_partitioning(init, ("embed", "mlp")))(x)
    return nn.Dense(3, kernel_init=nn.with_logical_partitioning(init, ("mlp", "embed")))(x)


def test_logical_to_shardings_follows_rules_and_fits_odd_dims():
  config = _mesh_config(2, 2, 2)
  mesh = parallel.create_mesh(config)
  abstract = jax.eval_shape(_Mlp().init, jax.random.key(0), jnp.ones((2, 16)))
  shardings = parallel.logical_to_shardings(abstract, mesh, parallel.rules_from_config(config))
  assert shardings["params"]["Dense_0"]["kernel"].spec == P("fsdp", "tensor")
  # The output dim 3 cannot be split over fsdp=2, so it is replicated.
  assert shardings["params"]["Dense_1"]["kernel"].spec == P("tensor", None)
  assert shardings["params"]["Dense_0"]["bias"].spec == P(None)


def test_fsdp_splits_kernels_no_name_puts_on_it_over_their_largest_free_dim():
  mesh = parallel.create_mesh(_mesh_config(2, 2, 2))
  rules = parallel.rules_from_config(_mesh_config(2, 2, 2))
  boxed = lambda shape, names: nn.Partitioned(jnp.zeros(shape), names)
  tree = {
      "conv": boxed((3, 3, 6, 8), (None, None, None, "channels")),  # [kh, kw, in, out]
      "pixels": boxed((16, 12), ("mlp", None)),  # No embed dim.
      "odd": boxed((3, 5, 7), (None, None, None)),  # Nothing fsdp divides.
      "bias": boxed((8,), ("mlp",)),  # 1-D leaves stay as named.
      "dense": boxed((4, 16), ("embed", "mlp")),  # Already on fsdp.
  }
  abstract = jax.eval_shape(lambda: tree)
  specs = {k: v.spec for k, v in parallel.logical_to_shardings(abstract, mesh, rules).items()}
  assert specs == {"conv": P(None, None, "fsdp", "tensor"), "pixels": P("tensor", "fsdp"),
                   "odd": P(None, None, None), "bias": P("tensor"),
                   "dense": P("fsdp", "tensor")}


def test_batch_sharding_splits_over_data_and_fsdp():
  mesh = parallel.create_mesh(_mesh_config(2, 2, 2))
  x = jax.device_put(jnp.zeros((8, 4)), parallel.batch_sharding(mesh))
  assert parallel.data_parallel_size(mesh) == 4
  assert x.addressable_shards[0].data.shape == (2, 4)


def test_a_dropped_axis_is_logged_once_with_path_shape_and_axis(caplog):
  mesh = parallel.create_mesh(_mesh_config(2, 2, 2))
  rules = parallel.rules_from_config(_mesh_config(2, 2, 2))
  abstract = {"head": nn.Partitioned(jax.ShapeDtypeStruct((6, 3), jnp.float32), ("mlp", "embed")),
              "odd": nn.Partitioned(jax.ShapeDtypeStruct((3, 5), jnp.float32), (None, None))}
  with caplog.at_level(logging.WARNING):
    for _ in range(2):
      shardings = parallel.logical_to_shardings(abstract, mesh, rules)
  assert shardings["head"].spec == P("tensor", None)
  dropped = [r.getMessage() for r in caplog.records if "['head']" in r.getMessage()]
  assert dropped == ["Sharding ['head'] [6, 3]: dim 1 (3) is not divisible by mesh axis 'fsdp' "
                     "(size 2), so that dim is not split over it."]
  odd = [r.getMessage() for r in caplog.records if "['odd']" in r.getMessage()]
  assert len(odd) == 1 and "no free dim is divisible by fsdp=2" in odd[0]


def test_create_mesh_falls_back_only_on_a_topology_failure(monkeypatch, caplog):
  tpu = [types.SimpleNamespace(platform="tpu", device_kind="TPU v4", id=i) for i in range(8)]
  monkeypatch.setattr(parallel, "Mesh", lambda devices, axes: (devices, axes))

  def no_fit(shape, devices, allow_split_physical_axes):
    raise NotImplementedError("Failed to find assignment for logical_axis_index 1")
  monkeypatch.setattr(parallel.mesh_utils, "create_device_mesh", no_fit)
  with caplog.at_level(logging.WARNING):
    devices, _ = parallel.create_mesh(_mesh_config(2, 2, 2), tpu)
  assert [d.id for d in devices.reshape(-1)] == list(range(8))
  assert "No topology-aware device order for mesh {'data': 2, 'fsdp': 2, 'tensor': 2}" in (
      caplog.text)

  def bug(shape, devices, allow_split_physical_axes):
    raise TypeError("a bug, not a topology that does not fit")
  monkeypatch.setattr(parallel.mesh_utils, "create_device_mesh", bug)
  with pytest.raises(TypeError, match="a bug"):
    parallel.create_mesh(_mesh_config(2, 2, 2), tpu)


def _constrained_spec(rules, mesh, names, shape):
  f = lambda x: nn.with_logical_constraint(x * 2, names)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    spec = jax.jit(f)(jnp.ones(shape)).sharding.spec
  return P(*spec, *(None,) * (len(shape) - len(spec)))  # Trailing Nones spelled out.


def test_activation_names_shard_apart_from_parameter_names():
  mesh = parallel.create_mesh(_mesh_config(2, 2, 2))
  names = ("activation_batch", "activation_length", "activation_embed")
  default = parallel.rules_from_config(_mesh_config(2, 2, 2))
  assert _constrained_spec(default, mesh, names, (8, 4, 8)) == P(("data", "fsdp"), None, None)
  # Sequence-split activations over `tensor`: the weights' shardings do not move.
  rules = tuple(r for r in parallel.DEFAULT_RULES if r[0] != "activation_length")
  rules = parallel.rules_from_config(_mesh_config(2, 2, 2, (("activation_length", "tensor"),)
                                                  + rules))
  assert _constrained_spec(rules, mesh, names, (8, 4, 8)) == P(("data", "fsdp"), "tensor", None)
  pos = {"pos": nn.Partitioned(jax.ShapeDtypeStruct((4, 8), jnp.float32), ("length", "embed"))}
  assert (parallel.logical_to_shardings(pos, mesh, rules)["pos"].spec
          == parallel.logical_to_shardings(pos, mesh, default)["pos"].spec == P(None, "fsdp"))


def test_rules_saved_before_activation_names_shard_activations_as_before():
  old = (("batch", ("data", "fsdp")), ("embed", "fsdp"), ("mlp", "tensor"), ("heads", "tensor"),
         ("vocab", "tensor"), ("codebook", "fsdp"), ("channels", "tensor"), ("length", None),
         ("kv", None), ("layers", None))
  rules = parallel.rules_from_config(_mesh_config(2, 2, 2, old))
  assert dict(rules)["activation_batch"] == ("data", "fsdp")
  assert dict(rules)["activation_mlp"] == "tensor"
  mesh = parallel.create_mesh(_mesh_config(2, 2, 2))
  names = ("activation_batch", "activation_length", "activation_mlp")
  assert _constrained_spec(rules, mesh, names, (8, 4, 8)) == P(("data", "fsdp"), None, "tensor")
