"""Schedules against hand-computed values; optimizer choices and weight EMA."""
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from vimjax.train import optimizers


def _opt(**kw):
  base = dict(name="adamw", lr=1.0, b1=0.9, b2=0.99, weight_decay=0.0, warmup_steps=10,
              schedule="cosine", end_lr=0.1, decay_start_step=0, grad_clip_norm=0.0,
              accumulation_steps=1, ema_decay=0.0)
  base.update(kw)
  return ml_collections.ConfigDict(base)


def test_warmup_then_cosine():
  sched = optimizers.create_schedule(_opt(), total_steps=110)
  np.testing.assert_allclose(sched(5), 0.5, rtol=1e-6)
  np.testing.assert_allclose(sched(10), 1.0, rtol=1e-6)
  # Halfway through the 100 decay steps: end + (1 - end) * (1 + cos(pi/2)) / 2.
  np.testing.assert_allclose(sched(60), 0.1 + 0.9 * 0.5, rtol=1e-5)
  np.testing.assert_allclose(sched(110), 0.1, rtol=1e-5)


def test_exponential_holds_then_reaches_end_lr():
  sched = optimizers.create_schedule(
      _opt(schedule="exponential", decay_start_step=50, end_lr=0.025), total_steps=150)
  np.testing.assert_allclose(sched(40), 1.0, rtol=1e-6)
  np.testing.assert_allclose(sched(100), 0.025 ** 0.5, rtol=1e-4)
  np.testing.assert_allclose(sched(150), 0.025, rtol=1e-4)


@pytest.mark.parametrize("name", ["adam", "adamw", "adafactor"])
def test_optimizers_reduce_a_quadratic(name):
  tx = optimizers.create_optimizer(_opt(name=name, lr=0.1, warmup_steps=1, schedule="constant",
                                        grad_clip_norm=1.0), total_steps=100)
  params = {"w": jnp.ones((4, 3))}
  state = tx.init(params)
  for _ in range(20):
    grads = {"w": 2 * params["w"]}
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  assert float(jnp.sum(params["w"] ** 2)) < 12.0 * 0.5


def test_accumulation_applies_every_k_steps():
  tx = optimizers.create_optimizer(_opt(name="adam", lr=0.1, warmup_steps=0,
                                        schedule="constant", accumulation_steps=2), 100)
  params = {"w": jnp.ones(3)}
  state = tx.init(params)
  updates, state = tx.update({"w": jnp.ones(3)}, state, params)
  np.testing.assert_array_equal(updates["w"], 0.0)
  updates, state = tx.update({"w": jnp.ones(3)}, state, params)
  assert float(jnp.abs(updates["w"]).min()) > 0


def test_unknown_names_are_rejected():
  with pytest.raises(ValueError, match="optimizer.name='sgdx'"):
    optimizers.create_optimizer(_opt(name="sgdx"), 10)
  with pytest.raises(ValueError, match="optimizer.schedule='linear'"):
    optimizers.create_schedule(_opt(schedule="linear"), 10)


def test_ema_update():
  ema = optimizers.update_ema({"w": jnp.zeros(2)}, {"w": jnp.ones(2)}, decay=0.9)
  np.testing.assert_allclose(ema["w"], 0.1, rtol=1e-6)
