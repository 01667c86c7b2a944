"""Tests for vimjax/sampling.py: filters vs NumPy, cached == uncached, guidance, mesh."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vimjax import parallel
from vimjax import sampling
from vimjax.models import transformer

B, V, G, D = 4, 24, 4, 32
N = G * G
TEXT = np.array([[5, 6, 7, 1, 0, 0], [8, 9, 1, 0, 0, 0], [3, 1, 0, 0, 0, 0],
                 [4, 4, 4, 4, 1, 0]], np.int32)
LABELS = np.array([0, 3, 4, 1], np.int32)


def _random_params(model, *args, seed=0):
  """(boxed abstract params, NumPy-drawn params): generic weights, no RNG compile."""
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, train=False))
  rs = np.random.RandomState(seed)

  def draw(path, x):
    noise = rs.standard_normal(x.shape).astype(np.float32)
    if jax.tree_util.keystr(path).endswith("['scale']"):
      return jnp.asarray(1.0 + 0.1 * noise)
    return jnp.asarray(noise * (x.shape[0] ** -0.5 if x.ndim >= 2 else 0.1))

  params = jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(abstract["params"]))
  return abstract["params"], params


@pytest.fixture(scope="module")
def vim():
  model = transformer.VIM(vocab_size=V, grid_h=G, grid_w=G, num_layers=2, num_heads=2,
                          emb_dim=D, mlp_dim=64, num_classes=5)
  return (model,) + _random_params(model, jnp.zeros((B, N), jnp.int32), jnp.asarray(LABELS))


@pytest.fixture(scope="module")
def parti():
  model = transformer.Parti(text_vocab_size=16, max_text_length=8, vocab_size=V, grid_h=G,
                            grid_w=G, encoder_layers=1, decoder_layers=2, num_heads=2,
                            emb_dim=D, mlp_dim=64, conv_attention_kernel=(2, 3))
  return (model,) + _random_params(model, jnp.asarray(TEXT), jnp.zeros((B, N), jnp.int32))


# ----------------------------------------------------------------------------- filters


def _logits(shape=(3, 20), seed=0):
  return np.random.RandomState(seed).randn(*shape).astype(np.float32) * 2


def test_apply_temperature():
  x = _logits()
  np.testing.assert_allclose(sampling.apply_temperature(jnp.asarray(x), 0.5), x / 0.5,
                             rtol=1e-6)


@pytest.mark.parametrize("k", [1, 5, 19, 0, 20, 50])
def test_top_k_filter_matches_numpy(k):
  x = _logits()
  got = np.asarray(sampling.top_k_filter(jnp.asarray(x), k))
  ref = x.copy()
  if 0 < k < x.shape[-1]:
    for row in ref:
      row[np.argsort(-row)[k:]] = -np.inf
  np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("p", [1e-4, 0.3, 0.75, 0.95, 1.0])
def test_top_p_filter_matches_numpy(p):
  x = _logits((4, 30), seed=1)
  got = np.asarray(sampling.top_p_filter(jnp.asarray(x), p))
  ref = np.full_like(x, -np.inf)
  for r, row in enumerate(x.astype(np.float64)):
    probs = np.exp(row - row.max())
    probs /= probs.sum()
    total = 0.0
    for j in np.argsort(-row):  # Smallest top set whose mass reaches p, >= 1 token.
      ref[r, j] = x[r, j]
      total += probs[j]
      if total >= p:
        break
  np.testing.assert_array_equal(got, ref)
  assert (np.isfinite(got).sum(-1) >= 1).all()


@pytest.mark.parametrize("scale", [0.0, 1.0, 1.2, 3.0])
def test_guided_logits_matches_numpy(scale):
  cond, uncond = _logits(seed=2), _logits(seed=3)
  got = sampling.guided_logits(jnp.asarray(cond), jnp.asarray(uncond), scale)
  np.testing.assert_allclose(got, uncond + scale * (cond - uncond), rtol=1e-5, atol=1e-5)
  if scale == 1.0:
    np.testing.assert_allclose(got, cond, rtol=1e-6, atol=1e-6)


def test_bad_arguments_are_rejected(vim):
  model, _, params = vim
  with pytest.raises(ValueError, match="top_p=0"):
    sampling.sample_vim(model, params, LABELS, num_tokens=N, rng=jax.random.key(0), top_p=0.0)
  with pytest.raises(ValueError, match="cache_segments=0"):
    sampling.sample_vim(model, params, LABELS, num_tokens=N, rng=jax.random.key(0),
                        cache_segments=0)
  uncond = transformer.VIM(vocab_size=V, grid_h=G, grid_w=G, num_layers=1, num_heads=2,
                           emb_dim=D, mlp_dim=64, num_classes=0)
  with pytest.raises(ValueError, match="cfg_scale=2.0"):
    sampling.sample_vim(uncond, params, None, batch_size=2, num_tokens=N,
                        rng=jax.random.key(0), cfg_scale=2.0)


# ----------------------------------------------------------------------------- decoding

SETTINGS = [dict(temperature=1.0), dict(temperature=0.7, top_k=5),
            dict(top_p=0.8, cfg_scale=2.0)]


@pytest.mark.parametrize("kw", SETTINGS)
def test_vim_cached_equals_uncached(vim, kw):
  model, _, params = vim
  run = lambda use_cache, seed=1: np.asarray(sampling.sample_vim(
      model, params, LABELS, num_tokens=N, rng=jax.random.key(seed), use_cache=use_cache,
      **kw))
  cached = run(True)
  assert cached.shape == (B, N) and cached.dtype == np.int32
  assert cached.min() >= 0 and cached.max() < V
  np.testing.assert_array_equal(cached, run(False))
  assert not np.array_equal(cached, run(True, seed=2))  # The rng matters.


@pytest.mark.parametrize("kw", SETTINGS)
def test_parti_cached_equals_uncached(parti, kw):
  model, _, params = parti
  run = lambda use_cache: np.asarray(sampling.sample_parti(
      model, params, TEXT, rng=jax.random.key(1), use_cache=use_cache, **kw))
  cached = run(True)
  assert cached.shape == (B, N) and cached.dtype == np.int32
  np.testing.assert_array_equal(cached, run(False))


def test_vim_greedy_guided_tokens_are_argmax_of_guided_forward(vim):
  """Independent check of position handling and guidance: re-score the output."""
  model, _, params = vim
  scale = 1.5
  tokens = sampling.sample_vim(model, params, LABELS, num_tokens=N, rng=jax.random.key(0),
                               temperature=0.0, cfg_scale=scale)
  cond = model.apply({"params": params}, tokens, jnp.asarray(LABELS), train=False)
  uncond = model.apply({"params": params}, tokens, None, train=False)
  ref = np.argmax(np.asarray(uncond) + scale * np.asarray(cond - uncond), axis=-1)
  np.testing.assert_array_equal(np.asarray(tokens), ref)


def test_parti_greedy_tokens_are_argmax_of_forward(parti):
  model, _, params = parti
  tokens = sampling.sample_parti(model, params, TEXT, rng=jax.random.key(0),
                                 temperature=0.0)
  logits = model.apply({"params": params}, jnp.asarray(TEXT), tokens, train=False)
  np.testing.assert_array_equal(np.asarray(tokens), np.argmax(np.asarray(logits), -1))


def _record_batch_sizes(module_type, method):
  sizes = []

  def interceptor(next_fun, args, kwargs, context):
    if isinstance(context.module, module_type) and context.method_name == method:
      sizes.append(args[0].shape[0])
    return next_fun(*args, **kwargs)
  return sizes, interceptor


@pytest.mark.parametrize("use_cache", [True, False])
def test_guidance_runs_one_batch_of_2b_rows(vim, parti, use_cache):
  model, _, params = vim
  sizes, interceptor = _record_batch_sizes(transformer.VIM, "__call__")
  with nn.intercept_methods(interceptor):  # top_k=3: a fresh trace, so calls are seen.
    sampling.sample_vim(model, params, LABELS, num_tokens=N, rng=jax.random.key(0),
                        cfg_scale=3.0, top_k=3, use_cache=use_cache)
  # Cached: the cache-creating call + one loop body per segment; uncached: one body.
  calls = 1 + sampling.CACHE_SEGMENTS if use_cache else 1
  assert sizes == [2 * B] * calls

  model, _, params = parti
  sizes, interceptor = _record_batch_sizes(transformer.Parti, "decode")
  with nn.intercept_methods(interceptor):
    sampling.sample_parti(model, params, TEXT, rng=jax.random.key(0), cfg_scale=3.0,
                          top_k=3, use_cache=use_cache)
  assert sizes == [2 * B] * calls


def _flops(fn, *args):
  return jax.jit(fn).lower(*args).compile().cost_analysis().get("flops", 0.0)


def test_unconditional_vim_sampling():
  model = transformer.VIM(vocab_size=V, grid_h=G, grid_w=G, num_layers=1, num_heads=2,
                          emb_dim=D, mlp_dim=64, num_classes=0)
  _, params = _random_params(model, jnp.zeros((2, N), jnp.int32), None)
  run = lambda use_cache: np.asarray(sampling.sample_vim(
      model, params, None, batch_size=2, num_tokens=N, rng=jax.random.key(4), top_p=0.9,
      use_cache=use_cache))
  cached = run(True)
  assert cached.shape == (2, N)
  np.testing.assert_array_equal(cached, run(False))


def test_bfloat16_sampling_casts_the_params_once_and_decodes_in_bfloat16(parti):
  """dtype="bfloat16": the weights are cast before the decode loops (one f32 -> bf16
  convert per kernel in the whole program), every step's matmuls take bf16 weights,
  and the greedy tokens are the argmax of a bfloat16 full forward over them."""
  model, _, params = parti
  run = lambda **kw: sampling.sample_parti(model, params, TEXT, rng=jax.random.key(0),
                                           temperature=0.0, cfg_scale=2.0, **kw)
  wi = f"{D}x{model.mlp_dim}"  # The MLP input kernels' shape.
  kernels = sum(x.shape == (D, model.mlp_dim) for x in jax.tree.leaves(params))
  bf16, f32 = run(dtype="bfloat16", lower=True).as_text(), run(lower=True).as_text()
  assert bf16.count(f"(tensor<{wi}xf32>) -> tensor<{wi}xbf16>") == kernels == 3
  dots = lambda hlo: [l for l in hlo.splitlines() if "stablehlo.dot_general" in l]
  assert any(f"tensor<{wi}xbf16>" in l for l in dots(bf16))
  assert not any(f"tensor<{wi}xf32>" in l for l in dots(bf16))
  assert any(f"tensor<{wi}xf32>" in l for l in dots(f32)) and "bf16" not in f32

  tokens = np.asarray(run(dtype="bfloat16"))
  cast = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  bf16_model = model.clone(dtype=jnp.bfloat16)
  forward = lambda drop: np.asarray(bf16_model.apply(
      {"params": cast}, jnp.asarray(TEXT), jnp.asarray(tokens), train=False,
      drop_condition=jnp.full((B,), drop)), np.float32)
  cond, uncond = forward(False), forward(True)
  guided = uncond + 2.0 * (cond - uncond)
  chosen = np.take_along_axis(guided, tokens[..., None], -1)[..., 0]
  # The argmax up to bfloat16 rounding (cached steps and the full forward round apart).
  np.testing.assert_array_less(guided.max(-1) - chosen, 0.1)
  assert (tokens == guided.argmax(-1)).mean() > 0.9
  with pytest.raises(ValueError, match=r"dtype='float16'; valid: \('float32', 'bfloat16'\)"):
    run(dtype="float16")


@pytest.mark.parametrize("segments", [1, 3, N + 2])
def test_cache_segments_give_the_same_tokens(vim, parti, segments):
  """Any number of decode loops (more than tokens too) draws the default's tokens."""
  model, _, params = vim
  run = lambda n, **kw: np.asarray(sampling.sample_vim(
      model, params, LABELS, num_tokens=n, rng=jax.random.key(4), top_k=5, **kw))
  for n in (N, 7):
    np.testing.assert_array_equal(run(n, cache_segments=segments), run(n), err_msg=str(n))
  model, _, params = parti
  run = lambda **kw: np.asarray(sampling.sample_parti(
      model, params, TEXT, rng=jax.random.key(4), cfg_scale=2.0, **kw))
  np.testing.assert_array_equal(run(cache_segments=segments), run())


