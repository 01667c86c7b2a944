"""Task `vim`: VIM, a decoder-only transformer over image tokens (class-conditional or not).

Batches: `tokens` int32 [b, n] and, when model.num_classes > 0, `label` int32
[b]. Labels outside [0, num_classes) (e.g. -1 from an unlabelled source) train
with the null class and are counted as `invalid_labels`. Classifier-free
guidance: each training row uses the null class with probability
model.cfg_dropout. Loss, metrics and state: see autoregressive.py.
"""
import jax.numpy as jnp

from vimjax.models import transformer
from vimjax.train import autoregressive
from vimjax.train import loop


def build_model(config) -> transformer.VIM:
  m = config.model
  return transformer.VIM(num_layers=m.num_layers, num_classes=m.num_classes,
                         **autoregressive.transformer_kwargs(m))


def _init_args(model: transformer.VIM) -> tuple:
  tokens = jnp.zeros((1, model.num_tokens), jnp.int32)
  return (tokens, jnp.zeros((1,), jnp.int32) if model.num_classes else None)


def build(config, mesh) -> loop.Task:
  """Returns VIM's pure init/step/eval functions."""
  del mesh  # Shardings come from logical names.
  model = build_model(config)
  num_classes = model.num_classes

  def apply_fn(params, batch, *, drop, train, rng):
    counts, labels = {}, None
    if num_classes:
      labels = batch["label"]
      invalid = (labels < 0) | (labels >= num_classes)
      counts["invalid_labels"] = invalid.astype(jnp.int32)
      drop = invalid if drop is None else drop | invalid
      labels = jnp.where(invalid, 0, labels)
    else:
      drop = None  # Unconditional: every row already uses the null (start) token.
    logits = model.apply({"params": params}, batch["tokens"], labels, train=train,
                         drop_condition=drop, rngs={"dropout": rng} if train else None)
    return logits, counts

  return autoregressive.build_task(config, model, _init_args(model), apply_fn,
                                   conditional=num_classes > 0)


def abstract_params(config) -> dict:
  """Top-level module -> abstract params (jax.eval_shape; nothing materialised)."""
  model = build_model(config)
  return autoregressive.abstract_params(model, _init_args(model))
