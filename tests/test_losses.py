"""Losses against independent float64 NumPy references, gradients and densities."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vimjax import losses


def _rand(seed, shape, lo=-1.0, hi=1.0):
  return np.random.default_rng(seed).uniform(lo, hi, shape).astype(np.float32)


def test_l2_matches_numpy():
  a, b = _rand(0, (2, 4, 4, 3)), _rand(1, (2, 4, 4, 3))
  a64, b64 = a.astype(np.float64), b.astype(np.float64)
  np.testing.assert_allclose(losses.l2_loss(a, b), np.mean((a64 - b64) ** 2), rtol=1e-6)


def _np_logit_laplace_nll(mu, log_b, x, eps):
  mu, log_b, x = (np.asarray(v, np.float64) for v in (mu, log_b, x))
  y = (1 - 2 * eps) * x + eps
  b = np.exp(log_b)
  return np.log(2 * b * y * (1 - y)) + np.abs(np.log(y / (1 - y)) - mu) / b


@pytest.mark.parametrize("eps", [0.1, 0.0])
def test_logit_laplace_matches_numpy(eps):
  x = _rand(2, (2, 4, 4, 3), 0.01, 0.99)
  mu, log_b = _rand(3, x.shape, -3, 3), _rand(4, x.shape, -3, 1)
  ref = _np_logit_laplace_nll(mu, log_b, x, eps)
  np.testing.assert_allclose(losses.logit_laplace_nll(mu, log_b, x, eps), ref,
                             rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(losses.logit_laplace_loss(mu, log_b, x, eps), ref.mean(),
                             rtol=1e-5)


def test_logit_laplace_clips_log_scale():
  x, mu = np.full((3,), 0.4, np.float32), np.zeros((3,), np.float32)
  far = np.array([-50.0, losses.LOG_SCALE_MIN, 50.0], np.float32)
  edge = np.array([losses.LOG_SCALE_MIN, losses.LOG_SCALE_MIN, losses.LOG_SCALE_MAX],
                  np.float32)
  got = losses.logit_laplace_nll(mu, far, x)
  np.testing.assert_allclose(got, _np_logit_laplace_nll(mu, edge, x, 0.1), rtol=1e-5)
  assert np.all(np.isfinite(got))


@pytest.mark.parametrize("mu,b,eps", [(0.0, 0.3, 0.0), (1.2, 0.5, 0.1), (-0.7, 0.2, 0.1)])
def test_logit_laplace_is_a_density_in_x_prime(mu, b, eps):
  # A grid in x' = sigmoid(u) that is dense where the density lives (near 0, 1).
  y = 1.0 / (1.0 + np.exp(-np.linspace(-14.0, 14.0, 40001)))
  x = (y - eps) / (1 - 2 * eps)  # The loss maps x back to x' = y.
  nll = losses.logit_laplace_nll(np.full_like(x, mu), np.full_like(x, np.log(b)), x, eps)
  density = np.exp(-np.asarray(nll, np.float64))
  assert np.trapezoid(density, y) == pytest.approx(1.0, abs=2e-3)


def test_logit_laplace_loss_is_minimised_at_the_target():
  x = np.full((5,), 0.3, np.float32)
  y = 0.8 * 0.3 + 0.1
  g = jax.grad(lambda mu: losses.logit_laplace_loss(mu, jnp.zeros(5), x))
  # mu below logit(x') -> loss decreases as mu grows (negative gradient), and vice versa.
  logit = np.log(y / (1 - y))
  assert np.all(g(jnp.full((5,), logit - 0.5)) < 0)
  assert np.all(g(jnp.full((5,), logit + 0.5)) > 0)


def test_vq_loss_values_and_gradients():
  z, e = _rand(5, (2, 3, 4)), _rand(6, (2, 3, 4))
  ref = np.mean(np.sum((z.astype(np.float64) - e) ** 2, axis=-1))
  out = losses.vq_loss(z, e, beta=0.25)
  np.testing.assert_allclose(out["codebook"], ref, rtol=1e-6)
  np.testing.assert_allclose(out["commitment"], ref, rtol=1e-6)
  np.testing.assert_allclose(out["loss"], 1.25 * ref, rtol=1e-6)
  gz, ge = jax.grad(lambda a, b: losses.vq_loss(a, b, 0.25)["loss"], argnums=(0, 1))(z, e)
  n = 6  # tokens
  # The codebook term moves only e, the commitment term only z (weighted by beta).
  np.testing.assert_allclose(gz, 0.25 * 2 * (z - e) / n, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(ge, 2 * (e - z) / n, rtol=1e-5, atol=1e-7)


def test_vq_loss_rejects_mismatched_shapes():
  with pytest.raises(ValueError, match="shapes differ"):
    losses.vq_loss(np.zeros((2, 4)), np.zeros((2, 5)))


def _np_entropy_penalty(sim, t):
  logits = sim.reshape(-1, sim.shape[-1]).astype(np.float64) / t
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  per_token = np.mean(-np.sum(p * np.log(p), -1))
  avg = p.mean(0)
  return per_token - (-np.sum(avg * np.log(avg)))


def test_entropy_penalty_matches_numpy():
  sim = _rand(7, (2, 5, 8))
  np.testing.assert_allclose(losses.entropy_penalty(sim, 0.3), _np_entropy_penalty(sim, 0.3),
                             rtol=1e-5, atol=1e-6)


def test_entropy_penalty_extremes():
  k = 8
  # Uniform per token: per-token entropy = codebook entropy = ln K -> 0.
  assert float(losses.entropy_penalty(np.zeros((4, k)), 1.0)) == pytest.approx(0.0, abs=1e-6)
  # Confident and spread over every code: 0 - ln K.
  confident = 100.0 * np.eye(k, dtype=np.float32)
  assert float(losses.entropy_penalty(confident, 1.0)) == pytest.approx(-np.log(k), abs=1e-4)
  # Confident but all on one code (collapse): 0 - 0.
  collapsed = np.tile(confident[:1], (k, 1))
  assert float(losses.entropy_penalty(collapsed, 1.0)) == pytest.approx(0.0, abs=1e-4)


def _softplus(x):
  return np.logaddexp(0.0, np.asarray(x, np.float64))


def test_gan_losses_match_numpy():
  real, fake = _rand(8, (6,), -4, 4), _rand(9, (6,), -4, 4)
  np.testing.assert_allclose(losses.generator_adversarial_loss(fake),
                             np.mean(_softplus(-fake)), rtol=1e-6)
  np.testing.assert_allclose(losses.discriminator_loss(real, fake),
                             np.mean(_softplus(-real)) + np.mean(_softplus(fake)), rtol=1e-6)


def test_gan_loss_gradient_signs():
  real, fake = _rand(10, (6,), -3, 3), _rand(11, (6,), -3, 3)
  # The generator wants higher fake logits; the discriminator higher real, lower fake.
  assert np.all(jax.grad(losses.generator_adversarial_loss)(fake) < 0)
  g_real, g_fake = jax.grad(losses.discriminator_loss, argnums=(0, 1))(real, fake)
  assert np.all(g_real < 0) and np.all(g_fake > 0)


def test_r1_penalty_linear_discriminator():
  w = _rand(12, (4, 4, 3))
  disc = lambda x: jnp.sum(x * w, axis=(1, 2, 3)) + 3.0
  images = _rand(13, (5, 4, 4, 3))
  # grad_x D(x) = w for every example.
  np.testing.assert_allclose(losses.logits_and_r1_penalty(disc, images)[1],
                             np.sum(w.astype(np.float64) ** 2), rtol=1e-5)


def test_r1_penalty_nonlinear_per_example():
  a = 1.7
  disc = lambda x: jnp.sum(jnp.tanh(a * x), axis=(1, 2, 3))
  x = _rand(14, (3, 2, 2, 3))
  grad = a * (1 - np.tanh(a * x.astype(np.float64)) ** 2)
  ref = np.mean(np.sum(grad ** 2, axis=(1, 2, 3)))
  np.testing.assert_allclose(losses.logits_and_r1_penalty(disc, x)[1], ref, rtol=1e-5)
  # The penalty is differentiable w.r.t. the discriminator's parameters.
  d = jax.grad(lambda s: losses.logits_and_r1_penalty(
      lambda y: jnp.sum(s * y, axis=(1, 2, 3)), x)[1])(2.0)
  np.testing.assert_allclose(d, 2 * 2.0 * x[0].size, rtol=1e-5)  # d/ds (s^2 * 12) = 24 s
  # The logits come from the same pass: D(x) itself, and differentiable too.
  logits = losses.logits_and_r1_penalty(disc, x)[0]
  np.testing.assert_allclose(logits, np.sum(np.tanh(a * x.astype(np.float64)), axis=(1, 2, 3)),
                             rtol=1e-5)
  d_logits = jax.grad(lambda s: jnp.sum(losses.logits_and_r1_penalty(
      lambda y: jnp.sum(s * y, axis=(1, 2, 3)), x)[0]))(2.0)
  np.testing.assert_allclose(d_logits, np.sum(x.astype(np.float64)), rtol=1e-5)


def test_lecam_matches_reference_and_gradients():
  real, fake = _rand(15, (8,), -2, 2), _rand(16, (8,), -2, 2)
  ema_r, ema_f = np.float32(0.4), np.float32(-0.3)
  relu = lambda v: np.maximum(v, 0.0)
  r64, f64 = real.astype(np.float64), fake.astype(np.float64)
  ref = np.mean(relu(r64 - ema_f) ** 2) + np.mean(relu(ema_r - f64) ** 2)
  np.testing.assert_allclose(losses.lecam_regularizer(real, fake, ema_r, ema_f), ref, rtol=1e-6)
  g_real, g_fake, g_er, g_ef = jax.grad(losses.lecam_regularizer, argnums=(0, 1, 2, 3))(
      real, fake, ema_r, ema_f)
  np.testing.assert_allclose(g_real, 2 * relu(r64 - ema_f) / 8, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(g_fake, -2 * relu(ema_r - f64) / 8, rtol=1e-5, atol=1e-7)
  assert g_er == 0 and g_ef == 0  # EMAs are constants.


def test_update_lecam_ema():
  real, fake = _rand(17, (8,)), _rand(18, (8,))
  new_r, new_f = losses.update_lecam_ema(jnp.float32(1.0), jnp.float32(-1.0), real, fake, 0.9)
  np.testing.assert_allclose(new_r, 0.9 + 0.1 * real.astype(np.float64).mean(), rtol=1e-6)
  np.testing.assert_allclose(new_f, -0.9 + 0.1 * fake.astype(np.float64).mean(), rtol=1e-6)


class _ToyDistance(nn.Module):
  """Stands in for LPIPS: a [b] distance with one parameter."""

  @nn.compact
  def __call__(self, a, b):
    w = self.param("w", nn.initializers.ones, (3,))
    return jnp.sum(w * jnp.square(a - b), axis=(1, 2, 3))


def test_perceptual_loss_glue():
  model = _ToyDistance()
  a, b = _rand(19, (2, 4, 4, 3), 0, 1), _rand(20, (2, 4, 4, 3), 0, 1)
  params = {"w": jnp.array([1.0, 2.0, 3.0])}
  ref = np.mean(np.sum(np.array([1.0, 2.0, 3.0]) * (a.astype(np.float64) - b) ** 2,
                       axis=(1, 2, 3)))
  np.testing.assert_allclose(losses.perceptual_loss(model, params, a, b), ref, rtol=1e-6)
  g_params, g_pred, g_target = jax.grad(
      lambda p, x, y: losses.perceptual_loss(model, p, x, y), argnums=(0, 1, 2))(params, a, b)
  assert np.all(g_params["w"] == 0) and np.all(g_target == 0)  # Frozen net, fixed target.
  np.testing.assert_allclose(g_pred, np.array([1.0, 2.0, 3.0]) * (a - b), rtol=1e-5)
