"""Model FLOPs: the one count the loop, the benchmark and aot_compile report."""
import numpy as np

from vimjax.configs import vim as vim_config
from vimjax import flops
from vimjax import flops_cache
from vimjax import tasks
from vimjax.data import sources
from vimjax.train import loop
import pytest

pytestmark = pytest.mark.slow

GRID, VOCAB = 4, 32


def _vim_config(source: str, **model):
  config = vim_config.get_config("tiny")
  with config.unlocked():
    config.update(total_steps=1, global_batch_size=8, log_every_steps=1, eval_every_steps=1,
                  checkpoint_every_steps=1, num_eval_images=8, peak_flops_per_device=1e12)
    config.data.source = source
    config.model.update(grid_size=GRID, codebook_size=VOCAB, emb_dim=32, mlp_dim=64,
                        num_heads=2, num_layers=3, num_classes=2, **model)
  return config


def test_loop_reports_model_flops_of_a_scanned_config_and_a_restart_lowers_nothing(
    tmp_path, monkeypatch):
  for split in ("train", "eval"):
    sources.write_array_record(
        str(tmp_path / f"tokens-{split}-00000-of-00001.array_record"),
        ({"tokens": (np.arange(GRID * GRID) + i) % VOCAB, "label": np.int32(i % 2)}
         for i in range(16)))
  source = f"array_record:{tmp_path}/tokens-{{split}}-*.array_record"
  scanned = _vim_config(source, scan_layers=True, remat_policy="none")
  analytic = flops.model_flops_per_step(tasks.get(scanned), scanned)
  # Scan and remat change neither the model nor its count.
  unrolled = _vim_config(source, scan_layers=False, remat_policy="full")
  assert analytic == flops.model_flops_per_step(tasks.get(unrolled), unrolled) > 0
  result = loop.train_and_evaluate(scanned, str(tmp_path / "work"))
  assert result["flops_per_step"] == analytic
  assert result["flops_per_step_per_device"] * 8 == analytic
  # XLA's count of the compiled, scanned program sees the 3-layer body once.
  assert result["compiled_flops_per_device"] * 8 < 0.8 * analytic
  assert (tmp_path / "work" / flops_cache.CACHE_FILE).exists()

  def lower(*args, **kwargs):
    raise AssertionError("a restart lowered the unrolled step again")
  monkeypatch.setattr(flops, "model_flops_per_step", lower)
  with scanned.unlocked():
    scanned.total_steps = 2  # Resumes from step 1, reading WORKDIR/model_flops.json.
  resumed = loop.train_and_evaluate(scanned, str(tmp_path / "work"))
  assert resumed["step"] == 2 and resumed["flops_per_step"] == analytic and resumed["mfu"] > 0


def test_batch_specs_match_the_synthetic_batches():
  from vimjax.configs import contrastive  # pylint: disable=g-import-not-at-top
  from vimjax.configs import parti as parti_config  # pylint: disable=g-import-not-at-top
  from vimjax.configs import vitvqgan  # pylint: disable=g-import-not-at-top
  for config in (vitvqgan.get_config("tiny"), _vim_config("unused"),
                 parti_config.get_config("tiny"), contrastive.get_config("tiny")):
    task = tasks.get(config)
    real = task.synthetic_batch(config, config.global_batch_size, 0)
    shapes = task.batch_spec(config, config.global_batch_size)
    assert {k: (v.shape, v.dtype) for k, v in real.items()} == {
        k: (v.shape, v.dtype) for k, v in shapes.items()}, config.task
