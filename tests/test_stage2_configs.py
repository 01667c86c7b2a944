"""configs/vim.py and configs/parti.py: keys, paper hyper-parameters, parameter counts."""
import math

import jax
import jax.numpy as jnp
import pytest

from vimjax.configs import parti as parti_config
from vimjax.configs import vim as vim_config
from vimjax.configs import vitvqgan
from vimjax import config_lib
from vimjax.data import shapes
from vimjax.train import optimizers
from vimjax import tasks

FAMILIES = {"vim": vim_config, "parti": parti_config}
ALL = [(name, v) for name, mod in FAMILIES.items() for v in mod.VARIANTS]
TOP_KEYS = ("task", "seed", "total_steps", "global_batch_size", "log_every_steps",
            "checkpoint_every_steps", "eval_every_steps", "keep_checkpoints",
            "num_eval_images", "peak_flops_per_device", "tokenizer_workdir", "mesh", "data",
            "model", "sampling", "optimizer")
# Paper parameter counts (ViT-VQGAN Table 2; Parti Table 1).
PAPER = {("vim", "base"): 650e6, ("vim", "large"): 1697e6, ("parti", "350m"): 350e6,
         ("parti", "750m"): 750e6, ("parti", "3b"): 3e9, ("parti", "20b"): 20e9}


def build_model(config):
  """The stage-2 model a config describes, built by its training task."""
  return tasks.TASKS[config.task].build_model(config)


def abstract_params(config):
  model = build_model(config)
  tokens = jnp.zeros((1, model.num_tokens), jnp.int32)
  if config.task == "vim":
    args = (tokens, jnp.zeros((1,), jnp.int32))
  else:
    args = (jnp.ones((1, config.model.max_text_length), jnp.int32), tokens)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), *args, train=False))["params"]


def count(abstract) -> tuple[int, int]:
  """(all params, params outside embedding tables and the output projection)."""
  leaves = jax.tree_util.tree_flatten_with_path(abstract)[0]
  total = embed = 0
  for path, leaf in leaves:
    size = math.prod(leaf.value.shape if hasattr(leaf, "value") else leaf.shape)
    total += size
    key = jax.tree_util.keystr(path)
    if "embedding" in key or "['logits']" in key:
      embed += size
  return total, total - embed


@pytest.mark.parametrize("family,variant", ALL)
def test_config_keys_and_lock(family, variant):
  config = FAMILIES[family].get_config(variant)
  assert config.task == family
  for key in config_lib.REQUIRED_KEYS + TOP_KEYS:
    config_lib._get(config, key)  # pylint: disable=protected-access
  assert set(config.optimizer) == set(vitvqgan.get_config("tiny").optimizer)
  assert set(config.sampling) == {"temperature", "top_k", "top_p", "cfg_scale", "use_cache",
                                  "cache_segments", "dtype"}
  assert config.sampling.dtype == "bfloat16"
  assert config.data.source.startswith("array_record:")
  with pytest.raises(AttributeError):
    config.not_a_key = 1
  optimizers.create_optimizer(config.optimizer, config.total_steps)  # Valid names.
  assert config.model.dtype == ("float32" if variant == "tiny" else "bfloat16")
  # VIM's paper trains without condition dropout; Parti's drops the text (rate not given).
  assert config.model.cfg_dropout == (0.0 if (family, variant) != ("vim", "tiny") and
                                      family == "vim" else 0.1)
  # No z-loss in either paper; the tiny demos keep one.
  assert config.model.z_loss_weight == (1e-4 if variant == "tiny" else 0.0)
  assert config.model.num_heads % config.mesh.tensor == 0
  if variant != "tiny":
    assert config.model.dropout_rate == 0.1 and config.model.grid_size == 32
    assert config.model.codebook_size == 8192


@pytest.mark.parametrize("family", FAMILIES)
def test_docstring_is_the_launch_command_and_bad_variant_fails(family):
  module = FAMILIES[family]
  assert module.__doc__.splitlines()[0] == (
      f"python -m vimjax.train --config=configs/{family}.py:tiny --workdir=/tmp/{family}_tiny")
  with pytest.raises(ValueError, match="Unknown .* variant 'xl'"):
    module.get_config("xl")


