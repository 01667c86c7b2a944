"""Tests for vimjax/models/layers.py: masks, attention numerics, cache, scan, remat."""
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from vimjax import parallel
from vimjax.models import layers

B, L, D, H, MLP = 2, 6, 16, 4, 32


def _x(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape, jnp.float32)


def _key(seed=0):
  # rbg keys: jitted init compiles ~2x faster on CPU than threefry.
  return jax.random.key(seed, impl="rbg")


def _init(mod, *args, **kw):
  return jax.jit(functools.partial(mod.init, **kw))(_key(), *args)


def _apply(mod, variables, *args, **kw):
  return jax.jit(functools.partial(mod.apply, **kw))(variables, *args)


def _stack(**kw):
  cfg = dict(num_layers=2, num_heads=H, mlp_dim=MLP, causal=True)
  cfg.update(kw)
  return layers.TransformerStack(**cfg)


# ----------------------------------------------------------------------------- masks


def test_causal_mask_is_lower_triangular():
  m = np.asarray(layers.make_causal_mask(5))
  assert m.shape == (1, 1, 5, 5) and m.dtype == np.bool_
  np.testing.assert_array_equal(m[0, 0], np.tril(np.ones((5, 5), bool)))


@pytest.mark.parametrize("h,w,kh,kw", [(4, 5, 2, 3), (5, 5, 3, 3), (3, 6, 1, 4), (4, 4, 9, 9),
                                        (8, 12, 6, 11)])
def test_conv_shaped_causal_mask_matches_brute_force(h, w, kh, kw):
  # The window is centred on the predicted cell i; key j holds the token of cell j - 1.
  ref = np.zeros((h * w, h * w), bool)
  ref[:, 0] = True  # The start token.
  for i in range(h * w):
    ri, ci = divmod(i, w)
    for m in range(i):  # Tokens before the predicted one.
      rm, cm = divmod(m, w)
      ref[i, m + 1] = ri - kh + 1 <= rm <= ri and ci - kw // 2 <= cm <= ci + (kw - 1) // 2
  got = np.asarray(layers.conv_shaped_causal_mask(h, w, kh, kw))
  assert got.shape == (1, 1, h * w, h * w)
  np.testing.assert_array_equal(got[0, 0], ref)
  if kh >= h and kw >= 2 * w:  # A window covering the image is plain causal.
    np.testing.assert_array_equal(got[0, 0], np.tril(np.ones((h * w,) * 2, bool)))


def test_conv_shaped_mask_window_is_centred_on_the_predicted_token():
  # DALL-E's (6, 11) kernel: predicting (5, 5) sees the 5 columns either side
  # in the rows above, and the 5 tokens to its left in its own row.
  w = 12
  row = np.asarray(layers.conv_shaped_causal_mask(8, w, 6, 11))[0, 0, 5 * w + 5, 1:]
  seen = {divmod(m, w) for m in np.flatnonzero(row)}
  expected = {(r, c) for r in range(5) for c in range(11)} | {(5, c) for c in range(5)}
  assert seen == expected


def test_conv_shaped_causal_mask_rejects_bad_kernel():
  with pytest.raises(ValueError, match="kernel_w=0"):
    layers.conv_shaped_causal_mask(4, 4, 3, 0)


# ----------------------------------------------------------------------------- numerics


