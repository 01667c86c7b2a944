r"""python -m vimjax.train --config=configs/parti.py:tiny --workdir=/tmp/parti_tiny

Parti: text encoder + autoregressive image-token decoder with cross-attention
(Yu et al. 2022, arXiv 2206.10789).

Variants: `tiny` (the demo: shapes captions -> 8x8 tokens of 32 px images,
codebook 256, 2+2 layers of dim 128; trains on 2 CPU cores in about a
minute) and the paper's `350m`, `750m`, `3b`, `20b` (Table 1; SentencePiece
vocabulary 16,000, 128 text tokens, 32x32 image tokens over an 8192-entry
codebook; the paper's parameter counts exclude the embedding tables).

Stage 2 trains on pre-computed token ids: `data.source` and
`data.text_tokenizer` are placeholders ("<dir>") for the ArrayRecord files of
`python -m vimjax.encode` (tokens + captions) and the SentencePiece model of
`python -m vimjax.train_vocab`, e.g.

  python -m vimjax.train --config=configs/parti.py:350m --workdir=gs://b/parti \
    --config.tokenizer_workdir=gs://b/vq_sl \
    --config.data.source='array_record:gs://b/tokens/tokens-{split}-*.array_record' \
    --config.data.text_tokenizer=gs://b/spm16k.model
"""
import ml_collections

from vimjax import config_lib
from vimjax import parallel

