"""Range and type checks of every config value, by key name, in every section.

`config_lib.validate` calls `check_values`. The rules go by a leaf's name, so
one table covers every family (tokenizer, VIM, Parti) and every section
(`optimizer` and `disc_optimizer` alike); keys not named here are checked
elsewhere or free-form. Each failure is a ValueError naming the dotted key,
the value and what is valid.
"""
import math

from vimjax import sampling
from vimjax.models import vit_vqgan
from vimjax.train import optimizers

# Counts and sizes: an integer >= 1.
POSITIVE_INTS = frozenset((
    "total_steps", "global_batch_size", "log_every_steps", "checkpoint_every_steps",
    "eval_every_steps", "keep_checkpoints", "num_eval_images", "image_size", "num_layers",
    "num_heads", "emb_dim", "mlp_dim", "codebook_size", "lookup_dim", "patch_size",
    "base_channels", "max_channels", "mbstd_group_size", "accumulation_steps", "grid_size",
    "num_classes", "encoder_layers", "decoder_layers", "max_text_length", "text_vocab_size",
    "cache_segments", "r1_interval"))
# Steps, counts where 0 means "off" or "all": an integer >= 0.
NON_NEGATIVE_INTS = frozenset((
    "seed", "num_train_examples", "num_eval_examples", "worker_count", "prefetch_buffer_size",
    "warmup_steps", "decay_start_step", "adversarial_start_step", "top_k"))
# Loss weights and other scales: a finite number >= 0.
NON_NEGATIVE_FLOATS = frozenset((
    "vq_beta", "r1_gamma", "grad_clip_norm", "weight_decay", "peak_flops_per_device",
    "dead_code_threshold", "end_lr", "cfg_scale", "temperature", "max_loss_ratio"))
# A finite number > 0.
POSITIVE_FLOATS = frozenset(("lr", "entropy_temperature"))
# Probabilities: [0, 1].
PROBABILITIES = frozenset(("dropout_rate", "cfg_dropout"))
# Exponential decays and Adam betas: [0, 1).
DECAYS = frozenset(("b1", "b2", "ema_decay", "usage_ema_decay", "lecam_ema_decay"))
# Names checked against a closed set wherever they appear (by section.leaf); the
# sets are the ones the code that reads them defines.
ENUMS = {
    "optimizer.name": optimizers.OPTIMIZERS,
    "optimizer.schedule": optimizers.SCHEDULES,
    "model.output": vit_vqgan.OUTPUTS,
    "sampling.dtype": sampling.DTYPES,
}
BOOLS = frozenset(("scan_layers", "restart_dead_codes", "use_cache", "skip_nonfinite_updates"))


def _is_int(value) -> bool:
  return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return (isinstance(value, (int, float)) and not isinstance(value, bool)
          and math.isfinite(value))


def _check_leaf(key: str, name: str, value) -> None:
  def fail(valid: str):
    raise ValueError(f"{key}={value!r}; valid: {valid}.")

  if name in POSITIVE_INTS and not (_is_int(value) and value >= 1):
    fail("an integer >= 1")
  if name in NON_NEGATIVE_INTS and not (_is_int(value) and value >= 0):
    fail("an integer >= 0")
  if name in NON_NEGATIVE_FLOATS or name.endswith("_weight"):
    if not (_is_number(value) and value >= 0):
      fail("a finite number >= 0")
  if name in POSITIVE_FLOATS and not (_is_number(value) and value > 0):
    fail("a finite number > 0")
  if name in PROBABILITIES and not (_is_number(value) and 0 <= value <= 1):
    fail("a number in [0, 1]")
  if name in DECAYS and not (_is_number(value) and 0 <= value < 1):
    fail("a number in [0, 1)")
  if name in BOOLS and not isinstance(value, bool):
    fail("True or False")
  if name == "top_p" and not (_is_number(value) and 0 < value <= 1):
    fail("a number in (0, 1]")


def _is_section(value) -> bool:
  return hasattr(value, "keys") and callable(value.keys) and not isinstance(value, dict)


def check_values(config, prefix: str = "") -> None:
  """Raises ValueError for the first value outside its range (walks every section)."""
  for name in config.keys():
    value = config[name]
    key = f"{prefix}{name}"
    if _is_section(value):
      check_values(value, key + ".")
      if {"num_heads", "emb_dim"} <= set(value.keys()):
        heads, dim = value["num_heads"], value["emb_dim"]
        if _is_int(heads) and _is_int(dim) and heads > 0 and dim % heads:
          raise ValueError(f"{key}.emb_dim={dim} is not divisible by {key}.num_heads={heads}.")
    elif name != "mesh":
      _check_leaf(key, name, value)
      section = prefix.rstrip(".").split(".")[-1].replace("disc_", "")
      valid = ENUMS.get(f"{section}.{name}")
      if valid is not None and value not in valid:
        raise ValueError(f"{key}={value!r}; valid: {valid}.")
