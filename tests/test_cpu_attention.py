"""vimjax/models/cpu_attention.py: the fused C++ attention kernel for XLA:CPU, against
a float64 NumPy reference, inside `layers.Attention`, on a mesh, and its fallbacks."""
import importlib
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vimjax import flops
from vimjax import parallel
from vimjax import tasks
from vimjax.configs import vitvqgan
from vimjax.models import cpu_attention
from vimjax.models import cpu_kernels
from vimjax.models import layers

pytestmark = pytest.mark.skipif(not cpu_attention.available(),
                                reason="the kernel could not be built here (see the warning)")


def _reference(q, k, v, g, scale):
  """softmax(scale q k^T) v and its vjp with cotangent g, in float64 per (b, h)."""
  q, k, v, g = (np.asarray(x, np.float64).transpose(0, 2, 1, 3) for x in (q, k, v, g))
  logits = scale * q @ k.transpose(0, 1, 3, 2)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  out = p @ v
  dp = g @ v.transpose(0, 1, 3, 2)
  ds = p * (dp - (dp * p).sum(-1, keepdims=True))
  grads = (scale * ds @ k, scale * ds.transpose(0, 1, 3, 2) @ q, p.transpose(0, 1, 3, 2) @ g)
  return [x.transpose(0, 2, 1, 3) for x in (out, *grads)]


def _inputs(b, q_len, kv_len, h, d, seed=0):
  rs = np.random.RandomState(seed)
  shapes = ((b, q_len, h, d), (b, kv_len, h, d), (b, kv_len, h, d), (b, q_len, h, d))
  return [jnp.asarray(rs.randn(*s) * 2, jnp.float32) for s in shapes]


@pytest.mark.parametrize("b,q_len,kv_len,h,d", [
    (2, 256, 256, 8, 32),   # issue 13's tokenizer
    (3, 64, 64, 4, 16),     # the demo's tiny tokenizer
    (1, 40, 96, 2, 64),     # cross lengths, the widest head
])
def test_values_and_gradients_match_float64(b, q_len, kv_len, h, d):
  q, k, v, g = _inputs(b, q_len, kv_len, h, d)
  scale = d ** -0.5
  out, vjp = jax.vjp(lambda q, k, v: cpu_attention.cpu_attention(q, k, v, scale), q, k, v)
  want = _reference(q, k, v, g, scale)
  for got, ref, what in zip((out, *vjp(g)), want, ("out", "dq", "dk", "dv")):
    np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-5 * np.abs(ref).max(),
                               err_msg=what)


def test_runs_are_bitwise_reproducible():
  q, k, v, g = _inputs(4, 64, 64, 4, 32, seed=1)
  run = jax.jit(jax.grad(lambda q, k, v: jnp.sum(cpu_attention.cpu_attention(q, k, v) * g),
                         argnums=(0, 1, 2)))
  for a, b in zip(run(q, k, v), run(q, k, v)):
    np.testing.assert_array_equal(a, b)


def _attention(implementation, x):
  mod = layers.Attention(num_heads=4, head_dim=32, implementation=implementation)
  params = mod.init(jax.random.key(0), x, x, deterministic=True)
  loss = lambda p, x: jnp.sum(jnp.sin(mod.apply(p, x, x, deterministic=True)))
  return params, loss


def test_attention_takes_the_kernel_on_the_cpu_where_it_fits():
  x = jax.random.normal(jax.random.key(1), (2, 64, 128))
  params, auto = _attention("auto", x)
  _, xla = _attention("xla", x)
  assert "vimjax_attention_forward" in jax.jit(auto).lower(params, x).as_text()
  assert "vimjax_attention_backward" in jax.jit(jax.grad(auto)).lower(params, x).as_text()
  assert "vimjax_attention" not in jax.jit(jax.grad(xla)).lower(params, x).as_text()
  got, want = (jax.jit(jax.value_and_grad(f, argnums=(0, 1)))(params, x) for f in (auto, xla))
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):  # (The key bias's is ~0.)
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)
  # A mask, causal attention, bfloat16 or a length off the blocks stay on XLA.
  q, k = jnp.ones((2, 64, 4, 32)), jnp.ones((2, 64, 4, 32))
  assert cpu_attention.fits(q, k, None, False)
  assert not cpu_attention.fits(q, k, jnp.ones((1, 1, 64, 64), bool), False)
  assert not cpu_attention.fits(q, k, None, True)
  assert not cpu_attention.fits(q.astype(jnp.bfloat16), k.astype(jnp.bfloat16), None, False)
  assert not cpu_attention.fits(q, k[:, :48], None, False)
  assert not cpu_attention.fits(q[..., :24], k[..., :24], None, False)


def test_forcing_the_kernel_where_it_does_not_fit_is_a_one_line_error():
  x = jnp.ones((2, 64, 128))
  mod = layers.Attention(num_heads=4, head_dim=32, implementation="cpu_kernel")
  params = mod.init(jax.random.key(0), x, x, deterministic=True)
  mask = jnp.ones((1, 1, 64, 64), bool)
  with pytest.raises(ValueError, match=r"cpu_kernel' does not fit .* mask \(1, 1, 64, 64\)"):
    mod.apply(params, x, x, mask, deterministic=True)


