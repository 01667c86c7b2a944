"""Stage-2 autoregressive models over image tokens: VIM and Parti.

Owns `VIM` (decoder-only, unconditional or class-conditional; ViT-VQGAN paper,
arXiv 2110.04627) and `Parti` (text encoder + image-token decoder with
cross-attention; arXiv 2206.10789). Both predict raster-order image tokens
[b, n], n = grid_h * grid_w, with float32 logits over the codebook.

Input convention (teacher forcing): position i predicts token i. Its input is
the previous token i - 1 (the condition / start embedding at i = 0) plus the
2D position embedding of i, the position being predicted; the shift right
happens inside the model. Position embeddings are factorised: a learned row
table [grid_h, dim] plus a learned column table [grid_w, dim].

Decode mode (sampling, see vimjax/sampling.py): `init`/`apply(..., decode=True)`
on full-length tokens creates the "cache" collection (self-attention KV caches,
Parti's once-projected cross-attention keys/values, and the decode position).
Each later `apply(..., decode=True, mutable=["cache"])` takes tokens [b, 1]
holding the *previous* token (ignored at position 0) and returns the logits
[b, 1, vocab] of the next position; the model tracks the position itself.

Classifier-free guidance: VIM's class table has num_classes + 1 rows, the last
(`null_label`) being the learned null class (and, with num_classes = 0, the
only start token). Parti replaces a dropped row's encoder output by a learned
null vector at every text position (all attended), so the decoder
cross-attends to a learned null context that does not depend on the text
length or content.
"""
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from vimjax.models import layers

Dtype = Any
PAD_ID = 0  # SentencePiece pad id (vimjax/data/text.py); masked out of attention.

_embed_init = nn.initializers.normal(stddev=0.02)


def _part(init, names):
  return nn.with_logical_partitioning(init, names)


def _embed(num, dim, names, dtype, param_dtype, name=None):
  return nn.Embed(num, dim, embedding_init=_part(_embed_init, names), dtype=dtype,
                  param_dtype=param_dtype, name=name)


class _Logits(nn.Dense):
  """Dense to the vocabulary; [b, l, vocab] output split over `vocab` like its kernel."""

  def __call__(self, x):
    return nn.with_logical_constraint(
        super().__call__(x), ("activation_batch", "activation_length", "activation_vocab"))


def _logits_dense(vocab_size, param_dtype, name):
  # Output logits in float32 (Parti: "LayerNorms and output logits in fp32").
  return _Logits(vocab_size, dtype=jnp.float32, param_dtype=param_dtype, name=name,
                 kernel_init=_part(nn.initializers.xavier_uniform(), ("embed", "vocab")),
                 bias_init=_part(nn.initializers.zeros_init(), ("vocab",)))


class PositionEmbedding2D(nn.Module):
  """Factorised learned 2D positions: row[r] + col[c] for token (r, c) = divmod(i, w)."""
  grid_h: int
  grid_w: int
  dim: int
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self):
    """Returns the raster-order table [grid_h * grid_w, dim] in param_dtype."""
    row = self.param("row", _part(_embed_init, (None, "embed")), (self.grid_h, self.dim),
                     self.param_dtype)
    col = self.param("col", _part(_embed_init, (None, "embed")), (self.grid_w, self.dim),
                     self.param_dtype)
    return (row[:, None, :] + col[None, :, :]).reshape(self.grid_h * self.grid_w, self.dim)


class DecodePosition(nn.Module):
  """The decode-step counter in the "cache" collection ("index", int32 [])."""

  @nn.compact
  def __call__(self, decode: bool):
    """Returns (is_step, position): is_step is False unless this is a decode step.

    The first decode call (cache creation, full-length input) creates the
    counter at 0 and is not a step; each step returns the current position
    and advances the counter.
    """
    if not decode:
      return False, None
    is_step = self.has_variable("cache", "index")
    index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    if not is_step:
      return False, None
    position = index.value
    index.value = position + 1
    return True, position


def _decoder_inputs(token_embedding, start, tokens, pos_table, is_step, position,
                    num_tokens, dtype):
  """Shifted-right image-token inputs plus target-position embeddings.

  Args:
    token_embedding: nn.Embed over the codebook.
    start: [b, dim] condition / start embedding (the input at position 0).
    tokens: [b, l] int (teacher forcing, l <= num_tokens), or [b, 1] holding the
      previous token in a decode step.
    pos_table: [num_tokens, dim].
    is_step, position: from DecodePosition.
  Returns:
    [b, l, dim] in dtype.
  """
  l = tokens.shape[1]
  if is_step:
    if l != 1:
      raise ValueError(f"A decode step takes tokens of shape [b, 1]; got {tokens.shape}.")
    prev = token_embedding(tokens)
    x = jnp.where(position == 0, start[:, None, :].astype(prev.dtype), prev)
    pos = jax.lax.dynamic_slice_in_dim(pos_table, position, 1)
  else:
    if l > num_tokens:
      raise ValueError(f"tokens length {l} exceeds the model's {num_tokens} positions "
                       "(grid_h * grid_w).")
    prev = token_embedding(tokens[:, :-1])
    x = jnp.concatenate([start[:, None, :].astype(prev.dtype), prev], axis=1)
    pos = pos_table[:l]
  return layers.add_to_every_example(x, pos.astype(x.dtype)).astype(dtype)


