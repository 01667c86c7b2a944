"""StyleGAN2 discriminator: shapes, param tree, mbstd/blur math, sharding."""
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest

from vimjax import parallel
from vimjax.models import convolution
from vimjax.models import discriminator as disc_lib
from vimjax.models import layers

TINY = dict(base_channels=8, max_channels=16)


def _images(seed, b, size):
  return jax.random.uniform(jax.random.key(seed), (b, size, size, 3))


def _shapes(params):
  return jax.tree.map(lambda x: tuple(x.shape), nn.meta.unbox(params))


def test_logits_shape_and_finite(size=64):  # 32px runs in the mesh test below.
  model = disc_lib.Discriminator(image_size=size, **TINY)
  images = _images(0, 4, size)
  params = jax.jit(model.init)(jax.random.key(1), images)
  logits = jax.jit(model.apply)(params, images)
  assert logits.shape == (4,) and logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))
  assert len(np.unique(np.asarray(logits))) == 4  # Different images, different scores.


def test_param_tree_32px():
  model = disc_lib.Discriminator(image_size=32, **TINY)
  shapes = _shapes(jax.eval_shape(model.init, jax.random.key(0), _images(0, 2, 32))["params"])
  block = lambda cin, cout: {"conv0": {"kernel": (3, 3, cin, cin), "bias": (cin,)},
                             "conv1": {"kernel": (3, 3, cin, cout), "bias": (cout,)},
                             "skip": {"kernel": (1, 1, cin, cout)}}
  assert shapes == {
      "from_rgb": {"kernel": (1, 1, 3, 8), "bias": (8,)},
      "b32": block(8, 16), "b16": block(16, 16), "b8": block(16, 16),
      "b4_conv": {"kernel": (3, 3, 17, 16), "bias": (16,)},  # +1 mbstd channel
      "b4_fc": {"kernel": (4 * 4 * 16, 16), "bias": (16,)},
      "out": {"kernel": (16, 1), "bias": (1,)},
  }


def test_paper_channels_256px():
  model = disc_lib.Discriminator(image_size=256)  # StyleGAN2 256px widths
  assert model.resolution_channels() == {256: 64, 128: 128, 64: 256, 32: 512, 16: 512,
                                         8: 512, 4: 512}
  out = jax.eval_shape(model.apply, jax.eval_shape(model.init, jax.random.key(0),
                                                   jnp.zeros((4, 256, 256, 3))),
                       jnp.zeros((4, 256, 256, 3)))
  assert out.shape == (4,)


def test_explicit_channels_and_bad_config():
  model = disc_lib.Discriminator(image_size=16, channels=(4, 8, 12))
  assert model.resolution_channels() == {16: 4, 8: 8, 4: 12}
  with pytest.raises(ValueError, match="one per resolution"):
    disc_lib.Discriminator(image_size=16, channels=(4, 8)).resolution_channels()
  with pytest.raises(ValueError, match="power of two"):
    disc_lib.Discriminator(image_size=48).resolution_channels()
  with pytest.raises(ValueError, match=r"expects \[b, 32, 32"):
    m = disc_lib.Discriminator(image_size=32, **TINY)
    m.init(jax.random.key(0), jnp.zeros((2, 16, 16, 3)))


