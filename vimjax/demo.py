"""python -m vimjax.demo --workdir=demo_out   (what `make demo` runs)

The main job on the embedded shapes dataset, on CPU in minutes: train the tiny
ViT-VQGAN, evaluate it (PSNR, SSIM, codebook usage, perplexity) and write a
reconstruction grid. Final line: one JSON object with the numbers.
"""
import os

from absl import app
from absl import flags
from absl import logging

from configs import vitvqgan
from vimjax import runtime
from vimjax.train import loop

_WORKDIR = flags.DEFINE_string("workdir", "demo_out", "Where every stage writes.")
_TOKENIZER_STEPS = flags.DEFINE_integer("tokenizer_steps", None,
                                        "Override the tiny tokenizer's total_steps.")


def run(workdir: str, tokenizer_steps: int | None = None) -> dict:
  """Trains and evaluates the tiny tokenizer under `workdir/tokenizer`."""
  config = vitvqgan.get_config("tiny")
  if tokenizer_steps:
    config.total_steps = tokenizer_steps
  tokenizer_dir = os.path.join(workdir, "tokenizer")
  train = loop.train_and_evaluate(config, tokenizer_dir)
  metrics = loop.evaluate_workdir(config, tokenizer_dir)
  logging.info("Reconstructions: %s", os.path.join(tokenizer_dir, "eval_grid.png"))
  return {"psnr": metrics["psnr"], "ssim": metrics["ssim"],
          "codebook_usage": metrics["codebook_usage"], "perplexity": metrics["perplexity"],
          "tokenizer_steps_per_sec": train["steps_per_sec"], "tokenizer_mfu": train["mfu"],
          "reconstructions": os.path.join(tokenizer_dir, "eval_grid.png")}


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  runtime.initialize()
  runtime.emit_result(run(_WORKDIR.value, _TOKENIZER_STEPS.value), _WORKDIR.value, "demo_result")


if __name__ == "__main__":
  app.run(main)
