"""FID, sFID, Inception Score and precision/recall from Inception features (host NumPy).

The ADM (guided-diffusion `evaluations/evaluator.py`) suite's definitions:
- FID / sFID: Fréchet distance between Gaussians fitted to `pool` / `spatial`
  features, in float64, sqrtm with pytorch-fid's / ADM's checks.
- Inception Score: exp(E_x KL(p(y|x) || p(y))) over splits of 5000 samples,
  averaged, from the unbiased softmax (see models/inception.py).
- Precision / recall: the k-NN manifold of Kynkäänniemi et al. (k = 3) on
  `pool` features; precision = fraction of samples inside the reference
  manifold, recall = fraction of references inside the samples' manifold.

Statistics files are .npz with `mu` [d] and `sigma` [d, d] (pytorch-fid / ADM
names; ADM's `mu_s` / `sigma_s` for the spatial features), so published
reference statistics such as ADM's `VIRTUAL_imagenet256_labeled.npz` load as
they are.
"""
import os
from typing import Any

from absl import logging
from etils import epath
import jax
import jax.numpy as jnp
import numpy as np
import scipy.linalg

IS_SPLIT_SIZE = 5000   # ADM's compute_inception_score(split_size=5000).
PR_NEIGHBOURHOOD = 3   # ADM's ManifoldEstimator(nhood_sizes=(3,)).
PR_BLOCK = 4096        # Rows of the distance matrix computed at once.
SQRTM_IMAG_TOL = 1e-3  # pytorch-fid / ADM: a larger imaginary part is an error.


def gaussian_stats(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(mu [d], sigma [d, d]) of features [n, ...] (flattened), float64, unbiased cov."""
  x = np.asarray(features, np.float64).reshape(len(features), -1)
  if len(x) < 2:
    raise ValueError(f"Statistics need at least 2 feature vectors, got {len(x)}.")
  return x.mean(axis=0), np.cov(x, rowvar=False)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """||mu1 - mu2||^2 + Tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^(1/2)), in float64.

  As pytorch-fid and ADM: when the product is singular (sqrtm not finite),
  `eps` is added to both diagonals; a complex root whose imaginary part
  exceeds 1e-3 is an error (the statistics are not valid covariances), a
  smaller one is numerical noise and dropped.

  Raises:
    ValueError: shapes differ, or the matrix root is significantly complex.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(f"Statistics do not match: mu {mu1.shape} vs {mu2.shape}, "
                     f"sigma {sigma1.shape} vs {sigma2.shape}.")
  diff = mu1 - mu2
  covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    logging.warning("Fréchet distance: singular product; adding %g to the diagonals.", eps)
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = scipy.linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    imag = np.max(np.abs(covmean.imag))
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=SQRTM_IMAG_TOL):
      raise ValueError(f"Fréchet distance: the matrix square root has an imaginary "
                       f"component {imag:.3g} (> {SQRTM_IMAG_TOL}); are both sigmas valid "
                       "covariance matrices of the same features?")
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def inception_score(logits: np.ndarray, split_size: int = IS_SPLIT_SIZE) -> float:
  """ADM's Inception Score from unbiased logits [n, classes].

  The softmax is taken in float64; each split of `split_size` rows gives
  exp(mean KL(p(y|x) || mean p(y))); the score is the mean over splits.
  """
  logits = np.asarray(logits, np.float64)
  logits = logits - logits.max(axis=1, keepdims=True)
  probs = np.exp(logits)
  probs /= probs.sum(axis=1, keepdims=True)
  scores = []
  for start in range(0, len(probs), split_size):
    part = probs[start:start + split_size]
    marginal = part.mean(axis=0, keepdims=True)
    kl = np.sum(part * (np.log(part + 1e-30) - np.log(marginal + 1e-30)), axis=1)
    scores.append(np.exp(kl.mean()))
  return float(np.mean(scores))


@jax.jit
def _squared_distances(a, b):
  """[n, m] squared Euclidean distances, float32, clipped at 0 (ADM's formula)."""
  aa = jnp.sum(a * a, axis=1)[:, None]
  bb = jnp.sum(b * b, axis=1)[None, :]
  ab = jnp.dot(a, b.T, precision=jax.lax.Precision.HIGHEST)
  return jnp.maximum(aa - 2.0 * ab + bb, 0.0)


def _blocks(n: int):
  return ((s, min(s + PR_BLOCK, n)) for s in range(0, n, PR_BLOCK))


