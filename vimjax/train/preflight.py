"""Start-up checks of a training run, before anything is compiled or written.

Each raises a one-line error (see vimjax/errors.py): the data sources open (a
missing `folder:` path, an unknown source, an unprepared tfds dataset), and a
run that already finished is recognised so a rerun is a no-op.
"""
import json

from absl import logging
from etils import epath

from vimjax import checkpoint
from vimjax.data import sources


def check_sources(config) -> None:
  """Opens the train and eval sources once (cheap: no example is decoded)."""
  data = config.data
  for split, num in (("train", data.num_train_examples), ("eval", data.num_eval_examples)):
    sources.make_source(data.source, split, image_size=data.image_size,
                        num_examples=int(num) or None)
  sources.check_tokens_metadata(config)  # gs:// too, unlike offline validation.


def finished_result(workdir: str, config) -> dict | None:
  """The saved train_result.json if this run already reached total_steps, else None."""
  path = epath.Path(workdir) / "train_result.json"
  try:
    result = json.loads(path.read_text())
  except (OSError, ValueError):
    return None
  done = (isinstance(result, dict) and result.get("step") == config.total_steps
          and not result.get("preempted")
          and (epath.Path(checkpoint.checkpoints_dir(workdir)) / str(config.total_steps)).exists())
  if not done:
    return None
  logging.info("%s already reached total_steps=%d; nothing to do (raise --config.total_steps "
               "to train further).", workdir, config.total_steps)
  return {**result, "already_finished": True}
