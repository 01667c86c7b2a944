"""Stage-2 tasks `vim` and `parti`: CFG dropout, loss/eval numerics, the loop on token records."""
import json
import math
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vimjax.configs import parti as parti_config
from vimjax.configs import vim as vim_config
from vimjax import config_lib
from vimjax import parallel
from vimjax.data import pipeline
from vimjax.data import sources
from vimjax.data import text
from vimjax.tasks import autoregressive
from vimjax.train import loop
from vimjax import tasks

pytestmark = pytest.mark.slow

GRID, VOCAB, CLASSES, TEXT_LEN = 4, 32, 4, 8
N = GRID * GRID
COLORS = ("red", "green", "blue", "yellow")


def _pattern(label: int) -> np.ndarray:
  """A learnable sequence: starts at 5 * label, then counts up (mod VOCAB)."""
  return ((5 * label + np.arange(N)) % VOCAB).astype(np.int32)


def _caption(i: int) -> str:
  # Every 4th caption is too long for TEXT_LEN and must be truncated (and counted).
  words = [COLORS[i % CLASSES]] * (12 if i % 4 == 3 else 1)
  return "a " + " ".join(words) + " square"


def _records(n: int, offset: int = 0):
  for i in range(offset, offset + n):
    yield {"tokens": _pattern(i % CLASSES), "label": np.int32(i % CLASSES),
           "caption": _caption(i)}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
  """Token shards (train: 2 shards of 32, eval: 20 records) and a SentencePiece model."""
  root = tmp_path_factory.mktemp("tokens")
  for shard in range(2):
    sources.write_array_record(str(root / f"tokens-train-{shard:05d}-of-00002.array_record"),
                               _records(32, 32 * shard))
  sources.write_array_record(str(root / "tokens-eval-00000-of-00001.array_record"),
                             _records(20, 1000))
  spm = text.train_sentencepiece([_caption(i) for i in range(64)], str(root / "spm"), 64)
  return {"source": f"array_record:{root}/tokens-{{split}}-*.array_record",
          "text_tokenizer": spm["model"], "vocab_size": spm["vocab_size"], "root": root}


def _config(family: str, data, **overrides):
  config = (vim_config if family == "vim" else parti_config).get_config("tiny")
  config.unlock()
  config.update(total_steps=24, global_batch_size=16, log_every_steps=24, eval_every_steps=24,
                checkpoint_every_steps=24, num_eval_images=32, peak_flops_per_device=1e12)
  config.data.source = data["source"]
  config.model.update(grid_size=GRID, codebook_size=VOCAB, emb_dim=32, mlp_dim=64, num_heads=2)
  if family == "vim":
    config.model.update(num_layers=1, num_classes=CLASSES)
  else:
    config.data.text_tokenizer = data["text_tokenizer"]
    config.model.update(encoder_layers=1, decoder_layers=1, max_text_length=TEXT_LEN,
                        text_vocab_size=64)
  config.optimizer.update(lr=1e-2, warmup_steps=2, end_lr=1e-3)
  for key, value in overrides.items():
    section, _, name = key.rpartition(".")
    (config[section] if section else config)[name] = value
  config.lock()
  return config


def _batch(family, data, labels, tokens, mask):
  batch = {"tokens": jnp.asarray(tokens, jnp.int32), "label": jnp.asarray(labels, jnp.int32),
           "mask": jnp.asarray(mask, jnp.int32)}
  if family == "parti":
    ids, _ = text.TextTokenizer(data["text_tokenizer"], TEXT_LEN).encode(
        [_caption(int(i)) for i in labels])
    batch.update(text_ids=jnp.asarray(ids), text_truncated=jnp.zeros(len(labels), jnp.int32))
  return batch


def _log_softmax64(logits):
  x = np.asarray(logits, np.float64)
  logz = np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1)) + x.max(-1)
  return x - logz[..., None], logz


# --- Classifier-free guidance dropout. ---

def test_drop_condition_mask_rate():
  n, rate = 200_000, 0.1
  mask = np.asarray(autoregressive.drop_condition_mask(jax.random.key(0), n, rate))
  assert mask.dtype == bool and mask.shape == (n,)
  assert abs(mask.mean() - rate) < 5 * math.sqrt(rate * (1 - rate) / n)
  other = np.asarray(autoregressive.drop_condition_mask(jax.random.key(1), n, rate))
  assert (mask != other).any()
  assert not np.asarray(autoregressive.drop_condition_mask(jax.random.key(0), n, 0.0)).any()
  assert np.asarray(autoregressive.drop_condition_mask(jax.random.key(0), n, 1.0)).all()
  with pytest.raises(ValueError, match=r"cfg_dropout=1.5 must be in \[0, 1\]"):
    autoregressive.drop_condition_mask(jax.random.key(0), n, 1.5)


def _init(task):
  return jax.jit(lambda r: parallel.unbox(task.init(r)))(jax.random.key(0))


