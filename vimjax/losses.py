"""Tokenizer losses: pure functions of arrays.

Reconstruction (L2, DALL-E logit-Laplace; the model's
`vit_vqgan.logit_laplace_mean` decodes the latter), vector quantisation
(codebook + commitment), codebook entropy, adversarial (non-saturating
logistic, R1, LeCam) and the LPIPS perceptual glue. Every function computes in
float32 and returns a scalar mean unless its docstring says otherwise. Means are
over the whole (global) batch: under `jit` with sharded inputs `jnp.mean` is a
global reduction, so nothing here needs to know about the mesh.
"""
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array

# ln b is clipped to this range: below it the density is a near-delta whose
# gradients explode, above it the loss is flat in mu.
LOG_SCALE_MIN = -7.0
LOG_SCALE_MAX = 5.0


def _f32(*xs):
  return [jnp.asarray(x, jnp.float32) for x in xs]


def l2_loss(pred: Array, target: Array) -> Array:
  """Mean squared error.

  Args:
    pred: [...] any shape, e.g. images [b, h, w, 3].
    target: same shape as `pred`.

  Returns:
    [] mean over all elements of (pred - target)^2.
  """
  pred, target = _f32(pred, target)
  return jnp.mean(jnp.square(pred - target))


def _squash(x: Array, eps: float) -> Array:
  """Maps pixels in [0, 1] to [eps, 1 - eps] (DALL-E sec. A.3)."""
  return (1.0 - 2.0 * eps) * x + eps


def logit_laplace_nll(mu_logit: Array, log_scale: Array, target: Array,
                      eps: float = 0.1) -> Array:
  """Per-element negative log-density of the logit-Laplace distribution.

  Ramesh et al. 2021 (DALL-E), sec. A.3: with x' = (1 - 2 eps) x + eps,
    ln f(x' | mu, b) = -ln(2 b x' (1 - x')) - |logit(x') - mu| / b,
  a proper density over x' in (0, 1) (the Laplace density of logit(x') times
  the Jacobian of the logit). The NLL is with respect to x', not x.

  Args:
    mu_logit: [...] location mu in logit space (decoder output).
    log_scale: [...] ln b (decoder output); clipped to
      [LOG_SCALE_MIN, LOG_SCALE_MAX] for stability.
    target: [...] pixels x in [0, 1] (values outside are allowed as long as
      x' stays in (0, 1)).
    eps: squashing margin, 0 <= eps < 0.5.

  Returns:
    [...] -ln f(x' | mu, b), same shape as the broadcast inputs.
  """
  if not 0.0 <= eps < 0.5:
    raise ValueError(f"logit_laplace eps={eps} is invalid; need 0 <= eps < 0.5.")
  mu_logit, log_scale, target = _f32(mu_logit, log_scale, target)
  log_b = jnp.clip(log_scale, LOG_SCALE_MIN, LOG_SCALE_MAX)
  y = _squash(target, eps)
  log_y, log_1my = jnp.log(y), jnp.log1p(-y)
  logit_y = log_y - log_1my
  return (jnp.log(2.0) + log_b + log_y + log_1my
          + jnp.abs(logit_y - mu_logit) * jnp.exp(-log_b))


def logit_laplace_loss(mu_logit: Array, log_scale: Array, target: Array,
                       eps: float = 0.1) -> Array:
  """DALL-E logit-Laplace NLL, mean over pixels and channels (and batch).

  Args:
    mu_logit: [b, h, w, c] location in logit space.
    log_scale: [b, h, w, c] ln b.
    target: [b, h, w, c] pixels in [0, 1].
    eps: squashing margin (0.1 in DALL-E).

  Returns:
    [] mean of `logit_laplace_nll`.
  """
  return jnp.mean(logit_laplace_nll(mu_logit, log_scale, target, eps))


