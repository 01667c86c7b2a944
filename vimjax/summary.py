"""python -m vimjax.summary --config=configs/vitvqgan.py:small

Parameter counts per top-level module, from jax.eval_shape (no weights are
materialised, so paper-size configs summarise in seconds on a laptop), the
non-embedding count the scaling-law papers use (Kaplan et al. 2020; Parti's
Table 1 sizes "exclude the embedding tables"), and with --flops the model
FLOPs per trained token (the lowered train step, see flops.py). Final line:
{"total_params": N, "non_embedding_params": N, "modules": {name: N, ...},
"flops_per_token": F (with --flops), "tokens_per_example": T}. The counting
lives in model_stats.py.
"""
from absl import app
from absl import flags

from vimjax import model_stats
from vimjax import errors
from vimjax import runtime

FLAGS = flags.FLAGS


def _define_flags():
  """Flags of the binary, defined when it runs."""
  runtime.define_config_file()
  flags.DEFINE_bool("flops", True, "Also lower the train step for FLOPs per token "
                    "(Parti needs data.text_tokenizer to exist).")


# Library names kept here for existing callers.
summarize = model_stats.summarize
count_params = model_stats.count_params


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  result = model_stats.summarize(FLAGS.config, FLAGS.flops)
  width = max(len(n) for n in result["modules"]) + 2
  print(f"{'module':<{width}}{'params':>16}")
  for name, n in result["modules"].items():
    print(f"{name:<{width}}{n:>16,}")
  print(f"{'total':<{width}}{result['total_params']:>16,}")
  print(f"{'non-embedding':<{width}}{result['non_embedding_params']:>16,}")
  if result.get("flops_per_token") is not None:
    print(f"{'FLOPs/token':<{width}}{result['flops_per_token']:>16.4g}")
  elif "flops_note" in result:
    print(f"FLOPs/token: {result['flops_note']}")
  runtime.emit_result(result, None, "summary")


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["config"])
  errors.run(main)