# Paper Table 1: (encoder layers, decoder layers, d_model, mlp, heads).
SIZES = {
    "tiny": (2, 2, 128, 512, 4),
    "350m": (12, 12, 1024, 4096, 16),
    "750m": (12, 36, 1024, 4096, 16),
    "3b": (12, 36, 2048, 8192, 32),
    "20b": (16, 64, 4096, 16384, 64),
}
VARIANTS = tuple(SIZES)
TOKENS_PLACEHOLDER = "array_record:<dir>/tokens-{split}-*.array_record"


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  """Returns the locked config for `variant` (one of VARIANTS)."""
  if variant not in VARIANTS:
    raise ValueError(f"Unknown parti variant {variant!r}; valid: {', '.join(VARIANTS)}.")
  tiny = variant == "tiny"
  c = ml_collections.ConfigDict()
  c.task = "parti"
  c.seed = 0
  c.total_steps = 3000 if tiny else 450_000  # Tiny: the demo's (BUILD_NOTES, "Demo recipe").
  c.global_batch_size = 32 if tiny else 8192
  c.log_every_steps = 50 if tiny else 100
  c.checkpoint_every_steps = 500 if tiny else 5_000
  c.eval_every_steps = 1000 if tiny else 10_000
  c.keep_checkpoints = 3
  # Divergence guard (README "Failure modes"): False stops at a NaN/inf loss or
  # gradient norm, True drops that update and counts it; a checkpoint whose loss
  # is over max_loss_ratio x the best so far is marked unhealthy (0 = off).
  c.skip_nonfinite_updates = False
  c.max_loss_ratio = 10.0
  c.num_eval_images = 64 if tiny else 30_000  # Eval examples (prompts / samples).
  # Zero-shot MS-COCO FID: 30k samples for val2014 captions against its reference statistics.
  c.eval = config_lib.eval_config(num_images=64 if tiny else 30_000)
  c.peak_flops_per_device = 0.0
  # Stage-1 workdir whose decoder turns sampled tokens into images.
  c.tokenizer_workdir = "/tmp/vq_tiny" if tiny else ""

  # Paper: 350M/750M data parallel; 3B 4-way in-layer model parallel + data
  # parallel; 20B pipelined (here: FSDP + 16-way tensor parallel instead).
  c.mesh = ml_collections.ConfigDict(
      dict(data=-1, fsdp=1, tensor=1, rules=parallel.DEFAULT_RULES))
  if variant == "3b":
    c.mesh.update(dict(data=1, fsdp=-1, tensor=4))
  elif variant == "20b":
    c.mesh.update(dict(data=1, fsdp=-1, tensor=16))

  c.data = ml_collections.ConfigDict(dict(
      source=TOKENS_PLACEHOLDER,  # Written by `python -m vimjax.encode`.
      text_tokenizer="<dir>/spm.model",  # Written by `python -m vimjax.train_vocab`.
      image_size=32 if tiny else 256,
      num_train_examples=0,
      num_eval_examples=0,
      worker_count=0 if tiny else 16,
      prefetch_buffer_size=2,
  ))

  enc, dec, dim, mlp, heads = SIZES[variant]
  c.model = ml_collections.ConfigDict(dict(
      codebook_size=256 if tiny else 8192,  # = the tokenizer's codebook.
      grid_size=8 if tiny else 32,  # Tokens per side: image_size / tokenizer patch.
      # >= the SentencePiece model's vocabulary (shapes BPE: < 200 pieces).
      text_vocab_size=256 if tiny else 16_000,
      max_text_length=32 if tiny else 128,  # EOS included; longer texts are truncated.
      encoder_layers=enc,
      decoder_layers=dec,
      num_heads=heads,
      emb_dim=dim,
      mlp_dim=mlp,
      dropout_rate=0.0 if tiny else 0.1,
      # Probability of dropping a row's text for classifier-free guidance (the
      # paper does not give it).
      cfg_dropout=0.1,
      # PaLM-style log(Z)^2 penalty on the logits; not in the paper (0 there).
      z_loss_weight=1e-4 if tiny else 0.0,
      # Conv-shaped (local 2D causal) decoder self-attention, (rows, cols) as in
      # layers.conv_shaped_causal_mask: DALL-E's 11x11 causal kernel is 6 rows
      # (5 above + current) x 11 columns. None = full causal attention.
      conv_attention_kernel=None if tiny else (6, 11),
      scan_layers=not tiny,
      remat_policy="none" if tiny else "dots",
      dtype="float32" if tiny else "bfloat16",
      param_dtype="float32",
  ))

  # Paper: classifier-free guidance scale 1.2; 16 samples per prompt (reranked).
  c.sampling = ml_collections.ConfigDict(dict(
      # Tiny (shapes): guidance and a cooler top-k cut the stray blobs of an
      # undertrained model (shape recall 0.17 -> 0.31 at 300 steps). At 1000
      # steps guidance 3 oversaturates (extra cells): 2 doubles strict adherence
      # (BUILD_NOTES.md "Demo recipe").
      temperature=0.7 if tiny else 1.0, top_k=32 if tiny else 0, top_p=1.0,
      cfg_scale=2.0 if tiny else 1.2, use_cache=True,
      # Cached decode in 4 loops with caches cut to the positions each reaches
      # (sampling.CACHE_SEGMENTS): 11% faster sampling on the CPU.
      cache_segments=4,
      # The decode's compute dtype: bfloat16 casts the params once per call and
      # halves the weight bytes a step streams (float32-trained tiny models too:
      # Parti at issue 13's dims, 0.77-0.84 -> 0.53-0.59 s/image on the CPU;
      # BUILD_NOTES.md "Sixth round: sampling in bfloat16").
      dtype="bfloat16"))

  # Paper: Adafactor b=(0.9, 0.96), lr 4.5e-5 after a 5k warm-up, exponential
  # decay from 85k to 0.025 x lr at 450k, decoupled weight decay 4.5e-2,
  # gradient-norm clipping 4.0.
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adafactor", lr=4.5e-5, b1=0.9, b2=0.96, weight_decay=4.5e-2,
      warmup_steps=5_000, schedule="exponential", end_lr=0.025 * 4.5e-5,
      decay_start_step=85_000, grad_clip_norm=4.0, accumulation_steps=1, ema_decay=0.0,
  ))
  if variant == "20b":
    # Fits v4:8x8x8 (512 chips, 17.2 GiB/chip; BUILD_NOTES "Proof of fit") only as
    # the paper's 8192 batch in 32 accumulated microbatches of 256. Step counts
    # are loop steps (microbatches): the paper's 450k updates are 14.4M of them,
    # warm-up and decay start scaled by 32 too, so the schedule is the paper's.
    k = 32
    c.global_batch_size = 8192 // k
    c.total_steps *= k
    c.eval_every_steps *= k  # Every 10k updates, as the other sizes; logs and
    # checkpoints stay every 100 / 5,000 loop steps (~1 / ~40 min at 0.49 s each).
    c.optimizer.update(dict(accumulation_steps=k, warmup_steps=5_000 * k,
                            decay_start_step=85_000 * k))
  if tiny:  # Adam: the demo's 3000 steps (cosine to end_lr over total_steps).
    c.optimizer.update(dict(name="adamw", lr=1e-3, b2=0.99, weight_decay=1e-4,
                            warmup_steps=20, schedule="cosine", end_lr=1e-4,
                            decay_start_step=0, grad_clip_norm=1.0))

  c.lock()
  return c
