"""Tests for vimjax.evaluation.{image_metrics,codebook} against float64 NumPy references."""
import math

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np
import pytest

from vimjax.evaluation import codebook
from vimjax.evaluation import image_metrics


# ---------------------------------------------------------------- references


def _ssim_reference(x, y, max_val=1.0):
  """Direct 2-D windowed SSIM, one valid position at a time, float64."""
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  offsets = np.arange(11) - 5
  g = np.exp(-(offsets[:, None] ** 2 + offsets[None, :] ** 2) / (2 * 1.5 ** 2))
  g /= g.sum()
  c1, c2 = (0.01 * max_val) ** 2, (0.03 * max_val) ** 2
  b, h, w, c = x.shape
  out = np.zeros(b)
  for n in range(b):
    per_channel = []
    for ch in range(c):
      values = []
      for i in range(h - 10):
        for j in range(w - 10):
          px, py = x[n, i:i + 11, j:j + 11, ch], y[n, i:i + 11, j:j + 11, ch]
          mx, my = (g * px).sum(), (g * py).sum()
          vx, vy = (g * (px - mx) ** 2).sum(), (g * (py - my) ** 2).sum()
          cov = (g * (px - mx) * (py - my)).sum()
          values.append((2 * mx * my + c1) * (2 * cov + c2) /
                        ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2)))
      per_channel.append(np.mean(values))
    out[n] = np.mean(per_channel)
  return out


def _mse_reference(x, y):
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  return np.array([np.mean((a - b) ** 2) for a, b in zip(x, y)])


def _image_pair(seed, shape=(3, 16, 20, 3), noise=0.1):
  """A smooth-ish target and a noisy prediction, both in [0, 1]."""
  rng = np.random.default_rng(seed)
  target = rng.uniform(size=shape).astype(np.float32)
  target = (target + np.roll(target, 1, axis=1) + np.roll(target, 1, axis=2)) / 3
  pred = np.clip(target + noise * rng.normal(size=shape), 0, 1).astype(np.float32)
  return pred, target


# ---------------------------------------------------------------- image metrics


@pytest.mark.parametrize("noise", [0.02, 0.3])
def test_ssim_matches_reference(noise):
  pred, target = _image_pair(0, noise=noise)
  got = np.asarray(image_metrics.ssim(pred, target))
  assert got.shape == (3,)
  np.testing.assert_allclose(got, _ssim_reference(pred, target), atol=2e-5)


def test_ssim_max_val_scales():
  pred, target = _image_pair(1)
  got = image_metrics.ssim(pred * 255, target * 255, max_val=255.0)
  np.testing.assert_allclose(got, _ssim_reference(pred * 255, target * 255, 255.0), rtol=1e-4)


def test_ssim_known_values():
  pred, _ = _image_pair(2)
  np.testing.assert_array_equal(image_metrics.ssim(pred, pred), np.ones(3, np.float32))
  # Constant images a, b: variances 0, so SSIM = (2ab + c1) / (a² + b² + c1).
  a, b, c1 = 0.2, 0.7, 0.01 ** 2
  x = np.full((1, 12, 12, 3), a, np.float32)
  y = np.full((1, 12, 12, 3), b, np.float32)
  np.testing.assert_allclose(image_metrics.ssim(x, y), [(2 * a * b + c1) / (a * a + b * b + c1)],
                             rtol=1e-5)


def test_psnr_l1_l2_match_reference():
  pred, target = _image_pair(3, noise=0.2)
  mse = _mse_reference(pred, target)
  np.testing.assert_allclose(image_metrics.l2(pred, target), mse, rtol=1e-5)
  np.testing.assert_allclose(image_metrics.psnr(pred, target), 10 * np.log10(1.0 / mse),
                             rtol=1e-5)
  l1_ref = [np.abs(a.astype(np.float64) - b).mean() for a, b in zip(pred, target)]
  np.testing.assert_allclose(image_metrics.l1(pred, target), l1_ref, rtol=1e-5)


