"""Task `contrastive` (the reranker): CLIP loss and retrieval against float64 NumPy
references, reranking selection, config checks, and the real loop learning to retrieve."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vimjax.configs import contrastive as contrastive_config
from vimjax import config_lib
from vimjax import reranking
from vimjax.data import sources
from vimjax.data import text
from vimjax.models import dual_encoder
from vimjax.tasks import contrastive
from vimjax.train import loop

pytestmark = pytest.mark.slow

GRID, VOCAB, TEXT_LEN = 4, 32, 8
COLORS = ("red", "green", "blue", "yellow", "white", "black", "purple", "orange")


def _ref_loss(logits, positives, valid):
  """CLIP's symmetric cross-entropy with identical captions as shared positives (float64)."""
  logits, positives = np.asarray(logits, np.float64), np.asarray(positives, bool)
  idx = np.flatnonzero(valid)
  lg, pos = logits[np.ix_(idx, idx)], positives[np.ix_(idx, idx)]
  def one_way(lg, pos):
    logp = lg - lg.max(1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(1, keepdims=True))
    target = pos / pos.sum(1, keepdims=True)
    return -(target * logp).sum(1)
  return float(np.mean(0.5 * (one_way(lg, pos) + one_way(lg.T, pos.T))))


def test_loss_and_retrieval_match_numpy_with_duplicates_and_padding():
  rng = np.random.default_rng(0)
  b = 6
  logits = rng.normal(size=(b, b)) * 3
  captions = np.array([[1, 2, 0], [3, 4, 0], [1, 2, 0], [5, 0, 0], [6, 7, 8], [3, 4, 0]])
  valid = np.array([1, 1, 1, 1, 1, 0], bool)  # Row 5 is eval padding.
  positives = np.asarray(contrastive.same_caption(jnp.asarray(captions, jnp.int32)))
  np.testing.assert_array_equal(positives,
                                (captions[:, None, :] == captions[None]).all(-1))
  loss = contrastive.contrastive_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(positives),
                                      jnp.asarray(valid))
  assert float(loss) == pytest.approx(_ref_loss(logits, positives, valid), rel=1e-5)
  # Padding never matters: scrambling its logits changes nothing.
  scrambled = logits.copy()
  scrambled[5], scrambled[:, 5] = 100.0, 100.0
  assert float(contrastive.contrastive_loss(jnp.asarray(scrambled, jnp.float32),
                                            jnp.asarray(positives), jnp.asarray(valid))
               ) == pytest.approx(float(loss), rel=1e-6)

  hits = jax.tree.map(np.asarray, contrastive.retrieval(
      jnp.asarray(scrambled, jnp.float32), jnp.asarray(positives), jnp.asarray(valid)))
  ref = scrambled[:5, :5]
  np.testing.assert_array_equal(hits["image_to_text"][:5],
                                positives[np.arange(5), ref.argmax(1)])
  np.testing.assert_array_equal(hits["text_to_image"][:5],
                                positives[ref.argmax(0), np.arange(5)])
  np.testing.assert_allclose(hits["chance"][:5], positives[:5, :5].sum(1) / 5)


def test_best_per_condition_keeps_the_top_scores_best_first():
  scores = np.array([0.1, 0.9, 0.5, 0.3, -1.0, 2.0, 2.0, 0.0])  # 2 prompts x 4 candidates.
  np.testing.assert_array_equal(reranking.best_per_condition(scores, 4, 1), [1, 5])
  np.testing.assert_array_equal(reranking.best_per_condition(scores, 4, 2), [1, 2, 5, 6])
  with pytest.raises(ValueError, match=r"--num_samples=5 must be in \[1, --num_candidates=4\]"):
    reranking.best_per_condition(scores, 4, 5)


