"""python -m vimjax.evaluate --workdir=DIR [--config.data.source=... --config.num_eval_images=N]

Evaluates the latest checkpoint of a training workdir with the config saved
there (overridable with --config.*): a final JSON line of the task's metrics
(tokenizer: psnr, ssim, l1, l2, codebook_usage, perplexity) and a PNG grid.

With Inception weights (`--config.eval.inception_weights=inception_fid.npz`,
from `python -m vimjax.convert_inception`) it adds the Inception metrics:
a tokenizer's rFID (reconstructions vs the originals of `eval.num_images` eval
images, plus rsfid, rprecision, rrecall, inception_score), and for VIM / Parti
the fid, sfid, inception_score (and precision / recall when the reference
holds features) of `eval.num_images` samples against
`--config.eval.fid_reference=REF.npz` (README "Evaluation protocol").
"""

from absl import app
from absl import flags

from vimjax import checkpoint
from vimjax import config_lib
from vimjax import errors
from vimjax import runtime
from vimjax.train import loop

FLAGS = flags.FLAGS


def _define_flags():
  """Flags of the binary, defined when it runs."""
  flags.DEFINE_string("workdir", None, "A training workdir (has config.json).")


def _load_config(workdir):
  saved = checkpoint.load_workdir_config(workdir)
  if "eval" not in saved:  # Workdirs trained before the Inception metrics existed.
    saved.eval = config_lib.eval_config(num_images=saved.num_eval_images)
  return saved


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  runtime.initialize()
  config = flags.FLAGS.config
  try:
    metrics = loop.evaluate_workdir(config, FLAGS.workdir)
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"error: {e}") from None
  runtime.emit_result(metrics, FLAGS.workdir, "eval_result")


if __name__ == "__main__":
  _define_flags()
  runtime.define_config_from_workdir("workdir", _load_config)
  errors.run(main)