def test_layer_norm_matches_numpy_and_casts():
  x = _x((B, L, D)) * 3 + 1
  mod = layers.LayerNorm(dtype=jnp.bfloat16)
  params = _init(mod, x)
  params = jax.tree.map(lambda p: p + 0.5, params)  # non-trivial scale/bias
  y = _apply(mod, params, x)
  assert y.dtype == jnp.bfloat16
  assert params["params"]["scale"].unbox().dtype == jnp.float32
  xn = np.asarray(x, np.float64)
  ref = (xn - xn.mean(-1, keepdims=True)) / np.sqrt(xn.var(-1, keepdims=True) + 1e-6)
  ref = ref * 1.5 + 0.5
  np.testing.assert_allclose(np.asarray(y, np.float32), ref, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("implementation", ["auto", "dot_product_attention", "xla"])
def test_attention_matches_numpy_reference_with_mask(implementation):
  xq, xkv = _x((B, 3, D), 1), _x((B, 5, 8), 2)  # cross-attention, other dims
  mask = np.random.RandomState(0).rand(B, 1, 3, 5) > 0.3
  mask[..., 0] = True
  mod = layers.Attention(num_heads=2, head_dim=6, implementation=implementation)
  params = nn.meta.unbox(_init(mod, xq, xkv, deterministic=True))
  out = _apply(mod, params, xq, xkv, jnp.asarray(mask), deterministic=True)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params["params"])
  q = np.einsum("bld,dhk->blhk", xq, p["query"]["kernel"]) + p["query"]["bias"]
  k = np.einsum("bld,dhk->blhk", xkv, p["key"]["kernel"]) + p["key"]["bias"]
  v = np.einsum("bld,dhk->blhk", xkv, p["value"]["kernel"]) + p["value"]["bias"]
  logits = np.einsum("bqhk,bshk->bhqs", q, k) / np.sqrt(6)
  logits = np.where(mask, logits, -np.inf)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  o = np.einsum("bhqs,bshk->bqhk", w, v)
  ref = np.einsum("bqhk,hkd->bqd", o, p["out"]["kernel"]) + p["out"]["bias"]
  assert out.shape == (B, 3, D)
  np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)


def test_attention_implementations_agree_causal_and_reject_unknown():
  x = _x((B, 7, D), 3)
  outs = {}
  for implementation in ("dot_product_attention", "xla"):
    mod = layers.Attention(num_heads=2, head_dim=6, implementation=implementation)
    params = nn.meta.unbox(_init(mod, x, x, deterministic=True))
    outs[implementation] = _apply(mod, params, x, x, deterministic=True, causal=True)
  np.testing.assert_allclose(outs["xla"], outs["dot_product_attention"], rtol=1e-5, atol=1e-6)
  # Causal: the first position sees only itself, so later inputs cannot move it.
  x2 = x.at[:, 1:].set(0.0)
  out2 = _apply(mod, params, x2, x2, deterministic=True, causal=True)
  np.testing.assert_allclose(out2[:, 0], outs["xla"][:, 0], rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match="implementation='flash'"):
    _apply(layers.Attention(num_heads=2, head_dim=6, implementation="flash"), params, x, x,
           deterministic=True)


@pytest.mark.parametrize("mask_kind", ["none", "conv", "padding"])
def test_causal_attention_in_two_row_blocks_matches_numpy(mask_kind):
  """Causal heads_major_attention (even length: two row blocks) against float64
  NumPy softmax attention over the full causal mask, values and gradients; the
  full [length, length] logits are never made."""
  b, length, heads, dim = 2, 8, 2, 4
  rs = np.random.RandomState(3)
  q, k, v, g = (rs.randn(b, length, heads, dim) for _ in range(4))
  mask = {"none": None, "conv": layers.conv_shaped_causal_mask(2, 4, 1, 3),
          "padding": jnp.asarray(np.arange(length) < 6)[None, None, None, :]}[mask_kind]
  allowed = np.tril(np.ones((length, length), bool))
  if mask is not None:
    allowed = allowed & np.asarray(mask)

  def reference(q, k, v):
    logits = np.einsum("bqhd,bkhd->bhqk", q, k)
    logits = np.where(allowed, logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    return np.einsum("bhqk,bkhd->bqhd", w / w.sum(-1, keepdims=True), v)

  attend = lambda q, k, v: layers.heads_major_attention(q, k, v, mask, causal=True)
  f32 = lambda x: jnp.asarray(x, jnp.float32)
  out, vjp = jax.vjp(attend, f32(q), f32(k), f32(v))
  np.testing.assert_allclose(out, reference(q, k, v), rtol=1e-4, atol=1e-5)
  eps = 1e-6  # Central differences of the float64 reference, along g.
  for i, got in enumerate(vjp(f32(g))):
    args = [q, k, v]
    want = np.zeros_like(args[i])
    for idx in np.ndindex(*args[i].shape):
      plus, minus = [a.copy() for a in args], [a.copy() for a in args]
      plus[i][idx] += eps
      minus[i][idx] -= eps
      want[idx] = np.sum((reference(*plus) - reference(*minus)) * g) / (2 * eps)
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-4, err_msg=str(i))
  hlo = jax.jit(attend).lower(f32(q), f32(k), f32(v)).as_text()
  assert f"{length}x{length}xf32" not in hlo and f"{length // 2}x{length}xf32" in hlo


