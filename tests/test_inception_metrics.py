"""FID / IS / precision-recall math against closed forms and brute-force float64 references."""
import numpy as np
import pytest

from vimjax.evaluation import inception_metrics as im


def _random_cov(rng, d):
  a = rng.normal(size=(d, d))
  return a @ a.T / d + 0.1 * np.eye(d)


def _psd_sqrt(m):
  w, v = np.linalg.eigh(m)
  return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def test_frechet_one_dimensional_closed_form():
  # N(m1, s1^2) vs N(m2, s2^2): (m1 - m2)^2 + (s1 - s2)^2.
  assert im.frechet_distance([1.0], [[4.0]], [-2.0], [[9.0]]) == pytest.approx(9.0 + 1.0)


def test_frechet_commuting_covariances_closed_form():
  rng = np.random.default_rng(0)
  a, b = rng.uniform(0.1, 3.0, 6), rng.uniform(0.1, 3.0, 6)
  mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert im.frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


def test_frechet_general_covariances_against_symmetric_form():
  # Tr((S1 S2)^1/2) = Tr((S1^1/2 S2 S1^1/2)^1/2), computed here by eigendecomposition.
  rng = np.random.default_rng(1)
  s1, s2 = _random_cov(rng, 20), _random_cov(rng, 20)
  mu1, mu2 = rng.normal(size=20), rng.normal(size=20)
  r1 = _psd_sqrt(s1)
  expected = (np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2)
              - 2 * np.trace(_psd_sqrt(r1 @ s2 @ r1)))
  assert im.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, rel=1e-8)
  assert im.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0.0, abs=1e-8)


def test_frechet_from_samples_of_known_gaussians():
  rng = np.random.default_rng(2)
  x = rng.normal(0.0, 1.0, (20000, 3))
  y = rng.normal(0.5, 2.0, (20000, 3))
  (m1, s1), (m2, s2) = im.gaussian_stats(x), im.gaussian_stats(y)
  # 3 * (0.5^2 + (2 - 1)^2) = 3.75, up to sampling noise.
  assert im.frechet_distance(m1, s1, m2, s2) == pytest.approx(3.75, abs=0.1)


def test_frechet_rejects_complex_roots_and_mismatched_shapes():
  with pytest.raises(ValueError, match="imaginary component"):
    im.frechet_distance(np.zeros(2), np.diag([1.0, -1.0]), np.zeros(2), np.eye(2))
  with pytest.raises(ValueError, match="do not match"):
    im.frechet_distance(np.zeros(2), np.eye(2), np.zeros(3), np.eye(3))


def test_frechet_singular_product_gets_the_eps_offset():
  # Rank-deficient covariances (fewer samples than dims) still give a finite distance.
  rng = np.random.default_rng(3)
  x, y = rng.normal(size=(4, 10)), rng.normal(size=(4, 10))
  (m1, s1), (m2, s2) = im.gaussian_stats(x), im.gaussian_stats(y)
  assert np.isfinite(im.frechet_distance(m1, s1, m2, s2))


def test_inception_score_extremes_and_splits():
  n, classes = 60, 1008
  assert im.inception_score(np.zeros((n, classes))) == pytest.approx(1.0)
  confident = np.full((n, classes), -1e3)
  confident[np.arange(n), np.arange(n) % 6] = 0.0  # 6 classes, balanced, certain.
  assert im.inception_score(confident) == pytest.approx(6.0, rel=1e-6)
  # Splits of 30 rows each hold all 6 classes: same score; of 6 rows at a time also.
  assert im.inception_score(confident, split_size=30) == pytest.approx(6.0, rel=1e-6)
  # A float64 reference for random logits.
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(50, 10)) * 3
  p = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
  expected = np.exp(np.mean(np.sum(p * (np.log(p) - np.log(p.mean(0))), 1)))
  assert im.inception_score(logits) == pytest.approx(expected, rel=1e-10)


def _brute_force_pr(ref, sample, k=3):
  d = lambda a, b: ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
  ref_r = np.sort(d(ref, ref), axis=1)[:, k]
  sam_r = np.sort(d(sample, sample), axis=1)[:, k]
  precision = np.mean((d(sample, ref) <= ref_r[None, :]).any(1))
  recall = np.mean((d(ref, sample) <= sam_r[None, :]).any(1))
  return precision, recall


def test_precision_recall_against_brute_force(monkeypatch):
  monkeypatch.setattr(im, "PR_BLOCK", 7)  # Exercise the blocked paths.
  rng = np.random.default_rng(5)
  ref = rng.normal(size=(40, 5))
  sample = rng.normal(0.7, 1.3, size=(33, 5))
  p, r = im.precision_recall(ref, sample)
  ep, er = _brute_force_pr(ref.astype(np.float64), sample.astype(np.float64))
  assert (p, r) == pytest.approx((ep, er))
  assert 0 < p < 1 and 0 < r < 1
  assert im.precision_recall(ref, ref) == (1.0, 1.0)
  with pytest.raises(ValueError, match="more than 3"):
    im.manifold_radii(ref[:3])


def test_stats_round_trip_and_adm_reference_batch(tmp_path):
  rng = np.random.default_rng(6)
  features = {"pool": rng.normal(size=(10, 4)), "spatial": rng.normal(size=(10, 3)),
              "logits": rng.normal(size=(10, 8))}
  stats = im.stats_from_features(features)
  path = str(tmp_path / "s.npz")
  im.save_stats(path, stats)
  loaded = im.load_stats(path)
  assert set(loaded) == {"mu", "sigma", "mu_s", "sigma_s"}
  np.testing.assert_array_equal(loaded["sigma"], stats["sigma"])
  # An ADM reference batch: images under arr_0 next to the statistics.
  adm = str(tmp_path / "VIRTUAL_ref.npz")
  np.savez(adm, arr_0=np.zeros((2, 8, 8, 3), np.uint8), **stats)
  assert im.load_stats(adm)["images"].shape == (2, 8, 8, 3)
  scores = im.compare(features, loaded)
  assert scores["fid"] == pytest.approx(0.0, abs=1e-6)
  assert scores["sfid"] == pytest.approx(0.0, abs=1e-6)
  assert "precision" not in scores and scores["inception_score"] > 1.0
  np.savez(path, mean=stats["mu"])
  with pytest.raises(ValueError, match="lacks 'mu' and 'sigma'"):
    im.load_stats(path)
  with pytest.raises(FileNotFoundError):
    im.load_stats(str(tmp_path / "missing.npz"))
