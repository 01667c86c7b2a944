"""The FID Inception-v3 on random weights: shapes, determinism, batch and sharding
invariance, the TF1 resize, weight loading, and (with torch + torch-fidelity installed)
torch-fidelity's port of the TF graph."""
import functools
import importlib
import sys
import types

import flax
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from vimjax import convert_inception
from vimjax import parallel
from vimjax.evaluation import inception_features
from vimjax.models import inception

pytestmark = pytest.mark.slow

SIZE = inception.MIN_SIZE  # 75 px: the smallest input; 299 costs 16x more.
# The smallest size at which the 8x8 (at 299) blocks Mixed_7b/7c are 3x3, not 1x1,
# so their padded pools and (1, 3) convs matter: the reference comparison uses it.
REFERENCE_SIZE = 139


@functools.lru_cache(maxsize=None)
def _params():
  return inception.random_params(0)


def _images(n: int, seed: int = 0, size: int = 32) -> np.ndarray:
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _mesh(num_devices: int):
  return parallel.create_mesh(ml_collections.ConfigDict(dict(data=-1, fsdp=1, tensor=1)),
                              jax.devices()[:num_devices])


@functools.lru_cache(maxsize=None)
def _extractor(num_devices: int, batch_size: int, size: int = SIZE):
  return inception_features.Extractor(_params(), _mesh(num_devices), size=size,
                                      batch_size=batch_size)


def test_param_tree_matches_torchvision_layout():
  shapes = inception.expected_param_shapes()
  # 94 conv + BN blocks (kernel, scale, bias, running mean and variance) and the
  # classifier kernel (its bias unused): 21.82M + 2.06M. Every name and shape is
  # also checked by the strict load of torch-fidelity's net below (with torch).
  assert sum(int(np.prod(s)) for s in shapes.values()) == 23_884_384
  assert len(shapes) == 94 * 5 + 1
  assert sum(k.endswith("/conv/kernel") for k in shapes) == 94
  assert shapes["Mixed_6d/branch1x1/conv/kernel"] == (1, 1, 768, 192)
  assert shapes["Mixed_7c/branch_pool/conv/kernel"] == (1, 1, 2048, 192)
  assert shapes["fc_kernel"] == (2048, 1008)


def test_shapes_determinism_and_spatial_tap():
  ex = _extractor(8, 8)
  images = _images(8)
  a, b = ex(images), ex(images)
  assert a["pool"].shape == (8, 2048) and a["logits"].shape == (8, 1008)
  # mixed_6 is 3x3 at 75 px (17x17 at 299), first 7 channels, flattened h, w, c.
  assert a["spatial"].shape == (8, 3 * 3 * 7)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k])
    assert np.isfinite(a[k]).all()
  # Different images give different features (the net is not constant).
  assert np.abs(a["pool"][0] - a["pool"][1]).max() > 1e-3


def test_logits_are_pool_times_kernel_without_bias():
  out = _extractor(8, 8)(_images(8))
  expected = out["pool"].astype(np.float64) @ _params()["fc_kernel"].astype(np.float64)
  np.testing.assert_allclose(out["logits"], expected, rtol=1e-4, atol=1e-4)


def test_invariant_to_batch_size_and_sharding():
  images = _images(12, seed=1)
  sharded = _extractor(8, 8).extract([images])  # 2 calls (8 + 4 padded), 8 devices.
  single = _extractor(1, 16).extract([images[:5], images[5:]])  # Other batching, 1 device.
  assert sharded["pool"].shape == (12, 2048)
  for k in sharded:
    np.testing.assert_allclose(sharded[k], single[k], rtol=2e-4, atol=2e-4)


def test_images_are_batch_sharded_over_the_mesh():
  ex = _extractor(8, 8)
  x = jax.make_array_from_callback((8, 32, 32, 3), parallel.batch_sharding(ex.mesh),
                                   lambda i: _images(8)[i])
  compiled = ex._fn.lower(ex.params, x).compile()  # pylint: disable=protected-access
  images_sharding = compiled.input_shardings[0][1]
  assert images_sharding.spec == jax.sharding.PartitionSpec(("data", "fsdp"))
  assert len(x.sharding.device_set) == 8 and x.addressable_shards[0].data.shape[0] == 1


def test_float_images_are_quantised_like_uint8():
  images = _images(4, seed=2)
  a = inception.preprocess(jnp.asarray(images), SIZE)
  b = inception.preprocess(jnp.asarray(images.astype(np.float32) / 255.0 + 1e-4), SIZE)
  np.testing.assert_allclose(a, b, atol=1e-6)
  assert float(a.min()) >= -1.0 and float(a.max()) <= 127 / 128