def test_parti_dropped_rows_ignore_their_text(data):
  """cfg_dropout=1 drops every row: the loss no longer depends on the text (VIM: the
  numerics test checks dropped rows against a null-class reference)."""
  family = "parti"
  task = tasks.build(_config(family, data, **{"model.cfg_dropout": 1.0}), None)
  state = _init(task)
  step = jax.jit(task.train_step)
  tokens = np.stack([_pattern(c) for c in range(4)])
  losses = []
  for labels in ([0, 1, 2, 3], [3, 2, 1, 0]):
    _, metrics = step(state, _batch(family, data, labels, tokens, np.ones(4)),
                      jax.random.key(1), None)
    assert float(metrics["cfg_drop_fraction"]) == 1.0
    losses.append(float(metrics["loss"]))
  assert losses[0] == pytest.approx(losses[1], rel=1e-6)


# --- Loss and eval numerics against a float64 NumPy reference. ---

def test_vim_train_and_eval_numerics_and_masking(data):
  """Train (cfg_dropout=1: every row null) and eval (each row's class) metrics against
  float64 references from the model's logits; eval ignores mask=0 rows."""
  config = _config("vim", data, **{"model.cfg_dropout": 1.0, "model.z_loss_weight": 0.1})
  task = tasks.build(config, None)
  model = tasks.TASKS["vim"].build_model(config)
  state = _init(task)
  rng = np.random.default_rng(0)
  labels = np.array([0, 1, -1, 3, 2, 1])  # -1: no label, uses the null class (counted).
  tokens = rng.integers(0, VOCAB, (6, N))
  mask = np.array([1, 1, 1, 1, 0, 0])
  forward = jax.jit(lambda d: model.apply(
      {"params": state.params["model"]}, jnp.asarray(tokens),
      jnp.asarray(np.maximum(labels, 0)), train=False, drop_condition=d))

  def reference(drop):
    logp, logz = _log_softmax64(forward(jnp.asarray(drop)))
    nll = -np.take_along_axis(logp, tokens[..., None], -1)[..., 0]
    return nll, logz, np.argmax(logp, -1) == tokens

  nll, logz, hits = reference(np.ones(6, bool))  # Training drops every condition.
  batch = _batch("vim", data, labels, tokens, mask)
  _, train_metrics = jax.jit(task.train_step)(state, {**batch, "mask": jnp.ones(6, jnp.int32)},
                                              jax.random.key(1), None)
  assert float(train_metrics["cfg_drop_fraction"]) == 1.0
  assert float(train_metrics["cross_entropy"]) == pytest.approx(nll.mean(), rel=1e-5)
  assert float(train_metrics["z_loss"]) == pytest.approx(0.1 * np.mean(logz**2), rel=1e-5)
  assert float(train_metrics["loss"]) == pytest.approx(nll.mean() + 0.1 * np.mean(logz**2),
                                                       rel=1e-5)
  assert float(train_metrics["accuracy"]) == pytest.approx(hits.mean())
  assert float(train_metrics["invalid_labels"]) == 1

  nll_cond, _, hits = reference(labels < 0)  # Eval: each row's own class.
  assert np.abs(nll_cond - nll).max() > 1e-3  # The class matters.
  valid = mask > 0
  ref_loss = nll_cond[valid].mean()
  eval_step = jax.jit(task.eval_step)
  evaluate = lambda b: task.summarize_eval(  # pylint: disable=g-long-lambda
      [jax.device_get(eval_step(state, jax.tree.map(lambda x: x[s], b), None))
       for s in (slice(0, 3), slice(3, 6))])
  metrics, images = evaluate(batch)
  assert images is None
  assert metrics["num_examples"] == 4 and metrics["invalid_labels"] == 1
  assert metrics["loss"] == pytest.approx(ref_loss, rel=1e-5)
  assert metrics["bits_per_token"] == pytest.approx(ref_loss / math.log(2), rel=1e-5)
  assert metrics["perplexity"] == pytest.approx(math.exp(ref_loss), rel=1e-5)
  assert metrics["accuracy"] == pytest.approx(hits[valid].mean())
  # Masked (padding) rows do not count, whatever they hold.
  garbage = {**batch, "tokens": batch["tokens"].at[4:].set(0),
             "label": batch["label"].at[4:].set(7)}
  again, _ = evaluate(garbage)
  assert again == pytest.approx(metrics)


def test_tokens_of_the_wrong_length_fail(data):
  task = tasks.build(_config("vim", data), None)
  state = jax.eval_shape(lambda: parallel.unbox(task.init(jax.random.key(0))))
  batch = _batch("vim", data, [0, 1], np.zeros((2, N - 1)), [1, 1])
  with pytest.raises(ValueError, match=r"shape \(2, 15\); the model needs \[b, 16\]"):
    jax.eval_shape(task.eval_step, state, batch, None)


# --- Data and config. ---

