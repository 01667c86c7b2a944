"""ViT-VQGAN image tokenizer (arXiv 2110.04627) as one `Model`.

Owns the encoder (patchify -> ViT -> LayerNorm -> tanh FFN head), the
quantizer (factorized l2 lookup or FSQ) and the decoder (ViT -> LayerNorm ->
tanh FFN head whose second layer emits pixels per patch -> unpatchify).
Params split cleanly into "encoder", "quantizer" and "decoder" so Parti-style
decoder fine-tuning can freeze the first two and swap in a larger decoder.
Losses and the discriminator live elsewhere.
"""
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from vimjax.models import layers
from vimjax.models import quantizers

Dtype = Any

# DALL-E's logit-laplace works on pixels shrunk to [eps, 1 - eps].
LOGIT_LAPLACE_EPS = 0.1
QUANTIZERS = ("factorized", "fsq")
OUTPUTS = ("logit_laplace", "rgb")


def _part(init, names):
  return nn.with_logical_partitioning(init, names)


def _dense(features, names, dtype, param_dtype, name):
  # layers.Dense: nn.Dense's params, init and values, with the kernel gradient in
  # the form XLA:CPU runs fast (`layers.dense_matmul`).
  return layers.Dense(features, names, dtype=dtype, param_dtype=param_dtype, name=name)


def _position_embedding(module, num_tokens, dim):
  return module.param("pos_embedding",
                      _part(nn.initializers.normal(0.02), ("length", "embed")),
                      (num_tokens, dim), module.param_dtype)


class PatchEmbedding(nn.Module):
  """nn.Conv(dim, (p, p), strides=p, padding="VALID"): the same params, init and
  values, as a reshape and one matmul.

  Non-overlapping patches need no convolution; inside the GAN step XLA:CPU ran
  this one's kernel gradient as a slow convolution (111 ms; ~2 ms as a matmul).
  """
  dim: int
  patch_size: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    """x: [b, h, w, c] with h, w multiples of patch_size -> [b, h / p, w / p, dim]."""
    p = self.patch_size
    b, h, w, c = x.shape
    kernel = self.param("kernel", _part(nn.initializers.lecun_normal(),
                                        (None, None, None, "embed")),
                        (p, p, c, self.dim), self.param_dtype)
    bias = self.param("bias", _part(nn.initializers.zeros_init(), ("embed",)), (self.dim,),
                      self.param_dtype)
    # Patch features ordered (row, column, channel), as the HWIO kernel flattens.
    patches = x.reshape(b, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    patches = patches.reshape(b, h // p, w // p, p * p * c).astype(self.dtype)
    y = layers.dense_matmul(patches, kernel.reshape(p * p * c, self.dim).astype(self.dtype))
    return y + bias.astype(self.dtype)


def logit_laplace_mean(mu_logit):
  """Image mean from logit-laplace logits: undo DALL-E's eps-shrink.

  Not clipped to [0, 1] (range [-eps, 1 + eps] / (1 - 2 eps)): a clip would zero
  the L2 loss's gradient wherever the mean overshoots, e.g. a shape predicted
  black could never be pulled back up. Clip for display and metrics.
  """
  eps = LOGIT_LAPLACE_EPS
  return (jax.nn.sigmoid(mu_logit) - eps) / (1 - 2 * eps)


def unpatchify(x, patch_size: int):
  """Inverse of raster-order patchify.

  Args:
    x: [b, g * g, patch_size * patch_size * c], token t = patch (t // g, t % g),
      its features ordered (row, col, channel) within the patch.
  Returns:
    [b, g * patch_size, g * patch_size, c].
  """
  b, n, f = x.shape
  g, p = math.isqrt(n), patch_size
  c = f // (p * p)
  if g * g != n or c * p * p != f:
    raise ValueError(f"unpatchify: shape {x.shape} is not [b, g*g, {p}*{p}*c].")
  x = x.reshape(b, g, g, p, p, c).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, g * p, g * p, c)


class Encoder(nn.Module):
  """images [b, H, W, 3] in [0, 1] -> z [b, (H/p) * (W/p), dim]."""
  image_size: int
  patch_size: int
  num_layers: int
  num_heads: int
  dim: int
  mlp_dim: int
  dropout_rate: float = 0.0
  scan_layers: bool = False
  remat_policy: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images, *, train: bool):
    p = self.patch_size
    x = images.astype(self.dtype) * 2.0 - 1.0
    x = PatchEmbedding(self.dim, p, self.dtype, self.param_dtype, name="patch_embed")(x)
    b, gh, gw, _ = x.shape
    x = x.reshape(b, gh * gw, self.dim)
    x = layers.add_to_every_example(
        x, _position_embedding(self, gh * gw, self.dim).astype(self.dtype))
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    x = layers.TransformerStack(
        self.num_layers, self.num_heads, self.mlp_dim, self.dropout_rate, causal=False,
        cross_attention=False, scan_layers=self.scan_layers,
        remat_policy=self.remat_policy, dtype=self.dtype, param_dtype=self.param_dtype,
        name="transformer")(x, deterministic=not train)
    x = layers.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(x)
    # The paper's output head: two-layer FFN with tanh in between.
    x = _dense(self.mlp_dim, ("embed", "mlp"), self.dtype, self.param_dtype, "head_hidden")(x)
    x = _dense(self.dim, ("mlp", "embed"), self.dtype, self.param_dtype, "head_out")(
        jnp.tanh(x))
    return nn.with_logical_constraint(
        x, ("activation_batch", "activation_length", "activation_embed"))


