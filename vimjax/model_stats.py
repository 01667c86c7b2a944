"""Model size facts of a config, without materialising weights (jax.eval_shape).

Parameter counts per top-level module, the non-embedding count the
scaling-law papers use (Kaplan et al. 2020; Parti's Table 1 sizes "exclude
the embedding tables"), tokens per example and model FLOPs per trained token.
Used by `python -m vimjax.summary` and the sweeps' collection.
"""
import math
import re

import jax

from vimjax import flops
from vimjax import tasks
from vimjax.tasks import base

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
  return tasks.get(config).tokens_per_example(config)


def flops_per_token(config) -> float:
  """Model FLOPs of one train step (forward + backward) per trained token."""
  batch = config.global_batch_size
  return (flops.model_flops_per_step(tasks.get(config), config)
          / (batch * tokens_per_example(config)))


def summarize(config, with_flops: bool = False) -> dict:
  params = tasks.abstract_params(config)
  modules = {name: count_params(tree) for name, tree in params.items()}
  result = {"total_params": sum(modules.values()),
            "non_embedding_params": count_non_embedding_params(params), "modules": modules,
            "tokens_per_example": tokens_per_example(config)}
  if with_flops:
    path = config.data.get("text_tokenizer", "")
    if path and not base.exists(path):
      # A captioned task's step tokenizes captions; say why the count is missing.
      result["flops_per_token"] = None
      result["flops_note"] = (f"data.text_tokenizer={path!r} does not exist; pass "
                              "--config.data.text_tokenizer=SPM.model for FLOPs per token.")
    else:
      result["flops_per_token"] = flops_per_token(config)
  return result
