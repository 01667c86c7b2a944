"""Vector quantizers for the tokenizer, plus dead-code restarts.

Owns: FactorizedQuantizer (ViT-VQGAN: low-dim, l2-normalised codebook lookup),
FiniteScalarQuantizer (FSQ, arXiv 2309.15505), and the pure functions the
train step uses to keep a factorized codebook alive (`update_usage_ema`,
`restart_dead_codes`). Losses (commitment, codebook, entropy) live in
vimjax/losses.py and read the `aux` dict returned here.

Both quantizers map z: [b, n, features] -> (z_q: [b, n, features], aux) with
  aux["codes"]: int32 [b, n]
  aux["latents"], aux["quantized_latents"]: float32 [b, n, lookup] (lookup space)
  aux["code_counts"]: float32 [codebook_size], histogram over the whole batch
    (a global array under jit, i.e. reduced over every device of the mesh)
and FactorizedQuantizer adds aux["similarity"]: float32 [b, n, codebook_size].
"""
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vimjax.models import layers

Dtype = Any
_HIGHEST = jax.lax.Precision.HIGHEST


def l2_normalize(x, axis=-1, eps=1e-6):
  """x / ||x||, safe at 0."""
  return x * jax.lax.rsqrt(jnp.sum(jnp.square(x), axis=axis, keepdims=True) + eps)


def _histogram(codes, size):
  # one_hot + sum fuses into a reduction; on a mesh it is a global all-reduce.
  return jnp.sum(jax.nn.one_hot(codes, size, dtype=jnp.float32), axis=(0, 1))


def _dense(features, names, dtype, param_dtype, name):
  # layers.Dense: nn.Dense's params, init and values, with the kernel gradient in
  # the form XLA:CPU runs fast (`layers.dense_matmul`).
  return layers.Dense(features, names, dtype=dtype, param_dtype=param_dtype, name=name)


def _check_features(module, z):
  if z.shape[-1] != module.features:
    raise ValueError(f"{type(module).__name__}: input dim {z.shape[-1]} != "
                     f"features={module.features}.")


class FactorizedQuantizer(nn.Module):
  """ViT-VQGAN factorized codes: project to `lookup_dim`, l2-normalise, look up.

  Attributes:
    codebook_size: number of codes K.
    lookup_dim: dimension of the lookup space (paper: 32; 8-16 for best usage).
    features: dim of the input z and of the output z_q.
  """
  codebook_size: int
  lookup_dim: int
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    # The lookup itself runs in float32: argmax over cosine similarities is
    # sensitive to bf16 rounding and the projections are tiny.
    self.down = _dense(self.lookup_dim, ("embed", None), jnp.float32, self.param_dtype,
                       "down")
    self.up = _dense(self.features, (None, "embed"), self.dtype, self.param_dtype, "up")
    self.codebook = self.param(
        "codebook", nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                 ("codebook", None)),
        (self.codebook_size, self.lookup_dim), self.param_dtype)

  def normalized_codebook(self):
    """[codebook_size, lookup_dim] float32, unit-norm rows."""
    return l2_normalize(self.codebook.astype(jnp.float32))

  def __call__(self, z):
    """Quantizes encoder outputs.

    Args:
      z: [b, n, features].
    Returns:
      z_q: [b, n, features] in `dtype` (straight-through gradient to z), and aux
      (see module docstring) with "similarity" [b, n, codebook_size].
    """
    _check_features(self, z)
    latents = l2_normalize(self.down(z.astype(jnp.float32)))
    codebook = self.normalized_codebook()
    # Over [b * n, d] tokens: with two contracting dims ("bnk,bnd->kd") the
    # codebook's gradient on XLA:CPU first copied dS into [k, b, n] (10 ms at
    # issue 13's tokenizer dims); a single token axis reads it in place.
    tokens = latents.reshape(-1, latents.shape[-1])
    similarity = jnp.einsum("td,kd->tk", tokens, codebook, precision=_HIGHEST).reshape(
        *latents.shape[:-1], codebook.shape[0])
    codes = jnp.argmax(similarity, axis=-1).astype(jnp.int32)
    quantized = jnp.take(codebook, codes, axis=0)
    straight_through = latents + jax.lax.stop_gradient(quantized - latents)
    z_q = self.up(straight_through.astype(self.dtype))
    z_q = nn.with_logical_constraint(
        z_q, ("activation_batch", "activation_length", "activation_embed"))
    aux = {"codes": codes, "latents": latents, "quantized_latents": quantized,
           "similarity": similarity,
           "code_counts": _histogram(codes, self.codebook_size)}
    return z_q, aux

  def embed_codes(self, codes):
    """codes: [b, n] int -> [b, n, features], the z_q that `__call__` would give."""
    quantized = jnp.take(self.normalized_codebook(), codes, axis=0)
    return self.up(quantized.astype(self.dtype))


