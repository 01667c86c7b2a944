"""Schedules against hand-computed values; optimizer choices and weight EMA."""
import jax
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


# ----------------------------------------------------------------------------- recipes (issue 12)


def _reference_schedule(opt, total_steps):
  """NumPy float64 schedule over optimizer updates (loop steps / accumulation_steps)."""
  k = opt.accumulation_steps
  total, warmup, hold_until = total_steps // k, opt.warmup_steps // k, opt.decay_start_step // k

  def lr(u):
    if u < warmup:
      return opt.lr * u / warmup
    if opt.schedule == "constant":
      return opt.lr
    if opt.schedule == "cosine":
      frac = min(1.0, (u - warmup) / (total - warmup))
      return opt.end_lr + (opt.lr - opt.end_lr) * 0.5 * (1 + np.cos(np.pi * frac))
    start = max(hold_until, warmup)
    if u < start:
      return opt.lr
    return max(opt.end_lr, opt.lr * (opt.end_lr / opt.lr) ** ((u - start) / (total - start)))
  return lr


def _paper_optimizers():
  from vimjax.configs import parti, vim, vitvqgan  # pylint: disable=g-import-not-at-top
  return {"parti_350m": parti.get_config("350m"), "vim_base": vim.get_config("base"),
          "vitvqgan_bb": vitvqgan.get_config("bb")}