class VIM(nn.Module):
  """Decoder-only causal transformer over image tokens (VIM).

  Params: class_embedding [num_classes + 1, dim], token_embedding [vocab, dim],
  position_embedding/{row,col}, decoder (TransformerStack), decoder_norm,
  logits (Dense to vocab, float32).
  """
  vocab_size: int
  grid_h: int
  grid_w: int
  num_layers: int
  num_heads: int
  emb_dim: int
  mlp_dim: int
  num_classes: int = 0  # 0 = unconditional (only the start / null token).
  dropout_rate: float = 0.0
  scan_layers: bool = False
  remat_policy: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def num_tokens(self) -> int:
    return self.grid_h * self.grid_w

  @property
  def null_label(self) -> int:
    """The learned null class (CFG dropout; the start token when unconditional)."""
    return self.num_classes

  @nn.compact
  def __call__(self, tokens, labels=None, *, train: bool, decode: bool = False,
               drop_condition=None):
    """Next-token logits.

    Args:
      tokens: [b, n] int32 image tokens (teacher forcing), or [b, 1] holding
        the previous token in a decode step (see module docstring).
      labels: [b] int32 class ids in [0, num_classes), or None (null class).
      train: enables dropout.
      decode: use / create the KV cache.
      drop_condition: optional [b] bool; True rows use the null class.
    Returns:
      [b, l, vocab_size] float32 logits; position i predicts token i.
    """
    b = tokens.shape[0]
    cond = jnp.full((b,), self.null_label, jnp.int32) if labels is None else labels
    if labels is not None and self.num_classes == 0:
      raise ValueError("VIM(num_classes=0) is unconditional; pass labels=None.")
    if drop_condition is not None:
      cond = jnp.where(drop_condition, self.null_label, cond)
    embed = functools.partial(_embed, dtype=self.dtype, param_dtype=self.param_dtype)
    start = embed(self.num_classes + 1, self.emb_dim, (None, "embed"),
                  name="class_embedding")(cond)
    pos_table = PositionEmbedding2D(self.grid_h, self.grid_w, self.emb_dim,
                                    self.param_dtype, name="position_embedding")()
    is_step, position = DecodePosition(name="decode_position")(decode)
    x = _decoder_inputs(
        embed(self.vocab_size, self.emb_dim, ("vocab", "embed"), name="token_embedding"),
        start, tokens, pos_table, is_step, position, self.num_tokens, self.dtype)
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    x = layers.TransformerStack(
        num_layers=self.num_layers, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
        dropout_rate=self.dropout_rate, causal=True, scan_layers=self.scan_layers,
        remat_policy=self.remat_policy, dtype=self.dtype, param_dtype=self.param_dtype,
        name="decoder")(x, deterministic=not train, decode=decode)
    x = layers.LayerNorm(dtype=jnp.float32, param_dtype=self.param_dtype,
                         name="decoder_norm")(x)
    return _logits_dense(self.vocab_size, self.param_dtype, "logits")(x)


