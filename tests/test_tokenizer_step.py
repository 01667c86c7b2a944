"""The tokenizer's train step (real task build) at the GAN start: D schedule, LeCam, lazy R1, MFU phases."""
import contextlib

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vimjax import flops
from vimjax import parallel
from vimjax.train import loop
from vimjax import tasks
from vimjax.tasks import tokenizer

import test_train_tokenizer

pytestmark = pytest.mark.slow

START, WARMUP, LR = 2, 4, 1e-3


def _config():
  return test_train_tokenizer.micro_config(
      total_steps=8, **{"loss.adversarial_start_step": START, "loss.lecam_weight": 0.1,
                        "loss.lecam_ema_decay": 0.5, "loss.r1_gamma": 0.0,
                        "disc_optimizer.warmup_steps": WARMUP, "disc_optimizer.lr": LR,
                        "disc_optimizer.weight_decay": 0.0})


@contextlib.contextmanager
def _built(config):
  """Inside the config's mesh: (task steps, seed-0 sharded state, its shardings, a batch)."""
  mesh = parallel.create_mesh(config.mesh)
  rules = parallel.rules_from_config(config.mesh)
  images = jax.random.uniform(jax.random.key(3), (8, 16, 16, 3))
  batch = {"image": images, "label": jnp.zeros((8,), jnp.int32), "mask": jnp.ones((8,), jnp.int32)}
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    task = tasks.build(config, mesh)
    state, shardings = loop.create_sharded_state(task, mesh, rules, jax.random.key(0))
    yield task, state, shardings, batch


@pytest.fixture(scope="module")
def run():
  """States before each step and the step metrics, for state.step 0..3."""
  config = _config()
  with _built(config) as (task, state, _, batch):
    images = batch["image"]
    step = jax.jit(task.train_step)
    states, metrics = [], []
    for i in range(START + 2):
      states.append(jax.tree.map(np.asarray, jax.device_get(state)))
      state, m = step(state, batch, jax.random.key(i), task.frozen)
      metrics.append({k: float(v) for k, v in m.items()})
    states.append(jax.tree.map(np.asarray, jax.device_get(state)))
  return config, np.asarray(images), states, metrics


def test_discriminator_schedule_is_aligned_with_the_global_step(run):
  _, _, states, metrics = run
  d = [s.params["discriminator"] for s in states]
  for i in range(START):  # No D update before the GAN phase.
    jax.tree.map(np.testing.assert_array_equal, d[i + 1], d[i])
  # The first D update (global step START) uses the global schedule's rate,
  # LR * START / WARMUP, not a fresh warm-up's 0: Adam's first step moves each
  # weight by lr * g / (|g| + eps), i.e. by lr where the gradient is not tiny.
  delta = np.concatenate([np.abs(a - b).ravel() for a, b in zip(
      jax.tree.leaves(d[START + 1]), jax.tree.leaves(d[START]))])
  expected = LR * START / WARMUP
  np.testing.assert_allclose(np.percentile(delta, 90), expected, rtol=1e-3)
  assert delta.max() <= expected * (1 + 1e-4)  # float32 rounding of w + update.
  for i in (START, START + 1):
    np.testing.assert_allclose(metrics[i]["d_lr"], LR * i / WARMUP, rtol=1e-6)
  assert metrics[0]["d_lr"] == 0.0


def test_lecam_uses_this_steps_updated_emas(run):
  config, images, states, metrics = run
  before = states[START]
  model, disc = tokenizer.build_model(config), tokenizer.build_discriminator(config)
  g, d = parallel.unbox(before.params["generator"]), before.params["discriminator"]
  recon = model.apply({"params": g}, images, train=True,
                      rngs={"dropout": jax.random.key(0)})[0]["image"]
  real = np.asarray(disc.apply({"params": d}, images), np.float64)
  fake = np.asarray(disc.apply({"params": d}, recon), np.float64)
  decay = config.loss.lecam_ema_decay
  ema_real = decay * before.extra["lecam_real"] + (1 - decay) * real.mean()
  ema_fake = decay * before.extra["lecam_fake"] + (1 - decay) * fake.mean()
  expected = (np.mean(np.maximum(real - ema_fake, 0) ** 2)
              + np.mean(np.maximum(ema_real - fake, 0) ** 2))
  np.testing.assert_allclose(metrics[START]["lecam"], expected, rtol=1e-4)
  np.testing.assert_allclose(states[START + 1].extra["lecam_real"], ema_real, rtol=1e-5)
  np.testing.assert_allclose(states[START + 1].extra["lecam_fake"], ema_fake, rtol=1e-5)