def test_each_cache_segment_reads_a_cache_of_its_length(parti):
  """With S segments the decode loops attend over caches of N/S, 2N/S, ... positions."""
  model, _, params = parti
  head_dim = model.emb_dim // model.num_heads
  hlo = lambda s: sampling.sample_parti(model, params, TEXT, rng=jax.random.key(0),
                                        cache_segments=s, lower=True).as_text()
  key_cache = lambda length: f"tensor<{B}x{model.num_heads}x{head_dim}x{length}xf32>"
  segmented, single = hlo(4), hlo(1)
  for length in (4, 8, 12):
    assert key_cache(length) in segmented and key_cache(length) not in single, length
  assert key_cache(N) in single


def test_cache_creation_drops_the_dummy_forward(vim):
  """Only the cache of the full-length decode=True call is kept: XLA removes the rest."""
  model, _, params = vim
  tokens, labels = jnp.zeros((B, N), jnp.int32), jnp.asarray(LABELS)
  apply = lambda p, **kw: model.apply({"params": p}, tokens, labels, train=False, **kw)
  assert _flops(lambda p: apply(p), params) > 1e5
  assert _flops(lambda p: apply(p, decode=True, mutable=["cache"])[1], params) < 100


def test_cached_step_costs_one_position(vim, parti):
  """A decode step does ~1/n of a full forward (no prefix recompute, no text re-projection)."""
  model, _, params = parti
  text, tokens = jnp.asarray(TEXT), jnp.zeros((B, N), jnp.int32)
  encoded, mask = model.apply({"params": params}, text, method="encode")
  decode = lambda p, t, **kw: model.apply(p, encoded, mask, t, train=False, method="decode",
                                          **kw)
  cache = jax.eval_shape(
      lambda p: decode({"params": p}, tokens, decode=True, mutable=["cache"])[1], params)
  full = _flops(lambda p: decode({"params": p}, tokens), params)
  step = _flops(lambda p, c: decode({"params": p, **c}, tokens[:, :1], decode=True,
                                    mutable=["cache"]), params, cache)
  assert step < 1.3 * full / N, (step, full / N)

  model, _, params = vim
  labels = jnp.asarray(LABELS)
  apply = lambda p, t, **kw: model.apply(p, t, labels, train=False, **kw)
  cache = jax.eval_shape(
      lambda p: apply({"params": p}, tokens, decode=True, mutable=["cache"])[1], params)
  full = _flops(lambda p: apply({"params": p}, tokens), params)
  step = _flops(lambda p, c: apply({"params": p, **c}, tokens[:, :1], decode=True,
                                   mutable=["cache"]), params, cache)
  assert step < 1.3 * full / N, (step, full / N)


