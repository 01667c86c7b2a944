"""python -m vimjax.summary --config=configs/vitvqgan.py:small

Parameter counts per top-level module, from jax.eval_shape (no weights are
materialised, so paper-size configs summarise in seconds on a laptop). Final
line: {"total_params": N, "modules": {name: N, ...}}.
"""
import math

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from vimjax import errors
from vimjax import runtime
from vimjax.train import tasks

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:variant].")


def count_params(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def summarize(config) -> dict:
  modules = {name: count_params(tree) for name, tree in tasks.abstract_params(config).items()}
  return {"total_params": sum(modules.values()), "modules": modules}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  result = summarize(_CONFIG.value)
  width = max(len(n) for n in result["modules"]) + 2
  print(f"{'module':<{width}}{'params':>16}")
  for name, n in result["modules"].items():
    print(f"{name:<{width}}{n:>16,}")
  print(f"{'total':<{width}}{result['total_params']:>16,}")
  runtime.emit_result(result, None, "summary")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  errors.run(main)
