"""Smallest tokenizer config that trains through the real loop (survival tests)."""
from vimjax.configs import vitvqgan
from vimjax import config_lib


def fast_config(**overrides):
  """vitvqgan tiny shrunk to compile and step in seconds: no GAN, 1 block, 16 px."""
  config = vitvqgan.get_config("tiny")
  with config.unlocked():
    config.total_steps = 4
    config.global_batch_size = 8
    config.log_every_steps = 2
    config.checkpoint_every_steps = 2
    config.eval_every_steps = 1000
    config.num_eval_images = 8
    config.peak_flops_per_device = 1e12  # No matmul measurement.
    config.data.image_size = 16
    config.data.num_train_examples = 64
    config.data.num_eval_examples = 8
    for side in (config.model.encoder, config.model.decoder):
      side.update(num_layers=1, num_heads=2, emb_dim=16, mlp_dim=32)
    config.model.codebook_size = 32
    config.model.lookup_dim = 4
    config.loss.entropy_weight = 0.0
    config.optimizer.warmup_steps = 1
  return config_lib.override(config, **overrides)


def get_config(arg: str = ""):
  """For the binaries: `--config=tests/survive_configs.py`."""
  del arg
  return fast_config()