def test_psnr_known_values():
  target = np.full((2, 4, 4, 3), 0.5, np.float32)
  # Off by 0.1 everywhere: MSE 0.01 -> 20 dB; off by 0.01 -> 40 dB.
  pred = target + np.array([0.1, 0.01], np.float32)[:, None, None, None]
  np.testing.assert_allclose(image_metrics.psnr(pred, target), [20.0, 40.0], rtol=1e-4)
  np.testing.assert_allclose(image_metrics.psnr(255 * pred, 255 * target, max_val=255.0),
                             [20.0, 40.0], rtol=1e-4)
  same = image_metrics.psnr(target, target)
  assert np.all(np.isposinf(same))  # Documented: exact reconstructions give +inf.
  np.testing.assert_array_equal(image_metrics.l1(target, target), [0, 0])
  np.testing.assert_array_equal(image_metrics.l2(target, target), [0, 0])


def test_metrics_jit_on_batch_sharded_arrays():
  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  pred, target = _image_pair(4, shape=(jax.device_count(), 12, 12, 3))
  fns = dict(psnr=image_metrics.psnr, ssim=image_metrics.ssim, l1=image_metrics.l1,
             l2=image_metrics.l2)
  step = jax.jit(lambda p, t: {k: f(p, t) for k, f in fns.items()})
  got = step(jax.device_put(pred, sharding), jax.device_put(target, sharding))
  for name, fn in fns.items():
    np.testing.assert_allclose(got[name], fn(pred, target), rtol=1e-5, err_msg=name)
  np.testing.assert_allclose(got["ssim"], _ssim_reference(pred, target), atol=2e-5)


def test_metrics_reject_bad_shapes():
  x = np.zeros((2, 16, 16, 3), np.float32)
  with pytest.raises(ValueError, match="shape"):
    image_metrics.psnr(x, x[:1])
  with pytest.raises(ValueError, match="h, w >= 11"):
    image_metrics.ssim(x[:, :10], x[:, :10])


def test_ssim_psnr_match_tensorflow():
  tf = pytest.importorskip("tensorflow")
  pred, target = _image_pair(5, noise=0.15)
  np.testing.assert_allclose(image_metrics.ssim(pred, target),
                             tf.image.ssim(pred, target, max_val=1.0).numpy(), atol=1e-5)
  np.testing.assert_allclose(image_metrics.psnr(pred, target),
                             tf.image.psnr(pred, target, max_val=1.0).numpy(), rtol=1e-5)


def test_ssim_matches_skimage():
  metrics = pytest.importorskip("skimage.metrics")
  pred, target = _image_pair(6, noise=0.15)
  want = [metrics.structural_similarity(p, t, gaussian_weights=True, sigma=1.5,
                                        use_sample_covariance=False, data_range=1.0,
                                        channel_axis=-1) for p, t in zip(pred, target)]
  np.testing.assert_allclose(image_metrics.ssim(pred, target), want, atol=1e-5)


# ---------------------------------------------------------------- codebook


def _usage_reference(all_codes, k, group):
  """Usage from the concatenated codes: full groups only, else the single partial group."""
  n = len(all_codes)
  starts = range(0, n - group + 1, group) if n >= group else [0]
  fractions = [len(np.unique(all_codes[s:s + group])) / k for s in starts]
  return float(np.mean(fractions)), len(fractions), (n % group if n >= group else 0)


def _perplexity_reference(all_codes, k):
  counts = np.array([(all_codes == i).sum() for i in range(k)], np.float64)
  p = counts / counts.sum()
  return math.exp(-sum(q * math.log(q) for q in p if q > 0))


def test_code_histogram_matches_numpy_in_jit():
  rng = np.random.default_rng(0)
  codes = rng.integers(0, 13, size=(8, 20)).astype(np.int32)
  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharded = jax.device_put(codes, NamedSharding(mesh, P("data")))
  hist = jax.jit(codebook.code_histogram, static_argnums=1)(sharded, 16)
  assert hist.shape == (16,) and hist.dtype == jnp.int32
  np.testing.assert_array_equal(hist, np.bincount(codes.ravel(), minlength=16))
  # Out-of-range ids (negative, >= K) are not counted, not clipped into 0 / K-1.
  np.testing.assert_array_equal(codebook.code_histogram(np.array([[-1, 0, 3, 4, 9]]), 4),
                                [1, 0, 0, 1])


