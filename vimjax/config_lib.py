"""Config checks run before anything compiles: one-line errors naming key and value."""
import os

from vimjax import parallel

REQUIRED_KEYS = ("task", "seed", "total_steps", "global_batch_size", "log_every_steps",
                 "checkpoint_every_steps", "eval_every_steps", "mesh.data", "mesh.fsdp",
                 "mesh.tensor", "data.source", "data.image_size", "model", "optimizer")
TASKS = ("tokenizer",)


def _get(config, dotted: str):
  node = config
  for part in dotted.split("."):
    if part not in node:
      raise ValueError(f"Config is missing required key {dotted!r}.")
    node = node[part]
  return node


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