class Decoder(nn.Module):
  """z_q [b, n, d_in] -> dict(image [b, H, W, 3], and logits for logit_laplace)."""
  image_size: int
  patch_size: int
  num_layers: int
  num_heads: int
  dim: int
  mlp_dim: int
  output: str = "logit_laplace"
  dropout_rate: float = 0.0
  scan_layers: bool = False
  remat_policy: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z_q, *, train: bool):
    p, grid = self.patch_size, self.image_size // self.patch_size
    if z_q.shape[1] != grid * grid:
      raise ValueError(f"Decoder: got {z_q.shape[1]} tokens; image_size={self.image_size} "
                       f"with patch_size={self.patch_size} needs {grid * grid}.")
    x = _dense(self.dim, (None, "embed"), self.dtype, self.param_dtype, "input_proj")(
        z_q.astype(self.dtype))
    x = layers.add_to_every_example(
        x, _position_embedding(self, grid * grid, self.dim).astype(self.dtype))
    x = nn.Dropout(self.dropout_rate)(x, deterministic=not train)
    x = layers.TransformerStack(
        self.num_layers, self.num_heads, self.mlp_dim, self.dropout_rate, causal=False,
        cross_attention=False, scan_layers=self.scan_layers,
        remat_policy=self.remat_policy, dtype=self.dtype, param_dtype=self.param_dtype,
        name="transformer")(x, deterministic=not train)
    x = layers.LayerNorm(dtype=self.dtype, param_dtype=self.param_dtype, name="norm")(x)
    # Two-layer tanh FFN head; its second layer emits the pixels of each patch
    # (in float32: output logits stay fp32, as in Parti).
    x = jnp.tanh(_dense(self.mlp_dim, ("embed", "mlp"), self.dtype, self.param_dtype,
                        "head_hidden")(x))
    channels = 6 if self.output == "logit_laplace" else 3
    x = _dense(p * p * channels, ("mlp", None), jnp.float32, self.param_dtype,
               "to_pixels")(x)
    x = unpatchify(x, p)
    if self.output == "rgb":
      return {"image": x}
    mu_logit, log_scale = x[..., :3], x[..., 3:]
    return {"image": logit_laplace_mean(mu_logit), "mu_logit": mu_logit,
            "log_scale": log_scale}