def manifold_radii(features: np.ndarray, k: int = PR_NEIGHBOURHOOD) -> np.ndarray:
  """[n] squared distance of each feature vector to its k-th nearest other one."""
  x = jnp.asarray(features, jnp.float32)
  if len(x) <= k:
    raise ValueError(f"Precision/recall with k={k} needs more than {k} feature vectors, "
                     f"got {len(x)}.")
  radii = []
  for start, stop in _blocks(len(x)):
    d = np.asarray(_squared_distances(x[start:stop], x))
    # Index k of the sorted row: index 0 is the point itself (distance 0).
    radii.append(np.partition(d, k, axis=1)[:, k])
  return np.concatenate(radii)


def _inside(points, centres, radii) -> np.ndarray:
  """[len(points)] bool: within radii[j] of some centres[j] (squared distances)."""
  found = np.zeros(len(points), bool)
  p, c = jnp.asarray(points, jnp.float32), jnp.asarray(centres, jnp.float32)
  for start, stop in _blocks(len(p)):
    for cstart, cstop in _blocks(len(c)):
      d = np.asarray(_squared_distances(p[start:stop], c[cstart:cstop]))
      found[start:stop] |= np.any(d <= radii[None, cstart:cstop], axis=1)
  return found


def precision_recall(ref_features: np.ndarray, sample_features: np.ndarray,
                     k: int = PR_NEIGHBOURHOOD) -> tuple[float, float]:
  """(precision, recall) of samples against references ([n, d] `pool` features)."""
  ref_radii = manifold_radii(ref_features, k)
  sample_radii = manifold_radii(sample_features, k)
  precision = _inside(sample_features, ref_features, ref_radii).mean()
  recall = _inside(ref_features, sample_features, sample_radii).mean()
  return float(precision), float(recall)


def stats_from_features(features: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """{"mu", "sigma"} of `pool` (+ {"mu_s", "sigma_s"} of `spatial` when present)."""
  mu, sigma = gaussian_stats(features["pool"])
  stats = {"mu": mu, "sigma": sigma}
  if "spatial" in features:
    stats["mu_s"], stats["sigma_s"] = gaussian_stats(features["spatial"])
  return stats


def save_stats(path: str, stats: dict[str, np.ndarray], **extra: Any) -> None:
  """Writes an .npz with the pytorch-fid / ADM keys (and any `extra` arrays)."""
  epath.Path(path).parent.mkdir(parents=True, exist_ok=True)
  with epath.Path(path).open("wb") as f:
    np.savez(f, **stats, **extra)


def load_stats(path: str) -> dict[str, np.ndarray]:
  """Reads `mu`/`sigma` (+ `mu_s`/`sigma_s`, + `pool` features) of a stats or ADM ref .npz.

  ADM reference batches also hold the images (`arr_0`), returned as `images`.

  Raises:
    FileNotFoundError / ValueError: missing file, or no `mu` and `sigma`.
  """
  if "://" not in path and not os.path.exists(path):
    raise FileNotFoundError(f"Statistics file {path!r} not found.")
  with epath.Path(path).open("rb") as f, np.load(f) as data:
    keys = set(data.files)
    if not {"mu", "sigma"} <= keys:
      raise ValueError(f"{path!r} is not a statistics file: it lacks 'mu' and 'sigma' (has "
                       f"{sorted(keys)}); make one with `python -m vimjax.fid --images=... "
                       "--out=STATS.npz`.")
    out = {k: np.asarray(data[k]) for k in ("mu", "sigma", "mu_s", "sigma_s", "pool")
           if k in keys}
    if "arr_0" in keys:
      out["images"] = np.asarray(data["arr_0"])
  mu, sigma = out["mu"], out["sigma"]
  if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
    raise ValueError(f"{path!r}: mu {mu.shape} / sigma {sigma.shape} are not [d] / [d, d].")
  return out


def compare(sample: dict[str, np.ndarray], ref: dict[str, np.ndarray]) -> dict[str, float]:
  """Every metric the two sides allow.

  Args:
    sample: features {"pool", "logits", "spatial"} or statistics {"mu", ...}.
    ref: the same, of the reference set.

  Returns:
    fid (always), sfid (both sides spatial), precision / recall (both sides
    have `pool` features), inception_score (sample has logits).
  """
  stats_a = sample if "mu" in sample else stats_from_features(sample)
  stats_b = ref if "mu" in ref else stats_from_features(ref)
  out = {"fid": frechet_distance(stats_a["mu"], stats_a["sigma"], stats_b["mu"], stats_b["sigma"])}
  if "mu_s" in stats_a and "mu_s" in stats_b:
    out["sfid"] = frechet_distance(stats_a["mu_s"], stats_a["sigma_s"],
                                   stats_b["mu_s"], stats_b["sigma_s"])
  if "pool" in sample and "pool" in ref:
    out["precision"], out["recall"] = precision_recall(ref["pool"], sample["pool"])
  if "logits" in sample:
    out["inception_score"] = inception_score(sample["logits"])
  return out
