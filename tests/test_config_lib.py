"""Start-up validation: every bad config is a one-line error naming key and value."""
import subprocess
import sys

import pytest

from vimjax.configs import vitvqgan
from vimjax import config_lib


def _config(**overrides):
  return config_lib.override(vitvqgan.get_config("tiny"), **overrides)


def test_tiny_config_is_valid_on_8_devices():
  config_lib.validate(_config(), num_devices=8)


@pytest.mark.parametrize("overrides,match", [
    ({"mesh.data": 3}, "does not divide the 8 devices"),
    ({"global_batch_size": 12}, "global_batch_size=12 is not divisible by the data-parallel size 8"),
    ({"data.image_size": 30}, "data.image_size=30 is not divisible by model.patch_size=4"),
    ({"loss.perceptual_weight": 0.1}, "needs loss.perceptual_weights"),
    ({"loss.perceptual_weight": 0.1, "loss.perceptual_weights": "/no/such.npz"},
     "'/no/such.npz' does not exist"),
    ({"task": "gan"}, "task='gan'"),
    ({"total_steps": 0}, "total_steps=0"),
    ({"model.quantizer": "vq"}, "model.quantizer='vq'; valid: \\('factorized', 'fsq'\\)"),
    ({"model.quantizer": "fsq", "loss.entropy_weight": 0.1}, "entropy_weight=0.1 needs"),
])
def test_bad_configs_fail_with_one_line(overrides, match):
  with pytest.raises(ValueError, match=match) as error:
    config_lib.validate(_config(**overrides), num_devices=8)
  assert "\n" not in str(error.value)


def test_unknown_variant_names_the_valid_ones():
  with pytest.raises(ValueError, match="Unknown vitvqgan variant 'xl'.*tiny, ss"):
    vitvqgan.get_config("xl")


def test_config_is_locked_against_unknown_keys():
  config = vitvqgan.get_config("tiny")
  with pytest.raises(AttributeError):
    config.optimizer.learning_rate = 1.0


def test_unknown_override_key_fails_at_the_command_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "vimjax.train", "--config=configs/vitvqgan.py:tiny",
       f"--workdir={tmp_path}", "--config.optimizer.learning_rate=1e-3"],
      capture_output=True, text=True, timeout=120)
  assert proc.returncode != 0
  assert "learning_rate" in proc.stderr


def test_override_sets_dotted_keys_and_names_a_missing_one():
  config = config_lib.override(vitvqgan.get_config("tiny"),
                               **{"model.encoder.num_layers": 3, "seed": 7})
  assert config.model.encoder.num_layers == 3 and config.seed == 7
  with pytest.raises(ValueError, match="no key 'model.encoder.num_layerz'.*'num_layerz'"):
    config_lib.override(config, **{"model.encoder.num_layerz": 3})
  with pytest.raises(ValueError, match="'modle'"):
    config_lib.override(config, **{"modle.encoder.num_layers": 3})
