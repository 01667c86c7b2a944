"""Reranking samples with the contrastive dual encoder (Parti: 16 samples per prompt, reranked).

Every prompt gets `num_candidates` samples; the dual encoder of a
`task: contrastive` workdir (vimjax/tasks/contrastive.py) scores each
candidate's image tokens against its prompt, and the best `keep` per prompt
are kept, best first. The shapes checker is never the scorer: it only
measures the result.
"""
import os

import jax
import numpy as np

from vimjax.models import dual_encoder
from vimjax.tasks import contrastive

RERANK_TASK = contrastive.NAME


def check_compatible(rerank_config, config, rerank_workdir: str) -> None:
  """Raises unless the reranker reads the sampler's tokens (same codebook, grid, tokenizer)."""
  if rerank_config.get("task") != RERANK_TASK:
    raise ValueError(f"--rerank_workdir={rerank_workdir!r} holds task="
                     f"{rerank_config.get('task')!r}; it must be a '{RERANK_TASK}' run "
                     "(configs/contrastive.py).")
  for key in ("codebook_size", "grid_size"):
    if rerank_config.model[key] != config.model[key]:
      raise ValueError(f"--rerank_workdir={rerank_workdir!r} has model.{key}="
                       f"{rerank_config.model[key]}, the sampled model {config.model[key]}.")
  mine, theirs = rerank_config.tokenizer_workdir, config.tokenizer_workdir
  if mine and theirs and os.path.realpath(mine) != os.path.realpath(theirs):
    raise ValueError(f"--rerank_workdir={rerank_workdir!r} was trained on the tokens of "
                     f"{mine!r}, but the samples are tokens of {theirs!r}; train the reranker "
                     "on the same tokenizer's tokens.")


def make_scorer(model: dual_encoder.DualEncoder, params, out_sharding):
  """(tokens [b, n], text_ids [b, L]) -> [b] float32 scores, jitted (sharded inputs)."""
  return jax.jit(lambda t, x: dual_encoder.similarity(model, params, t, x),
                 out_shardings=out_sharding)


def best_per_condition(scores: np.ndarray, num_candidates: int, keep: int) -> np.ndarray:
  """Indices of the `keep` best-scoring candidates of each condition, best first.

  Args:
    scores: [num_conditions * num_candidates], grouped by condition.
    num_candidates: candidates per condition.
    keep: how many to keep per condition, 1 <= keep <= num_candidates.
  Returns:
    int [num_conditions * keep] indices into `scores`, grouped by condition.
  """
  if not 1 <= keep <= num_candidates:
    raise ValueError(f"--num_samples={keep} must be in [1, --num_candidates={num_candidates}].")
  grouped = np.asarray(scores).reshape(-1, num_candidates)
  # Stable, so ties keep sampling order.
  order = np.argsort(-grouped, axis=1, kind="stable")[:, :keep]
  return (order + num_candidates * np.arange(len(grouped))[:, None]).reshape(-1)