def test_similarity_is_scaled_cosine_and_towers_are_unit_norm():
  model = dual_encoder.DualEncoder(
      vocab_size=VOCAB, grid_h=GRID, grid_w=GRID, text_vocab_size=16, max_text_length=TEXT_LEN,
      image_layers=1, text_layers=1, num_heads=2, emb_dim=16, mlp_dim=32, out_dim=8)
  rng = np.random.default_rng(1)
  tokens = jnp.asarray(rng.integers(0, VOCAB, (3, GRID * GRID)), jnp.int32)
  ids = jnp.asarray([[3, 4, 1, 0, 0, 0, 0, 0]] * 3, jnp.int32)
  params = model.init(jax.random.key(0), tokens, ids)["params"]
  image, txt, scale = model.apply({"params": params}, tokens, ids)
  np.testing.assert_allclose(np.linalg.norm(image, axis=-1), 1.0, rtol=1e-5)
  assert float(scale) == pytest.approx(1 / 0.07, rel=1e-5)
  score = dual_encoder.similarity(model, params, tokens, ids)
  np.testing.assert_allclose(score, np.sum(np.asarray(image, np.float64) * np.asarray(txt), -1)
                             / 0.07, rtol=1e-4)
  # Pads are masked out of attention and pooling: the same text without them encodes the same.
  encode = lambda x: np.asarray(model.apply({"params": params}, x, method="encode_text"))
  np.testing.assert_allclose(encode(ids), encode(ids[:, :3]), rtol=1e-5, atol=1e-6)
  assert not np.allclose(encode(ids), encode(ids.at[:, 5].set(7)), atol=1e-4)


def test_configs_and_validation():
  for variant in contrastive_config.VARIANTS:
    config = contrastive_config.get_config(variant)
    assert config.task == "contrastive"
  with pytest.raises(ValueError, match="Unknown contrastive variant 'huge'"):
    contrastive_config.get_config("huge")
  with pytest.raises(ValueError, match="is a placeholder"):
    config_lib.validate(contrastive_config.get_config("tiny"), 8)


def _records(n, offset, rng):
  # The caption names a colour; the image tokens carry it (tokens 4c..4c+3) among noise.
  for i in range(offset, offset + n):
    c = i % len(COLORS)
    tokens = rng.integers(0, VOCAB, GRID * GRID)
    tokens[:4] = 4 * c + np.arange(4)
    yield {"tokens": tokens.astype(np.int32), "label": np.int32(c),
           "caption": f"a {COLORS[c]} square"}


def test_loop_learns_to_retrieve_and_beats_chance(tmp_path):
  rng = np.random.default_rng(0)
  sources.write_array_record(str(tmp_path / "tokens-train-0.array_record"),
                             _records(256, 0, rng))
  sources.write_array_record(str(tmp_path / "tokens-eval-0.array_record"),
                             _records(32, 1000, rng))
  spm = text.train_sentencepiece([f"a {c} square" for c in COLORS] * 8, str(tmp_path / "spm"),
                                 40)
  config = config_lib.override(
      contrastive_config.get_config("tiny"), total_steps=40, global_batch_size=16,
      log_every_steps=40, eval_every_steps=40, checkpoint_every_steps=40, num_eval_images=32,
      peak_flops_per_device=1e12, tokenizer_workdir="",
      **{"data.source": f"array_record:{tmp_path}/tokens-{{split}}-*.array_record",
         "data.text_tokenizer": spm["model"], "model.grid_size": GRID,
         "model.codebook_size": VOCAB, "model.text_vocab_size": 64,
         "model.max_text_length": TEXT_LEN, "model.image_layers": 1, "model.text_layers": 1,
         "model.emb_dim": 32, "model.mlp_dim": 64, "model.num_heads": 2, "model.out_dim": 16,
         "optimizer.lr": 3e-3, "optimizer.warmup_steps": 2})
  result = loop.train_and_evaluate(config, str(tmp_path / "run"))
  # 8 captions over 16-row batches: chance = 2/16 per query.
  assert result["eval_chance"] == pytest.approx(2 / 16)
  assert result["eval_image_to_text"] > 0.9 and result["eval_text_to_image"] > 0.9
  assert result["eval_num_examples"] == 32 and np.isfinite(result["temperature"])