def test_paper_optimizer_settings():
  vim, parti = vim_config.get_config("large"), parti_config.get_config("350m")
  assert vim.global_batch_size == 1024 and parti.global_batch_size == 8192
  for config, lr, decay_from in ((vim, 4.5e-4, 80_000), (parti, 4.5e-5, 85_000)):
    o = config.optimizer
    assert (o.name, o.lr, o.b1, o.b2) == ("adafactor", lr, 0.9, 0.96)
    assert (o.warmup_steps, o.schedule, o.decay_start_step) == (5_000, "exponential", decay_from)
    assert config.total_steps == 450_000
  assert vim.optimizer.end_lr == 1e-5
  assert parti.optimizer.end_lr == pytest.approx(0.025 * 4.5e-5)
  assert (parti.optimizer.weight_decay, parti.optimizer.grad_clip_norm) == (4.5e-2, 4.0)
  assert parti.sampling.cfg_scale == 1.2 and parti.model.max_text_length == 128
  assert parti.model.text_vocab_size == 16_000


def test_tiny_configs_match_the_tiny_tokenizer_and_shapes():
  vq = vitvqgan.get_config("tiny")
  for config in (vim_config.get_config("tiny"), parti_config.get_config("tiny")):
    assert config.model.grid_size == vq.data.image_size // vq.model.patch_size
    assert config.model.codebook_size == vq.model.codebook_size
    assert config.data.image_size == vq.data.image_size
  assert vim_config.get_config("tiny").model.num_classes == shapes.NUM_CLASSES
  tiny = parti_config.get_config("tiny").model
  assert (tiny.encoder_layers, tiny.decoder_layers, tiny.emb_dim) == (2, 2, 128)


@pytest.mark.parametrize("family", FAMILIES)
def test_tiny_model_runs(family):
  config = FAMILIES[family].get_config("tiny")
  model = build_model(config)
  tokens = jnp.zeros((2, model.num_tokens), jnp.int32)
  if family == "vim":
    args = (tokens, jnp.array([0, 17]))
  else:
    args = (jnp.ones((2, config.model.max_text_length), jnp.int32), tokens)
  out = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), *args,
                                                      train=False)[0])
  assert out.shape == (2, 64, config.model.codebook_size) and out.dtype == jnp.float32


@pytest.mark.parametrize("family,variant", sorted(PAPER))
def test_parameter_counts_match_the_papers(family, variant):
  """Parti's Table 1 counts the transformer without embeddings / output layer
  (350M: 386M with them, 353M without); VIM's counts are totals."""
  total, non_embedding = count(abstract_params(FAMILIES[family].get_config(variant)))
  paper = PAPER[(family, variant)]
  measured = non_embedding if family == "parti" else total
  assert abs(measured / paper - 1) < 0.10, (family, variant, total, non_embedding)
  assert non_embedding < total


def test_paper_model_and_recipe_settings():
  """The Recipe audit table (BUILD_NOTES.md): paper values the other tests do not pin."""
  parti = parti_config.get_config("350m")
  m = parti.model
  assert (m.conv_attention_kernel, m.dropout_rate, m.codebook_size, m.grid_size) == (
      (6, 11), 0.1, 8192, 32)
  assert (m.z_loss_weight, parti.optimizer.ema_decay, parti.optimizer.accumulation_steps) == (
      0.0, 0.0, 1)
  for variant in ("base", "large"):
    vim = vim_config.get_config(variant)
    assert (vim.model.cfg_dropout, vim.model.z_loss_weight, vim.model.dropout_rate) == (
        0.0, 0.0, 0.1)
    assert (vim.sampling.temperature, vim.sampling.top_k, vim.sampling.top_p,
            vim.sampling.cfg_scale) == (1.0, 0, 1.0, 1.0)
    assert (vim.optimizer.weight_decay, vim.optimizer.ema_decay) == (0.0, 0.0)
    assert vim.model.num_classes == 1000 and vim.model.codebook_size == 8192


def test_parti_20b_defaults_are_its_proof_of_fit_slice():
  """20B fits v4:8x8x8 only as 32 accumulated microbatches of 256 (BUILD_NOTES, "Proof of
  fit": 17.2 GiB/chip); its schedule is still the paper's, in optimizer updates."""
  from vimjax.train import optimizers  # pylint: disable=g-import-not-at-top
  config = parti_config.get_config("20b")
  o = config.optimizer
  assert (config.global_batch_size, o.accumulation_steps) == (256, 32)
  k = o.accumulation_steps
  assert config.global_batch_size * k == 8192
  assert (config.total_steps // k, o.warmup_steps // k, o.decay_start_step // k) == (
      450_000, 5_000, 85_000)
  schedule = optimizers.create_schedule(o, config.total_steps)
  assert float(schedule(5_000)) == pytest.approx(o.lr)  # Warm-up ends at update 5k.
  assert float(schedule(450_000)) == pytest.approx(o.end_lr)
  assert (config.mesh.data, config.mesh.fsdp, config.mesh.tensor) == (1, -1, 16)
