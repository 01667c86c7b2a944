"""A CLIP-style dual encoder over image tokens and caption ids: the sample reranker.

Parti samples 16 images per prompt and reranks them with a contrastive
image-text model. This one reads the images as the ViT-VQGAN token ids that
stage 2 trains on and samples (no decoding to pixels needed to score a
sample), and the captions as SentencePiece ids.

  image tower: token embedding + learned 2D positions -> bidirectional
               TransformerStack -> LayerNorm -> mean over tokens -> Dense
  text tower:  piece embedding + learned positions -> TransformerStack (pad
               masked) -> LayerNorm -> mean over non-pad pieces -> Dense
  both l2-normalised; similarity logits = exp(logit_scale) * <image, text>,
  logit_scale learned (CLIP: init log(1 / 0.07), clipped at log(100)).

Params: token_embedding, position_embedding/{row,col}, image_encoder,
image_norm, image_projection, text_embedding, text_position_embedding,
text_encoder, text_norm, text_projection, logit_scale.
"""
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vimjax.models import layers
from vimjax.models import transformer

Dtype = Any
MAX_LOGIT_SCALE = math.log(100.0)  # CLIP clips the learned temperature at 1/100.

_embed_init = nn.initializers.normal(stddev=0.02)


def _part(init, names):
  return nn.with_logical_partitioning(init, names)


def l2_normalize(x, eps: float = 1e-6):
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


class DualEncoder(nn.Module):
  """Image-token and text towers mapping to one l2-normalised embedding space."""
  vocab_size: int  # Image codebook.
  grid_h: int
  grid_w: int
  text_vocab_size: int
  max_text_length: int
  image_layers: int
  text_layers: int
  num_heads: int
  emb_dim: int
  mlp_dim: int
  out_dim: int
  temperature_init: float = 0.07
  dropout_rate: float = 0.0
  scan_layers: bool = False
  remat_policy: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def num_tokens(self) -> int:
    return self.grid_h * self.grid_w

  def setup(self):
    embed = lambda num, name: nn.Embed(  # pylint: disable=g-long-lambda
        num, self.emb_dim, embedding_init=_part(_embed_init, ("vocab", "embed")),
        dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    stack = functools.partial(
        layers.TransformerStack, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
        dropout_rate=self.dropout_rate, causal=False, scan_layers=self.scan_layers,
        remat_policy=self.remat_policy, dtype=self.dtype, param_dtype=self.param_dtype)
    norm = functools.partial(layers.LayerNorm, dtype=jnp.float32, param_dtype=self.param_dtype)
    project = lambda name: nn.Dense(  # pylint: disable=g-long-lambda
        self.out_dim, use_bias=False, dtype=jnp.float32, param_dtype=self.param_dtype,
        kernel_init=_part(nn.initializers.xavier_uniform(), ("embed", "mlp")), name=name)
    self.token_embedding = embed(self.vocab_size, "token_embedding")
    self.position_embedding = transformer.PositionEmbedding2D(
        self.grid_h, self.grid_w, self.emb_dim, self.param_dtype)
    self.image_encoder = stack(num_layers=self.image_layers)
    self.image_norm = norm()
    self.image_projection = project("image_projection")
    self.text_embedding = embed(self.text_vocab_size, "text_embedding")
    self.text_position_embedding = self.param(
        "text_position_embedding", _part(_embed_init, (None, "embed")),
        (self.max_text_length, self.emb_dim), self.param_dtype)
    self.text_encoder = stack(num_layers=self.text_layers)
    self.text_norm = norm()
    self.text_projection = project("text_projection")
    self.logit_scale = self.param("logit_scale", nn.initializers.constant(
        math.log(1.0 / self.temperature_init)), (), jnp.float32)
    self.dropout = nn.Dropout(self.dropout_rate)

  def encode_image(self, tokens, *, train: bool = False):
    """tokens [b, grid_h * grid_w] int32 -> [b, out_dim] float32, unit norm."""
    if tokens.ndim != 2 or tokens.shape[1] != self.num_tokens:
      raise ValueError(f"tokens of shape {tokens.shape}; the image tower reads "
                       f"[b, {self.num_tokens}] (grid_size^2).")
    x = self.token_embedding(tokens) + self.position_embedding()[None].astype(self.dtype)
    x = self.dropout(x, deterministic=not train)
    x = self.image_norm(self.image_encoder(x, deterministic=not train))
    return l2_normalize(self.image_projection(jnp.mean(x, axis=1)))

  def encode_text(self, text_ids, *, train: bool = False):
    """text_ids [b, L] int32 (pad = 0, L <= max_text_length) -> [b, out_dim] float32, unit norm."""
    length = text_ids.shape[1]
    if length > self.max_text_length:
      raise ValueError(f"text length {length} exceeds max_text_length={self.max_text_length}.")
    valid = text_ids != transformer.PAD_ID
    x = self.text_embedding(text_ids)
    x = x + self.text_position_embedding[None, :length].astype(x.dtype)
    x = self.dropout(x, deterministic=not train)
    x = self.text_encoder(x, mask=valid[:, None, None, :], deterministic=not train)
    x = self.text_norm(x)
    weights = valid.astype(jnp.float32)[..., None]
    pooled = jnp.sum(x * weights, axis=1) / jnp.maximum(jnp.sum(weights, axis=1), 1.0)
    return l2_normalize(self.text_projection(pooled))

  def temperature_scale(self):
    """exp(logit_scale), clipped at 100 (float32 [])."""
    return jnp.exp(jnp.minimum(self.logit_scale, MAX_LOGIT_SCALE))

  def __call__(self, tokens, text_ids, *, train: bool = False):
    """Returns (image embeddings [b, out_dim], text embeddings [b, out_dim], scale [])."""
    return (self.encode_image(tokens, train=train), self.encode_text(text_ids, train=train),
            self.temperature_scale())


def similarity(model: DualEncoder, params, tokens, text_ids):
  """Scaled cosine similarity of row i's image and row i's text: [b] float32 (the rerank score)."""
  image, text, scale = model.apply({"params": params}, tokens, text_ids, train=False)
  return scale * jnp.sum(image * text, axis=-1)
