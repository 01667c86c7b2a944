"""Task `parti`: Parti, text encoder + image-token decoder with cross-attention.

Batches: `tokens` int32 [b, n] and `caption` str, which the task's data
transform (`text.TokenizeCaptions` with data.text_tokenizer, a SentencePiece
`.model`) turns into `text_ids` int32 [b, model.max_text_length] and
`text_truncated` int32 [b] (0/1; summed into the `text_truncated` metric).
Classifier-free guidance: each training row's text is replaced by the learned
null context with probability model.cfg_dropout. Loss, metrics and state: see
autoregressive.py.
"""
import jax.numpy as jnp

from vimjax.data import text
from vimjax.models import transformer
from vimjax.train import autoregressive
from vimjax.train import loop


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


def build(config, mesh) -> loop.Task:
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
  return autoregressive.abstract_params(model, _init_args(model))
