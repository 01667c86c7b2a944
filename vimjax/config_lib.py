"""Config checks run before anything compiles: one-line errors naming key and value."""
import json
import os

from vimjax import parallel
from vimjax.data import text
from vimjax.models import layers

REQUIRED_KEYS = ("task", "seed", "total_steps", "global_batch_size", "log_every_steps",
                 "checkpoint_every_steps", "eval_every_steps", "mesh.data", "mesh.fsdp",
                 "mesh.tensor", "data.source", "data.image_size", "model", "optimizer")
TASKS = ("tokenizer", "vim", "parti", "contrastive")
# Tasks that train on the token records of `python -m vimjax.encode`.
STAGE2_TASKS = ("vim", "parti", "contrastive")


def _get(config, dotted: str):
  node = config
  for part in dotted.split("."):
    if part not in node:
      raise ValueError(f"Config is missing required key {dotted!r}.")
    node = node[part]
  return node


def override(config, **dotted):
  """Sets `config`'s dotted keys in place ("model.num_layers"=2); returns it.

  As `--config.model.num_layers=2` does on the command line, for code and tests.
  Keys must exist (a typo is an error naming it).
  """
  with config.unlocked():
    for key, value in dotted.items():
      *parents, leaf = key.split(".")
      node = config
      for depth, part in enumerate(key.split(".")):
        if part not in node:
          raise ValueError(f"Config has no key {key!r} to override (no {part!r}).")
        if depth < len(parents):
          node = node[part]
      node[leaf] = value
  return config


def validate(config, num_devices: int, num_processes: int = 1) -> None:
  """Raises ValueError on the first problem found in `config`."""
  for key in REQUIRED_KEYS:
    _get(config, key)
  if config.task not in TASKS:
    raise ValueError(f"task={config.task!r}; valid: {TASKS}.")
  for key in ("total_steps", "global_batch_size", "log_every_steps",
              "checkpoint_every_steps", "eval_every_steps"):
    if int(config[key]) <= 0:
      raise ValueError(f"{key}={config[key]} must be a positive integer.")
  data, fsdp, tensor = parallel.mesh_shape(config.mesh, num_devices)
  parallel.rules_from_config(config.mesh)
  dp = data * fsdp
  if config.global_batch_size % dp:
    raise ValueError(f"global_batch_size={config.global_batch_size} is not divisible by the "
                     f"data-parallel size {dp} (mesh.data={data} x mesh.fsdp={fsdp}).")
  if config.global_batch_size % num_processes:
    raise ValueError(f"global_batch_size={config.global_batch_size} is not divisible by the "
                     f"{num_processes} processes.")
  _validate_levers(config.model)
  patch = config.model.get("patch_size")
  if patch and config.data.image_size % patch:
    raise ValueError(f"data.image_size={config.data.image_size} is not divisible by "
                     f"model.patch_size={patch}.")
  if "loss" in config and config.loss.get("perceptual_weight", 0) > 0:
    path = config.loss.perceptual_weights
    if not path:
      raise ValueError("loss.perceptual_weight > 0 needs loss.perceptual_weights=PATH.npz "
                       "(make it with `python -m vimjax.convert_weights`), or set "
                       "loss.perceptual_weight=0.")
    if "://" not in path and not os.path.exists(path):
      raise ValueError(f"loss.perceptual_weights={path!r} does not exist "
                       "(make it with `python -m vimjax.convert_weights`).")
  if config.task == "tokenizer":
    _validate_tokenizer(config)
  if config.task in STAGE2_TASKS:
    _validate_stage2(config)


def _validate_tokenizer(config) -> None:
  quantizers = ("factorized", "fsq")
  if config.model.quantizer not in quantizers:
    raise ValueError(f"model.quantizer={config.model.quantizer!r}; valid: {quantizers}.")
  if config.model.quantizer == "fsq" and config.loss.entropy_weight > 0:
    raise ValueError(f"loss.entropy_weight={config.loss.entropy_weight} needs "
                     "model.quantizer='factorized' (FSQ has no code similarities); set it to 0.")


COMPUTE_DTYPES = ("float32", "bfloat16", "float16")


def _validate_levers(model) -> None:
  """Remat policy, scan flag and dtypes: the compile-time and memory levers."""
  if "remat_policy" in model and model.remat_policy not in layers.REMAT_POLICIES:
    raise ValueError(f"model.remat_policy={model.remat_policy!r}; valid: "
                     f"{tuple(layers.REMAT_POLICIES)}.")
  if "scan_layers" in model and not isinstance(model.scan_layers, bool):
    raise ValueError(f"model.scan_layers={model.scan_layers!r} must be True or False.")
  if "dtype" in model and model.dtype not in COMPUTE_DTYPES:
    raise ValueError(f"model.dtype={model.dtype!r}; valid: {COMPUTE_DTYPES}.")
  if "param_dtype" in model and model.param_dtype not in ("float32", "bfloat16"):
    raise ValueError(f"model.param_dtype={model.param_dtype!r}; valid: ('float32', "
                     "'bfloat16') (float32 params with model.dtype='bfloat16' is the usual).")


def _validate_stage2(config) -> None:
  """Token source, CFG rate, tokens metadata and (captioned tasks) the text tokenizer."""
  source = config.data.source
  if "<dir>" in source:
    raise ValueError(f"data.source={source!r} is a placeholder; point it at the shards of "
                     "`python -m vimjax.encode`, e.g. "
                     "'array_record:OUT/tokens-{split}-*.array_record'.")
  if "cfg_dropout" in config.model and not 0.0 <= config.model.cfg_dropout <= 1.0:
    raise ValueError(f"model.cfg_dropout={config.model.cfg_dropout} must be in [0, 1].")
  kind, _, pattern = source.partition(":")
  directory = os.path.dirname(pattern)
  metadata = os.path.join(directory, "metadata.json")
  if kind == "array_record" and "{split}" not in directory and os.path.exists(metadata):
    with open(metadata) as f:
      written = json.load(f)
    for key in ("grid_size", "codebook_size"):
      if written[key] != config.model[key]:
        raise ValueError(f"model.{key}={config.model[key]} does not match the tokens in "
                         f"{directory} ({key}={written[key]} in metadata.json); set "
                         f"--config.model.{key}={written[key]}.")
  if "text_tokenizer" in config.data:  # Parti and the contrastive reranker read captions.
    path = config.data.text_tokenizer
    if "<dir>" in path or ("://" not in path and not os.path.exists(path)):
      raise ValueError(f"data.text_tokenizer={path!r} does not exist; {text.TRAIN_HINT}.")
    vocab = text.TextTokenizer(path, config.model.max_text_length).vocab_size
    if vocab > config.model.text_vocab_size:
      raise ValueError(f"data.text_tokenizer={path!r} has {vocab} pieces, more than "
                       f"model.text_vocab_size={config.model.text_vocab_size}.")
