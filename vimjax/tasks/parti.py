"""Task `parti`: Parti, text encoder + image-token decoder with cross-attention.

Batches: `tokens` int32 [b, n] and `caption` str, which the task's data
transform (`text.TokenizeCaptions` with data.text_tokenizer, a SentencePiece
`.model`) turns into `text_ids` int32 [b, model.max_text_length] and
`text_truncated` int32 [b] (0/1; summed into the `text_truncated` metric).
Classifier-free guidance: each training row's text is replaced by the learned
null context with probability model.cfg_dropout. Loss, metrics and state: see
autoregressive.py.
"""
import jax
import jax.numpy as jnp
import numpy as np

from vimjax import sampling
from vimjax.data import text
from vimjax.models import transformer
from vimjax.tasks import autoregressive
from vimjax.tasks import base
from vimjax.tasks import inputs

NAME = "parti"
INPUT = autoregressive.INPUT
EVAL_IMAGES = autoregressive.EVAL_IMAGES
LAYER_KEYS = ("encoder_layers", "decoder_layers")
flops_phases = autoregressive.flops_phases
flops_mix = autoregressive.flops_mix
tokens_per_example = autoregressive.tokens_per_example


def build_model(config) -> transformer.Parti:
  m = config.model
  kernel = m.conv_attention_kernel
  return transformer.Parti(
      text_vocab_size=m.text_vocab_size, max_text_length=m.max_text_length,
      encoder_layers=m.encoder_layers, decoder_layers=m.decoder_layers,
      conv_attention_kernel=None if kernel is None else tuple(kernel),
      **autoregressive.transformer_kwargs(m))


def _init_args(model: transformer.Parti) -> tuple:
  return (jnp.ones((1, model.max_text_length), jnp.int32),
          jnp.zeros((1, model.num_tokens), jnp.int32))


def build(config, mesh) -> base.Steps:
  """Returns Parti's pure init/step/eval functions and its caption transform."""
  del mesh  # Shardings come from logical names.
  model = build_model(config)
  tokenize = text.TokenizeCaptions(config.data.text_tokenizer, config.model.max_text_length)

  def apply_fn(params, batch, *, drop, train, rng):
    logits = model.apply({"params": params}, batch["text_ids"], batch["tokens"], train=train,
                         drop_condition=drop, rngs={"dropout": rng} if train else None)
    return logits, {"text_truncated": batch["text_truncated"]}

  return autoregressive.build_task(config, model, _init_args(model), apply_fn,
                                   conditional=True, data_transforms=(tokenize,))


def abstract_params(config) -> dict:
  """Top-level module -> abstract params (jax.eval_shape; nothing materialised)."""
  model = build_model(config)
  return base.abstract_params(model, _init_args(model))


def validate(config) -> None:
  autoregressive.validate(config)
  inputs.validate_text_tokenizer(config)


def batch_spec(config, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """`mask`, `tokens` int32 [b, grid_size^2], `text_ids` int32 [b, max_text_length],
  `text_truncated` int32 [b]."""
  return {**inputs.token_spec(config, batch_size), **inputs.caption_spec(config, batch_size)}


def synthetic_batch(config, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  rs = np.random.RandomState(seed)
  return {**inputs.synthetic_tokens(config, batch_size, rs),
          **inputs.synthetic_captions(config, batch_size, rs)}


def conditioning(config) -> str:
  del config
  return "prompt"


def condition_spec(config, batch_size: int) -> jax.ShapeDtypeStruct:
  """Text ids int32 [b, max_text_length]."""
  return base.spec((batch_size, config.model.max_text_length))


def synthetic_conditions(config, batch_size: int, seed: int = 0) -> np.ndarray:
  """Random text ids int32 [b, max_text_length] (pieces, EOS, padding)."""
  return inputs.synthetic_text_ids(config, batch_size, np.random.RandomState(seed))


sampling_settings = base.sampling_settings


def make_sampler(config, model: transformer.Parti, *, batch_size: int,
                 **overrides) -> base.Sampler:
  """(params, text_ids [b, L] int32, rng) -> tokens [b, n] with `sampling_settings`."""
  del batch_size  # The text ids give it.
  settings = sampling_settings(config, **overrides)
  return lambda params, text_ids, rng, lower=False: sampling.sample_parti(
      model, params, text_ids, rng=rng, lower=lower, **settings)