def vq_loss(latents: Array, quantized_latents: Array,
            beta: float = 0.25) -> dict[str, Array]:
  """VQ-VAE loss ||sg[z_e] - e||^2 + beta ||z_e - sg[e]||^2.

  Each term is the squared distance per token (summed over the lookup dim),
  averaged over tokens. With l2-normalised codes this is 2 - 2 cos(z_e, e) in
  [0, 4] whatever the lookup dim, so the paper's loss weights do not depend on it.
  Both terms have the same value; they differ in where the gradient goes.

  Args:
    latents: [..., d] encoder outputs z_e (in the lookup space).
    quantized_latents: [..., d] selected codes e, same shape.
    beta: commitment weight (0.25 in ViT-VQGAN).

  Returns:
    {"loss": [] codebook + beta * commitment, "codebook": [], "commitment": []}
    (the parts unweighted, for logging).
  """
  if latents.shape != quantized_latents.shape:
    raise ValueError(f"vq_loss shapes differ: latents {latents.shape} vs "
                     f"quantized_latents {quantized_latents.shape}.")
  z, e = _f32(latents, quantized_latents)
  sg = jax.lax.stop_gradient
  codebook = jnp.mean(jnp.sum(jnp.square(sg(z) - e), axis=-1))
  commitment = jnp.mean(jnp.sum(jnp.square(z - sg(e)), axis=-1))
  return {"loss": codebook + beta * commitment, "codebook": codebook,
          "commitment": commitment}


def _entropy(probs: Array, log_probs: Array) -> Array:
  return -jnp.sum(probs * log_probs, axis=-1)


def entropy_penalty(similarity: Array, temperature: float = 1.0) -> Array:
  """Codebook entropy regulariser: per-token entropy minus codebook entropy.

  p_i = softmax(similarity_i / temperature) over the codebook for every token i
  of the global batch. Minimising mean_i H(p_i) - H(mean_i p_i) makes each
  token's assignment confident while spreading use over the whole codebook.

  Args:
    similarity: [..., codebook] similarity (e.g. cosine or negative squared
      distance) of every token to every code; all leading dims are tokens.
    temperature: softmax temperature, > 0.

  Returns:
    [] penalty in [-ln K, ln K].
  """
  if temperature <= 0:
    raise ValueError(f"entropy_penalty temperature={temperature}; must be > 0.")
  logits = jnp.asarray(similarity, jnp.float32).reshape(-1, similarity.shape[-1])
  log_probs = jax.nn.log_softmax(logits / temperature, axis=-1)
  probs = jnp.exp(log_probs)
  per_token = jnp.mean(_entropy(probs, log_probs))
  avg_probs = jnp.mean(probs, axis=0)
  codebook = _entropy(avg_probs, jnp.log(jnp.maximum(avg_probs, 1e-30)))
  return per_token - codebook


def generator_adversarial_loss(fake_logits: Array) -> Array:
  """Non-saturating logistic generator loss, mean softplus(-D(G(z))).

  Args:
    fake_logits: [b] discriminator logits on generated images.

  Returns:
    [] loss.
  """
  (fake_logits,) = _f32(fake_logits)
  return jnp.mean(jax.nn.softplus(-fake_logits))


def discriminator_loss(real_logits: Array, fake_logits: Array) -> Array:
  """Logistic discriminator loss, mean softplus(-D(x)) + mean softplus(D(G(z))).

  Args:
    real_logits: [b] logits on real images.
    fake_logits: [b'] logits on generated images (stop their generator
      gradient at the caller).

  Returns:
    [] loss.
  """
  real_logits, fake_logits = _f32(real_logits, fake_logits)
  return (jnp.mean(jax.nn.softplus(-real_logits))
          + jnp.mean(jax.nn.softplus(fake_logits)))