def test_parti_eval_batches_from_token_records(data):
  config = _config("parti", data)
  task = tasks.build(config, None)
  it = pipeline.create_iterator(config.data, split="eval", global_batch_size=16, seed=0,
                                train=False, transforms=task.data_transforms)
  batches = list(it)
  assert len(batches) == 2  # 20 records padded to 32.
  b = batches[1]
  assert "image" not in b and "caption" not in b
  assert b["tokens"].shape == (16, N) and b["tokens"].dtype == np.int32
  assert b["text_ids"].shape == (16, TEXT_LEN) and b["text_ids"].dtype == np.int32
  assert list(b["mask"]) == [1] * 4 + [0] * 12
  truncated = np.concatenate([x["text_truncated"] for x in batches])[:20]
  np.testing.assert_array_equal(truncated, [int(i % 4 == 3) for i in range(1000, 1020)])


def test_stage2_config_validation(data, tmp_path):
  with pytest.raises(ValueError, match="data.source=.*<dir>.* is a placeholder"):
    config_lib.validate(vim_config.get_config("tiny"), 8)
  config_lib.validate(_config("parti", data), 8)
  missing = str(tmp_path / "nope.model")
  with pytest.raises(ValueError, match=f"data.text_tokenizer='{missing}' does not exist"):
    config_lib.validate(_config("parti", data, **{"data.text_tokenizer": missing}), 8)
  small = data["vocab_size"] - 1
  with pytest.raises(ValueError, match=f"more than model.text_vocab_size={small}"):
    config_lib.validate(_config("parti", data, **{"model.text_vocab_size": small}), 8)
  with pytest.raises(ValueError, match=r"cfg_dropout=2.0; valid: a number in \[0, 1\]"):
    config_lib.validate(_config("vim", data, **{"model.cfg_dropout": 2.0}), 8)
  tokens = tmp_path / "tokens"
  tokens.mkdir()
  (tokens / "metadata.json").write_text(json.dumps({"grid_size": 8, "codebook_size": VOCAB}))
  source = f"array_record:{tokens}/tokens-{{split}}-*.array_record"
  with pytest.raises(ValueError, match=r"model.grid_size=4 does not match .*grid_size=8"):
    config_lib.validate(_config("vim", data, **{"data.source": source}), 8)


def test_abstract_params_for_summary():
  for config in (vim_config.get_config("tiny"), parti_config.get_config("tiny")):
    modules = tasks.abstract_params(config)
    assert {"token_embedding", "position_embedding", "decoder", "logits"} <= set(modules)
    shapes = jax.tree.leaves(modules)
    assert all(isinstance(s, jax.ShapeDtypeStruct) for s in shapes)
    assert modules["logits"]["kernel"].shape == (config.model.emb_dim, config.model.codebook_size)
  assert modules["text_embedding"]["embedding"].shape == (256, 128)


# --- The real loop on 8 devices. ---

@pytest.mark.parametrize("family", ["vim", "parti"])
def test_loop_trains_on_token_records(family, data, tmp_path):
  config = _config(family, data)
  result = loop.train_and_evaluate(config, str(tmp_path))
  assert result["step"] == config.total_steps
  # A learnable pattern: held-out loss falls far below uniform guessing (ln 32 = 3.47;
  # measured ~0.1-0.3 after 24 steps).
  assert np.isfinite(result["loss"])
  assert result["eval_loss"] < 1.0, result
  assert result["eval_bits_per_token"] == pytest.approx(result["eval_loss"] / math.log(2))
  assert result["eval_num_examples"] == 20
  assert 0.0 <= result["cfg_drop_fraction"] <= 0.5
  if family == "parti":
    assert result["eval_text_truncated"] == 5  # Records 1003, 1007, ..., 1019.
    assert result["text_truncated"] > 0
  assert os.path.exists(tmp_path / "checkpoints" / str(config.total_steps))


def test_logged_lr_is_the_rate_each_accumulated_update_applies(data):
  # 8 loop steps with accumulation 2 = 4 updates (at loop steps 1, 3, 5, 7): a
  # warm-up of 4 loop steps = 2 updates (0, lr / 2), then cosine over the
  # remaining 2 updates from lr (1e-2) towards end_lr (1e-3).
  config = _config("vim", data, total_steps=8, **{"optimizer.accumulation_steps": 2,
                                                  "optimizer.warmup_steps": 4})
  task = tasks.build(config, None)
  state = _init(task)
  labels = np.arange(4) % CLASSES
  batch = _batch("vim", data, labels, np.stack([_pattern(i) for i in labels]), np.ones(4))
  step = jax.jit(task.train_step)
  logged = []
  for i in range(8):
    state, metrics = step(state, batch, jax.random.key(i), None)
    logged.append(float(metrics["lr"]))
  per_update = [0.0, 5e-3, 1e-2, 1e-3 + 9e-3 * 0.5 * (1 + math.cos(math.pi / 2))]
  np.testing.assert_allclose(logged, np.repeat(per_update, 2), rtol=1e-6, atol=1e-9)
