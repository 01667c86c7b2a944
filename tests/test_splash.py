"""vimjax/models/splash.py: the Pallas TPU splash kernel, in the interpreter on CPU
against `heads_major_attention`, on a mesh, and compiled for a TPU slice."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vimjax import aot_compile
from vimjax import parallel
from vimjax.models import layers
from vimjax.models import splash

B, L, H, D = 2, 256, 4, 64


def _qkvg(seed=0):
  rs = np.random.RandomState(seed)
  return [jnp.asarray(rs.randn(B, L, H, D), jnp.float32) * s for s in (0.125, 1, 1, 1)]


def _conv_mask():  # A local 2-D causal window on a 16 x 16 grid, static (NumPy).
  return np.asarray(layers.conv_shaped_causal_mask(16, 16, 3, 5))


@pytest.mark.parametrize("kind", ["full", "causal", "conv"])
def test_splash_matches_heads_major_attention(kind):
  """Values and gradients, with the mask as the kernel's block-sparse mask."""
  q, k, v, g = _qkvg()
  mask = _conv_mask() if kind == "conv" else None
  causal = kind != "full"
  outs = {}
  for name, attend in (("splash", functools.partial(splash.splash_attention, interpret=True)),
                       ("xla", layers.heads_major_attention)):
    out, vjp = jax.vjp(lambda q, k, v, attend=attend: attend(q, k, v, mask, causal), q, k, v)
    outs[name] = (out, *vjp(g))
  for got, want, what in zip(outs["splash"], outs["xla"], ("out", "dq", "dk", "dv")):
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5, err_msg=what)


def test_splash_on_a_mesh_matches_one_device():
  """shard_map over batch (data) and heads (tensor): the same values and gradients."""
  q, k, v, g = _qkvg(1)
  loss = lambda q, k, v: jnp.sum(
      splash.splash_attention(q, k, v, None, True, interpret=True) * g)
  want = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)
  mesh = parallel.create_mesh(dict(data=2, fsdp=1, tensor=4), jax.devices()[:8])
  sharding = jax.sharding.NamedSharding(mesh, jax.P(("data", "fsdp"), None, "tensor", None))
  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.DEFAULT_RULES):
    args = [jax.device_put(x, sharding) for x in (q, k, v)]
    got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(*args)
    hlo = jax.jit(loss).lower(*args).as_text()
  assert "shard_map" in hlo or "manual" in hlo
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=2e-4, atol=2e-5)


def test_what_does_not_fit_is_refused_or_left_to_xla():
  assert splash.fits(256, 128, None) and splash.fits(256, 256, _conv_mask())
  assert not splash.fits(100, 100, None)  # Not a multiple of 128.
  assert not splash.fits(256, 256, np.ones((2, 1, 1, 256), bool))  # Per example (padding).
  assert not splash.fits(256, 256, jnp.ones((1, 1, 256, 256), bool))  # Not static.
  q, k, v, _ = _qkvg()
  with pytest.raises(ValueError, match="q=100, k=100 .* multiples of 128"):
    splash.splash_attention(q[:, :100], k[:, :100], v[:, :100])
  # Attention(implementation="auto") on TPU takes splash only where it fits: a
  # padding mask keeps the einsum path, which the CPU can run.
  mod = layers.Attention(num_heads=H, head_dim=D)
  x = jnp.ones((B, L, 32))
  params = mod.init(jax.random.key(0), x, x, deterministic=True)
  padding = jnp.asarray(np.arange(L) < 200)[None, None, None, :]
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(layers, "target_platform", lambda: "tpu")
    text = jax.jit(lambda p: mod.apply(p, x, x, padding, deterministic=True)).lower(
        params).as_text()
  assert "pallas" not in text.lower()


@pytest.mark.slow
def test_attention_compiles_to_the_splash_kernel_for_a_tpu_slice():
  """Forward and backward of Attention on a v5e:2x2 slice: "auto" runs Mosaic
  (splash) kernels, "xla" none."""
  _, devices = aot_compile.topology_devices("v5e:2x2")
  mesh = parallel.create_mesh(dict(data=1, fsdp=1, tensor=4), devices)
  x = jax.ShapeDtypeStruct((4, L, 256), jnp.bfloat16)
  texts = {}
  for implementation in ("auto", "xla"):
    mod = layers.Attention(num_heads=H, head_dim=D, implementation=implementation,
                           dtype=jnp.bfloat16)
    with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.DEFAULT_RULES):
      params = jax.eval_shape(lambda: mod.init(jax.random.key(0), jnp.ones((4, L, 256)),
                                               jnp.ones((4, L, 256)), deterministic=True))
      loss = lambda p, x, mod=mod: jnp.sum(mod.apply(p, x, x, deterministic=True,
                                                     causal=True).astype(jnp.float32))
      texts[implementation] = jax.jit(jax.grad(loss)).lower(params, x).compile().as_text()
  assert texts["auto"].count("tpu_custom_call") >= 2  # Forward and backward kernels.
  assert "tpu_custom_call" not in texts["xla"]
