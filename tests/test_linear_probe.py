"""The VIM linear probe: block features (sown, scanned or not) against a truncated model,
the optax head on known problems, and the probe end to end on a VIM trained by the loop."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vimjax.configs import vim as vim_config
from vimjax import checkpoint
from vimjax import config_lib
from vimjax import parallel
from vimjax.data import sources
from vimjax.evaluation import linear_probe
from vimjax.models import layers
from vimjax.models import transformer

pytestmark = pytest.mark.slow

GRID, VOCAB, CLASSES = 4, 32, 4


def _vim(num_layers, scan=False):
  return transformer.VIM(vocab_size=VOCAB, grid_h=GRID, grid_w=GRID, num_layers=num_layers,
                         num_heads=2, emb_dim=16, mlp_dim=32, num_classes=CLASSES,
                         scan_layers=scan)


def test_block_features_equal_a_truncated_model_scanned_or_not():
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, VOCAB, (3, GRID * GRID)), jnp.int32)
  full = _vim(3)
  params = parallel.unbox(full.init(jax.random.key(0), tokens, None, train=False)["params"])
  features = np.asarray(linear_probe.pooled_block_features(full, params, tokens, [1, 2, 3]))
  assert features.shape == (3, 3, 16)

  # The last block's sown output, through the model's own head, gives its logits.
  _, state = full.apply({"params": params}, tokens, None, train=False,
                        mutable=["intermediates"])
  last = layers.block_outputs(state["intermediates"]["decoder"], 3)[-1]
  head = lambda p, x: transformer._logits_dense(VOCAB, jnp.float32, None).apply(  # pylint: disable=protected-access
      {"params": p["logits"]}, layers.LayerNorm().apply({"params": p["decoder_norm"]}, x))
  np.testing.assert_allclose(head(params, last), full.apply({"params": params}, tokens, None,
                                                            train=False), rtol=1e-5, atol=1e-5)
  # Block 2 of 3 = the last block of the 2-block model with the same first two blocks.
  short = _vim(2)
  short_params = {**params, "decoder": {k: params["decoder"][k] for k in ("layers_0", "layers_1")}}
  np.testing.assert_allclose(
      features[1], linear_probe.pooled_block_features(short, short_params, tokens, [2])[0],
      rtol=1e-5, atol=1e-6)
  # Scanned stacks give the same features from the same (stacked) weights.
  stacked = {**params, "decoder": {"layers": jax.tree.map(
      lambda *x: jnp.stack(x), *(params["decoder"][f"layers_{i}"] for i in range(3)))}}
  np.testing.assert_allclose(
      linear_probe.pooled_block_features(_vim(3, scan=True), stacked, tokens, [1, 2, 3]),
      features, rtol=1e-5, atol=1e-6)
  # The label is never shown: the probe feeds the null class, so the class rows do not matter.
  table = params["class_embedding"]["embedding"]
  other = {**params, "class_embedding": {"embedding": table.at[:CLASSES].set(5.0)}}
  np.testing.assert_array_equal(
      linear_probe.pooled_block_features(full, other, tokens, [1, 2, 3]), features)
  with pytest.raises(ValueError, match=r"--block=4 out of range; valid: 1..3"):
    linear_probe.check_blocks([4], 3)


def test_linear_head_separates_clusters_and_stays_at_chance_on_random_labels():
  rng = np.random.default_rng(0)
  centers = rng.normal(size=(5, 12)) * 3
  labels = rng.integers(0, 5, 600)
  x = (centers[labels] + rng.normal(size=(600, 12))).astype(np.float32)
  standardize = linear_probe.Standardizer(x[:400])
  head = linear_probe.train_linear_head(standardize(x[:400]), labels[:400], 5, steps=300,
                                        batch_size=128, lr=5e-2, weight_decay=1e-4)
  assert head["kernel"].shape == (12, 5)
  assert np.mean(linear_probe.predict(head, standardize(x[400:])) == labels[400:]) > 0.95
  shuffled = rng.permutation(labels)
  head = linear_probe.train_linear_head(standardize(x[:400]), shuffled[:400], 5, steps=300,
                                        batch_size=128, lr=5e-2, weight_decay=1e-4)
  accuracy = np.mean(linear_probe.predict(head, standardize(x[400:])) == shuffled[400:])
  assert accuracy < 0.35  # Chance is 0.2; 200 eval rows.


def _records(n, offset, rng):
  # The class sets the first four tokens; the rest is noise. Every 5th row is unlabelled.
  for i in range(offset, offset + n):
    c = i % CLASSES
    tokens = rng.integers(0, VOCAB, GRID * GRID)
    tokens[:4] = 4 * c + np.arange(4)
    yield {"tokens": tokens.astype(np.int32), "label": np.int32(-1 if i % 5 == 4 else c),
           "caption": ""}


def test_probe_end_to_end_on_a_trained_vim(tmp_path):
  from vimjax.train import loop  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  sources.write_array_record(str(tmp_path / "tokens-train-0.array_record"),
                             _records(160, 0, rng))
  sources.write_array_record(str(tmp_path / "tokens-eval-0.array_record"),
                             _records(40, 1000, rng))
  config = config_lib.override(
      vim_config.get_config("tiny"), total_steps=2, global_batch_size=8, log_every_steps=2,
      eval_every_steps=2, checkpoint_every_steps=2, num_eval_images=8,
      peak_flops_per_device=1e12,
      **{"data.source": f"array_record:{tmp_path}/tokens-{{split}}-*.array_record",
         "model.grid_size": GRID, "model.codebook_size": VOCAB, "model.num_classes": CLASSES,
         "model.num_layers": 2, "model.emb_dim": 32, "model.mlp_dim": 64,
         "model.num_heads": 2})
  workdir = str(tmp_path / "vim")
  loop.train_and_evaluate(config, workdir)
  saved = checkpoint.load_workdir_config(workdir)
  result = linear_probe.run(saved, workdir, blocks=[1, 2], steps=200, batch_size=64, lr=5e-2)
  assert result["num_train"] == 128 and result["num_eval"] == 32 and result["unlabelled"] == 40
  assert result["num_classes"] == CLASSES and result["chance"] == pytest.approx(0.25)
  assert set(result["accuracy"]) == {"1", "2"} and result["best_accuracy"] > 0.9
  with pytest.raises(ValueError, match=r"--block=3 out of range"):
    linear_probe.run(saved, workdir, blocks=[3])
  with pytest.raises(ValueError, match="the linear probe reads a VIM workdir"):
    linear_probe.run(config_lib.override(saved, task="parti"), workdir, blocks=[1])
