"""Task `vim`: VIM, a decoder-only transformer over image tokens (class-conditional or not).

Batches: `tokens` int32 [b, n] and, when model.num_classes > 0, `label` int32
[b]. Labels outside [0, num_classes) (e.g. -1 from an unlabelled source) train
with the null class and are counted as `invalid_labels`. Classifier-free
guidance: each training row uses the null class with probability
model.cfg_dropout. Loss, metrics and state: see autoregressive.py.
"""
import jax
import jax.numpy as jnp
import numpy as np

from vimjax import sampling
from vimjax.models import transformer
from vimjax.tasks import autoregressive
from vimjax.tasks import base
from vimjax.tasks import inputs

NAME = "vim"
INPUT = autoregressive.INPUT
EVAL_IMAGES = autoregressive.EVAL_IMAGES
LAYER_KEYS = ("num_layers",)
flops_phases = autoregressive.flops_phases
flops_mix = autoregressive.flops_mix
tokens_per_example = autoregressive.tokens_per_example
validate = autoregressive.validate


def build_model(config) -> transformer.VIM:
  m = config.model
  return transformer.VIM(num_layers=m.num_layers, num_classes=m.num_classes,
                         **autoregressive.transformer_kwargs(m))


def _init_args(model: transformer.VIM) -> tuple:
  tokens = jnp.zeros((1, model.num_tokens), jnp.int32)
  return (tokens, jnp.zeros((1,), jnp.int32) if model.num_classes else None)


def build(config, mesh) -> base.Steps:
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
  return base.abstract_params(model, _init_args(model))


def batch_spec(config, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """`mask`, `tokens` int32 [b, grid_size^2] and `label` int32 [b]."""
  return {**inputs.token_spec(config, batch_size), "label": base.spec((batch_size,))}


def synthetic_batch(config, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  rs = np.random.RandomState(seed)
  labels = rs.randint(0, max(config.model.num_classes, 1), (batch_size,)).astype(np.int32)
  return {**inputs.synthetic_tokens(config, batch_size, rs), "label": labels}


def conditioning(config) -> str:
  return "class" if config.model.num_classes else "none"


def condition_spec(config, batch_size: int) -> jax.ShapeDtypeStruct | None:
  """Class ids int32 [b], or None for an unconditional VIM."""
  return base.spec((batch_size,)) if config.model.num_classes else None


def synthetic_conditions(config, batch_size: int, seed: int = 0) -> np.ndarray | None:
  """Random class ids int32 [b] (None for an unconditional VIM)."""
  if not config.model.num_classes:
    return None
  rs = np.random.RandomState(seed)
  return rs.randint(0, config.model.num_classes, (batch_size,)).astype(np.int32)


def sampling_settings(config, **overrides) -> dict:
  """`base.sampling_settings`; an unconditional VIM samples with guidance 1.0 (there
  is no class to guide towards): config.sampling.cfg_scale is ignored, an
  explicit other `cfg_scale` is an error."""
  settings = base.sampling_settings(config, **overrides)
  if not config.model.num_classes:
    asked = overrides.get("cfg_scale")
    if asked is not None and asked != 1.0:
      raise ValueError(f"cfg_scale={asked} needs a class-conditional VIM "
                       "(model.num_classes > 0); this one is unconditional.")
    settings["cfg_scale"] = 1.0
  return settings


def make_sampler(config, model: transformer.VIM, *, batch_size: int,
                 **overrides) -> base.Sampler:
  """(params, labels [b] int32 or None, rng) -> tokens [b, n] with `sampling_settings`."""
  settings = sampling_settings(config, **overrides)
  return lambda params, labels, rng, lower=False: sampling.sample_vim(
      model, params, labels if model.num_classes else None, rng=rng, batch_size=batch_size,
      lower=lower, **settings)
