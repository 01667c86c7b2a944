"""Divergence guard: non-finite steps caught inside the jitted step, loss spikes on the host.

Every step checks its loss and gradient norms for NaN/inf inside the compiled
program (`guard_step`) and a tiny jitted `track` keeps, on device, the first
non-finite step and a count; the host reads them only where it syncs anyway
(log steps and checkpoint saves), so the check costs no host round trip.

Without `skip_nonfinite_updates` the run stops with `DivergedError` at the next
log or save after a non-finite step, before anything non-finite is saved. With
it, such an update is dropped (params, optimizer and task state keep their
previous values; the step counter and the data still advance), its metrics are
zeroed, and the count is reported as `skipped_nonfinite_updates`.

Finite divergence (a loss that explodes but stays finite) is caught by
`max_loss_ratio`: a checkpoint whose window-mean loss exceeds that multiple of
the lowest window-mean loss seen so far is marked unhealthy (a warning names
both numbers); retention always keeps the newest healthy checkpoint.
"""
import dataclasses
import math

from absl import logging
import jax
import jax.numpy as jnp

NONFINITE = "nonfinite"


def _checked_values(metrics: dict) -> list:
  """The loss and every gradient norm a task reports."""
  return [v for k, v in metrics.items() if k == "loss" or k.endswith("loss") or "grad_norm" in k]


def guard_step(train_step, skip_nonfinite: bool):
  """Wraps `(state, batch, rng, frozen) -> (state, metrics)` with the finiteness check.

  The wrapped step adds metric `nonfinite` (1.0 if this step's loss or a gradient
  norm was NaN/inf). With `skip_nonfinite`, such a step keeps the previous state
  except for `step`, and its metrics are zeroed so averages stay finite.
  """
  def step(state, batch, rng, frozen):
    new_state, metrics = train_step(state, batch, rng, frozen)
    checked = _checked_values(metrics)
    ok = jnp.all(jnp.stack([jnp.all(jnp.isfinite(v)) for v in checked])) if checked else True
    ok = jnp.asarray(ok)
    if skip_nonfinite:
      kept = jax.tree.map(lambda new, old: jnp.where(ok, new, old), new_state, state)
      new_state = kept.replace(step=new_state.step)
      metrics = jax.tree.map(lambda v: jnp.where(ok, v, jnp.zeros_like(v)), metrics)
    return new_state, {**metrics, NONFINITE: 1.0 - ok.astype(jnp.float32)}
  return step


@jax.jit
def _track(health, nonfinite, step):
  first, count = health
  bad = nonfinite > 0
  first = jnp.where((first == 0) & bad, step, first)
  return first, count + bad.astype(jnp.int32)


def empty_health():
  """(first non-finite step or 0, count of non-finite steps), on device."""
  return jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32)


def track(health, metrics: dict, step: int):
  """Folds one step's `nonfinite` flag into `health`; dispatches, never syncs."""
  return _track(health, metrics[NONFINITE], step)


@dataclasses.dataclass
class LossWatch:
  """Host-side health of window-mean losses: finite, and within `max_ratio` of the best."""
  max_ratio: float
  best: float = float("inf")

  def healthy(self, loss: float | None, step: int) -> bool:
    if loss is None:
      return True
    if not math.isfinite(loss):
      return False
    if self.max_ratio > 0 and 0 < self.best and loss > self.max_ratio * self.best:
      logging.warning("step %d: loss %.4g is %.1fx the best %.4g (max_loss_ratio=%g): diverging? "
                      "This checkpoint is marked unhealthy; the newest healthy one is kept.",
                      step, loss, loss / self.best, self.best, self.max_ratio)
      return False
    self.best = min(self.best, loss)
    return True


def read(health) -> tuple[int, int]:
  """(first non-finite step or 0, non-finite steps so far): a host sync, so call it rarely."""
  first, count = jax.device_get(health)
  return int(first), int(count)