def test_perplexity_known_values():
  assert codebook.perplexity(np.full(64, 5)) == pytest.approx(64)
  assert codebook.perplexity(np.eye(64)[7] * 100) == pytest.approx(1)
  assert codebook.perplexity(np.r_[np.ones(32), np.zeros(32)]) == pytest.approx(32)
  with pytest.raises(ValueError, match="positive total"):
    codebook.perplexity(np.zeros(4))


def test_stats_half_then_full_codebook_across_odd_batches():
  k, n_tok = 8, 6
  rng = np.random.default_rng(1)
  # Group 1 (images 0..255) uses codes {0..3} only; group 2 uses all 8.
  first = rng.integers(0, 4, size=(256, n_tok))
  first[:4, 0] = np.arange(4)
  second = rng.integers(0, 8, size=(256, n_tok))
  second[:8, 0] = np.arange(8)
  all_codes = np.concatenate([first, second])
  stats = codebook.CodebookStats(k)
  for lo, hi in [(0, 100), (100, 137), (137, 137), (137, 400), (400, 512)]:
    stats.update(all_codes[lo:hi])
  result = stats.result()
  assert result["codebook_usage"] == pytest.approx(0.75)
  assert result["usage_groups"] == 2 and result["usage_images_dropped"] == 0
  assert result["perplexity"] == pytest.approx(_perplexity_reference(all_codes, k))


@pytest.mark.parametrize("batches,group", [([100, 37, 300, 93], 256), ([5, 5, 5], 4),
                                            ([30], 64), ([64], 64)])
def test_stats_matches_reference(batches, group):
  k = 50
  rng = np.random.default_rng(len(batches) + group)
  all_codes = rng.integers(0, k, size=(sum(batches), 3, 2))  # [b, h, w] ids are accepted.
  stats = codebook.CodebookStats(k, images_per_usage_batch=group)
  start = 0
  for size in batches:
    stats.update(all_codes[start:start + size])
    start += size
  usage, groups, dropped = _usage_reference(all_codes.reshape(len(all_codes), -1), k, group)
  result = stats.result()
  assert result["codebook_usage"] == pytest.approx(usage)
  assert (result["usage_groups"], result["usage_images_dropped"]) == (groups, dropped)
  assert result["perplexity"] == pytest.approx(_perplexity_reference(all_codes, k))
  assert 0.0 <= result["codebook_usage"] <= 1.0


def test_stats_partial_group_policy():
  k = 10
  stats = codebook.CodebookStats(k, images_per_usage_batch=4)
  stats.update(np.array([[0], [1]]))  # Only a partial group: it is used.
  assert stats.result()["codebook_usage"] == pytest.approx(0.2)
  assert stats.result()["usage_groups"] == 1
  stats.update(np.array([[2], [3], [4]]))  # Group {0,1,2,3} closes; [4] is a trailing partial.
  result = stats.result()
  assert result["codebook_usage"] == pytest.approx(0.4)
  assert (result["usage_groups"], result["usage_images_dropped"]) == (1, 1)
  assert result["perplexity"] == pytest.approx(5)  # Perplexity still counts all 5 images.


def test_stats_rejects_bad_input():
  stats = codebook.CodebookStats(4)
  with pytest.raises(ValueError, match="before any images"):
    stats.result()
  with pytest.raises(ValueError, match=r"\[0, 4\)"):
    stats.update(np.array([[0, 4]]))
  with pytest.raises(ValueError, match="integer"):
    stats.update(np.zeros((2, 3), np.float32))
  with pytest.raises(ValueError, match="codebook_size"):
    codebook.CodebookStats(0)
