"""python -m vimjax.evaluate --workdir=DIR [--config.data.source=... --config.num_eval_images=N]

Evaluates the latest checkpoint of a training workdir with the config saved
there (overridable with --config.*): a final JSON line of the task's metrics
(tokenizer: psnr, ssim, l1, l2, codebook_usage, perplexity) and a PNG grid.
"""
import argparse
import json
import os
import sys

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags

from vimjax import runtime
from vimjax.train import loop

_WORKDIR = flags.DEFINE_string("workdir", None, "A training workdir (has config.json).")


def load_workdir_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise SystemExit(f"error: --workdir={workdir!r} has no config.json; pass the workdir "
                     "of a `python -m vimjax.train` run.")
  with open(path) as f:
    return ml_collections.ConfigDict(json.load(f))


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  runtime.initialize()
  config = flags.FLAGS.config
  metrics = loop.evaluate_workdir(config, _WORKDIR.value)
  runtime.emit_result(metrics, _WORKDIR.value, "eval_result")


if __name__ == "__main__":
  # --config.* overrides are typed by the saved config, so load it before flags parse.
  parser = argparse.ArgumentParser(add_help=False)
  parser.add_argument("--workdir", required=True)
  known, _ = parser.parse_known_args(sys.argv[1:])
  config_flags.DEFINE_config_dict("config", load_workdir_config(known.workdir))
  app.run(main)
