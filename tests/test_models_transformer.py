"""Tests for vimjax/models/transformer.py: shapes, params, causality, conditioning, decode."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vimjax.models import layers
from vimjax.models import transformer

B, V, G, D = 2, 24, 4, 32  # batch, codebook, grid side, width
N = G * G
TEXT_VOCAB, TEXT_LEN = 30, 6


def _vim(**kw):
  cfg = dict(vocab_size=V, grid_h=G, grid_w=G, num_layers=2, num_heads=2, emb_dim=D,
             mlp_dim=64, num_classes=5)
  cfg.update(kw)
  return transformer.VIM(**cfg)


def _parti(**kw):
  cfg = dict(text_vocab_size=TEXT_VOCAB, max_text_length=8, vocab_size=V, grid_h=G,
             grid_w=G, encoder_layers=1, decoder_layers=2, num_heads=2, emb_dim=D,
             mlp_dim=64)
  cfg.update(kw)
  return transformer.Parti(**cfg)


def _tokens(seed=0, b=B, n=N):
  return jax.random.randint(jax.random.key(seed), (b, n), 0, V)


def _text():
  return jnp.array([[5, 6, 7, 1, 0, 0], [8, 9, 1, 0, 0, 0]], jnp.int32)


def random_params(model, *args, seed=0):
  """(boxed abstract variables, params drawn with NumPy): no JAX RNG to compile.

  Generic random weights (LayerNorm scales near 1, non-zero biases) so every
  parameter matters.
  """
  abstract = jax.eval_shape(lambda: model.init(jax.random.key(0), *args, train=False))
  rs = np.random.RandomState(seed)

  def draw(path, x):
    name = jax.tree_util.keystr(path)
    noise = rs.standard_normal(x.shape).astype(np.float32)
    if name.endswith("['scale']"):
      return jnp.asarray(1.0 + 0.1 * noise)
    fan_in = x.shape[0] if x.ndim >= 2 and "embedding" not in name else 1
    return jnp.asarray(noise * (0.1 if x.ndim < 2 else fan_in ** -0.5))

  params = jax.tree_util.tree_map_with_path(draw, nn.meta.unbox(abstract["params"]))
  return abstract, params


def _init(model, *args):
  return random_params(model, *args)


# ----------------------------------------------------------------------------- VIM


def test_vim_shapes_dtypes_and_param_tree():
  model = _vim(dtype=jnp.bfloat16)
  variables, params = _init(model, _tokens(), jnp.array([0, 3]))
  logits = model.apply({"params": params}, _tokens(), jnp.array([0, 3]), train=False)
  assert logits.shape == (B, N, V) and logits.dtype == jnp.float32
  assert params["class_embedding"]["embedding"].shape == (5 + 1, D)
  assert params["token_embedding"]["embedding"].shape == (V, D)
  assert params["position_embedding"]["row"].shape == (G, D)
  assert params["position_embedding"]["col"].shape == (G, D)
  assert set(params["decoder"]) == {"layers_0", "layers_1"}
  assert params["logits"]["kernel"].shape == (D, V)
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
  names = nn.get_partition_spec(variables["params"])
  assert tuple(names["token_embedding"]["embedding"]) == ("vocab", "embed")
  assert tuple(names["logits"]["kernel"]) == ("embed", "vocab")
  assert tuple(names["class_embedding"]["embedding"]) == (None, "embed")


def test_vim_is_causal():
  model = _vim()
  _, params = _init(model, _tokens(), jnp.array([0, 1]))
  labels = jnp.array([2, 4])
  tokens = _tokens(1)
  j = 7
  changed = tokens.at[:, j].set((tokens[:, j] + 1) % V)
  a = model.apply({"params": params}, tokens, labels, train=False)
  b = model.apply({"params": params}, changed, labels, train=False)
  # Position i predicts token i from tokens < i: logits up to j ignore token j.
  np.testing.assert_allclose(a[:, :j + 1], b[:, :j + 1], atol=1e-6)
  assert np.all(np.abs(np.asarray(a[:, j + 1:] - b[:, j + 1:])).max(-1) > 1e-4)


def test_vim_class_token_null_class_and_drop():
  model = _vim()
  _, params = _init(model, _tokens(), jnp.array([0, 1]))
  tokens = _tokens(2)
  run = lambda labels, **kw: model.apply({"params": params}, tokens, labels, train=False, **kw)
  a, b = run(jnp.array([0, 0])), run(jnp.array([3, 3]))
  assert np.abs(np.asarray(a[:, 0] - b[:, 0])).max() > 1e-4  # The class steers position 0.
  null = run(jnp.array([model.null_label] * B))
  np.testing.assert_allclose(run(None), null, atol=1e-6)
  dropped = run(jnp.array([0, 3]), drop_condition=jnp.array([True, False]))
  np.testing.assert_allclose(dropped[0], null[0], atol=1e-6)
  np.testing.assert_allclose(dropped[1], b[1], atol=1e-6)


def test_vim_unconditional_has_one_start_token_and_rejects_labels():
  model = _vim(num_classes=0)
  _, params = _init(model, _tokens(), None)
  assert params["class_embedding"]["embedding"].shape == (1, D)
  assert model.apply({"params": params}, _tokens(), None, train=False).shape == (B, N, V)
  with pytest.raises(ValueError, match="num_classes=0"):
    model.apply({"params": params}, _tokens(), jnp.array([0, 1]), train=False)


def test_vim_dropout_only_in_training():
  model = _vim(dropout_rate=0.5)
  _, params = _init(model, _tokens(), jnp.array([0, 1]))
  args = ({"params": params}, _tokens(), jnp.array([0, 1]))
  train = jax.jit(lambda rng: model.apply(*args, train=True, rngs={"dropout": rng}))
  t1, t2 = train(jax.random.key(1)), train(jax.random.key(2))
  assert np.abs(np.asarray(t1 - t2)).max() > 1e-3
  np.testing.assert_array_equal(model.apply(*args, train=False), model.apply(*args, train=False))


def _decode_all(apply_step, cache, tokens):
  """Feeds previous tokens one at a time; returns stacked [b, n, vocab] logits."""
  out, prev = [], jnp.zeros((tokens.shape[0], 1), jnp.int32)
  for i in range(tokens.shape[1]):
    logits, mut = apply_step(cache, prev)
    cache = mut["cache"]
    out.append(logits[:, 0])
    prev = tokens[:, i:i + 1]
  return jnp.stack(out, 1)


@pytest.mark.parametrize("scan", [False, True])
def test_vim_decode_steps_match_teacher_forcing(scan):
  model = _vim(scan_layers=scan)
  labels = jnp.array([1, 4])
  _, params = _init(model, _tokens(), labels)
  tokens = _tokens(3)
  full = model.apply({"params": params}, tokens, labels, train=False)
  _, init = model.apply({"params": params}, jnp.zeros_like(tokens), labels, train=False,
                        decode=True, mutable=["cache"])
  step = jax.jit(lambda cache, prev: model.apply(
      {"params": params, "cache": cache}, prev, labels, train=False, decode=True,
      mutable=["cache"]))
  np.testing.assert_allclose(_decode_all(step, init["cache"], tokens), full, atol=2e-5)


# ----------------------------------------------------------------------------- Parti


def test_parti_shapes_and_param_tree():
  model = _parti(dtype=jnp.bfloat16)
  variables, params = _init(model, _text(), _tokens())
  logits = model.apply({"params": params}, _text(), _tokens(), train=False)
  assert logits.shape == (B, N, V) and logits.dtype == jnp.float32
  assert params["text_embedding"]["embedding"].shape == (TEXT_VOCAB, D)
  assert params["text_position_embedding"].shape == (8, D)
  assert params["null_text_embedding"].shape == (D,)
  assert params["start_embedding"].shape == (D,)
  assert set(params["encoder"]) == {"layers_0"}
  assert "cross_attention" in params["decoder"]["layers_1"]
  assert "cross_attention" not in params["encoder"]["layers_0"]
  assert {"encoder_norm", "decoder_norm", "logits"} <= set(params)
  names = nn.get_partition_spec(variables["params"])
  assert tuple(names["text_embedding"]["embedding"]) == ("vocab", "embed")
  assert tuple(names["null_text_embedding"]) == ("embed",)


def test_parti_ignores_text_padding():
  model = _parti()
  _, params = _init(model, _text(), _tokens())
  tokens = _tokens(4)
  run = lambda text: model.apply({"params": params}, text, tokens, train=False)
  short = _text()[:, :4]  # Same texts with fewer pad positions.
  np.testing.assert_allclose(run(_text()), run(short), atol=1e-5)
  other = _text().at[0, 1].set(11)  # A real token change does matter.
  assert np.abs(np.asarray(run(other)[0] - run(_text())[0])).max() > 1e-4


def test_parti_dropped_rows_use_the_null_context():
  model = _parti()
  _, params = _init(model, _text(), _tokens())
  tokens = _tokens(5)
  drop = jnp.array([True, False])
  run = lambda text, d: model.apply({"params": params}, text, tokens, train=False,
                                    drop_condition=d)
  a = run(_text(), drop)
  b = run(_text().at[:, 0].set(13), drop)
  np.testing.assert_allclose(a[0], b[0], atol=1e-6)  # Dropped: text content is ignored.
  assert np.abs(np.asarray(a[1] - b[1])).max() > 1e-4
  encoded, mask = model.apply({"params": params}, _text(), drop, method="encode")
  np.testing.assert_allclose(encoded[0], np.broadcast_to(params["null_text_embedding"],
                                                         encoded[0].shape))
  assert bool(mask[0].all()) and not bool(mask[1].all())


def test_parti_conv_attention_receptive_field():
  kernel = (2, 3)
  model = _parti(decoder_layers=1, conv_attention_kernel=kernel)
  _, params = _init(model, _text(), _tokens())
  tokens = _tokens(6)
  mask = np.asarray(layers.conv_shaped_causal_mask(G, G, *kernel))[0, 0]
  run = lambda t: np.asarray(model.apply({"params": params}, _text(), t, train=False))
  base = run(tokens)
  for j in (2, 5, 9):
    diff = np.abs(run(tokens.at[:, j].set((tokens[:, j] + 1) % V)) - base).max(axis=(0, 2))
    # Token j is the input at position j + 1; with one layer, logits i see it iff mask[i, j+1].
    np.testing.assert_array_equal(diff > 1e-5, mask[:, j + 1])
    # In grid terms: the prediction of cell i sees token j iff j < i, j's row is
    # i's or the one above, and j's column within one of i's (kernel (2, 3)).
    (rj, cj), cells = divmod(j, G), [divmod(i, G) for i in range(G * G)]
    window = [j < i and 0 <= ri - rj < 2 and abs(cj - ci) <= 1 for i, (ri, ci) in enumerate(cells)]
    np.testing.assert_array_equal(diff > 1e-5, window)


@pytest.mark.parametrize("kernel,scan", [(None, False), ((2, 3), True)])
def test_parti_decode_steps_match_teacher_forcing(kernel, scan):
  model = _parti(conv_attention_kernel=kernel, scan_layers=scan)
  _, params = _init(model, _text(), _tokens())
  tokens = _tokens(7)
  full = model.apply({"params": params}, _text(), tokens, train=False)
  encoded, mask = model.apply({"params": params}, _text(), method="encode")
  decode = lambda variables, t, **kw: model.apply(variables, encoded, mask, t, train=False,
                                                  method="decode", **kw)
  _, init = decode({"params": params}, jnp.zeros_like(tokens), decode=True, mutable=["cache"])
  step = jax.jit(lambda cache, prev: decode({"params": params, "cache": cache}, prev,
                                            decode=True, mutable=["cache"]))
  np.testing.assert_allclose(_decode_all(step, init["cache"], tokens), full, atol=2e-5)


def test_parti_rejects_too_long_text():
  model = _parti()
  _, params = _init(model, _text(), _tokens())
  with pytest.raises(ValueError, match="max_text_length=8"):
    model.apply({"params": params}, jnp.ones((1, 9), jnp.int32), _tokens(b=1), train=False)


def test_parti_decode_projects_text_keys_values_once():
  model = _parti()
  _, params = _init(model, _text(), _tokens())
  encoded, mask = model.apply({"params": params}, _text(), method="encode")
  calls = []

  def record(next_fun, args, kwargs, context):
    path = "/".join(context.module.path)
    if "cross_attention" in path and path.endswith(("key", "value")):
      calls.append(path)
    return next_fun(*args, **kwargs)

  decode = lambda variables, t: model.apply(variables, encoded, mask, t, train=False,
                                            method="decode", decode=True, mutable=["cache"])
  with nn.intercept_methods(record):
    _, init = decode({"params": params}, _tokens())
  assert len(calls) == 2 * 2  # key + value in each of the 2 decoder layers.
  cache = init["cache"]["decoder"]["layers_0"]["cross_attention"]
  assert cache["cached_key"].shape == (B, 2, D // 2, TEXT_LEN)
  assert cache["cached_value"].shape == (B, 2, TEXT_LEN, D // 2)
  calls.clear()
  with nn.intercept_methods(record):
    decode({"params": params, "cache": init["cache"]}, _tokens()[:, :1])
  assert not calls  # Decode steps reuse the cached text keys/values.