def test_mfu_counts_the_gan_flops_only_in_the_gan_phase():
  config = _config()
  phases = flops.model_flops_by_phase(tasks.get(config), config)
  (s0, before), (s1, during) = phases
  assert (s0, s1) == (0, START) and 0 < before < during
  no_gan = test_train_tokenizer.micro_config(**{"loss.adversarial_weight": 0.0})
  assert before == flops.model_flops_per_step(tasks.get(no_gan), no_gan)
  assert during == flops.model_flops_per_step(tasks.get(config), config)
  # A logging window straddling the start: steps 0..3 = 2 without, 2 with the GAN.
  assert flops.flops_between(phases, 0, 4) == 2 * before + 2 * during
  assert flops.flops_between(phases, 3, 5) == 2 * during


def _one_step(config, step: int):
  """(params after, metrics) of one real train step from the seed-0 init at `step`."""
  with _built(config) as (task, state, shardings, batch):
    state = state.replace(step=jax.device_put(jnp.int32(step), shardings.step))
    state, metrics = jax.jit(task.train_step)(state, batch, jax.random.key(7), task.frozen)
  return jax.device_get(state.params), {k: float(v) for k, v in metrics.items()}


def test_lazy_r1_pays_interval_times_r1_on_its_steps_and_nothing_between():
  gamma, interval = 1.0, 2
  lazy = _with_loss(_config(), r1_gamma=gamma, r1_interval=interval)
  assert tokenizer.is_r1_step(lazy.loss, START) and not tokenizer.is_r1_step(lazy.loss, START + 1)
  eager = _with_loss(lazy, r1_gamma=gamma * interval, r1_interval=1)  # Same weight, every step.
  without = _with_loss(lazy, r1_gamma=0.0)
  disc = lambda params: params["discriminator"]
  # The R1 step: the discriminator update of gamma x interval R1 on every step.
  params, metrics = _one_step(lazy, START)
  params_eager, metrics_eager = _one_step(eager, START)
  assert np.isfinite(metrics["r1"]) and metrics["r1"] > 0
  np.testing.assert_allclose(metrics["r1"], metrics_eager["r1"], rtol=1e-6)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               disc(params), disc(params_eager))
  # Between: no R1 (NaN metric), the update of the same config without it ...
  params, metrics = _one_step(lazy, START + 1)
  params_without, _ = _one_step(without, START + 1)
  params_eager, _ = _one_step(eager, START + 1)
  assert np.isnan(metrics["r1"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7),
               disc(params), disc(params_without))
  # ... which R1 would have moved.
  assert _max_abs_difference(disc(params), disc(params_eager)) > 1e-5


def _with_loss(config, **loss):
  """A copy of `config` with these loss fields."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.loss.update(loss)
  return config


def _max_abs_difference(a, b) -> float:
  return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
             for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_lazy_r1_flops_are_the_mean_of_the_two_programs():
  lazy = _with_loss(_config(), r1_gamma=1.0, r1_interval=4)
  task = tasks.get(lazy)
  every = flops.model_flops_per_step(task, _with_loss(lazy, r1_interval=1))
  without = flops.model_flops_per_step(task, _with_loss(lazy, r1_gamma=0.0))
  assert every > without
  np.testing.assert_allclose(flops.model_flops_per_step(task, lazy),
                             every / 4 + without * 3 / 4, rtol=1e-12)


def test_logged_r1_averages_the_steps_that_computed_it():
  empty, accumulate = loop.metrics_accumulator(["r1", "loss"], intermittent=("r1",))
  acc = empty
  for r1, loss in ((1.0, 1.0), (np.nan, 2.0), (3.0, np.nan)):
    acc = accumulate(acc, {"r1": jnp.float32(r1), "loss": jnp.float32(loss)})
  logged = acc.compute()
  assert float(logged["r1"]) == 2.0
  assert np.isnan(float(logged["loss"]))  # Any other metric keeps a NaN visible.