class Parti(nn.Module):
  """Encoder-decoder text-to-image-token transformer (Parti).

  Params: text_embedding [text_vocab, dim], text_position_embedding
  [max_text_length, dim], encoder, encoder_norm, null_text_embedding [dim],
  start_embedding [dim], token_embedding [vocab, dim], position_embedding/
  {row,col}, decoder (causal, cross-attention), decoder_norm, logits.
  """
  text_vocab_size: int
  max_text_length: int
  vocab_size: int
  grid_h: int
  grid_w: int
  encoder_layers: int
  decoder_layers: int
  num_heads: int
  emb_dim: int
  mlp_dim: int
  dropout_rate: float = 0.0
  # (kernel_h, kernel_w) of the local 2D causal self-attention, None = full causal.
  conv_attention_kernel: tuple[int, int] | None = None
  scan_layers: bool = False
  remat_policy: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def num_tokens(self) -> int:
    return self.grid_h * self.grid_w

  def setup(self):
    embed = functools.partial(_embed, dtype=self.dtype, param_dtype=self.param_dtype)
    stack = functools.partial(
        layers.TransformerStack, num_heads=self.num_heads, mlp_dim=self.mlp_dim,
        dropout_rate=self.dropout_rate, scan_layers=self.scan_layers,
        remat_policy=self.remat_policy, dtype=self.dtype, param_dtype=self.param_dtype)
    vec = lambda name, shape, names: self.param(name, _part(_embed_init, names), shape,
                                                self.param_dtype)
    # Text encoder.
    self.text_embedding = embed(self.text_vocab_size, self.emb_dim, ("vocab", "embed"))
    self.text_position_embedding = vec("text_position_embedding",
                                       (self.max_text_length, self.emb_dim), (None, "embed"))
    self.encoder = stack(num_layers=self.encoder_layers, causal=False)
    self.encoder_norm = layers.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype)
    self.null_text_embedding = vec("null_text_embedding", (self.emb_dim,), ("embed",))
    # Image-token decoder.
    self.start_embedding = vec("start_embedding", (self.emb_dim,), ("embed",))
    self.token_embedding = embed(self.vocab_size, self.emb_dim, ("vocab", "embed"))
    self.position_embedding = PositionEmbedding2D(self.grid_h, self.grid_w, self.emb_dim,
                                                  self.param_dtype)
    self.decode_position = DecodePosition()
    self.decoder = stack(num_layers=self.decoder_layers, causal=True, cross_attention=True,
                         cache_cross_attention=True)
    self.decoder_norm = layers.LayerNorm(dtype=jnp.float32, param_dtype=self.param_dtype)
    self.logits = _logits_dense(self.vocab_size, self.param_dtype, None)
    self.embed_dropout = nn.Dropout(self.dropout_rate)

  def encode(self, text_ids, drop_condition=None, *, train: bool = False):
    """Encodes text; dropped rows become the learned null context.

    Args:
      text_ids: [b, L] int32 SentencePiece ids, L <= max_text_length, pad = 0.
      drop_condition: optional [b] bool; True rows are replaced by the null
        context (classifier-free guidance).
      train: enables dropout.
    Returns:
      (encoded [b, L, dim] in dtype, encoder_mask [b, 1, 1, L] bool) where
      the mask is False at pad positions (all True for dropped rows).
    """
    length = text_ids.shape[1]
    if length > self.max_text_length:
      raise ValueError(f"text length {length} exceeds max_text_length="
                       f"{self.max_text_length}.")
    valid = text_ids != PAD_ID
    x = self.text_embedding(text_ids)
    x = x + self.text_position_embedding[None, :length].astype(x.dtype)
    x = self.embed_dropout(x, deterministic=not train)
    mask = valid[:, None, None, :]
    x = self.encoder(x, mask=mask, deterministic=not train)
    encoded = self.encoder_norm(x)
    if drop_condition is not None:
      drop = drop_condition[:, None, None]
      null = jnp.broadcast_to(self.null_text_embedding.astype(encoded.dtype),
                              encoded.shape)
      encoded = jnp.where(drop, null, encoded)
      mask = jnp.logical_or(mask, drop_condition[:, None, None, None])
    return encoded, mask

  def decode(self, encoded, encoder_mask, tokens, *, train: bool, decode: bool = False):
    """Image-token logits given the encoded text.

    Args:
      encoded, encoder_mask: from `encode`.
      tokens: [b, l] int32 image tokens (teacher forcing), or [b, 1] holding
        the previous token in a decode step.
      train: enables dropout.
      decode: use / create the cache (see module docstring).
    Returns:
      [b, l, vocab_size] float32 logits; position i predicts token i.
    """
    b = tokens.shape[0]
    is_step, position = self.decode_position(decode)
    start = jnp.broadcast_to(self.start_embedding, (b, self.emb_dim))
    x = _decoder_inputs(self.token_embedding, start, tokens, self.position_embedding(),
                        is_step, position, self.num_tokens, self.dtype)
    x = self.embed_dropout(x, deterministic=not train)
    mask = None
    if self.conv_attention_kernel is not None:
      kh, kw = self.conv_attention_kernel
      mask = layers.conv_shaped_causal_mask(self.grid_h, self.grid_w, kh, kw)
      if is_step:  # The query row of the current position, over the whole cache.
        mask = jax.lax.dynamic_slice_in_dim(mask, position, 1, axis=2)
      else:
        mask = mask[:, :, :x.shape[1], :x.shape[1]]
    x = self.decoder(x, encoded, mask, encoder_mask, deterministic=not train,
                     decode=decode)
    return self.logits(self.decoder_norm(x))

  def __call__(self, text_ids, tokens, *, train: bool, drop_condition=None):
    """Teacher-forced logits [b, n, vocab_size] float32 (see encode / decode)."""
    encoded, encoder_mask = self.encode(text_ids, drop_condition, train=train)
    return self.decode(encoded, encoder_mask, tokens, train=train)