def test_dense_matmul_value_and_gradients_match_numpy():
  """Same value and gradients as x @ W (float64 NumPy), for 3-D inputs too."""
  rs = np.random.RandomState(7)
  x, w, g = rs.randn(2, 5, 6), rs.randn(6, 4), rs.randn(2, 5, 4)
  y, vjp = jax.vjp(layers.dense_matmul, jnp.asarray(x, jnp.float32),
                   jnp.asarray(w, jnp.float32))
  dx, dw = vjp(jnp.asarray(g, jnp.float32))
  np.testing.assert_allclose(y, x @ w, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dx, g @ w.T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(dw, np.einsum("blk,bln->kn", x, g), rtol=1e-5, atol=1e-5)


def test_dense_matmul_bfloat16_accumulates_in_float32():
  """bfloat16 operands: a bfloat16 result equal to the float64 dot rounded once (a
  bfloat16 running sum of 256 + 1 + 1 + ... stays at 256), and float32-accumulated
  gradients."""
  x = jnp.ones((4, 256), jnp.bfloat16)
  w = jnp.ones((256, 3), jnp.bfloat16).at[0].set(256.0)
  y, vjp = jax.vjp(layers.dense_matmul, x, w)
  assert y.dtype == jnp.bfloat16
  expected = np.asarray(x, np.float64) @ np.asarray(w, np.float64)  # 511 -> 512 in bf16
  np.testing.assert_array_equal(np.asarray(y, np.float64),
                                np.asarray(jnp.asarray(expected, jnp.bfloat16), np.float64))
  dx, dw = vjp(jnp.ones((4, 3), jnp.bfloat16))
  assert dx.dtype == dw.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(dw, np.float64), np.full((256, 3), 4.0))


def test_dense_is_nn_dense():
  """Same param tree, init values and outputs as the nn.Dense it replaces."""
  x = _x((B, L, 12), 5)
  ours = layers.Dense(D, dtype=jnp.float32)
  dense = nn.Dense(D, kernel_init=nn.initializers.xavier_uniform())
  params = nn.meta.unbox(ours.init(jax.random.key(3), x))
  dense_params = dense.init(jax.random.key(3), x)
  np.testing.assert_array_equal(params["params"]["kernel"], dense_params["params"]["kernel"])
  params["params"]["bias"] = jnp.linspace(-1.0, 1.0, D)
  np.testing.assert_allclose(ours.apply(params, x), dense.apply(params, x), rtol=1e-5,
                             atol=1e-6)


def test_materialize_gradient_is_the_identity_behind_a_conditional():
  """Value and gradient pass through unchanged (NaN included); on the CPU the
  backward pass keeps its conditional (the barrier XLA:CPU cannot fuse through)."""
  x = _x((3, 4), 1)
  for g in (_x((3, 4), 2), _x((3, 4), 2).at[0, 0].set(jnp.nan)):
    y, vjp = jax.vjp(layers.materialize_gradient, x)
    (dx,) = vjp(g)
    np.testing.assert_array_equal(y, x)
    np.testing.assert_array_equal(dx, g)
  loss = lambda x: jnp.sum(jnp.sin(layers.materialize_gradient(jnp.cos(x))))
  np.testing.assert_allclose(jax.grad(loss)(x), -jnp.cos(jnp.cos(x)) * jnp.sin(x), rtol=1e-6)
  hlo = jax.jit(jax.grad(loss)).lower(x).compile().as_text()
  assert " conditional(" in hlo, "XLA folded the gradient barrier away"


