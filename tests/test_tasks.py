"""The Task protocol: every family provides it, and the shared rules live in one place."""
import typing

import jax
import numpy as np
import pytest

from vimjax import tasks
from vimjax.configs import contrastive
from vimjax.configs import parti
from vimjax.configs import vim
from vimjax.configs import vitvqgan
from vimjax.tasks import base

CONFIGS = {"tokenizer": vitvqgan, "vim": vim, "parti": parti, "contrastive": contrastive}
PROTOCOL = [n for n in dir(base.Task) if not n.startswith("_")] + list(
    typing.get_type_hints(base.Task))


def _config(name, **model):
  config = CONFIGS[name].get_config("tiny")
  with config.unlocked():
    config.model.update(model)
  return config


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_family_provides_the_protocol(name):
  task = tasks.TASKS[name]
  assert task.NAME == name
  missing = [attr for attr in PROTOCOL if not hasattr(task, attr)]
  assert not missing, missing
  assert task.INPUT in base.INPUTS and task.EVAL_IMAGES in base.EVAL_IMAGES
  config = _config(name)
  assert task.conditioning(config) in base.CONDITIONINGS
  for key in task.LAYER_KEYS:  # Dotted keys of config.model, all integers.
    node = config.model
    for part in key.split("."):
      node = node[part]
    assert isinstance(node, int) and node >= 1, key
  spec = task.batch_spec(config, 4)
  batch = task.synthetic_batch(config, 4, 0)
  assert {k: (v.shape, v.dtype) for k, v in batch.items()} == {
      k: (v.shape, v.dtype) for k, v in spec.items()}
  condition = task.condition_spec(config, 4)
  values = task.synthetic_conditions(config, 4, 0)
  assert (condition is None) == (values is None) == (task.conditioning(config) == "none")
  if condition is not None:
    assert (values.shape, values.dtype) == (condition.shape, condition.dtype)


def test_sampling_families_and_unknown_task():
  assert tasks.SAMPLING == ("vim", "parti")
  with pytest.raises(ValueError, match=r"task='var'; valid: \('tokenizer', 'vim', 'parti', "
                     r"'contrastive'\)"):
    tasks.get({"task": "var"})
  with pytest.raises(ValueError, match="needs a model that samples image tokens"):
    tasks.get_sampling(_config("contrastive"), "--workdir='w'")


def test_unconditional_vim_samples_without_guidance():
  config = _config("vim", num_classes=0)
  with config.unlocked():
    config.sampling.cfg_scale = 3.0
  task = tasks.get(config)
  assert task.conditioning(config) == "none"
  # The config's guidance does not apply; asking for it explicitly is an error.
  assert task.sampling_settings(config)["cfg_scale"] == 1.0
  assert task.sampling_settings(config, cfg_scale=1.0, top_k=5)["top_k"] == 5
  with pytest.raises(ValueError, match="cfg_scale=2.0 needs a class-conditional VIM"):
    task.sampling_settings(config, cfg_scale=2.0)
  conditional = _config("vim", num_classes=10)
  with conditional.unlocked():
    conditional.sampling.cfg_scale = 3.0
  assert task.sampling_settings(conditional)["cfg_scale"] == 3.0
  assert task.sampling_settings(conditional, cfg_scale=2.0)["cfg_scale"] == 2.0
  labels = task.synthetic_conditions(conditional, 64, 0)
  assert labels.min() >= 0 and labels.max() < 10


def test_sampling_settings_carry_the_decode_dtype():
  config = _config("parti")
  task = tasks.get(config)
  assert task.sampling_settings(config)["dtype"] == "bfloat16"
  assert task.sampling_settings(config, dtype="float32")["dtype"] == "float32"
  with config.unlocked():
    del config.sampling["dtype"]  # A workdir's config.json from before the key.
  assert task.sampling_settings(config)["dtype"] is None  # The model's dtype.
  with pytest.raises(ValueError, match=r"sampling.dtype='float16'; valid: \('float32', "):
    task.sampling_settings(config, dtype="float16")


def test_tokenizer_phases_split_at_the_gan_start():
  config = vitvqgan.get_config("tiny")
  with config.unlocked():
    config.loss.update(adversarial_weight=0.1, adversarial_start_step=7)
  (s0, before), (s1, during) = tasks.get(config).flops_phases(config)
  assert (s0, s1) == (0, 7) and before.loss.adversarial_weight == 0.0 and during is config
  with config.unlocked():
    config.loss.adversarial_start_step = 0
  assert tasks.get(config).flops_phases(config) == ((0, config),)


def test_abstract_params_match_the_built_init():
  config = _config("vim", num_layers=1, emb_dim=32, mlp_dim=64, num_heads=2)
  steps = tasks.build(config, None)
  state = jax.eval_shape(steps.init, jax.random.key(0))
  from vimjax import parallel  # pylint: disable=g-import-not-at-top
  built = parallel.unbox(state.params["model"])
  abstract = tasks.abstract_params(config)
  assert jax.tree.map(lambda x: x.shape, dict(built)) == jax.tree.map(lambda x: x.shape, abstract)
  assert np.prod(abstract["logits"]["kernel"].shape) > 0
