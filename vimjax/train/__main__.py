"""python -m vimjax.train --config=configs/vitvqgan.py:tiny --workdir=DIR

Trains the task the config names; re-running the same command resumes.
"""
from absl import app
from absl import flags

from vimjax import errors
from vimjax import runtime
from vimjax.train import loop

FLAGS = flags.FLAGS


def _define_flags():
  """Flags of the binary, defined when it runs."""
  runtime.define_config_file()
  flags.DEFINE_string("workdir", None, "Checkpoints, logs and results go here.")
  flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  runtime.initialize()
  result = loop.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  runtime.emit_result(result, None, "train_result")


if __name__ == "__main__":
  _define_flags()
  errors.run(main)
