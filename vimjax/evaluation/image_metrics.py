"""Per-image reconstruction metrics: PSNR, SSIM, L1 and L2 (MSE).

Pure `jnp` functions of `[b, h, w, c]` batches returning one value per image, so
they run inside `jit` on batch-sharded arrays (every reduction is over the
non-batch axes) and the caller decides how to average over a dataset.

Computation is float32 (float64 if the inputs are float64). SSIM filters with
sums of shifted slices instead of a convolution: it is exact in float32 on
TPU, where convolutions default to bf16 passes.
"""
import jax.numpy as jnp
import numpy as np

# SSIM constants of Wang et al. 2004, as in tf.image.ssim and skimage.
SSIM_WINDOW = 11
SSIM_SIGMA = 1.5
SSIM_K1 = 0.01
SSIM_K2 = 0.03


def _check_pair(pred, target, name: str) -> None:
  if pred.shape != target.shape:
    raise ValueError(f"{name}: pred shape {pred.shape} != target shape {target.shape}; "
                     "they must match.")
  if pred.ndim < 2:
    raise ValueError(f"{name}: images must be [b, ...] with a batch axis, got shape "
                     f"{pred.shape}.")


def _as_float(x):
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _per_image_mean(x):
  return jnp.mean(x, axis=tuple(range(1, x.ndim)))


def l1(pred, target):
  """Mean absolute error per image.

  Args:
    pred: [b, h, w, c] float, e.g. in [0, 1].
    target: same shape as `pred`.

  Returns:
    [b] float32.
  """
  _check_pair(pred, target, "l1")
  return _per_image_mean(jnp.abs(_as_float(pred) - _as_float(target)))


def l2(pred, target):
  """Mean squared error per image (mean over pixels and channels).

  Args:
    pred: [b, h, w, c] float, e.g. in [0, 1].
    target: same shape as `pred`.

  Returns:
    [b] float32.
  """
  _check_pair(pred, target, "l2")
  return _per_image_mean(jnp.square(_as_float(pred) - _as_float(target)))


def psnr(pred, target, max_val: float = 1.0):
  """Peak signal-to-noise ratio per image, in dB: 10 log10(max_val² / MSE).

  Identical images (MSE = 0) give +inf, not a capped value: the same as
  tf.image.psnr and skimage. Average finite values, or PSNR of the mean MSE,
  when aggregating a set that may contain exact reconstructions.

  Args:
    pred: [b, h, w, c] float in [0, max_val].
    target: same shape as `pred`.
    max_val: dynamic range of the images (1.0 for [0, 1], 255 for uint8 values).

  Returns:
    [b] float32 in dB.
  """
  _check_pair(pred, target, "psnr")
  mse = l2(pred, target)
  # log10(0) = -inf, so an exact match yields +inf with no division warning.
  return 20.0 * jnp.log10(jnp.asarray(max_val, mse.dtype)) - 10.0 * jnp.log10(mse)


def gaussian_window(size: int = SSIM_WINDOW, sigma: float = SSIM_SIGMA) -> np.ndarray:
  """1-D Gaussian window [size] float64, normalised to sum 1 (centred, odd size)."""
  x = np.arange(size, dtype=np.float64) - (size - 1) / 2.0
  w = np.exp(-0.5 * (x / sigma) ** 2)
  return w / w.sum()


def _filter_valid(x, window: np.ndarray):
  """Separable 'valid' filtering of x [b, h, w, c] over h and w."""
  k = len(window)
  h, w = x.shape[1], x.shape[2]
  x = sum(float(window[i]) * x[:, i:i + h - k + 1] for i in range(k))
  return sum(float(window[i]) * x[:, :, i:i + w - k + 1] for i in range(k))


def ssim(pred, target, max_val: float = 1.0):
  """Structural similarity per image (Wang et al. 2004), mean over pixels and channels.

  The definition of `tf.image.ssim` (filter_size=11, filter_sigma=1.5, k1=0.01,
  k2=0.03), equal to skimage's `structural_similarity(gaussian_weights=True,
  sigma=1.5, use_sample_covariance=False, data_range=max_val, channel_axis=-1)`:
  local statistics under an 11×11 normalised Gaussian window, only at 'valid'
  positions (no padding; skimage's border crop is the same thing), population
  (not sample) variances, SSIM map averaged over space, then over channels.

  Args:
    pred: [b, h, w, c] float in [0, max_val]; h and w at least 11.
    target: same shape as `pred`.
    max_val: dynamic range of the images.

  Returns:
    [b] float32; 1.0 for identical images.
  """
  _check_pair(pred, target, "ssim")
  if pred.ndim != 4 or min(pred.shape[1:3]) < SSIM_WINDOW:
    raise ValueError(f"ssim: images must be [b, h, w, c] with h, w >= {SSIM_WINDOW}, "
                     f"got shape {pred.shape}.")
  x, y = _as_float(pred), _as_float(target)
  window = gaussian_window()
  c1 = (SSIM_K1 * max_val) ** 2
  c2 = (SSIM_K2 * max_val) ** 2
  mu_x, mu_y = _filter_valid(x, window), _filter_valid(y, window)
  # Centre first so E[x²] - E[x]² does not cancel catastrophically in float32.
  offset_x = jnp.mean(x, axis=(1, 2, 3), keepdims=True)
  offset_y = jnp.mean(y, axis=(1, 2, 3), keepdims=True)
  xc, yc = x - offset_x, y - offset_y
  mxc, myc = mu_x - offset_x, mu_y - offset_y
  var_x = _filter_valid(xc * xc, window) - mxc * mxc
  var_y = _filter_valid(yc * yc, window) - myc * myc
  cov = _filter_valid(xc * yc, window) - mxc * myc
  luminance = (2.0 * mu_x * mu_y + c1) / (mu_x * mu_x + mu_y * mu_y + c1)
  contrast_structure = (2.0 * cov + c2) / (var_x + var_y + c2)
  return _per_image_mean(luminance * contrast_structure)