def _np_mbstd(x, g, f):
  x = np.asarray(x, np.float64)
  n, h, w, c = x.shape
  out = np.zeros((n, h, w, f))
  for start in range(0, n, g):
    grp = x[start:start + g]
    std = np.sqrt(((grp - grp.mean(0)) ** 2).mean(0) + 1e-8)  # [h, w, c]
    for j in range(f):
      out[start:start + g, :, :, j] = std[..., j * (c // f):(j + 1) * (c // f)].mean()
  return np.concatenate([x, out], axis=-1)


@pytest.mark.parametrize("n,g,f", [(8, 4, 1), (6, 2, 2), (3, 4, 1)])
def test_minibatch_stddev_matches_numpy(n, g, f):
  x = np.random.default_rng(0).normal(size=(n, 4, 4, 6)).astype(np.float32)
  np.testing.assert_allclose(disc_lib.minibatch_stddev(x, g, f), _np_mbstd(x, min(g, n), f),
                             rtol=1e-5, atol=1e-6)


def test_minibatch_stddev_rejects_indivisible_batch():
  with pytest.raises(ValueError, match="not divisible by group size 4"):
    disc_lib.minibatch_stddev(jnp.zeros((6, 4, 4, 2)), 4)


def test_blur_downsample_keeps_constants_and_halves():
  x = jnp.full((1, 8, 8, 2), 3.0)
  y = disc_lib.blur(x, pad=1, stride=2)
  assert y.shape == (1, 4, 4, 2)
  np.testing.assert_allclose(y[0, 1:-1, 1:-1], 3.0, rtol=1e-6)  # Interior: filter sums to 1.
  # Separable [1,3,3,1]/8 filter on a delta at (3, 3), stride 1, pad 2.
  delta = np.zeros((1, 7, 7, 1), np.float32)
  delta[0, 3, 3, 0] = 1.0
  taps = np.array([1, 3, 3, 1]) / 8.0
  got = np.asarray(disc_lib.blur(jnp.asarray(delta), pad=2, stride=1))[0, :, :, 0]
  assert got.shape == (8, 8)
  np.testing.assert_allclose(got[2:6, 2:6], np.outer(taps, taps), rtol=1e-6)
  assert got.sum() == pytest.approx(1.0)


@pytest.mark.parametrize("pad,stride", [(1, 2), (2, 1), (2, 2)])
def test_blur_matches_numpy_depthwise_filter(pad, stride):
  """The slice-and-add blur equals a float64 depthwise 4x4 correlation, odd sizes too."""
  x = np.random.RandomState(pad + stride).randn(2, 9, 8, 3).astype(np.float32)
  taps = np.array([1.0, 3.0, 3.0, 1.0]) / 8.0
  padded = np.pad(x.astype(np.float64), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  oh, ow = (padded.shape[1] - 4) // stride + 1, (padded.shape[2] - 4) // stride + 1
  ref = np.zeros((2, oh, ow, 3))
  for i in range(oh):
    for j in range(ow):
      window = padded[:, i * stride:i * stride + 4, j * stride:j * stride + 4]
      ref[:, i, j] = np.einsum("bhwc,h,w->bc", window, taps, taps)
  got = np.asarray(disc_lib.blur(jnp.asarray(x), pad=pad, stride=stride))
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("k,stride,size", [(3, 2, 9), (3, 2, 8), (1, 2, 7), (3, 3, 10), (3, 1, 6), (1, 1, 5)])
def test_conv_as_matmul_matches_numpy_and_lax_gradients(k, stride, size):
  """Patches @ kernel equals a float64 NumPy correlation; its gradients equal lax's conv's."""
  rs = np.random.RandomState(k + stride + size)
  x = rs.randn(2, size, size + 1, 5).astype(np.float32)
  kernel = rs.randn(k, k, 5, 4).astype(np.float32)
  oh, ow = (size - k) // stride + 1, (size + 1 - k) // stride + 1
  ref = np.zeros((2, oh, ow, 4))
  for i in range(oh):
    for j in range(ow):
      window = x[:, i * stride:i * stride + k, j * stride:j * stride + k].astype(np.float64)
      ref[:, i, j] = np.einsum("bhwc,hwco->bo", window, kernel)
  got = convolution.conv_as_matmul(jnp.asarray(x), jnp.asarray(kernel), stride)
  np.testing.assert_allclose(np.asarray(got), ref, rtol=1e-5, atol=1e-5)

  lax_conv = lambda x, w: jax.lax.conv_general_dilated(
      x, w, (stride, stride), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  # R1's shape: the kernel gradient of the squared input gradient (second order).
  def r1(conv):
    loss = lambda x, w: jnp.sum(jnp.sin(conv(x, w)))
    return jax.grad(lambda w, x: jnp.sum(jnp.square(jax.grad(loss)(x, w))))
  expected = r1(lax_conv)(jnp.asarray(kernel), jnp.asarray(x))
  got = r1(lambda x, w: convolution.conv_as_matmul(x, w, stride))(jnp.asarray(kernel), jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=2e-4, atol=2e-4)


def test_discriminator_uses_native_convolutions_off_the_cpu(monkeypatch):
  """Off the CPU no patches (kh * kw copies of each input): lax convolutions, with
  the same values and R1 gradient as the CPU's patches @ kernel."""
  model = disc_lib.Discriminator(image_size=32, **TINY)
  images = _images(2, 3, 32)
  params = jax.jit(model.init)(jax.random.key(0), images)

  def r1_and_logits():  # A new function each time: no trace cached across platforms.
    return jax.jit(lambda params: (model.apply(params, images), jax.grad(
        lambda p: jnp.sum(jnp.square(jax.grad(lambda x: jnp.sum(model.apply(p, x)))(images))))(
            params)))
  on_cpu, cpu_hlo = r1_and_logits()(params), r1_and_logits().lower(params).as_text()
  monkeypatch.setattr(layers, "target_platform", lambda: "tpu")
  off_cpu, tpu_hlo = r1_and_logits()(params), r1_and_logits().lower(params).as_text()
  assert "convolution" in tpu_hlo and "convolution" not in cpu_hlo
  for a, b in zip(jax.tree.leaves(off_cpu), jax.tree.leaves(on_cpu)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=2e-4, atol=2e-4)


def test_equalized_lr_and_bf16():
  model = disc_lib.Discriminator(image_size=32, equalized_lr=True, dtype=jnp.bfloat16, **TINY)
  images = _images(2, 4, 32)
  params = jax.jit(model.init)(jax.random.key(0), images)
  kernel = nn.meta.unbox(params)["params"]["b32"]["conv0"]["kernel"]
  assert kernel.dtype == jnp.float32
  assert 0.8 < float(jnp.std(kernel)) < 1.2  # N(0, 1) storage, scaled at runtime.
  logits = jax.jit(model.apply)(params, images)
  assert logits.dtype == jnp.float32 and np.all(np.isfinite(logits))


def test_params_shard_on_8_device_mesh():
  mesh = parallel.create_mesh({"data": 2, "fsdp": 2, "tensor": 2})
  rules = parallel.DEFAULT_RULES
  model = disc_lib.Discriminator(image_size=32, **TINY)
  images = _images(3, 8, 32)
  abstract = jax.eval_shape(model.init, jax.random.key(0), images)
  shardings = parallel.logical_to_shardings(abstract, mesh, rules)
  specs = shardings["params"]
  assert specs["b32"]["conv1"]["kernel"].spec == P(None, None, "fsdp", "tensor")
  assert specs["from_rgb"]["kernel"].spec == P(None, None, None, "tensor")  # RGB dim 3.
  assert specs["b4_fc"]["kernel"].spec == P("fsdp", "tensor")
  assert specs["out"]["kernel"].spec == P("tensor", None)
  params = jax.jit(model.init, out_shardings=shardings)(jax.random.key(0), images)
  assert nn.meta.unbox(params)["params"]["b8"]["conv0"]["kernel"].sharding == \
      specs["b8"]["conv0"]["kernel"]
  sharded_images = jax.device_put(images, parallel.batch_sharding(mesh))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    logits = jax.jit(model.apply)(params, sharded_images)
  assert logits.shape == (8,)
  np.testing.assert_allclose(logits, jax.jit(model.apply)(jax.device_get(params), images),
                             rtol=1e-4, atol=1e-5)
