"""config.task -> the task's `build(config, mesh) -> loop.Task`."""
from vimjax.train import contrastive
from vimjax.train import parti
from vimjax.train import tokenizer
from vimjax.train import vim


TASKS = {"tokenizer": tokenizer, "vim": vim, "parti": parti, "contrastive": contrastive}


def _module(config):
  if config.task not in TASKS:
    raise ValueError(f"task={config.task!r}; valid: {tuple(TASKS)}.")
  return TASKS[config.task]


def build(config, mesh):
  """The task's pure functions (`loop.Task`)."""
  return _module(config).build(config, mesh)


def abstract_params(config) -> dict:
  """{top-level module: abstract params} without materialising weights."""
  return _module(config).abstract_params(config)
