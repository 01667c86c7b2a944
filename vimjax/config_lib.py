"""Config checks run before anything compiles: one-line errors naming key and value."""
import json
import os

from etils import epath
import ml_collections

from vimjax import config_checks
from vimjax import parallel
from vimjax.data import text
from vimjax.models import layers
from vimjax.train import optimizers

REQUIRED_KEYS = ("task", "seed", "total_steps", "global_batch_size", "log_every_steps",
                 "checkpoint_every_steps", "eval_every_steps", "keep_checkpoints",
                 "num_eval_images", "mesh.data", "mesh.fsdp",
                 "mesh.tensor", "data.source", "data.image_size", "model", "optimizer",
                 "eval.inception_weights", "eval.fid_reference", "eval.num_images")
TASKS = ("tokenizer", "vim", "parti", "contrastive")
# Tasks that train on the token records of `python -m vimjax.encode`.
STAGE2_TASKS = ("vim", "parti", "contrastive")


INCEPTION_MIN_SIZE = 75  # models/inception.py MIN_SIZE (not imported: it pulls in flax).
CONVERT_INCEPTION_HINT = "make it with `python -m vimjax.convert_inception`"


def eval_config(num_images: int) -> ml_collections.ConfigDict:
  """The `eval` section: Inception metrics (FID / IS / rFID) in evaluate and training.

  Empty `inception_weights` turns them off. `num_images`: 50000 for ImageNet,
  30000 for COCO (README "Evaluation protocol").
  """
  return ml_collections.ConfigDict(dict(
      inception_weights="",  # .npz from `python -m vimjax.convert_inception`.
      fid_reference="",      # mu/sigma .npz (pytorch-fid / ADM); needed for VIM/Parti.
      num_images=num_images,  # Eval images (tokenizer) or samples (VIM/Parti).
      inception_size=299,     # Resize target; 299 for comparable numbers.
      batch_size=256,         # Images per sharded Inception call.
      seed=0,                 # Sampling seed of the FID samples.
  ))


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
  config_checks.check_values(config)
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
  for section in ("optimizer", "disc_optimizer"):  # Names, schedule, decay: before any write.
    if section in config:
      optimizers.create_optimizer(config[section], config.total_steps)
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
  _validate_eval(config)
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


def _validate_eval(config) -> None:
  """Inception metrics: weights and (VIM/Parti) reference statistics exist."""
  e = config.eval
  if not e.inception_weights:
    return
  if config.task == "contrastive":
    raise ValueError(f"eval.inception_weights={e.inception_weights!r} with task='contrastive': "
                     "a dual encoder generates no images; leave eval.inception_weights empty.")
  if "://" not in e.inception_weights and not os.path.exists(e.inception_weights):
    raise ValueError(f"eval.inception_weights={e.inception_weights!r} does not exist; "
                     f"{CONVERT_INCEPTION_HINT}.")
  if int(e.num_images) < 2:
    raise ValueError(f"eval.num_images={e.num_images} must be >= 2 (50000 for ImageNet FID, "
                     "30000 for COCO).")
  if int(e.inception_size) < INCEPTION_MIN_SIZE:
    raise ValueError(f"eval.inception_size={e.inception_size} must be >= {INCEPTION_MIN_SIZE} "
                     "(299 for comparable numbers).")
  if int(e.batch_size) < 1:
    raise ValueError(f"eval.batch_size={e.batch_size} must be a positive integer.")
  if config.task in STAGE2_TASKS:
    ref = e.fid_reference
    if not ref:
      raise ValueError("eval.inception_weights is set but eval.fid_reference is empty: FID of "
                       "samples needs reference statistics (`python -m vimjax.fid --images=DIR "
                       "--out=REF.npz`, or ADM's VIRTUAL_imagenet256_labeled.npz).")
    if "://" not in ref and not os.path.exists(ref):
      raise ValueError(f"eval.fid_reference={ref!r} does not exist.")


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
  # Local metadata only: validation also runs offline (launch scripts); a gs://
  # one is checked when the run opens its data (train/preflight.py).
  check_tokens_metadata(config, remote=False)
  if "text_tokenizer" in config.data:  # Parti and the contrastive reranker read captions.
    path = config.data.text_tokenizer
    if "<dir>" in path or ("://" not in path and not os.path.exists(path)):
      raise ValueError(f"data.text_tokenizer={path!r} does not exist; {text.TRAIN_HINT}.")
    vocab = text.TextTokenizer(path, config.model.max_text_length).vocab_size
    if vocab > config.model.text_vocab_size:
      raise ValueError(f"data.text_tokenizer={path!r} has {vocab} pieces, more than "
                       f"model.text_vocab_size={config.model.text_vocab_size}.")


def check_tokens_metadata(config, remote: bool = True) -> None:
  """model.grid_size / codebook_size against `encode`'s metadata.json beside the shards.

  Reads it through epath (local or, with `remote`, gs://); no metadata.json, or a
  `{split}` in the shards' folder, is not checked.
  """
  kind, _, pattern = config.data.source.partition(":")
  directory = os.path.dirname(pattern)
  if (kind != "array_record" or "{split}" in directory or "grid_size" not in config.model
      or (not remote and "://" in directory)):
    return
  metadata = epath.Path(directory) / "metadata.json"
  if not metadata.exists():
    return
  written = json.loads(metadata.read_text())
  for key in ("grid_size", "codebook_size"):
    if written[key] != config.model[key]:
      raise ValueError(f"model.{key}={config.model[key]} does not match the tokens in "
                       f"{directory} ({key}={written[key]} in metadata.json); set "
                       f"--config.model.{key}={written[key]}.")
