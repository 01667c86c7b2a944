"""The task families: `config.task` -> the module that implements `base.Task`.

Adding a family means adding one module here and one entry to TASKS; nothing
outside this package branches on a task's name.
"""
from vimjax.tasks import base
from vimjax.tasks import contrastive
from vimjax.tasks import parti
from vimjax.tasks import tokenizer
from vimjax.tasks import vim

TASKS: dict[str, base.Task] = {
    m.NAME: m for m in (tokenizer, vim, parti, contrastive)}
# The families that sample image tokens (stage 2: VIM, Parti).
SAMPLING = tuple(name for name, task in TASKS.items() if task.make_sampler is not None)


def get(config) -> base.Task:
  """The family of `config.task`; a one-line error lists the valid ones."""
  name = config.get("task")
  if name not in TASKS:
    raise ValueError(f"task={name!r}; valid: {tuple(TASKS)}.")
  return TASKS[name]


def get_sampling(config, what: str) -> base.Task:
  """The family of `config.task` if it samples image tokens, else a one-line error."""
  name = config.get("task")
  if name not in SAMPLING:
    raise ValueError(f"{what} holds task={name!r}; it needs a model that samples image "
                     f"tokens (task one of {SAMPLING}).")
  return TASKS[name]


def build(config, mesh) -> base.Steps:
  """The task's pure functions (`base.Steps`)."""
  return get(config).build(config, mesh)


def abstract_params(config) -> dict:
  """{top-level module: abstract params} without materialising weights."""
  return get(config).abstract_params(config)
