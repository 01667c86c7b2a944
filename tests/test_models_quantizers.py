"""Tests for vimjax/models/quantizers.py against NumPy float64 references."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from vimjax.models import quantizers

B, N, D, K, LOOKUP = 8, 5, 12, 16, 4


def _z(shape=(B, N, D), seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _key(seed=0):
  # rbg keys: jitted init compiles ~2x faster on CPU than threefry.
  return jax.random.key(seed, impl="rbg")


def _l2n(x):
  return x / np.linalg.norm(x, axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def factorized():
  mod = quantizers.FactorizedQuantizer(codebook_size=K, lookup_dim=LOOKUP, features=D)
  variables = jax.jit(mod.init)(_key(), _z())
  return mod, variables


def test_factorized_matches_numpy_lookup(factorized):
  mod, variables = factorized
  z = _z(seed=1)
  z_q, aux = mod.apply(variables, z)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), nn.meta.unbox(variables)["params"])
  lat = _l2n(np.asarray(z, np.float64) @ p["down"]["kernel"] + p["down"]["bias"])
  book = _l2n(p["codebook"])
  sim = lat @ book.T
  codes = sim.argmax(-1)
  assert set(aux) == {"codes", "latents", "quantized_latents", "similarity", "code_counts"}
  assert z_q.shape == (B, N, D) and aux["codes"].dtype == jnp.int32
  np.testing.assert_array_equal(aux["codes"], codes)
  np.testing.assert_allclose(aux["latents"], lat, atol=1e-5)
  np.testing.assert_allclose(aux["similarity"], sim, atol=1e-5)
  np.testing.assert_allclose(aux["quantized_latents"], book[codes], atol=1e-5)
  np.testing.assert_allclose(z_q, book[codes] @ p["up"]["kernel"] + p["up"]["bias"],
                             atol=1e-5)
  np.testing.assert_array_equal(aux["code_counts"], np.bincount(codes.ravel(), minlength=K))
  assert aux["code_counts"].dtype == jnp.float32 and float(aux["code_counts"].sum()) == B * N


def test_factorized_straight_through_gradient(factorized):
  mod, variables = factorized
  z, w = _z(seed=2), _z(seed=3)

  def quantized_loss(z):
    return jnp.sum(mod.apply(variables, z)[0] * w)

  def unquantized_loss(z):  # up(l2(down(z))): what straight-through differentiates
    lat = mod.apply(variables, z, method=lambda m, z: quantizers.l2_normalize(m.down(z)))
    return jnp.sum(mod.apply(variables, lat, method=lambda m, x: m.up(x)) * w)

  g = jax.grad(quantized_loss)(z)
  assert float(jnp.abs(g).max()) > 0
  np.testing.assert_allclose(g, jax.grad(unquantized_loss)(z), rtol=1e-4, atol=1e-6)
  # The codebook gets no gradient through z_q (only through losses on aux).
  gp = jax.grad(lambda v: jnp.sum(mod.apply(v, z)[0] * w))(variables)
  assert float(jnp.abs(nn.meta.unbox(gp)["params"]["codebook"]).max()) == 0
  gq = jax.grad(lambda v: jnp.sum(mod.apply(v, z)[1]["quantized_latents"]))(variables)
  assert float(jnp.abs(nn.meta.unbox(gq)["params"]["codebook"]).max()) > 0


def test_factorized_embed_codes_and_partitioning(factorized):
  mod, variables = factorized
  z_q, aux = mod.apply(variables, _z(seed=4))
  np.testing.assert_allclose(mod.apply(variables, aux["codes"], method="embed_codes"), z_q,
                             atol=1e-6)
  specs = nn.get_partition_spec(variables)["params"]
  assert specs["codebook"] == P("codebook", None)
  assert specs["down"]["kernel"] == P("embed", None)
  assert specs["up"]["kernel"] == P(None, "embed")
  assert variables["params"]["codebook"].unbox().shape == (K, LOOKUP)
  with pytest.raises(ValueError, match="input dim 7 != features=12"):
    mod.apply(variables, _z((B, N, 7)))


def test_code_counts_are_global_on_a_mesh(factorized):
  mod, variables = factorized
  mesh = Mesh(np.asarray(jax.devices()).reshape(8), ("data",))
  z = jax.device_put(_z((16, N, D), seed=5), NamedSharding(mesh, P("data")))
  variables = jax.device_put(variables, NamedSharding(mesh, P()))
  _, aux = jax.jit(mod.apply)(variables, z)
  counts = aux["code_counts"]
  assert counts.sharding.is_fully_replicated
  np.testing.assert_array_equal(counts, np.bincount(np.asarray(aux["codes"]).ravel(),
                                                    minlength=K))
  assert float(counts.sum()) == 16 * N


# ----------------------------------------------------------------------------- FSQ

LEVELS = (8, 5, 4, 2)


def _fsq():
  return quantizers.FiniteScalarQuantizer(levels=LEVELS, features=D)


def test_fsq_bound_and_round_match_numpy():
  mod = _fsq()
  variables = jax.jit(mod.init)(_key(), _z())
  z = _z((64, 3, D), seed=6) * 3
  z_q, aux = mod.apply(variables, z)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), nn.meta.unbox(variables)["params"])
  h = np.asarray(z, np.float64) @ p["down"]["kernel"] + p["down"]["bias"]
  levels = np.array(LEVELS, np.float64)
  half_l = (levels - 1) * 0.999 / 2
  offset = (levels % 2 == 0) * 0.5
  bounded = np.tanh(h + np.tan(offset / half_l)) * half_l - offset
  half_width = levels // 2
  digits = np.round(bounded) + half_width
  assert digits.min() >= 0 and np.all(digits.max((0, 1)) <= levels - 1)
  codes = np.ravel_multi_index(tuple(digits.reshape(-1, 4).T[::-1].astype(int)),
                               LEVELS[::-1]).reshape(64, 3)
  assert set(aux) == {"codes", "latents", "quantized_latents", "code_counts"}
  np.testing.assert_allclose(aux["latents"], bounded / half_width, atol=1e-5)
  np.testing.assert_allclose(aux["quantized_latents"], np.round(bounded) / half_width)
  np.testing.assert_array_equal(aux["codes"], codes)
  np.testing.assert_array_equal(aux["code_counts"], np.bincount(codes.ravel(), minlength=320))
  np.testing.assert_allclose(mod.apply(variables, aux["codes"], method="embed_codes"), z_q,
                             atol=1e-6)
  # Zero rounds to the centre, and sweeping the input reaches exactly L values.
  sweep = mod.apply(variables, jnp.linspace(-8, 8, 4001)[:, None] * jnp.ones(4),
                    method="bound")
  np.testing.assert_array_equal(
      np.round(mod.apply(variables, jnp.zeros(4), method="bound")), 0)
  for i, l in enumerate(LEVELS):
    assert len(np.unique(np.round(np.asarray(sweep[:, i])))) == l


def test_fsq_codes_values_bijection():
  mod = _fsq()
  variables = jax.jit(mod.init)(_key(), _z())
  codes = jnp.arange(8 * 5 * 4 * 2)
  digits = mod.apply(variables, codes, method="codes_to_digits")
  np.testing.assert_array_equal(mod.apply(variables, digits, method="digits_to_codes"), codes)
  values = np.asarray(mod.apply(variables, codes, method="codes_to_values"))
  assert len({tuple(v) for v in values}) == len(codes)  # distinct grid points
  assert values.min() >= -1 and values.max() <= 1
  grids = [np.unique(values[:, i]) for i in range(4)]
  np.testing.assert_allclose(grids[0], np.arange(-4, 4) / 4)  # even level: -4..3
  np.testing.assert_allclose(grids[1], np.arange(-2, 3) / 2)  # odd level: -2..2
  np.testing.assert_allclose(grids[3], [-1, 0])


def test_fsq_straight_through_and_errors():
  mod = _fsq()
  variables = jax.jit(mod.init)(_key(), _z())
  g = jax.grad(lambda z: jnp.sum(mod.apply(variables, z)[0]))(_z(seed=7))
  assert float(jnp.abs(g).max()) > 0
  assert nn.get_partition_spec(variables)["params"]["up"]["kernel"] == P(None, "embed")
  for bad in [(), (8, 1)]:
    with pytest.raises(ValueError, match="levels="):
      quantizers.FiniteScalarQuantizer(levels=bad, features=D).init(jax.random.key(0), _z())


# ----------------------------------------------------------------------------- restarts


def test_update_usage_ema_matches_numpy():
  ema, counts = np.random.RandomState(0).rand(2, K).astype(np.float32)
  got = quantizers.update_usage_ema(jnp.asarray(ema), jnp.asarray(counts * 10), 0.9)
  np.testing.assert_allclose(got, 0.9 * ema + 0.1 * counts * 10, rtol=1e-6)


def test_restart_dead_codes_matches_numpy():
  rs = np.random.RandomState(0)
  codebook = rs.randn(K, LOOKUP).astype(np.float32)
  usage = rs.rand(K).astype(np.float32)
  latents = _l2n(rs.randn(B, N, LOOKUP)).astype(np.float32)
  rng = jax.random.key(3)
  new_book, new_usage = quantizers.restart_dead_codes(
      jnp.asarray(codebook), jnp.asarray(usage), jnp.asarray(latents), rng, 0.5)
  idx = np.asarray(jax.random.randint(rng, (K,), 0, B * N))  # documented contract
  dead = usage < 0.5
  assert 0 < dead.sum() < K
  ref = np.where(dead[:, None], latents.reshape(-1, LOOKUP)[idx], codebook)
  np.testing.assert_array_equal(new_book, ref)
  np.testing.assert_array_equal(new_usage, np.where(dead, 0.5, usage))
  # Restarts draw from the global batch: sharded latents give the same result.
  mesh = Mesh(np.asarray(jax.devices()).reshape(8), ("data",))
  sharded = jax.device_put(jnp.asarray(latents), NamedSharding(mesh, P("data")))
  book_sharded, _ = jax.jit(quantizers.restart_dead_codes, static_argnums=4)(
      jnp.asarray(codebook), jnp.asarray(usage), sharded, rng, 0.5)
  np.testing.assert_array_equal(book_sharded, ref)


def test_restart_dead_codes_seeds_from_badly_served_latents():
  rs = np.random.RandomState(1)
  codebook = rs.randn(K, LOOKUP).astype(np.float32)
  usage = np.zeros(K, np.float32)  # Every code dead: K draws.
  latents = _l2n(rs.randn(B, N, LOOKUP)).astype(np.float32)
  quantized = latents.copy()
  served_badly = np.zeros(B * N, bool)
  served_badly[rs.choice(B * N, 3, replace=False)] = True
  quantized.reshape(-1, LOOKUP)[served_badly] *= -1.0  # Error 4 there, 0 elsewhere.
  new_book, _ = quantizers.restart_dead_codes(
      jnp.asarray(codebook), jnp.asarray(usage), jnp.asarray(latents), jax.random.key(0),
      0.5, jnp.asarray(quantized))
  flat = latents.reshape(-1, LOOKUP)
  # Every restarted code is one of the three badly served latents, and all three are drawn.
  matches = np.all(np.asarray(new_book)[:, None, :] == flat[None], axis=-1)  # [K, B*N]
  assert matches.any(axis=1).all()
  assert set(np.nonzero(matches)[1]) == set(np.nonzero(served_badly)[0])


def test_restart_draws_are_proportional_to_the_error():
  """Draw frequencies follow error / sum(error) (chi-square, fixed seed); zero-error
  latents are never drawn, and an all-zero error draws uniformly."""
  codes, m = 20_000, 64
  rs = np.random.RandomState(2)
  latents = _l2n(rs.randn(m, LOOKUP)).astype(np.float32)
  scale = np.where(np.arange(m) % 4 == 0, 0.0, rs.uniform(0.05, 1.0, m))  # Error 0 at 1/4.
  quantized = (latents * (1.0 - np.sqrt(scale))[:, None]).astype(np.float32)
  error = np.sum(np.square(latents.astype(np.float64) - quantized), axis=-1)
  restart = lambda q: quantizers.restart_dead_codes(
      jnp.zeros((codes, LOOKUP)), jnp.zeros(codes), jnp.asarray(latents), jax.random.key(5),
      0.5, jnp.asarray(q))[0]
  book = np.asarray(restart(quantized))
  idx = np.argmax(np.all(book[:, None] == latents[None], axis=-1), axis=1)
  assert np.all(book == latents[idx])
  counts = np.bincount(idx, minlength=m)
  assert (error == 0).sum() == m // 4 and counts[error == 0].sum() == 0
  expected = codes * error / error.sum()
  live = expected > 0
  chi2 = np.sum((counts[live] - expected[live]) ** 2 / expected[live])
  assert chi2 < 2 * live.sum(), chi2  # dof = live - 1; its mean is ~live.
  uniform = np.bincount(np.argmax(np.all(
      np.asarray(restart(latents))[:, None] == latents[None], axis=-1), axis=1), minlength=m)
  assert uniform.min() > 0.7 * codes / m and uniform.max() < 1.3 * codes / m
