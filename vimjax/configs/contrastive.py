r"""python -m vimjax.train --config=configs/contrastive.py:tiny --workdir=/tmp/clip_tiny

A CLIP-style dual encoder over image tokens and captions (vimjax/models/
dual_encoder.py), trained on the same token records and SentencePiece
vocabulary as Parti; `python -m vimjax.sample --rerank_workdir=DIR
--num_candidates=16` uses it to rerank Parti's samples, as Parti does with
its contrastive model (arXiv 2206.10789; the paper does not describe that
model, so the sizes are CLIP's).

Variants: `tiny` (the demo: 8x8 tokens, codebook 256, 2+2 layers of dim 128)
and `base` (CLIP ViT-B-sized towers, 12+12 layers of dim 768, 32x32 tokens
over 8192 codes, batch 4096). `data.source` and `data.text_tokenizer` are
placeholders ("<dir>") as in configs/parti.py, e.g.

  python -m vimjax.train --config=configs/contrastive.py:base --workdir=gs://b/clip \
    --config.tokenizer_workdir=gs://b/vq_sl \
    --config.data.source='array_record:gs://b/tokens/tokens-{split}-*.array_record' \
    --config.data.text_tokenizer=gs://b/spm16k.model
"""
import ml_collections

from vimjax import config_lib
from vimjax import parallel

# (image layers, text layers, dim, mlp, heads, output dim).
SIZES = {
    "tiny": (2, 2, 128, 512, 4, 64),
    "base": (12, 12, 768, 3072, 12, 512),
}
VARIANTS = tuple(SIZES)
TOKENS_PLACEHOLDER = "array_record:<dir>/tokens-{split}-*.array_record"


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  """Returns the locked config for `variant` (one of VARIANTS)."""
  if variant not in VARIANTS:
    raise ValueError(f"Unknown contrastive variant {variant!r}; valid: {', '.join(VARIANTS)}.")
  tiny = variant == "tiny"
  c = ml_collections.ConfigDict()
  c.task = "contrastive"
  c.seed = 0
  c.total_steps = 300 if tiny else 100_000
  # Contrastive learning wants large batches: every other row is a negative.
  c.global_batch_size = 64 if tiny else 4096
  c.log_every_steps = 50 if tiny else 100
  c.checkpoint_every_steps = 300 if tiny else 5_000
  c.eval_every_steps = 300 if tiny else 5_000
  c.keep_checkpoints = 3
  # Divergence guard (README "Failure modes"), as in the other configs.
  c.skip_nonfinite_updates = False
  c.max_loss_ratio = 10.0
  c.num_eval_images = 512 if tiny else 50_000  # Eval examples (retrieval within each batch).
  # No Inception metrics: a dual encoder generates no images (kept for the shared checks).
  c.eval = config_lib.eval_config(num_images=2)
  c.peak_flops_per_device = 0.0
  # The stage-1 workdir whose tokens this model reads (checked when reranking).
  c.tokenizer_workdir = "/tmp/vq_tiny" if tiny else ""

  c.mesh = ml_collections.ConfigDict(
      dict(data=-1, fsdp=1, tensor=1, rules=parallel.DEFAULT_RULES))

  c.data = ml_collections.ConfigDict(dict(
      source=TOKENS_PLACEHOLDER,  # Written by `python -m vimjax.encode`.
      text_tokenizer="<dir>/spm.model",  # Written by `python -m vimjax.train_vocab`.
      image_size=32 if tiny else 256,
      num_train_examples=0,
      num_eval_examples=0,
      worker_count=0 if tiny else 16,
      prefetch_buffer_size=2,
  ))

  image_layers, text_layers, dim, mlp, heads, out = SIZES[variant]
  c.model = ml_collections.ConfigDict(dict(
      codebook_size=256 if tiny else 8192,  # = the tokenizer's codebook.
      grid_size=8 if tiny else 32,  # Tokens per side: image_size / tokenizer patch.
      text_vocab_size=256 if tiny else 16_000,  # >= the SentencePiece vocabulary.
      max_text_length=32 if tiny else 128,
      image_layers=image_layers,
      text_layers=text_layers,
      num_heads=heads,
      emb_dim=dim,
      mlp_dim=mlp,
      out_dim=out,
      temperature_init=0.07,  # CLIP's; learned, clipped at 0.01.
      dropout_rate=0.0,
      scan_layers=not tiny,
      remat_policy="none" if tiny else "dots",
      dtype="float32" if tiny else "bfloat16",
      param_dtype="float32",
  ))

  # CLIP: AdamW b2 0.98, weight decay 0.2, warm-up then cosine.
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", lr=5e-4, b1=0.9, b2=0.98, weight_decay=0.2,
      warmup_steps=30 if tiny else 2_000, schedule="cosine", end_lr=0.0, decay_start_step=0,
      grad_clip_norm=1.0, accumulation_steps=1, ema_decay=0.0,
  ))
  if tiny:
    c.optimizer.update(dict(lr=1e-3, weight_decay=1e-4, end_lr=1e-4))

  c.lock()
  return c
