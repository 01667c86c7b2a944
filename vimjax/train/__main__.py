"""python -m vimjax.train --config=configs/vitvqgan.py:tiny --workdir=DIR

Trains the task the config names; re-running the same command resumes.
"""
from absl import app
from absl import flags
from ml_collections import config_flags

from vimjax import errors
from vimjax import runtime
from vimjax.train import loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:variant].")
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, logs and results go here.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  runtime.initialize()
  result = loop.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  runtime.emit_result(result, None, "train_result")


if __name__ == "__main__":
  errors.run(main)
