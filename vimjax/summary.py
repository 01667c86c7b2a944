"""python -m vimjax.summary --config=configs/vitvqgan.py:small

Parameter counts per top-level module, from jax.eval_shape (no weights are
materialised, so paper-size configs summarise in seconds on a laptop), the
non-embedding count the scaling-law papers use (Kaplan et al. 2020; Parti's
Table 1 sizes "exclude the embedding tables"), and with --flops the model
FLOPs per trained token (the lowered train step, see flops.py). Final line:
{"total_params": N, "non_embedding_params": N, "modules": {name: N, ...},
"flops_per_token": F (with --flops), "tokens_per_example": T}.
"""
import math
import os
import re

from absl import app
from absl import flags
import jax
from ml_collections import config_flags

from vimjax import runtime
from vimjax.train import tasks

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:variant].")
_FLOPS = flags.DEFINE_bool("flops", True, "Also lower the train step for FLOPs per token "
                           "(Parti needs data.text_tokenizer to exist).")

# Vocabulary- or position-indexed tables and the unembedding: token, text, class,
# patch and position embeddings, start/null vectors, the output logits layer and
# the tokenizer's codebook. Everything else (the transformer stacks, norms,
# heads) is "non-embedding".
EMBEDDING_NAME = re.compile(r"embed|^logits$|^codebook$")


def count_params(tree) -> int:
  return sum(math.prod(x.shape) for x in jax.tree.leaves(tree))


def count_non_embedding_params(tree) -> int:
  """Parameters none of whose path names is an embedding (see EMBEDDING_NAME)."""
  total = 0
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
    if not any(EMBEDDING_NAME.search(n) for n in names):
      total += math.prod(leaf.shape)
  return total


def tokens_per_example(config) -> int:
  """Tokens one training example holds: image tokens (stage 2) or patches (tokenizer)."""
  if config.task == "tokenizer":
    return (config.data.image_size // config.model.patch_size) ** 2
  return config.model.grid_size ** 2


def flops_per_token(config) -> float:
  """Model FLOPs of one train step (forward + backward) per trained token."""
  from vimjax import flops  # pylint: disable=g-import-not-at-top
  batch = config.global_batch_size
  return flops.model_flops_per_step(config) / (batch * tokens_per_example(config))


def summarize(config, with_flops: bool = False) -> dict:
  params = tasks.abstract_params(config)
  modules = {name: count_params(tree) for name, tree in params.items()}
  result = {"total_params": sum(modules.values()),
            "non_embedding_params": count_non_embedding_params(params), "modules": modules,
            "tokens_per_example": tokens_per_example(config)}
  if with_flops:
    path = config.data.get("text_tokenizer", "") if config.task == "parti" else ""
    if path and "://" not in path and not os.path.exists(path):
      # Parti's step tokenizes captions; say why the count is missing.
      result["flops_per_token"] = None
      result["flops_note"] = (f"data.text_tokenizer={path!r} does not exist; pass "
                              "--config.data.text_tokenizer=SPM.model for FLOPs per token.")
    else:
      result["flops_per_token"] = flops_per_token(config)
  return result


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  result = summarize(_CONFIG.value, _FLOPS.value)
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
  flags.mark_flags_as_required(["config"])
  app.run(main)
