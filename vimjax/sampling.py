"""Autoregressive sampling for VIM and Parti: KV-cache decoding, filters, guidance.

One jitted decode loop (`jax.lax.fori_loop`) per call. The cached path creates
the "cache" collection once (an apply with decode=True on full-length dummy
tokens, of which only the cache is kept; XLA drops the unused forward) and
then feeds one token per step, so a step does O(1) new work apart from
attending over the cache. The reference path (`use_cache=False`) recomputes
the full teacher-forced forward every step and reads the current position.

Random draws depend only on (rng, position): step i samples with
`fold_in(rng, i)`, so both paths draw identical tokens from identical logits.
Classifier-free guidance runs the conditional and unconditional rows as one
batch of 2b rows and combines their logits with `guided_logits`.
Filter order per step: guidance -> temperature -> top-k -> top-p.
The decode computes in `dtype` (config.sampling.dtype): in bfloat16 the floating
params are cast once per call, before the loop, so each step streams half the
weight bytes (LayerNorm and the logits still compute in float32).
Nothing in the loop syncs with the host, so it runs unchanged on sharded
params/inputs under a mesh.
"""
import functools

import jax
import jax.numpy as jnp

from vimjax.models import layers
from vimjax.models import transformer

_NEG_INF = -jnp.inf
# Decode loops per cached sampling call (`_decode_loop`): the steps of loop s of S
# read a cache of (s + 1) / S of the positions, (S + 1) / 2S of it on average.
CACHE_SEGMENTS = 4
# Compute dtypes a sampler decodes in (config.sampling.dtype; None = the model's).
DTYPES = ("float32", "bfloat16")


def apply_temperature(logits, temperature):
  """logits / temperature. logits: [..., vocab]; temperature > 0 (scalar)."""
  return logits / jnp.asarray(temperature, logits.dtype)


def top_k_filter(logits, k: int):
  """Keeps the k largest logits per row (ties at the k-th value kept), the rest -inf.

  Args:
    logits: [..., vocab] float.
    k: static int; k <= 0 or k >= vocab keeps everything.
  """
  if k <= 0 or k >= logits.shape[-1]:
    return logits
  kth = jax.lax.top_k(logits, k)[0][..., -1:]
  return jnp.where(logits < kth, _NEG_INF, logits)