def logits_and_r1_penalty(disc_fn: Callable[[Array], Array],
                          real_images: Array) -> tuple[Array, Array]:
  """The discriminator's logits on reals and the R1 penalty, from one forward pass.

  R1 (Mescheder et al. 2018) is E ||grad_x D(x)||^2 on reals. The gradient of
  sum(D(x)) gives every example its own gradient, since the discriminator
  treats examples independently (the minibatch-stddev layer couples them
  slightly, as in StyleGAN2). The logits come from the same `jax.vjp`, so the
  discriminator loss needs no second forward pass on the reals. The caller
  multiplies the penalty by gamma / 2.

  Args:
    disc_fn: images [b, h, w, c] -> logits [b] (params closed over).
    real_images: [b, h, w, c] real images.

  Returns:
    (logits [b] float32, [] mean over examples of the squared gradient norm).
  """
  real_images = jnp.asarray(real_images, jnp.float32)
  logits, vjp = jax.vjp(lambda x: jnp.asarray(disc_fn(x), jnp.float32), real_images)
  (grads,) = vjp(jnp.ones_like(logits))
  penalty = jnp.mean(jnp.sum(jnp.square(grads), axis=tuple(range(1, grads.ndim))))
  return logits, penalty


def lecam_regularizer(real_logits: Array, fake_logits: Array,
                      ema_real: Array, ema_fake: Array) -> Array:
  """LeCam regulariser (Tseng et al. 2021) for the discriminator loss.

  As in the authors' code: mean relu(D(x) - alpha_F)^2 + mean relu(alpha_R -
  D(G(z)))^2, where alpha_R / alpha_F are EMAs of the mean real / fake logits
  (see `update_lecam_ema`; pass the updated values). The EMAs are constants.

  Args:
    real_logits: [b] logits on real images.
    fake_logits: [b'] logits on generated images.
    ema_real: [] EMA of mean real logits (alpha_R).
    ema_fake: [] EMA of mean fake logits (alpha_F).

  Returns:
    [] regulariser; the caller weights it (e.g. 0.001 to 0.3).
  """
  real_logits, fake_logits, ema_real, ema_fake = _f32(
      real_logits, fake_logits, ema_real, ema_fake)
  ema_real, ema_fake = jax.lax.stop_gradient(ema_real), jax.lax.stop_gradient(ema_fake)
  return (jnp.mean(jnp.square(jax.nn.relu(real_logits - ema_fake)))
          + jnp.mean(jnp.square(jax.nn.relu(ema_real - fake_logits))))


def update_lecam_ema(ema_real: Array, ema_fake: Array, real_logits: Array,
                     fake_logits: Array, decay: float = 0.99) -> tuple[Array, Array]:
  """One EMA step of the mean real and fake logits (no gradient flows).

  Args:
    ema_real: [] current EMA of real logits (start at 0).
    ema_fake: [] current EMA of fake logits (start at 0).
    real_logits: [b] this step's real logits.
    fake_logits: [b'] this step's fake logits.
    decay: EMA decay (0.99 in the LeCam code).

  Returns:
    (new_ema_real, new_ema_fake), each [] float32.
  """
  real_logits, fake_logits, ema_real, ema_fake = _f32(
      *jax.lax.stop_gradient((real_logits, fake_logits, ema_real, ema_fake)))
  new_real = decay * ema_real + (1.0 - decay) * jnp.mean(real_logits)
  new_fake = decay * ema_fake + (1.0 - decay) * jnp.mean(fake_logits)
  return new_real, new_fake


def perceptual_loss(lpips_model: nn.Module, lpips_params: Any, pred: Array,
                    target: Array) -> Array:
  """Mean LPIPS distance between reconstructions and targets.

  Args:
    lpips_model: a `vimjax.models.perceptual.LPIPS` (or any module whose
      `apply({"params": params}, a, b)` returns a [b] distance).
    lpips_params: its frozen params tree, e.g. from `load_lpips_params`;
      gradients are stopped so they never train.
    pred: [b, h, w, 3] reconstructions in [0, 1] (gradients flow here).
    target: [b, h, w, 3] targets in [0, 1].

  Returns:
    [] mean distance.
  """
  frozen = jax.lax.stop_gradient(lpips_params)
  return jnp.mean(lpips_model.apply({"params": frozen}, pred, jax.lax.stop_gradient(target)))
