"""LPIPS/VGG16: shapes, distance properties, head math, weight conversion and loading."""
import json

from absl import flags
from absl.testing import flagsaver
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vimjax import convert_weights
from vimjax import roofline
from vimjax.models import layers
from vimjax.models import perceptual

SIZE = 32


@pytest.fixture(scope="module")
def lpips():
  model = perceptual.LPIPS()
  x = jnp.zeros((2, SIZE, SIZE, 3))
  params = jax.jit(model.init)(jax.random.key(0), x, x)["params"]
  apply = jax.jit(lambda p, a, b: model.apply({"params": p}, a, b))
  return model, params, apply


def _images(seed, b=2, size=SIZE):
  return np.random.default_rng(seed).uniform(0, 1, (b, size, size, 3)).astype(np.float32)


def _torch_states(seed):
  """Random state dicts with torchvision/LPIPS names and [out, in, kh, kw] layouts."""
  rng = np.random.default_rng(seed)
  vgg, cin = {"classifier.0.weight": np.zeros((4, 4), np.float32)}, 3
  couts = [c for stage in perceptual.VGG16_STAGES for c in stage]
  for idx, cout in zip(convert_weights.TORCHVISION_CONV_INDICES, couts):
    std = np.sqrt(2.0 / (9 * cin))
    vgg[f"features.{idx}.weight"] = (rng.standard_normal((cout, cin, 3, 3)) * std).astype(
        np.float32)
    vgg[f"features.{idx}.bias"] = rng.uniform(-0.1, 0.1, cout).astype(np.float32)
    cin = cout
  lp = {f"lin{i}.model.1.weight": rng.uniform(0, 0.1, (1, c, 1, 1)).astype(np.float32)
        for i, c in enumerate(perceptual.TAP_CHANNELS)}
  return vgg, lp


def test_param_tree(lpips):
  _, params, _ = lpips
  flat = perceptual.flatten_params(params)
  assert {k: v.shape for k, v in flat.items()} == perceptual.expected_param_shapes()
  assert len(flat) == 13 * 2 + 5
  assert flat["vgg/conv1_1/kernel"].shape == (3, 3, 3, 64)
  assert flat["vgg/conv3_3/kernel"].shape == (3, 3, 256, 256)
  assert flat["vgg/conv5_3/bias"].shape == (512,)
  assert flat["lin_4/kernel"].shape == (1, 1, 512, 1)
  assert all(np.all(flat[f"lin_{i}/kernel"] == 1.0) for i in range(5))


def test_distance_properties(lpips):
  _, params, apply = lpips
  x, y = _images(0), _images(1)
  d_xy, d_yx, d_xx = apply(params, x, y), apply(params, y, x), apply(params, x, x)
  assert d_xy.shape == (2,) and d_xy.dtype == jnp.float32
  np.testing.assert_allclose(d_xx, 0.0, atol=1e-7)  # Batch position may round differently.
  np.testing.assert_allclose(d_xy, d_yx, rtol=1e-6)
  assert np.all(d_xy > 0)
  # A small perturbation is closer than an unrelated image.
  assert np.all(apply(params, x, np.clip(x + 0.02, 0, 1)) < d_xy)


def _np_normalize(f):
  f = np.asarray(f, np.float64)
  return f / (np.sqrt(np.sum(f ** 2, -1, keepdims=True)) + 1e-10)


def test_head_math_matches_numpy(lpips):
  model, params, _ = lpips
  rng = np.random.default_rng(2)
  sizes = [8, 4, 2, 1, 1]
  f0 = [np.maximum(rng.standard_normal((2, s, s, c)), 0).astype(np.float32)
        for s, c in zip(sizes, perceptual.TAP_CHANNELS)]
  f1 = [np.maximum(rng.standard_normal(f.shape), 0).astype(np.float32) for f in f0]
  w = [rng.uniform(0, 1, c).astype(np.float32) for c in perceptual.TAP_CHANNELS]
  params = dict(params)
  for i, wi in enumerate(w):
    params[f"lin_{i}"] = {"kernel": wi.reshape(1, 1, -1, 1)}
  got = model.apply({"params": params}, f0, f1,
                    method=perceptual.LPIPS.distance_from_features)
  ref = sum(np.mean(np.sum((_np_normalize(a) - _np_normalize(b)) ** 2 * wi, -1), axis=(1, 2))
            for a, b, wi in zip(f0, f1, w))
  np.testing.assert_allclose(got, ref, rtol=1e-5)