class Model(nn.Module):
  """ViT-VQGAN: `encode` images to codes, `decode` code vectors to images.

  Submodules: "encoder" (Encoder), "quantizer" (FactorizedQuantizer or
  FiniteScalarQuantizer), "decoder" (Decoder). Token grid is
  (image_size / patch_size)^2; z_q has dim `encoder_dim`.
  `codebook_size` must equal prod(fsq_levels) when quantizer == "fsq".
  """
  image_size: int
  patch_size: int
  encoder_layers: int
  encoder_heads: int
  encoder_dim: int
  encoder_mlp_dim: int
  decoder_layers: int
  decoder_heads: int
  decoder_dim: int
  decoder_mlp_dim: int
  quantizer: str = "factorized"
  codebook_size: int = 8192
  lookup_dim: int = 32
  fsq_levels: Sequence[int] = (8, 5, 5, 5)
  output: str = "logit_laplace"
  dropout_rate: float = 0.0
  scan_layers: bool = False
  remat_policy: str = "none"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @property
  def num_tokens(self) -> int:
    return (self.image_size // self.patch_size) ** 2

  def _validate(self):
    if self.patch_size <= 0 or self.image_size % self.patch_size:
      raise ValueError(f"image_size={self.image_size} is not divisible by "
                       f"patch_size={self.patch_size}.")
    if self.quantizer not in QUANTIZERS:
      raise ValueError(f"Unknown quantizer {self.quantizer!r}; valid: {QUANTIZERS}.")
    if self.output not in OUTPUTS:
      raise ValueError(f"Unknown output {self.output!r}; valid: {OUTPUTS}.")
    if self.quantizer == "fsq" and self.codebook_size != math.prod(self.fsq_levels):
      raise ValueError(f"codebook_size={self.codebook_size} must equal "
                       f"prod(fsq_levels={tuple(self.fsq_levels)})="
                       f"{math.prod(self.fsq_levels)} for the fsq quantizer.")

  def setup(self):
    self._validate()
    common = dict(image_size=self.image_size, patch_size=self.patch_size,
                  dropout_rate=self.dropout_rate, scan_layers=self.scan_layers,
                  remat_policy=self.remat_policy, dtype=self.dtype,
                  param_dtype=self.param_dtype)
    self.encoder = Encoder(num_layers=self.encoder_layers, num_heads=self.encoder_heads,
                           dim=self.encoder_dim, mlp_dim=self.encoder_mlp_dim, **common)
    if self.quantizer == "factorized":
      self.quantizer_ = quantizers.FactorizedQuantizer(
          codebook_size=self.codebook_size, lookup_dim=self.lookup_dim,
          features=self.encoder_dim, dtype=self.dtype, param_dtype=self.param_dtype,
          name="quantizer")
    else:
      self.quantizer_ = quantizers.FiniteScalarQuantizer(
          levels=tuple(self.fsq_levels), features=self.encoder_dim, dtype=self.dtype,
          param_dtype=self.param_dtype, name="quantizer")
    self.decoder = Decoder(num_layers=self.decoder_layers, num_heads=self.decoder_heads,
                           dim=self.decoder_dim, mlp_dim=self.decoder_mlp_dim,
                           output=self.output, **common)

  def encode(self, images, *, train: bool):
    """images: [b, H, W, 3] float in [0, 1] -> (z_q [b, n, encoder_dim], aux).

    aux is the quantizer's dict: codes int32 [b, n], latents,
    quantized_latents, code_counts [codebook_size] (+ similarity if factorized).
    """
    want = (self.image_size, self.image_size, 3)
    if tuple(images.shape[1:]) != want:
      raise ValueError(f"Model.encode: images shape {tuple(images.shape)}; expected "
                       f"[b, {want[0]}, {want[1]}, 3] for image_size={self.image_size}.")
    return self.quantizer_(self.encoder(images, train=train))

  def decode(self, z_q, *, train: bool):
    """z_q: [b, n, encoder_dim] -> dict(image [b, H, W, 3] float32, and for
    output="logit_laplace" also mu_logit, log_scale [b, H, W, 3])."""
    return self.decoder(z_q, train=train)

  def decode_codes(self, codes, *, train: bool = False):
    """codes: [b, n] int token ids (e.g. sampled by stage 2) -> decode dict."""
    return self.decode(self.quantizer_.embed_codes(codes), train=train)

  def __call__(self, images, *, train: bool):
    """images [b, H, W, 3] in [0, 1] -> (decode dict, quantizer aux)."""
    z_q, aux = self.encode(images, train=train)
    return self.decode(z_q, train=train), aux