def top_p_filter(logits, p):
  """Nucleus filter: keeps the smallest set of top tokens whose probability >= p.

  A token is kept when the probability mass strictly above it (in descending
  order) is < p, so the most likely token is always kept; tokens tied with the
  least likely kept one are kept too.

  Args:
    logits: [..., vocab] float.
    p: scalar in (0, 1]; 1 keeps everything.
  """
  sorted_logits = -jnp.sort(-logits, axis=-1)
  probs = jax.nn.softmax(sorted_logits.astype(jnp.float32), axis=-1)
  mass_before = jnp.cumsum(probs, axis=-1) - probs
  keep_sorted = (mass_before < p).at[..., 0].set(True)
  # Kept tokens are a prefix of the sorted order: threshold at its last logit.
  cutoff = jnp.min(jnp.where(keep_sorted, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits < cutoff, _NEG_INF, logits)


def guided_logits(cond_logits, uncond_logits, scale):
  """Classifier-free guidance: uncond + scale * (cond - uncond); 1.0 = cond only."""
  return uncond_logits + scale * (cond_logits - uncond_logits)


def _filter_and_sample(logits, rng, temperature, top_k, top_p, greedy, use_top_p):
  """logits [b, vocab] float32 -> tokens [b] int32."""
  if greedy:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = apply_temperature(logits, temperature)
  logits = top_k_filter(logits, top_k)
  if use_top_p:
    logits = top_p_filter(logits, top_p)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def _segment_bounds(num_tokens: int, segments: int):
  """[(start, end)] of `segments` near-equal runs of positions (empty ones dropped)."""
  bounds = [round(num_tokens * s / segments) for s in range(segments + 1)]
  return [(a, b) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _decode_loop(step_logits, state, num_tokens, batch, rng, temperature, top_k, top_p,
                 cfg_scale, guided, greedy, use_top_p, resize_state=None, segments=1):
  """Shared fori_loops: `step_logits(i, prev [B], tokens [B, n], state)` -> (logits
  [B, vocab], state), with B = 2 * batch under guidance (cond rows first).

  With `resize_state(state, length)`, the positions run in `segments` loops and
  each loop's state is resized to the positions it reaches first (the KV caches:
  a step reads its whole cache, so early steps read less; one compiled step per
  segment).
  """
  rows = 2 * batch if guided else batch

  def body(i, carry):
    tokens, prev, state = carry
    logits, state = step_logits(i, prev, tokens, state)
    logits = logits.astype(jnp.float32)
    if guided:
      logits = guided_logits(logits[:batch], logits[batch:], cfg_scale)
    new = _filter_and_sample(logits, jax.random.fold_in(rng, i), temperature, top_k,
                             top_p, greedy, use_top_p)
    if guided:
      new = jnp.concatenate([new, new])
    tokens = jax.lax.dynamic_update_slice_in_dim(tokens, new[:, None], i, axis=1)
    return tokens, new, state

  tokens = jnp.zeros((rows, num_tokens), jnp.int32)
  prev = jnp.zeros((rows,), jnp.int32)
  if resize_state is None:
    segments = 1
  for start, end in _segment_bounds(num_tokens, segments):
    if resize_state is not None:
      state = resize_state(state, end)
    tokens, prev, state = jax.lax.fori_loop(start, end, body, (tokens, prev, state))
  return tokens[:batch]


def _in_dtype(model, dtype):
  """`model` computing in `dtype` (None or its own: unchanged)."""
  if dtype is None:
    return model
  if dtype not in DTYPES:
    raise ValueError(f"dtype={dtype!r}; valid: {DTYPES} (None = the model's dtype).")
  return model.clone(dtype=jnp.dtype(dtype))


def _params_in(params, dtype):
  """Floating params wider than `dtype` cast to it (inside the jitted call, before
  the decode loop: the cast runs once per call, not per step)."""
  def cast(p):
    if jnp.issubdtype(p.dtype, jnp.floating) and p.dtype.itemsize > jnp.dtype(dtype).itemsize:
      return p.astype(dtype)
    return p
  return jax.tree.map(cast, params)


def _check(num_tokens, temperature, top_k, top_p, cache_segments):
  if num_tokens < 1:
    raise ValueError(f"num_tokens={num_tokens} must be >= 1.")
  if temperature < 0:
    raise ValueError(f"temperature={temperature} must be >= 0 (0 = greedy).")
  if top_k < 0:
    raise ValueError(f"top_k={top_k} must be >= 0 (0 = off).")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p={top_p} must be in (0, 1] (1 = off).")
  if cache_segments < 1:
    raise ValueError(f"cache_segments={cache_segments} must be >= 1 (1 = one decode loop "
                     "over the full cache).")


@functools.partial(jax.jit, static_argnames=(
    "model", "num_tokens", "top_k", "guided", "greedy", "use_top_p", "use_cache",
    "cache_segments"))
def _sample_vim(model, params, labels, rng, temperature, top_p, cfg_scale, *, num_tokens,
                top_k, guided, greedy, use_top_p, use_cache, cache_segments):
  batch = labels.shape[0]
  if guided:
    labels = jnp.concatenate([labels, jnp.full_like(labels, model.null_label)])
  variables = {"params": _params_in(params, model.dtype)}
  apply_labels = None if model.num_classes == 0 else labels
  dummy = jnp.zeros((labels.shape[0], num_tokens), jnp.int32)

  if use_cache:
    _, init = model.apply(variables, dummy, apply_labels, train=False, decode=True,
                          mutable=["cache"])

    def step_logits(i, prev, tokens, cache):
      del i, tokens
      logits, mut = model.apply({**variables, "cache": cache}, prev[:, None], apply_labels,
                                train=False, decode=True, mutable=["cache"])
      return logits[:, 0], mut["cache"]
    state = init["cache"]
  else:
    def step_logits(i, prev, tokens, state):
      del prev
      logits = model.apply(variables, tokens, apply_labels, train=False)
      return jax.lax.dynamic_index_in_dim(logits, i, axis=1, keepdims=False), state
    state = ()
  return _decode_loop(step_logits, state, num_tokens, batch, rng, temperature, top_k,
                      top_p, cfg_scale, guided, greedy, use_top_p,
                      layers.resize_decode_caches if use_cache else None, cache_segments)


def sample_vim(model: transformer.VIM, params, labels, *, rng, num_tokens: int | None = None,
               temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
               cfg_scale: float = 1.0, use_cache: bool = True, batch_size: int | None = None,
               cache_segments: int = CACHE_SEGMENTS, dtype: str | None = None,
               lower: bool = False):
  """Samples image tokens from VIM.

  Args:
    model: the VIM module.
    params: its params (unboxed; may be sharded).
    labels: [b] int32 class ids, or None for an unconditional model (then
      `batch_size` gives b).
    num_tokens: tokens per image, <= grid_h * grid_w (None = all of them).
    rng: jax PRNG key.
    temperature: > 0, or 0 for greedy (argmax).
    top_k: keep the k most likely tokens (0 = off).
    top_p: nucleus mass (1.0 = off).
    cfg_scale: classifier-free guidance scale (1.0 = conditional only; needs
      a class-conditional model otherwise).
    use_cache: KV-cache decoding; False recomputes the full forward each step.
    batch_size: b when labels is None.
    cache_segments: the cached decode runs in this many loops, each with a KV
      cache only as long as the positions it reaches (steps read less of it;
      each loop compiles its own step). 1 = one loop over the full cache.
    dtype: the decode's compute dtype, one of DTYPES (None = the model's); params
      wider than it are cast to it once per call.
    lower: return the `jax.stages.Lowered` call instead (to compile it ahead of
      time or read its HLO); the same jit cache entry as the sampling call.
  Returns:
    tokens [b, num_tokens] int32.
  """
  model = _in_dtype(model, dtype)
  num_tokens = model.num_tokens if num_tokens is None else int(num_tokens)
  if num_tokens > model.num_tokens:
    raise ValueError(f"num_tokens={num_tokens} exceeds the model's grid_h * grid_w = "
                     f"{model.num_tokens}.")
  _check(num_tokens, temperature, top_k, top_p, cache_segments)
  if labels is None:
    if batch_size is None:
      raise ValueError("sample_vim: pass labels [b] or batch_size for an unconditional model.")
    labels = jnp.full((batch_size,), model.null_label, jnp.int32)
  elif model.num_classes == 0:
    raise ValueError("sample_vim: the model is unconditional (num_classes=0); pass labels=None.")
  guided = cfg_scale != 1.0
  if guided and model.num_classes == 0:
    raise ValueError(f"cfg_scale={cfg_scale} needs a class-conditional VIM (num_classes > 0).")
  call = _sample_vim.lower if lower else _sample_vim
  return call(model, params, jnp.asarray(labels, jnp.int32), rng,
                     jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p),
                     jnp.float32(cfg_scale), num_tokens=num_tokens, top_k=int(top_k),
                     guided=guided, greedy=temperature == 0, use_top_p=top_p < 1.0,
                     use_cache=use_cache, cache_segments=int(cache_segments))


@functools.partial(jax.jit, static_argnames=(
    "model", "top_k", "guided", "greedy", "use_top_p", "use_cache", "cache_segments"))
def _sample_parti(model, params, text_ids, rng, temperature, top_p, cfg_scale, *, top_k,
                  guided, greedy, use_top_p, use_cache, cache_segments):
  batch = text_ids.shape[0]
  variables = {"params": _params_in(params, model.dtype)}
  drop = jnp.zeros((batch,), bool)
  if guided:  # Conditional rows first, then the same texts dropped to the null context.
    text_ids = jnp.concatenate([text_ids, text_ids])
    drop = jnp.concatenate([drop, jnp.ones((batch,), bool)])
  encoded, encoder_mask = model.apply(variables, text_ids, drop, train=False,
                                      method=transformer.Parti.encode)
  num_tokens = model.num_tokens
  dummy = jnp.zeros((text_ids.shape[0], num_tokens), jnp.int32)
  decode = functools.partial(model.apply, method=transformer.Parti.decode)

  if use_cache:
    _, init = decode(variables, encoded, encoder_mask, dummy, train=False, decode=True,
                     mutable=["cache"])

    def step_logits(i, prev, tokens, cache):
      del i, tokens
      logits, mut = decode({**variables, "cache": cache}, encoded, encoder_mask,
                           prev[:, None], train=False, decode=True, mutable=["cache"])
      return logits[:, 0], mut["cache"]
    state = init["cache"]
  else:
    def step_logits(i, prev, tokens, state):
      del prev
      logits = decode(variables, encoded, encoder_mask, tokens, train=False)
      return jax.lax.dynamic_index_in_dim(logits, i, axis=1, keepdims=False), state
    state = ()
  return _decode_loop(step_logits, state, num_tokens, batch, rng, temperature, top_k,
                      top_p, cfg_scale, guided, greedy, use_top_p,
                      layers.resize_decode_caches if use_cache else None, cache_segments)


def sample_parti(model: transformer.Parti, params, text_ids, *, rng,
                 temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0,
                 cfg_scale: float = 1.0, use_cache: bool = True,
                 cache_segments: int = CACHE_SEGMENTS, dtype: str | None = None,
                 lower: bool = False):
  """Samples grid_h * grid_w image tokens per text from Parti.

  Args:
    model: the Parti module.
    params: its params (unboxed; may be sharded).
    text_ids: [b, L] int32 SentencePiece ids (pad 0).
    rng: jax PRNG key.
    temperature, top_k, top_p: as in `sample_vim`.
    cfg_scale: classifier-free guidance scale (Parti: 1.2; 1.0 = off).
    use_cache: KV-cache decoding; False recomputes the full forward each step.
    cache_segments, dtype, lower: as in `sample_vim`.
  Returns:
    tokens [b, grid_h * grid_w] int32.
  """
  model = _in_dtype(model, dtype)
  _check(model.num_tokens, temperature, top_k, top_p, cache_segments)
  call = _sample_parti.lower if lower else _sample_parti
  return call(model, params, jnp.asarray(text_ids, jnp.int32), rng,
                       jnp.float32(max(temperature, 1e-6)), jnp.float32(top_p),
                       jnp.float32(cfg_scale), top_k=int(top_k), guided=cfg_scale != 1.0,
                       greedy=temperature == 0, use_top_p=top_p < 1.0,
                       use_cache=use_cache, cache_segments=int(cache_segments))
