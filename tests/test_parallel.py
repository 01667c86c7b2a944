"""Mesh construction, rule validation and logical -> physical shardings."""
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