def test_normalize_channels_handles_zero_vectors():
  x = jnp.zeros((1, 2, 2, 4)).at[0, 0, 0].set(jnp.array([3.0, 4.0, 0.0, 0.0]))
  y = perceptual.normalize_channels(x)
  np.testing.assert_allclose(y[0, 0, 0], [0.6, 0.8, 0, 0], rtol=1e-6)
  np.testing.assert_array_equal(y[0, 1, 1], 0.0)
  g = jax.grad(lambda v: jnp.sum(perceptual.normalize_channels(v) ** 2 * 0.5))(x)
  assert np.all(np.isfinite(g))


def _np_conv_relu(x, w, b):
  """torch Conv2d(padding=1) + ReLU: x [n, c, h, w], w [out, in, 3, 3]."""
  n, c, h, wd = x.shape
  xp = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)))
  out = np.zeros((n, w.shape[0], h, wd))
  for i in range(3):
    for j in range(3):
      out += np.einsum("nchw,oc->nohw", xp[:, :, i:i + h, j:j + wd], w[:, :, i, j])
  return np.maximum(out + b[None, :, None, None], 0)


def test_converted_weights_match_torch_layout_reference(tmp_path):
  vgg, lp = _torch_states(3)
  path = str(tmp_path / "w.npz")
  np.savez(path, **convert_weights.convert_state_dicts(vgg, lp))
  params = perceptual.load_lpips_params(path)
  images = _images(4, b=1, size=16)
  taps = jax.jit(lambda p, x: perceptual.LPIPS().apply(
      {"params": p}, x, method=perceptual.LPIPS.features))(params, images)
  # Independent NCHW reference: [0,1] -> [-1,1] -> ScalingLayer -> relu1_2 -> pool -> relu2_2.
  x = images.transpose(0, 3, 1, 2).astype(np.float64) * 2 - 1
  x = (x - np.array(perceptual.LPIPS_SHIFT)[:, None, None]) / np.array(
      perceptual.LPIPS_SCALE)[:, None, None]
  f = lambda x, i: _np_conv_relu(x, vgg[f"features.{i}.weight"], vgg[f"features.{i}.bias"])
  relu1_2 = f(f(x, 0), 2)
  pooled = relu1_2.reshape(1, 64, 8, 2, 8, 2).max(axis=(3, 5))
  relu2_2 = f(f(pooled, 5), 7)
  np.testing.assert_allclose(taps[0], relu1_2.transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(taps[1], relu2_2.transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-4)
  assert [t.shape for t in taps] == [(1, 16, 16, 64), (1, 8, 8, 128), (1, 4, 4, 256),
                                     (1, 2, 2, 512), (1, 1, 1, 512)]


def test_npz_round_trip(lpips, tmp_path):
  _, params, apply = lpips
  path = str(tmp_path / "lpips.npz")
  np.savez(path, **perceptual.flatten_params(params))
  loaded = perceptual.load_lpips_params(path)
  x, y = _images(5), _images(6)
  np.testing.assert_array_equal(apply(loaded, x, y), apply(params, x, y))


def test_loader_errors(lpips, tmp_path):
  _, params, _ = lpips
  missing = str(tmp_path / "nope.npz")
  with pytest.raises(FileNotFoundError, match="nope.npz.*python -m vimjax.convert_weights"):
    perceptual.load_lpips_params(missing)
  flat = perceptual.flatten_params(params)
  bad = dict(flat)
  del bad["vgg/conv2_1/bias"]
  np.savez(tmp_path / "a.npz", **bad)
  with pytest.raises(ValueError, match="lack array 'vgg/conv2_1/bias'"):
    perceptual.load_lpips_params(str(tmp_path / "a.npz"))
  bad = dict(flat, **{"lin_2/kernel": np.zeros((1, 256, 1, 1), np.float32)})
  np.savez(tmp_path / "b.npz", **bad)
  with pytest.raises(ValueError, match=r"'lin_2/kernel' has shape \(1, 256, 1, 1\)"):
    perceptual.load_lpips_params(str(tmp_path / "b.npz"))
  np.savez(tmp_path / "c.npz", **flat, extra=np.zeros(3))
  with pytest.raises(ValueError, match="unexpected array 'extra'"):
    perceptual.load_lpips_params(str(tmp_path / "c.npz"))


def test_convert_state_dicts_layout():
  vgg, lp = _torch_states(7)
  out = convert_weights.convert_state_dicts(vgg, lp)
  assert {k: v.shape for k, v in out.items()} == perceptual.expected_param_shapes()
  w = vgg["features.10.weight"]  # conv3_1: [256, 128, 3, 3]
  assert out["vgg/conv3_1/kernel"][2, 0, 17, 5] == w[5, 17, 2, 0]
  np.testing.assert_array_equal(out["vgg/conv5_3/bias"], vgg["features.28.bias"])
  np.testing.assert_array_equal(out["lin_1/kernel"][0, 0, :, 0],
                                lp["lin1.model.1.weight"][0, :, 0, 0])


def test_convert_state_dicts_errors():
  vgg, lp = _torch_states(8)
  del vgg["features.12.weight"]
  with pytest.raises(ValueError, match="lacks 'features.12.weight'"):
    convert_weights.convert_state_dicts(vgg, lp)
  vgg, lp = _torch_states(8)
  lp["lin3.model.1.weight"] = np.zeros((1, 256, 1, 1), np.float32)
  with pytest.raises(ValueError, match=r"'lin3.model.1.weight' has shape \(1, 256, 1, 1\)"):
    convert_weights.convert_state_dicts(vgg, lp)


def test_convert_binary_main(tmp_path, monkeypatch, capsys):
  vgg, lp = _torch_states(9)
  monkeypatch.setattr(convert_weights, "_load_torch",
                      lambda path: vgg if path == "vgg.pth" else lp)
  if "torchvision_vgg16" not in flags.FLAGS:  # Defined only when run as a program.
    convert_weights._define_flags()  # pylint: disable=protected-access
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  out = str(tmp_path / "converted")  # np.savez appends .npz; the binary reports it.
  with flagsaver.flagsaver(torchvision_vgg16="vgg.pth", lpips_vgg="lpips.pth", out=out):
    convert_weights.main([])
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result == {"out": out + ".npz", "num_arrays": 31}
  loaded = perceptual.load_lpips_params(result["out"])
  np.testing.assert_array_equal(loaded["lin_0"]["kernel"][0, 0, :, 0],
                                lp["lin0.model.1.weight"][0, :, 0, 0])


def test_load_torch_without_torch_names_the_fix(monkeypatch):
  import builtins  # pylint: disable=g-import-not-at-top
  real_import = builtins.__import__

  def no_torch(name, *args, **kwargs):
    if name == "torch":
      raise ImportError("No module named 'torch'")
    return real_import(name, *args, **kwargs)

  monkeypatch.setattr(builtins, "__import__", no_torch)
  with pytest.raises(ImportError, match="pip install torch"):
    convert_weights._load_torch("x.pth")  # pylint: disable=protected-access


def test_lpips_under_batch_sharding_moves_no_activations_between_devices(lpips):
  # Each device's examples stay on it: only the weights' gradients are reduced.
  model, params, _ = lpips
  mesh = jax.sharding.Mesh(np.array(jax.devices()[:8]), ("data",))
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  loss = lambda p, a, b: model.apply({"params": p}, a, b).sum()
  fn = jax.jit(jax.grad(loss, argnums=(0, 1)), in_shardings=(repl, batch, batch))
  images = _images(0, b=8)
  text = fn.lower(params, images, images).compile().as_text()
  kinds = {c.opcode for c in roofline.collectives(text, 8)}
  assert kinds <= {"all-reduce"}, kinds


def test_cpu_patch_convs_equal_lax_convs(lpips, monkeypatch):
  """On the CPU the VGG convs run as patches @ kernel; same params, same distance and
  input gradient as the lax convolutions other platforms run."""
  model, params, _ = lpips
  a, b = jnp.asarray(_images(3)), jnp.asarray(_images(4))
  distance = lambda a: jnp.sum(model.apply({"params": params}, a, b))
  value, grad = jax.value_and_grad(distance)(a)
  convs = lambda: jax.jit(lambda a: distance(a)).lower(a).as_text().count(
      "stablehlo.convolution")
  assert convs() == len(perceptual.TAP_CHANNELS)  # Only the five 1x1 'lin' heads.
  monkeypatch.setattr(layers, "target_platform", lambda: "tpu")
  assert convs() == len(perceptual.TAP_CHANNELS) + 2 * 13  # VGG on both images.
  lax_value, lax_grad = jax.value_and_grad(distance)(a)
  np.testing.assert_allclose(value, lax_value, rtol=1e-5)
  np.testing.assert_allclose(grad, lax_grad, rtol=1e-4, atol=1e-7)
