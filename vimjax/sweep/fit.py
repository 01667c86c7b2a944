"""Power-law fits L(x) = a x^-alpha + c in log space, with bootstrap intervals.

The residuals are log L - log(a x^-alpha + c) (scipy least squares), so every
point weighs by its relative error, as on the papers' log-log plots. x is
divided by its geometric mean first (a is reported for the raw x). Intervals
come from a residual bootstrap: the fitted log values plus residuals drawn
with replacement (inflated by sqrt(n / (n - p)) for the p fitted parameters),
refit; the 2.5 / 97.5 percentiles of alpha and R^2 (in log space) over the
resamples. A residual bootstrap, not resampled points, because a sweep has a
handful of sizes and dropping one changes the design.
"""
import dataclasses

import numpy as np
from scipy import optimize


@dataclasses.dataclass
class PowerLaw:
  """L(x) = a x^-alpha + c (c = 0 for a pure power law)."""
  a: float
  alpha: float
  c: float

  def __call__(self, x):
    return self.a * np.asarray(x, np.float64) ** -self.alpha + self.c


def _fit_once(log_x: np.ndarray, log_y: np.ndarray, with_offset: bool) -> np.ndarray:
  """Best (log A, alpha[, c]) on x normalised to geometric mean 1."""
  slope, intercept = np.polyfit(log_x, log_y, 1)  # Pure power law: exact in log space.
  if not with_offset:
    return np.array([intercept, -slope])
  y = np.exp(log_y)
  cap = float(np.min(y)) * (1 - 1e-9)

  def residuals(p):
    return np.log(np.exp(p[0] - p[1] * log_x) + p[2]) - log_y

  def jacobian(p):  # d/d(log A, alpha, c) of log(A x^-alpha + c).
    u = np.exp(p[0] - p[1] * log_x)
    s = u + p[2]
    return np.stack([u / s, -log_x * u / s, 1 / s], axis=1)

  best = None
  for frac in (0.0, 0.5, 0.9):  # Offsets from none to most of the smallest loss.
    c0 = frac * cap
    start = np.array([np.log(max(np.exp(intercept) - c0, 1e-12)), -slope, c0])
    try:
      sol = optimize.least_squares(residuals, start, jac=jacobian,
                                   bounds=([-np.inf, -10, 0], [np.inf, 10, cap]))
    except ValueError:
      continue
    if best is None or sol.cost < best.cost:
      best = sol
  return best.x


def _predict(p: np.ndarray, log_x: np.ndarray) -> np.ndarray:
  c = p[2] if len(p) == 3 else 0.0
  return np.log(np.exp(p[0] - p[1] * log_x) + c)


def _r2(log_y, pred) -> float:
  total = np.sum((log_y - log_y.mean()) ** 2)
  return float(1 - np.sum((log_y - pred) ** 2) / total) if total > 0 else float("nan")


def fit_power_law(x, y, *, with_offset: bool = True, bootstrap: int = 1000,
                  seed: int = 0) -> dict:
  """Fits y = a x^-alpha (+ c); returns the law, R^2 and bootstrap intervals.

  Args:
    x, y: positive values, one per finished trial (y: loss-like metric).
    with_offset: fit the irreducible term c >= 0 too (needs > 3 points).
    bootstrap: residual-bootstrap resamples (0: no intervals).
  Returns:
    {"a", "alpha", "c", "r2", "alpha_ci": [lo, hi], "r2_ci": [lo, hi],
     "num_points", "curves": (grid x, lower, upper) of the 95% band}.
  Raises:
    ValueError: too few points, or non-positive values.
  """
  x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
  params = 3 if with_offset else 2
  if len(x) <= params:
    raise ValueError(f"{len(x)} points cannot fit {params} parameters "
                     f"({'a, alpha, c' if with_offset else 'a, alpha'}); need {params + 1}+.")
  if np.any(x <= 0) or np.any(y <= 0):
    raise ValueError(f"A power law in log space needs positive x and y; got x={x}, y={y}.")
  if len(np.unique(x)) < params:
    raise ValueError(f"x takes {len(np.unique(x))} distinct values; need {params}+.")
  scale = float(np.exp(np.mean(np.log(x))))
  log_x, log_y = np.log(x / scale), np.log(y)
  p = _fit_once(log_x, log_y, with_offset)
  pred = _predict(p, log_x)
  law = _law(p, scale)
  result = {"a": law.a, "alpha": law.alpha, "c": law.c, "r2": _r2(log_y, pred),
            "num_points": int(len(x)), "with_offset": with_offset}
  if bootstrap:
    rng = np.random.default_rng(seed)
    resid = (log_y - pred) * np.sqrt(len(x) / (len(x) - params))
    grid = np.geomspace(x.min(), x.max(), 64)
    alphas, r2s, curves = [], [], []
    for _ in range(bootstrap):
      log_y_star = pred + rng.choice(resid, size=len(resid), replace=True)
      p_star = _fit_once(log_x, log_y_star, with_offset)
      alphas.append(p_star[1])
      r2s.append(_r2(log_y_star, _predict(p_star, log_x)))
      curves.append(_law(p_star, scale)(grid))
    lo, hi = np.percentile(curves, [2.5, 97.5], axis=0)
    result.update(alpha_ci=[float(v) for v in np.percentile(alphas, [2.5, 97.5])],
                  r2_ci=[float(v) for v in np.nanpercentile(r2s, [2.5, 97.5])],
                  band=(grid.tolist(), lo.tolist(), hi.tolist()))
  return result


def _law(p: np.ndarray, scale: float) -> PowerLaw:
  """Parameters on x / scale -> the law on raw x."""
  return PowerLaw(a=float(np.exp(p[0]) * scale ** p[1]), alpha=float(p[1]),
                  c=float(p[2]) if len(p) == 3 else 0.0)


def pareto_frontier(cost, loss) -> np.ndarray:
  """Indices of points no cheaper point beats: the lower envelope of loss vs cost."""
  order = np.argsort(cost, kind="stable")
  keep, best = [], np.inf
  for i in order:
    if loss[i] < best:
      keep.append(int(i))
      best = loss[i]
  return np.asarray(keep, int)