class FiniteScalarQuantizer(nn.Module):
  """FSQ: bound a few scalars and round them; the codebook is implicit.

  Each of the d = len(levels) channels is bounded to `levels[i]` integer values
  (tanh-based; even levels use the paper's half-step offset) and rounded with a
  straight-through gradient. The code index is the mixed-radix number of the
  per-channel digits, so codebook_size = prod(levels).

  Attributes:
    levels: values per channel, each >= 2, e.g. (8, 5, 5, 5) -> 1000 codes.
    features: dim of the input z and of the output z_q.
  """
  levels: Sequence[int]
  features: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  def setup(self):
    if not self.levels or any(int(l) < 2 for l in self.levels):
      raise ValueError(f"FiniteScalarQuantizer: levels={tuple(self.levels)}; need a "
                       "non-empty tuple of ints >= 2.")
    self.down = _dense(len(self.levels), ("embed", None), jnp.float32, self.param_dtype,
                       "down")
    self.up = _dense(self.features, (None, "embed"), self.dtype, self.param_dtype, "up")

  @property
  def codebook_size(self) -> int:
    return math.prod(int(l) for l in self.levels)

  def _consts(self):
    levels = np.asarray(self.levels, np.float32)
    half_width = np.floor(levels / 2)  # digits = rounded + half_width in [0, L)
    basis = np.cumprod([1] + [int(l) for l in self.levels[:-1]]).astype(np.int32)
    return levels, half_width, basis

  def bound(self, z):
    """z: [..., d] -> per channel, within [-floor(L/2), L - 1 - floor(L/2)]."""
    levels, _, _ = self._consts()
    eps = 1e-3
    half_l = (levels - 1) * (1 - eps) / 2
    offset = np.where(levels % 2 == 0, 0.5, 0.0)
    # As in the paper's listing: tan, not arctanh (~equal for L > 2, and still
    # defined for L = 2 where offset / half_l > 1); rounds bound(0) to 0.
    shift = np.tan(offset / half_l)
    return jnp.tanh(z + shift) * half_l - offset

  def codes_to_digits(self, codes):
    """codes: [...] int -> per-channel digits [..., d] int32 in [0, L_i)."""
    levels, _, basis = self._consts()
    return (codes[..., None] // basis) % levels.astype(np.int32)

  def digits_to_codes(self, digits):
    """digits: [..., d] int -> mixed-radix codes [...] int32."""
    _, _, basis = self._consts()
    return jnp.sum(digits.astype(jnp.int32) * basis, axis=-1)

  def __call__(self, z):
    """Quantizes encoder outputs.

    Args:
      z: [b, n, features].
    Returns:
      z_q: [b, n, features] in `dtype`, and aux (see module docstring; latents
      and quantized_latents are the bounded values divided by floor(L/2), so the
      grid lies in [-1, 1]).
    """
    _check_features(self, z)
    _, half_width, _ = self._consts()
    bounded = self.bound(self.down(z.astype(jnp.float32)))
    rounded = jnp.round(bounded)
    latents = bounded / half_width
    quantized = rounded / half_width
    straight_through = latents + jax.lax.stop_gradient(quantized - latents)
    z_q = self.up(straight_through.astype(self.dtype))
    z_q = nn.with_logical_constraint(
        z_q, ("activation_batch", "activation_length", "activation_embed"))
    codes = self.digits_to_codes((rounded + half_width).astype(jnp.int32))
    aux = {"codes": codes, "latents": latents, "quantized_latents": quantized,
           "code_counts": _histogram(codes, self.codebook_size)}
    return z_q, aux

  def codes_to_values(self, codes):
    """codes: [...] -> normalised grid values [..., d] float32 in [-1, 1]."""
    _, half_width, _ = self._consts()
    return (self.codes_to_digits(codes) - half_width) / half_width

  def embed_codes(self, codes):
    """codes: [b, n] int -> [b, n, features], the z_q that `__call__` would give."""
    return self.up(self.codes_to_values(codes).astype(self.dtype))


def update_usage_ema(usage_ema, code_counts, decay: float):
  """Exponential moving average of per-code usage counts.

  Args:
    usage_ema: [K] float32.
    code_counts: [K] float32, counts in the current (global) batch.
    decay: in [0, 1).
  Returns:
    decay * usage_ema + (1 - decay) * code_counts.
  """
  return decay * usage_ema + (1.0 - decay) * code_counts.astype(usage_ema.dtype)


def restart_dead_codes(codebook, usage_ema, latents, rng, threshold: float,
                       quantized_latents=None):
  """Re-initialises codes whose usage EMA fell below `threshold`.

  Each dead code k is replaced by latents[idx[k]], idx drawn over the m
  flattened latents of the *global* batch (pass the same rng on every
  process): uniformly, or -- given `quantized_latents` -- with probability
  proportional to each latent's squared quantization error (k-means++
  seeding), so restarts go to badly served latents rather than to the
  dominant ones (e.g. a uniform background). Its usage EMA is
  set to `threshold` so an unused restart is restarted again next time. Live
  codes and their EMA are untouched. Call after the optimizer update; the
  optimizer moments of restarted rows are left as they are.

  Args:
    codebook: [K, lookup_dim] raw (unnormalised) codebook param.
    usage_ema: [K] float32.
    latents: [..., lookup_dim] l2-normalised encoder latents (aux["latents"]).
    rng: PRNG key.
    threshold: codes with usage_ema < threshold are dead.
    quantized_latents: optional, same shape as latents: the selected codes.
  Returns:
    (new_codebook [K, lookup_dim], new_usage_ema [K]).
  """
  flat = latents.reshape(-1, latents.shape[-1]).astype(codebook.dtype)
  if quantized_latents is None:
    idx = jax.random.randint(rng, (codebook.shape[0],), 0, flat.shape[0])
  else:
    error = jnp.sum(jnp.square(flat - quantized_latents.reshape(flat.shape)), axis=-1)
    # Inverse-CDF draws: O(m + K log m) work. jax.random.categorical(..., shape=(K,))
    # draws a [K, m] Gumbel noise: 3% of the tokenizer step at the benchmark's dims,
    # 8192 x 262144 floats with restarts on at the paper's codebook and batch. The
    # floor makes an all-zero error a uniform draw.
    cdf = jnp.cumsum(error.astype(jnp.float32) + 1e-12)
    targets = jax.random.uniform(rng, (codebook.shape[0],), jnp.float32) * cdf[-1]
    idx = jnp.minimum(jnp.searchsorted(cdf, targets, side="right"), flat.shape[0] - 1)
  dead = usage_ema < threshold
  new_codebook = jnp.where(dead[:, None], jnp.take(flat, idx, axis=0), codebook)
  new_usage = jnp.where(dead, jnp.asarray(threshold, usage_ema.dtype), usage_ema)
  return new_codebook, new_usage
