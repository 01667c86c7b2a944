"""flops_cache.StepFlops: the model FLOPs of a run counted once, off the critical path."""
import logging

from vimjax import flops
from vimjax import flops_cache
from vimjax import tasks
from vimjax.configs import vim as vim_config


def _config(num_layers=2):
  config = vim_config.get_config("tiny")
  with config.unlocked():
    config.global_batch_size = 8
    config.model.update(grid_size=4, codebook_size=32, emb_dim=32, mlp_dim=64, num_heads=2,
                        num_layers=num_layers, num_classes=2)
  return config


def test_counted_once_then_read_and_recounted_only_for_a_changed_model(tmp_path, monkeypatch,
                                                                       caplog):
  config = _config()
  counter = flops_cache.StepFlops(tasks.get(config), config, str(tmp_path))
  assert counter.counted_now
  phases = counter.phases(wait=True)
  assert phases == ((0, flops.model_flops_per_step(tasks.get(config), config)),) and phases[0][1] > 0

  lowered = []
  monkeypatch.setattr(flops, "model_flops_by_phase", lambda t, c: lowered.append(c) or 1 / 0)
  with config.unlocked():  # Run-only keys: same fingerprint.
    config.update(total_steps=config.total_steps * 2, seed=7, log_every_steps=3)
  again = flops_cache.StepFlops(tasks.get(config), config, str(tmp_path))
  assert not again.counted_now and again.phases() == phases and not lowered

  with caplog.at_level(logging.WARNING):  # A changed model recounts; a failed count warns.
    deeper = flops_cache.StepFlops(tasks.get(config), _config(num_layers=3), str(tmp_path))
    assert deeper.counted_now and deeper.phases(wait=True) is None and len(lowered) == 1
  assert "Could not count the model FLOPs (division by zero)" in caplog.text
  assert flops_cache.fingerprint(_config(3)) != flops_cache.fingerprint(_config(2))