def test_materialize_gradient_holds_in_a_gradient_of_a_gradient():
  """R1-shaped second order (the gradient of a squared input gradient, taken
  w.r.t. a weight): values equal the plain function's, and the outer backward
  pass through the forward also routes through a conditional (without it,
  XLA:CPU fused a 13-way cotangent sum into three consumers, BUILD_NOTES.md)."""
  w, x = _x((4, 4), 5), _x((3, 4), 6)

  def r1(w, barrier):
    def f(x):
      h = jnp.tanh(x @ w)
      return jnp.sum(jnp.sin((barrier(h) @ w)))
    return jnp.sum(jnp.square(jax.grad(f)(x)))

  with_barrier = jax.grad(r1)(w, layers.materialize_gradient)
  np.testing.assert_allclose(with_barrier, jax.grad(r1)(w, lambda h: h), rtol=1e-6)
  hlo = jax.jit(jax.grad(lambda w: r1(w, layers.materialize_gradient))).lower(w).as_text()
  # The inner backward's, the outer backward's through it, and the outer
  # backward's through the forward pass (the one the fwd rule's self-call adds).
  assert hlo.count("stablehlo.case") + hlo.count(" conditional(") >= 3, hlo.count("case")


def test_transformer_block_gradients_same_with_and_without_barriers(monkeypatch):
  """The CPU's gradient barriers change no gradient (a platform without them is the
  reference), and the platform is read from the mesh in context."""
  block = layers.TransformerBlock(num_heads=2, mlp_dim=16, cross_attention=True)
  x, enc = _x((B, L, 12), 3), _x((B, 5, 12), 4)
  params = nn.meta.unbox(block.init(jax.random.key(0), x, enc))
  loss = lambda p, x: jnp.sum(jnp.square(block.apply(p, x, enc)))
  mesh = jax.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  with jax.set_mesh(mesh):
    assert layers.target_platform() == "cpu"
    hlo = jax.jit(jax.grad(loss)).lower(params, x).compile().as_text()
    assert hlo.count(" conditional(") == 3  # One per residual add.
    with_barriers = jax.grad(loss, argnums=(0, 1))(params, x)
  monkeypatch.setattr(layers, "target_platform", lambda: "tpu")
  assert " conditional(" not in jax.jit(jax.grad(loss)).lower(params, x).compile().as_text()
  without = jax.grad(loss, argnums=(0, 1))(params, x)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
               with_barriers, without)


def test_attention_and_mlp_logical_names():
  block = layers.TransformerBlock(num_heads=H, mlp_dim=MLP, cross_attention=True)
  x, enc = _x((B, L, D)), _x((B, 3, D))
  abstract = jax.eval_shape(lambda: block.init(jax.random.key(0), x, enc))
  specs = nn.get_partition_spec(abstract)["params"]
  assert specs["self_attention"]["query"]["kernel"] == P("embed", "heads", "kv")
  assert specs["self_attention"]["query"]["bias"] == P("heads", "kv")
  assert specs["cross_attention"]["out"]["kernel"] == P("heads", "kv", "embed")
  assert specs["mlp"]["wi"]["kernel"] == P("embed", "mlp")
  assert specs["mlp"]["wo"]["kernel"] == P("mlp", "embed")
  assert specs["pre_mlp_norm"]["scale"] == P("embed")
  assert set(specs) == {"pre_attention_norm", "self_attention", "pre_cross_attention_norm",
                        "cross_attention", "pre_mlp_norm", "mlp"}
  names = {n for s in jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P)) for n in s}
  assert names <= set(parallel.LOGICAL_AXES) | {None}


def test_block_rejects_indivisible_heads():
  with pytest.raises(ValueError, match="num_heads=3"):
    layers.TransformerBlock(num_heads=3, mlp_dim=8).init(jax.random.key(0), _x((1, 2, D)))


def test_causal_block_does_not_look_ahead():
  mod = _stack(num_layers=1)
  x = _x((B, L, D))
  params = _init(mod, x, deterministic=True)
  fwd = jax.jit(functools.partial(mod.apply, deterministic=True))
  y1, y2 = fwd(params, x), fwd(params, x.at[:, -1].set(7.0))
  np.testing.assert_allclose(y1[:, :-1], y2[:, :-1], atol=1e-6)
  assert not np.allclose(y1[:, -1], y2[:, -1])


# ----------------------------------------------------------------------------- decode