def test_on_a_mesh_each_shard_runs_the_kernel_and_matches_one_device():
  """shard_map over batch (data) and heads (tensor), as splash on TPU."""
  q, k, v, g = _inputs(2, 64, 64, 4, 32, seed=2)
  loss = lambda q, k, v: jnp.sum(cpu_attention.cpu_attention(q, k, v, 0.2) * g)
  want = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(q, k, v)
  mesh = parallel.create_mesh(dict(data=2, fsdp=1, tensor=4), jax.devices()[:8])
  sharding = jax.sharding.NamedSharding(mesh, jax.P(("data", "fsdp"), None, "tensor", None))
  with jax.set_mesh(mesh), nn.logical_axis_rules(parallel.DEFAULT_RULES):
    args = [jax.device_put(x, sharding) for x in (q, k, v)]
    got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(*args)
    compiled = jax.jit(loss).lower(*args).compile().as_text()
  # The kernel sees one shard: [1, 64, 1, 32] of the [2, 64, 4, 32] inputs.
  assert "vimjax_attention_forward" in compiled and "f32[1,64,1,32]" in compiled
  np.testing.assert_allclose(got[0], want[0], rtol=1e-5)  # The loss sums shards' partials.
  for a, b in zip(got[1], want[1]):  # Each (example, head) is computed as on one device.
    np.testing.assert_array_equal(a, b)


def test_model_flops_count_xla_attention():
  """XLA's cost analysis sees nothing inside a custom call: the count traces XLA's."""
  config = vitvqgan.get_config("tiny")
  task = tasks.get(config)
  counted = flops.model_flops_per_step(task, config)
  with cpu_kernels.xla_reference():
    assert flops.model_flops_per_step(task, config) == counted
  steps = task.build(config, None)
  state = parallel.unbox(jax.eval_shape(steps.init, jax.random.key(0)))
  batch = {name: jax.ShapeDtypeStruct(np.shape(x), x.dtype)
           for name, x in task.batch_spec(config, config.global_batch_size).items()}
  lowered = jax.jit(steps.train_step).lower(state, batch, jax.random.key(0), steps.frozen)
  assert "vimjax_attention_forward" in lowered.as_text()  # The step itself runs the kernel,
  assert flops.compiled_flops(lowered) < counted  # whose FLOPs its own analysis misses.


def _fresh_module(monkeypatch, **env):
  for name, value in env.items():
    monkeypatch.setenv(name, value)
  module = importlib.reload(cpu_attention)
  monkeypatch.setattr(layers, "cpu_attention", module)
  return module


def test_without_a_compiler_attention_runs_on_xla_with_one_warning(monkeypatch, tmp_path,
                                                                   caplog):
  module = _fresh_module(monkeypatch, CXX="no-such-compiler-vimjax",
                         VIMJAX_KERNEL_CACHE=str(tmp_path))
  try:
    assert not module.available()
    assert "no C++ compiler 'no-such-compiler-vimjax'" in caplog.text
    x = jnp.ones((2, 64, 128))
    params, loss = _attention("auto", x)
    assert "vimjax_attention" not in jax.jit(loss).lower(params, x).as_text()
  finally:
    monkeypatch.undo()
    importlib.reload(cpu_attention)


def test_the_switch_turns_it_off_and_refuses_bad_values(monkeypatch):
  monkeypatch.setenv("VIMJAX_CPU_ATTENTION", "0")
  assert not cpu_attention.available()
  x = jnp.ones((2, 64, 128))
  params, loss = _attention("auto", x)
  assert "vimjax_attention" not in jax.jit(loss).lower(params, x).as_text()
  q = jnp.ones((1, 32, 1, 32))
  with pytest.raises(RuntimeError, match=r"not available \(\$VIMJAX_CPU_ATTENTION='0'"):
    cpu_attention.cpu_attention(q, q, q)
  monkeypatch.setenv("VIMJAX_CPU_ATTENTION", "yes")
  with pytest.raises(ValueError, match=r"VIMJAX_CPU_ATTENTION='yes'; valid: 1 .* or 0"):
    cpu_attention.available()


def test_a_fresh_cache_builds_the_library_once(tmp_path):
  """In a new process with an empty cache: built on the first call (no `available()`
  first), named for this machine, then reused."""
  code = ("import os, jax.numpy as jnp; from vimjax.models import cpu_attention as c; "
          "q = jnp.ones((1, 32, 1, 16)); assert c.cpu_attention(q, q, q).shape == q.shape; "
          "p = c.library_path(); print(p, os.path.getmtime(p))")
  env = {"VIMJAX_KERNEL_CACHE": str(tmp_path), "JAX_PLATFORMS": "cpu",
         "PATH": "/usr/bin:/bin:/usr/local/bin"}
  first, again = (subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                                 text=True, timeout=300, check=True).stdout.split()
                  for _ in range(2))
  assert first == again  # Same path, same modification time: not rebuilt.
  assert first[0].startswith(str(tmp_path / "cpu_attention-")) and first[0].endswith(".so")
  assert [p.name for p in tmp_path.iterdir()] == [first[0].split("/")[-1]]  # No temporaries.