@pytest.mark.parametrize("in_size,out_size", [(32, 75), (256, 299), (512, 299), (299, 299)])
def test_resize_matches_tf1_resize_bilinear(in_size, out_size):
  tf = pytest.importorskip("tensorflow")
  x = np.random.default_rng(3).uniform(0, 255, (2, in_size, in_size, 3)).astype(np.float32)
  expected = tf.raw_ops.ResizeBilinear(images=x, size=[out_size, out_size], align_corners=False,
                                       half_pixel_centers=False).numpy()
  got = np.asarray(inception.preprocess(jnp.asarray(np.round(x).astype(np.uint8)), out_size))
  expected_uint8 = tf.raw_ops.ResizeBilinear(
      images=np.round(x), size=[out_size, out_size], align_corners=False,
      half_pixel_centers=False).numpy()
  np.testing.assert_allclose(got, (expected_uint8 - 128.0) / 128.0, atol=1e-4)
  assert expected.shape == got.shape


def test_too_small_input_is_an_error():
  with pytest.raises(ValueError, match=">= 75"):
    inception.InceptionV3().init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)))


def test_load_inception_params_round_trip_and_errors(tmp_path):
  flat = {"/".join(k): v for k, v in flax.traverse_util.flatten_dict(_params()).items()}
  path = str(tmp_path / "w.npz")
  np.savez(path, **flat)
  loaded = inception.load_inception_params(path)
  np.testing.assert_array_equal(loaded["fc_kernel"], _params()["fc_kernel"])
  with pytest.raises(FileNotFoundError, match="convert_inception"):
    inception.load_inception_params(str(tmp_path / "missing.npz"))
  bad = dict(flat)
  bad["fc_kernel"] = np.zeros((2048, 1000), np.float32)
  np.savez(path, **bad)
  with pytest.raises(ValueError, match="'fc_kernel' has shape"):
    inception.load_inception_params(path)
  del bad["fc_kernel"]
  np.savez(path, **bad)
  with pytest.raises(ValueError, match="lack array 'fc_kernel'"):
    inception.load_inception_params(path)


def test_converter_names_cover_every_param():
  keys = {convert_inception.torch_key(k) for k in inception.expected_param_shapes()}
  assert "Mixed_6d.branch1x1.conv.weight" in keys
  assert "Conv2d_1a_3x3.bn.running_var" in keys
  assert "fc.weight" in keys and "fc.bias" not in keys
  with pytest.raises(ValueError, match="state dict lacks 'Conv2d_1a_3x3"):
    convert_inception.convert_state_dict({})


def _import_torch_fidelity_inception():
  """torch-fidelity's TF-exact Inception, without its package __init__ (which
  imports torchvision for CLIP; only the Inception module is needed)."""
  torch = pytest.importorskip("torch")
  spec = importlib.util.find_spec("torch_fidelity")
  if spec is None:
    pytest.skip("torch-fidelity is not installed")
  if "torch_fidelity" not in sys.modules:
    package = types.ModuleType("torch_fidelity")
    package.__path__ = list(spec.submodule_search_locations)
    sys.modules["torch_fidelity"] = package
  return torch, importlib.import_module("torch_fidelity.feature_extractor_inceptionv3")


def test_matches_torch_fidelity_on_shared_random_weights(tmp_path):
  """torch-fidelity's port of the TF graph (TF1 resize, (x-128)/128, unbiased
  logits) in float64, on our random weights written in the torch layout that
  `convert_inception` reads: same pool, mixed_6 and logits from uint8 images."""
  torch, tfi = _import_torch_fidelity_inception()
  ours = flax.traverse_util.flatten_dict(_params())
  state = {}
  for path, value in ours.items():
    key = convert_inception.torch_key("/".join(path))
    v = value.transpose(3, 2, 0, 1) if value.ndim == 4 else value.T if value.ndim == 2 else value
    state[key] = torch.from_numpy(np.ascontiguousarray(v))
    if key.endswith("bn.weight"):
      state[key.replace("bn.weight", "bn.num_batches_tracked")] = torch.tensor(0)
  state["fc.bias"] = torch.zeros(1008)
  # The converter maps the torch state dict back to the same arrays.
  converted = convert_inception.convert_state_dict({k: v.numpy() for k, v in state.items()})
  for path, value in ours.items():
    np.testing.assert_array_equal(converted["/".join(path)], value)
  torch.save(state, tmp_path / "random_inception.pth")
  net = tfi.FeatureExtractorInceptionV3(
      "inception-v3-compat", ["2048", "logits_unbiased"],
      feature_extractor_weights_path=str(tmp_path / "random_inception.pth"),
      feature_extractor_internal_dtype="float64")
  net.INPUT_IMAGE_SIZE = REFERENCE_SIZE  # Its TF1 resize to this size instead of 299.
  taps = {}
  net.Mixed_6d.branch1x1.register_forward_hook(lambda m, i, o: taps.__setitem__("spatial", o))
  images = _images(4, seed=4)
  with torch.no_grad():
    pool, logits = net(torch.from_numpy(images.transpose(0, 3, 1, 2).copy()))
  got = _extractor(8, 8, REFERENCE_SIZE)(images)
  assert taps["spatial"].shape[2:] == (7, 7)
  spatial = taps["spatial"].numpy().transpose(0, 2, 3, 1)[..., :7].reshape(4, -1)
  np.testing.assert_allclose(got["pool"], pool.numpy(), rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(got["spatial"], spatial, rtol=1e-3, atol=1e-4)
  np.testing.assert_allclose(got["logits"], logits.numpy(), rtol=1e-3, atol=1e-3)