def _decode_stepwise(mod, params, x, encoded=None, row_masks=None, cache_lengths=None):
  """Decodes x one position at a time; `cache_lengths` {step: length} resizes the
  self-attention caches before that step (as a segmented sampler does)."""
  cache = _init(mod, x, encoded, deterministic=True, decode=True)["cache"]
  assert all(float(jnp.abs(c).sum()) == 0 for c in jax.tree.leaves(cache))
  step = jax.jit(functools.partial(mod.apply, deterministic=True, decode=True,
                                   mutable=["cache"]))
  outs = []
  for t in range(x.shape[1]):
    if cache_lengths and t in cache_lengths:
      cache = layers.resize_decode_caches(cache, cache_lengths[t])
    mask = None if row_masks is None else row_masks[:, :, t:t + 1]
    y, upd = step({"params": params["params"], "cache": cache}, x[:, t:t + 1], encoded, mask)
    cache = upd["cache"]
    outs.append(y)
  return jnp.concatenate(outs, axis=1), cache


@pytest.mark.parametrize("scan", [False, True])
def test_decode_with_cache_matches_full_causal_pass(scan):
  mod = _stack(scan_layers=scan)
  x = _x((B, L, D))
  params = _init(mod, x, deterministic=True)
  full = _apply(mod, params, x, deterministic=True)
  stepwise, cache = _decode_stepwise(mod, params, x)
  np.testing.assert_allclose(stepwise, full, rtol=1e-5, atol=1e-5)
  idx = [v for k, v in jax.tree_util.tree_flatten_with_path(cache)[0]
         if "cache_index" in jax.tree_util.keystr(k)]
  assert all(np.all(np.asarray(i) == L) for i in idx)
  if scan:
    # Keys [b, heads, head_dim, max_len], values [b, heads, max_len, head_dim], stacked.
    assert cache["layers"]["self_attention"]["cached_key"].shape == (2, B, H, D // H, L)
    assert cache["layers"]["self_attention"]["cached_value"].shape == (2, B, H, L, D // H)


def test_decode_with_cross_attention_and_conv_mask():
  mod = _stack(cross_attention=True)
  x, enc = _x((B, 6, D)), _x((B, 4, D), 3)
  conv = layers.conv_shaped_causal_mask(2, 3, 1, 3)
  params = _init(mod, x, enc, deterministic=True)
  fwd = jax.jit(functools.partial(mod.apply, deterministic=True))
  full = fwd(params, x, enc, conv)
  stepwise, _ = _decode_stepwise(mod, params, x, enc, row_masks=conv)
  np.testing.assert_allclose(stepwise, full, rtol=1e-5, atol=1e-5)
  # The conv mask is effective: it differs from plain causal attention.
  assert not np.allclose(full, fwd(params, x, enc, None), atol=1e-4)


@pytest.mark.parametrize("scan", [False, True])
def test_decode_with_caches_cut_then_grown_matches_full_pass(scan):
  """Caches cut to 2 positions, then zero-padded to 5, then to 6: the same outputs
  as the full pass (the conv mask, longer than the cut cache, is cut with it);
  cross-attention caches keep their length."""
  mod = _stack(cross_attention=True, scan_layers=scan)
  x, enc = _x((B, 6, D)), _x((B, 4, D), 3)
  conv = layers.conv_shaped_causal_mask(2, 3, 1, 3)
  params = _init(mod, x, enc, deterministic=True)
  full = jax.jit(functools.partial(mod.apply, deterministic=True))(params, x, enc, conv)
  stepwise, cache = _decode_stepwise(mod, params, x, enc, row_masks=conv,
                                     cache_lengths={0: 2, 2: 5, 5: 6})
  np.testing.assert_allclose(stepwise, full, rtol=1e-5, atol=1e-5)
  shapes = {jax.tree_util.keystr(k): v.shape
            for k, v in jax.tree_util.tree_flatten_with_path(cache)[0]}
  lead = (2,) if scan else ()
  for name, shape in shapes.items():
    if "self_attention" in name and "cached_key" in name:
      assert shape == lead + (B, H, D // H, 6), name
    if "self_attention" in name and "cached_value" in name:
      assert shape == lead + (B, H, 6, D // H), name
    if "cross_attention" in name and "cached_" in name:
      assert 4 in shape[-2:] and 6 not in shape[-2:], (name, shape)


def test_resize_decode_caches_cuts_and_pads_the_length_axes_only():
  rng = np.random.RandomState(0)
  draw = lambda *shape: rng.randn(*shape).astype(np.float32)
  self_cache = {"cached_key": draw(2, 3, 4, 8), "cached_value": draw(2, 3, 8, 4),
                "cache_index": np.array(3)}
  cross = {"cached_key": draw(2, 3, 4, 5), "cached_value": draw(2, 3, 5, 4)}
  tree = {"layers_0": {"self_attention": self_cache, "cross_attention": cross},
          "index": np.array(3)}
  cut = layers.resize_decode_caches(tree, 5)
  np.testing.assert_array_equal(cut["layers_0"]["self_attention"]["cached_key"],
                                self_cache["cached_key"][..., :5])
  np.testing.assert_array_equal(cut["layers_0"]["self_attention"]["cached_value"],
                                self_cache["cached_value"][:, :, :5])
  assert all(cut["layers_0"]["cross_attention"][name] is cross[name] for name in cross)
  assert cut["index"] is tree["index"]
  grown = layers.resize_decode_caches(cut, 8)["layers_0"]["self_attention"]
  expected_key = self_cache["cached_key"].copy()
  expected_key[..., 5:] = 0
  np.testing.assert_array_equal(grown["cached_key"], expected_key)
  assert grown["cached_value"].shape == (2, 3, 8, 4)
  assert not np.any(grown["cached_value"][:, :, 5:])


def test_decode_step_rejects_multiple_positions():
  mod = _stack(num_layers=1)
  x = _x((B, L, D))
  variables = _init(mod, x, deterministic=True, decode=True)
  with pytest.raises(ValueError, match="one position"):
    _apply(mod, variables, x[:, :2], deterministic=True, decode=True, mutable=["cache"])


# ----------------------------------------------------------------------------- scan, remat


def _restack(unscanned, num_layers):
  layers_ = [unscanned[f"layers_{i}"] for i in range(num_layers)]
  return {"layers": jax.tree.map(lambda *a: jnp.stack(a), *layers_)}


def test_scanned_and_unscanned_stacks_agree_and_name_layers_axis():
  x, enc = _x((B, L, D)), _x((B, 3, D))
  flat, scanned = _stack(cross_attention=True), _stack(cross_attention=True, scan_layers=True)
  p_flat = nn.meta.unbox(_init(flat, x, enc, deterministic=True))
  abstract = jax.eval_shape(
      lambda: scanned.init(jax.random.key(0), x, enc, deterministic=True))
  specs = nn.get_partition_spec(abstract)["params"]["layers"]
  assert specs["self_attention"]["query"]["kernel"] == P("layers", "embed", "heads", "kv")
  assert specs["mlp"]["wi"]["kernel"] == P("layers", "embed", "mlp")
  p_scan = {"params": _restack(p_flat["params"], 2)}
  shapes = jax.tree.map(lambda a: a.shape, nn.meta.unbox(abstract))
  assert jax.tree.map(lambda a: a.shape, p_scan) == shapes
  y_flat = _apply(flat, p_flat, x, enc, deterministic=True)
  y_scan = _apply(scanned, p_scan, x, enc, deterministic=True)
  np.testing.assert_allclose(y_scan, y_flat, rtol=1e-5, atol=1e-5)


def test_scanned_layers_get_different_init_and_dropout_masks():
  mod = _stack(scan_layers=True, dropout_rate=0.5)
  x = _x((B, L, D))
  params = _init(mod, x, deterministic=True)
  k = params["params"]["layers"]["mlp"]["wi"]["kernel"].unbox()
  assert not np.allclose(k[0], k[1])
  # Dropout rngs are split over the scan: dropout is live inside the loop.
  det = _apply(mod, params, x, deterministic=True)
  drop = _apply(mod, params, x, deterministic=False, rngs={"dropout": _key(1)})
  assert not np.allclose(drop, det)


@pytest.mark.parametrize("scan,policy", [(False, "full"), (False, "dots_saveable"),
                                         (True, "dots")])
def test_remat_policies_keep_values_and_grads(scan, policy):
  x = _x((B, L, D))
  ref_mod, mod = _stack(scan_layers=scan), _stack(scan_layers=scan, remat_policy=policy)
  params = _init(ref_mod, x, deterministic=True)

  def loss(m, p):
    return jnp.sum(m.apply(p, x, deterministic=True) ** 2)

  l_ref, g_ref = jax.jit(jax.value_and_grad(lambda p: loss(ref_mod, p)))(params)
  l_got, g_got = jax.jit(jax.value_and_grad(lambda p: loss(mod, p)))(params)
  np.testing.assert_allclose(l_got, l_ref, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5),
               nn.meta.unbox(g_got), nn.meta.unbox(g_ref))


def test_unknown_remat_policy_is_rejected():
  with pytest.raises(ValueError, match="'everything'.*valid"):
    _stack(remat_policy="everything").init(jax.random.key(0), _x((B, L, D)),
                                           deterministic=True)


def test_dropout_is_active_only_when_not_deterministic():
  mod = _stack(dropout_rate=0.5)
  x = _x((B, L, D))
  params = _init(mod, x, deterministic=True)
  fwd = jax.jit(lambda p, r, det: mod.apply(p, x, deterministic=det, rngs={"dropout": r}),
                static_argnums=2)
  det = fwd(params, _key(1), True)
  np.testing.assert_array_equal(det, fwd(params, _key(2), True))
  r1, r2 = fwd(params, _key(1), False), fwd(params, _key(2), False)
  assert not np.allclose(r1, det) and not np.allclose(r1, r2)


def test_bf16_compute_keeps_float32_params():
  mod = _stack(dtype=jnp.bfloat16)
  x = _x((B, L, D))
  params = _init(mod, x, deterministic=True)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nn.meta.unbox(params)))
  assert _apply(mod, params, x, deterministic=True).dtype == jnp.bfloat16


def test_bf16_compute_runs_every_matmul_in_bf16():
  """dtype=bfloat16 reaches every projection (q, k, v once computed in param_dtype
  because dtype was passed positionally); decode caches are float32 on the CPU,
  where XLA writes a bfloat16 cache's position by copying the whole cache."""
  mod = _stack(dtype=jnp.bfloat16, cross_attention=True, cache_cross_attention=True)
  x, encoded = _x((B, L, D)), _x((B, 3, D), seed=1)
  params = _init(mod, x, encoded, deterministic=True)
  hlo = jax.jit(functools.partial(mod.apply, deterministic=True)).lower(
      params, x, encoded).as_text()
  operands = [line.split(": (")[1].split(") ->")[0] for line in hlo.splitlines()
              if "stablehlo.dot_general" in line]
  assert len(operands) >= 2 * (4 + 4 + 2 + 2)  # q k v out, cross q k v out, mlp; attention.
  assert all("bf16" in o and "f32" not in o for o in operands), operands
  _, cache = jax.jit(functools.partial(mod.apply, deterministic=True, decode=True,
                                       mutable=["cache"]))(params, x, encoded)
  kv = [v for path, v in jax.tree_util.tree_leaves_with_path(cache)
        if "cached_" in jax.tree_util.keystr(path)]
  assert len(kv) == 2 * 2 * 2 and all(v.dtype == jnp.float32 for v in kv)


def test_add_to_every_example_is_x_plus_table_with_the_batch_sum_as_its_gradient():
  """The table's gradient is a [1, b] x [b, n] matmul; against float64 NumPy."""
  rs = np.random.RandomState(0)
  x, table, g = rs.randn(5, 7, 16), rs.randn(7, 16), rs.randn(5, 7, 16)
  out, vjp = jax.vjp(layers.add_to_every_example, *(jnp.asarray(a, jnp.float32)
                                                    for a in (x, table)))
  dx, d_table = vjp(jnp.asarray(g, jnp.float32))
  np.testing.assert_allclose(out, x + table, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(dx, np.float32(g))
  np.testing.assert_allclose(d_table, g.sum(0), rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match=r"table \(16, 7\) is not the shape of one example "
                                       r"of x \(5, 7, 16\)"):
    layers.add_to_every_example(jnp.asarray(x), jnp.asarray(table.T))