@pytest.mark.parametrize("variant", ["parti_350m", "vim_base", "vitvqgan_bb"])
def test_zero_gradient_warmup_steps_leave_paper_weights_unchanged(variant):
  # Parti's Adafactor used to remove weight_decay = 4.5% of every weight per
  # step whatever the rate: 1.0 -> 0.63 in these ten steps. Decoupled decay
  # shrinks by lr_t * wd, < 1e-9 in the first warm-up steps.
  config = _paper_optimizers()[variant]
  tx = optimizers.create_optimizer(config.optimizer, config.total_steps)
  params = {"kernel": jnp.ones((256, 128)), "bias": jnp.ones((7,))}
  state, update = tx.init(params), jax.jit(tx.update)
  zeros = jax.tree.map(jnp.zeros_like, params)
  for _ in range(10):
    updates, state = update(zeros, state, params)
    params = optax.apply_updates(params, updates)
  for value in jax.tree.leaves(params):
    np.testing.assert_allclose(value, 1.0, rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", ["adamw", "adafactor"])
@pytest.mark.parametrize("accumulation", [1, 2])
def test_zero_gradient_steps_shrink_by_lr_times_weight_decay(name, accumulation):
  opt = _opt(name=name, lr=0.1, weight_decay=0.5, warmup_steps=4, schedule="cosine",
             end_lr=0.01, grad_clip_norm=1.0, accumulation_steps=accumulation)
  total = 16
  tx = optimizers.create_optimizer(opt, total)
  reference = _reference_schedule(opt, total)
  params = {"kernel": jnp.full((256, 128), 2.0), "bias": jnp.full((7,), -1.0)}
  state, update = tx.init(params), jax.jit(tx.update)
  zeros = jax.tree.map(jnp.zeros_like, params)
  expected = 1.0
  for step in range(total):
    updates, state = update(zeros, state, params)
    params = optax.apply_updates(params, updates)
    if (step + 1) % accumulation == 0:
      expected *= 1.0 - reference(step // accumulation) * opt.weight_decay
  np.testing.assert_allclose(params["kernel"], 2.0 * expected, rtol=1e-5)
  np.testing.assert_allclose(params["bias"], -1.0 * expected, rtol=1e-5)


def test_zero_gradient_steps_without_weight_decay_change_nothing():
  for name in optimizers.OPTIMIZERS:
    tx = optimizers.create_optimizer(_opt(name=name, lr=0.1, warmup_steps=0,
                                          grad_clip_norm=1.0), 10)
    params = {"w": jnp.full((130, 3), 0.7)}
    state, update = tx.init(params), jax.jit(tx.update)
    for _ in range(3):
      updates, state = update({"w": jnp.zeros((130, 3))}, state, params)
      params = optax.apply_updates(params, updates)
    np.testing.assert_array_equal(params["w"], np.float32(0.7))


def test_plain_adam_with_weight_decay_is_rejected():
  with pytest.raises(ValueError, match="name='adam' with weight_decay=0.1"):
    optimizers.create_optimizer(_opt(name="adam", weight_decay=0.1), 10)


@pytest.mark.parametrize("schedule", ["cosine", "exponential"])
def test_accumulated_updates_follow_the_schedule_to_its_end(schedule):
  # Constant unit gradients: each Adam update moves a weight by exactly -lr_t
  # (bias-corrected m / sqrt(v) = 1), so the applied rate is observable.
  k, total = 4, 80
  opt = _opt(name="adam", lr=1.0, end_lr=0.05, warmup_steps=8, schedule=schedule,
             decay_start_step=40, accumulation_steps=k)
  tx = optimizers.create_optimizer(opt, total)
  applied_lr = optimizers.learning_rate_fn(opt, total)
  reference = _reference_schedule(opt, total)
  params = {"w": jnp.zeros((3,))}
  state, update = tx.init(params), jax.jit(tx.update)
  applied = []
  for step in range(total):
    updates, state = update({"w": jnp.ones((3,))}, state, params)
    params = optax.apply_updates(params, updates)
    if (step + 1) % k == 0:
      applied.append(-float(updates["w"][0]))
      np.testing.assert_allclose(float(applied_lr(step)), applied[-1], rtol=1e-5, atol=1e-7)
  expected = [reference(u) for u in range(total // k)]
  np.testing.assert_allclose(applied, expected, rtol=1e-4, atol=1e-6)
  # The last update is at the end of the schedule, not a quarter of the way.
  assert applied[-1] < 1.5 * opt.end_lr


def test_discriminator_schedule_is_read_at_the_global_step():
  opt = _opt(name="adam", lr=1.0, warmup_steps=10, schedule="cosine", end_lr=0.1)
  start, total = 6, 20
  tx = optimizers.create_optimizer(opt, total, start_step=start)
  reference = _reference_schedule(opt, total)
  params = {"w": jnp.zeros((2,))}
  state, update = tx.init(params), jax.jit(tx.update)
  for step in range(start, total):
    updates, state = update({"w": jnp.ones((2,))}, state, params)
    params = optax.apply_updates(params, updates)
    np.testing.assert_allclose(-float(updates["w"][0]), reference(step), rtol=1e-4, atol=1e-6)


def _factored_adafactor_reference(grads, params, lr, b1, b2, wd, eps=1e-30):
  """NumPy float64 Adafactor with a fixed, bias-corrected b2 (Shazeer & Stern 2018).

  A [r, c] matrix keeps row and column means of g^2 (normalised EMAs with
  decay b2); its second moment is v_row v_col^T / mean(v_row). Updates are
  clipped to block RMS 1, averaged with b1, then w -= lr (m + wd w).
  """
  w = np.asarray(params, np.float64)
  vr = vc = 0.0
  m = np.zeros_like(w)
  for t, g in enumerate(grads, start=1):
    g2 = np.asarray(g, np.float64) ** 2 + eps
    norm = (1 - b2) / (1 - b2 ** t)  # Weight of the newest term in the normalised EMA.
    vr = (1 - norm) * vr + norm * g2.mean(axis=1)
    vc = (1 - norm) * vc + norm * g2.mean(axis=0)
    u = g / np.sqrt(np.outer(vr, vc) / vr.mean())
    u = u / max(1.0, np.sqrt(np.mean(u ** 2)))
    m = b1 * m + (1 - b1) * u
    w = w - lr * (m + wd * w)
  return w


def test_adafactor_uses_b2_and_decoupled_decay():
  opt = _opt(name="adafactor", lr=0.01, b1=0.9, b2=0.96, weight_decay=0.045,
             warmup_steps=0, schedule="constant")
  rng = np.random.default_rng(0)
  w0 = rng.normal(size=(256, 130)).astype(np.float32)
  grads = [rng.normal(size=w0.shape).astype(np.float32) * s for s in (1.0, 3.0, 0.2, 1.0)]
  tx = optimizers.create_optimizer(opt, 100)
  params = {"w": jnp.asarray(w0)}
  state, update = tx.init(params), jax.jit(tx.update)
  for g in grads:
    updates, state = update({"w": jnp.asarray(g)}, state, params)
    params = optax.apply_updates(params, updates)
  expected = _factored_adafactor_reference(grads, w0, 0.01, 0.9, 0.96, 0.045)
  np.testing.assert_allclose(params["w"], expected, rtol=1e-5, atol=1e-6)


def test_bad_optimizer_settings_fail_in_config_validation():
  from vimjax.configs import vitvqgan  # pylint: disable=g-import-not-at-top
  from vimjax import config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.override(vitvqgan.get_config("tiny"), **{"disc_optimizer.name": "adam"})
  with pytest.raises(ValueError, match="optimizer.name='adam' with weight_decay=0.0001"):
    config_lib.validate(config, 8)
  config = config_lib.override(vitvqgan.get_config("tiny"),
                               **{"optimizer.accumulation_steps": 0})
  with pytest.raises(ValueError, match=r"optimizer.accumulation_steps=0; valid: an integer >= 1"):
    config_lib.validate(config, 8)


@pytest.mark.parametrize("shape", [(256, 128), (128, 256), (3, 3, 256, 512), (128, 128),
                                   (512, 64), (4096,), (200, 300, 200)])
def test_factored_dims_copy_matches_the_moments_optax_builds(shape):
  """The local copy of optax's factoring rule names the moments optax actually creates."""
  state = optax.scale_by_factored_rms(min_dim_size_to_factor=optimizers.MIN_DIM_SIZE_TO_FACTOR
                                      ).init({"w": jnp.zeros(shape)})
  v_row, v_col = state.v_row["w"].shape, state.v_col["w"].shape
  dims = optimizers._factored_dims(shape)  # pylint: disable=protected-access
  if dims is None:
    assert v_row == v_col == (1,)
  else:
    d1, d0 = dims
    assert v_row == tuple(np.delete(shape, d0)) and v_col == tuple(np.delete(shape, d1))
