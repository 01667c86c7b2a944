"""Decoder fine-tuning (Parti's tokenizer recipe) end to end through the train binary.

The fine-tuned workdir must encode every image to exactly the ids of the
tokenizer it started from, so that stage-2 tokens stay valid for its decoder.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from vimjax import checkpoint
from vimjax import encoding
from vimjax import parallel
from vimjax.train import loop
from vimjax.tasks import tokenizer
import test_train_tokenizer

pytestmark = pytest.mark.slow

# The source tokenizer: the micro config, no GAN (the fine-tune keeps one), EMA
# on so that `encode` reads EMA weights, different from the raw ones.
SOURCE = dict(total_steps=3, eval_every_steps=3, checkpoint_every_steps=3, log_every_steps=3,
              **{"optimizer.ema_decay": 0.5, "loss.adversarial_weight": 0.0,
                 "peak_flops_per_device": 1e12})
# The fine-tune: a wider decoder, raw weights, dead-code restarts left on (the
# tiny default) to show they are skipped.
FINETUNE = {"total_steps": 3, "eval_every_steps": 3, "checkpoint_every_steps": 3,
            "log_every_steps": 3, "optimizer.ema_decay": 0.0, "peak_flops_per_device": 1e12,
            "model.decoder.emb_dim": 48, "model.decoder.mlp_dim": 96}


def _flags(overrides: dict) -> list[str]:
  return [f"--config.{k}={v}" for k, v in overrides.items()]


def _usage_ema(workdir):
  manager = ocp.CheckpointManager(checkpoint.checkpoints_dir(workdir))
  state = manager.restore(manager.latest_step(),
                          args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
  manager.close()
  return np.asarray(state["extra"]["usage_ema"])


def _codes(workdir, images):
  """The ids `python -m vimjax.encode` writes for `images` with `workdir`'s tokenizer."""
  config = encoding.load_tokenizer_config(workdir)
  mesh = parallel.create_mesh(config.mesh)
  rules = parallel.rules_from_config(config.mesh)
  model = tokenizer.build_model(config)
  with jax.set_mesh(mesh):
    params, _ = encoding.restore_generator(config, workdir, mesh, rules)
    params = jax.tree.map(np.asarray, jax.device_get(params))
  codes = model.apply({"params": params}, images, train=False, method="encode")[1]["codes"]
  return np.asarray(codes), params


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
  source = str(tmp_path_factory.mktemp("vq_source"))
  loop.train_and_evaluate(test_train_tokenizer.micro_config(**SOURCE), source)
  finetuned = str(tmp_path_factory.mktemp("vq_finetuned"))
  micro = test_train_tokenizer.micro_config()
  overrides = {
      "global_batch_size": micro.global_batch_size, "num_eval_images": micro.num_eval_images,
      "data.image_size": 16, "data.num_train_examples": 64, "data.num_eval_examples": 8,
      "model.codebook_size": 64, "model.lookup_dim": 8,
      "discriminator.base_channels": 8, "discriminator.max_channels": 16,
      "loss.adversarial_weight": 0.0, "loss.logit_laplace_weight": 0.1,
      "optimizer.warmup_steps": 1, "disc_optimizer.warmup_steps": 1}
  for side in ("encoder", "decoder"):
    overrides.update({f"model.{side}.num_layers": 1, f"model.{side}.num_heads": 2,
                      f"model.{side}.emb_dim": 32, f"model.{side}.mlp_dim": 64})
  overrides.update(FINETUNE)
  env = dict(os.environ, JAX_PLATFORMS="cpu")  # XLA_FLAGS: conftest's (8 devices).
  proc = subprocess.run(
      [sys.executable, "-m", "vimjax.train", "--config=configs/vitvqgan.py:tiny",
       f"--workdir={finetuned}", f"--config.finetune_decoder_from={source}",
       *_flags(overrides)],
      capture_output=True, text=True, timeout=600, env=env,
      cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  return source, finetuned, result


def test_finetuned_tokenizer_encodes_to_identical_ids(workdirs):
  source, finetuned, result = workdirs
  assert result["step"] == 3
  images = jax.random.uniform(jax.random.key(1), (16, 16, 16, 3))
  source_codes, source_params = _codes(source, images)
  tuned_codes, tuned_params = _codes(finetuned, images)
  np.testing.assert_array_equal(tuned_codes, source_codes)
  # Frozen: encoder, codebook (no dead-code restart) and usage statistics.
  for name in tokenizer.FROZEN_WHEN_FINETUNING:
    jax.tree.map(np.testing.assert_array_equal, tuned_params[name], source_params[name])
  np.testing.assert_array_equal(_usage_ema(finetuned), _usage_ema(source))
  # The decoder is the fine-tune's own, wider one.
  assert tuned_params["decoder"]["norm"]["scale"].shape == (48,)
  assert source_params["decoder"]["norm"]["scale"].shape == (32,)


def test_source_ema_weights_are_the_frozen_ones(workdirs):
  # The source encodes with its EMA weights; the fine-tune must freeze those,
  # not the raw params (they differ after 3 steps with ema_decay 0.5).
  source, finetuned, _ = workdirs
  _, tuned = _codes(finetuned, jnp.zeros((1, 16, 16, 3)))
  manager = ocp.CheckpointManager(checkpoint.checkpoints_dir(source))
  state = manager.restore(manager.latest_step(),
                          args=ocp.args.Composite(state=ocp.args.StandardRestore())).state
  manager.close()
  raw, ema = state["params"]["generator"], state["ema_params"]["generator"]
  assert np.abs(np.asarray(raw["quantizer"]["codebook"])
                - np.asarray(ema["quantizer"]["codebook"])).max() > 0
  np.testing.assert_array_equal(tuned["quantizer"]["codebook"], ema["quantizer"]["codebook"])


def test_mismatched_encoder_is_a_clear_error(workdirs, tmp_path):
  source, _, _ = workdirs
  config = test_train_tokenizer.micro_config(
      finetune_decoder_from=source, **{"model.lookup_dim": 4})
  with pytest.raises(ValueError, match="its quantizer params differ .* must match the "
                     "pretrained tokenizer"):
    loop.train_and_evaluate(config, str(tmp_path / "bad"))