def _mesh_2x4():
  mesh = parallel.create_mesh(dict(data=2, fsdp=1, tensor=4), jax.devices()[:8])
  return mesh, parallel.DEFAULT_RULES


def test_sampling_on_a_2x4_mesh_matches_unsharded(vim, parti):
  mesh, rules = _mesh_2x4()
  kw = dict(temperature=0.9, top_k=7, top_p=0.9, cfg_scale=1.5)
  runs = {
      "vim": (vim, lambda p, x: sampling.sample_vim(
          vim[0], p, x, num_tokens=N, rng=jax.random.key(3), **kw), LABELS),
      "parti": (parti, lambda p, x: sampling.sample_parti(
          parti[0], p, x, rng=jax.random.key(3), **kw), TEXT),
  }
  for name, ((_, abstract, params), sample, inputs) in runs.items():
    shardings = parallel.logical_to_shardings(abstract, mesh, rules)
    sharded = jax.device_put(params, shardings)
    assert any(len(s.device_set) > 1 and not s.is_fully_replicated
               for s in jax.tree.leaves(shardings))
    with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
      x = jax.device_put(inputs, parallel.batch_sharding(mesh))
      on_mesh = np.asarray(sample(sharded, x))
    np.testing.assert_array_equal(on_mesh, np.asarray(sample(params, inputs)), err_msg=name)
