"""vimjax/models/cpu_layer_norm.py: the C++ LayerNorm kernel for XLA:CPU, against a
float64 NumPy reference, inside the model's layers, on a mesh, and its fallbacks."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vimjax import parallel
from vimjax.models import cpu_kernels
from vimjax.models import cpu_layer_norm
from vimjax.models import layers

pytestmark = pytest.mark.skipif(not cpu_layer_norm.available(),
                                reason="the kernels could not be built here (see the warning)")


def _norm_reference(x, scale, bias, g, eps):
  """LayerNorm and its vjp with cotangent g, in float64 by the textbook formulas."""
  x, scale, bias, g = (np.asarray(a, np.float64) for a in (x, scale, bias, g))
  mean = x.mean(-1, keepdims=True)
  rstd = 1.0 / np.sqrt(x.var(-1, keepdims=True) + eps)
  x_hat = (x - mean) * rstd
  gs = g * scale
  dx = rstd * (gs - gs.mean(-1, keepdims=True) - x_hat * (gs * x_hat).mean(-1, keepdims=True))
  rows = tuple(range(x.ndim - 1))
  return x_hat * scale + bias, dx, (g * x_hat).sum(rows), g.sum(rows)


def _randn(seed, *shape, scale=1.0, offset=0.0):
  return jnp.asarray(np.random.RandomState(seed).randn(*shape) * scale + offset, jnp.float32)


@pytest.mark.parametrize("shape", [
    (2, 256, 256),  # issue 13's tokenizer
    (3, 21, 64),    # rows that are not a multiple of the 64-row block
    (1, 1, 16),     # one row, the narrowest feature axis
])
def test_layer_norm_values_and_gradients_match_float64(shape):
  x = _randn(0, *shape, scale=3.0, offset=2.0)  # A mean and spread far from N(0, 1).
  scale, bias = _randn(1, shape[-1]), _randn(2, shape[-1])
  g = _randn(3, *shape)
  out, vjp = jax.vjp(lambda x, s, b: cpu_layer_norm.layer_norm(x, s, b, 1e-6), x, scale, bias)
  want = _norm_reference(x, scale, bias, g, 1e-6)
  for got, ref, what in zip((out, *vjp(g)), want, ("y", "dx", "d scale", "d bias")):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max(),
                               err_msg=what)


def test_runs_are_bitwise_reproducible():
  x, g = _randn(6, 4, 100, 128), _randn(7, 4, 100, 128)
  scale, bias = _randn(8, 128), _randn(9, 128)
  loss = lambda x, s, b: jnp.sum(cpu_layer_norm.layer_norm(x, s, b, 1e-6) * g)
  run = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
  for a, b in zip(run(x, scale, bias), run(x, scale, bias)):
    np.testing.assert_array_equal(a, b)


def _block(x):
  block = layers.TransformerBlock(num_heads=4, mlp_dim=256)
  params = block.init(jax.random.key(0), x, deterministic=True)
  loss = lambda p, x: jnp.sum(jnp.sin(block.apply(p, x, deterministic=True)))
  return params, jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))


def test_the_block_takes_the_kernel_on_the_cpu_and_matches_xla(monkeypatch):
  x = _randn(10, 2, 64, 128)
  params, grad = _block(x)
  text = grad.lower(params, x).as_text()
  assert text.count("vimjax_layer_norm_forward") >= 2  # Both of the block's norms,
  assert "vimjax_layer_norm_backward" in text  # and their gradients.
  got = grad(params, x)
  with cpu_kernels.xla_reference():  # As the model FLOPs count traces it.
    _, reference_grad = _block(x)
    assert "vimjax_layer_norm" not in reference_grad.lower(params, x).as_text()
  monkeypatch.setenv("VIMJAX_CPU_LAYER_NORM", "0")
  _, xla_grad = _block(x)
  assert "vimjax_layer_norm" not in xla_grad.lower(params, x).as_text()
  want = xla_grad(params, x)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def test_what_does_not_fit_stays_on_xla():
  x = jnp.ones((2, 8, 64))
  assert cpu_layer_norm.fits(x)
  assert not cpu_layer_norm.fits(x.astype(jnp.bfloat16))
  assert not cpu_layer_norm.fits(x[..., :40])  # Features not a multiple of 16.
  assert not cpu_layer_norm.fits(x[0])  # Not [b, l, features].
  norm = layers.LayerNorm()
  y = jnp.ones((2, 8, 40))
  params = norm.init(jax.random.key(0), y)
  assert "vimjax_layer_norm" not in jax.jit(norm.apply).lower(params, y).as_text()


def test_on_a_mesh_each_shard_runs_the_kernel_and_matches_one_device():
  """shard_map over the batch (data); the feature axis stays whole."""
  x, scale, bias = _randn(11, 4, 32, 128), _randn(13, 128), _randn(14, 128)
  loss = lambda x, s, b: jnp.sum(jnp.sin(cpu_layer_norm.layer_norm(x, s, b, 1e-6)))
  grad = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
  want = grad(x, scale, bias)
  mesh = parallel.create_mesh(dict(data=2, fsdp=1, tensor=4), jax.devices()[:8])
  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.DEFAULT_RULES):
    rows = jax.sharding.NamedSharding(mesh, jax.P(("data", "fsdp"), None, None))
    args = (jax.device_put(x, rows), scale, bias)
    got = grad(*args)
    compiled = grad.lower(*args).compile().as_text()
  # Per shard: [2, 32, 128] of the [4, 32, 128] input.
  assert "vimjax_layer_norm_backward" in compiled and "f32[2,32,128]" in compiled
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)
  for a, b in zip(got[1], want[1]):  # Partial sums over other row blocks: rounding only.
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_the_switch_turns_it_off_and_forcing_it_is_a_one_line_error(monkeypatch):
  monkeypatch.setenv("VIMJAX_CPU_LAYER_NORM", "0")
  x, scale = jnp.ones((1, 4, 16)), jnp.ones((16,))
  assert not cpu_layer_norm.available() and not cpu_layer_norm.fits(x)
  with pytest.raises(RuntimeError, match=r"cpu_layer_norm: .* not available "
                                         r"\(\$VIMJAX_CPU_LAYER_NORM='0'"):
    cpu_layer_norm.layer_norm(x, scale, scale, 1e-6)
  monkeypatch.setenv("VIMJAX_CPU_LAYER_NORM", "on")
  with pytest.raises(ValueError, match=r"VIMJAX_CPU_LAYER_NORM='on'; valid: 1 .* or 0"):
    cpu_layer_norm.available()
