r"""python -m vimjax.train --config=configs/vim.py:tiny --workdir=/tmp/vim_tiny

VIM: decoder-only transformer over ViT-VQGAN image tokens (Yu et al. 2021,
arXiv 2110.04627), unconditional or class-conditional (a class-id token is
prepended; `model.num_classes=0` makes it unconditional).

Variants: `tiny` (the demo: 8x8 tokens of 32 px shapes images, codebook 256,
18 shape classes; trains on 2 CPU cores in about a minute) and the paper's
`base` (VIM-Base, 650M) and `large` (VIM-Large, 1697M), ImageNet at 256 px as
32x32 tokens over an 8192-entry codebook.

Stage 2 trains on pre-computed token ids: `data.source` is a placeholder
("<dir>") for the ArrayRecord files that `python -m vimjax.encode` writes with
the stage-1 tokenizer in `tokenizer_workdir`, e.g.

  python -m vimjax.train --config=configs/vim.py:large --workdir=gs://b/vim_l \
    --config.tokenizer_workdir=gs://b/vq_bb \
    --config.data.source='array_record:gs://b/tokens/tokens-{split}-*.array_record'
"""
import ml_collections

from vimjax import config_lib
from vimjax import parallel

# Paper (ViT-VQGAN Table 2): (blocks, heads, dim, mlp).
SIZES = {
    "tiny": (2, 4, 128, 512),
    "base": (24, 16, 1536, 6144),
    "large": (36, 32, 2048, 8192),
}
VARIANTS = tuple(SIZES)
TOKENS_PLACEHOLDER = "array_record:<dir>/tokens-{split}-*.array_record"


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  """Returns the locked config for `variant` (one of VARIANTS)."""
  if variant not in VARIANTS:
    raise ValueError(f"Unknown vim variant {variant!r}; valid: {', '.join(VARIANTS)}.")
  tiny = variant == "tiny"
  c = ml_collections.ConfigDict()
  c.task = "vim"
  c.seed = 0
  c.total_steps = 1500 if tiny else 450_000  # Tiny: 1000 left class accuracy ~0.7-0.8.
  c.global_batch_size = 32 if tiny else 1024
  c.log_every_steps = 50 if tiny else 100
  c.checkpoint_every_steps = 500 if tiny else 5_000
  c.eval_every_steps = 1500 if tiny else 10_000
  c.keep_checkpoints = 3
  # Divergence guard (README "Failure modes"): False stops at a NaN/inf loss or
  # gradient norm, True drops that update and counts it; a checkpoint whose loss
  # is over max_loss_ratio x the best so far is marked unhealthy (0 = off).
  c.skip_nonfinite_updates = False
  c.max_loss_ratio = 10.0
  c.num_eval_images = 64 if tiny else 50_000  # Eval examples (token sequences / samples).
  # FID / IS of 50k class-balanced samples against ImageNet reference statistics.
  c.eval = config_lib.eval_config(num_images=64 if tiny else 50_000)
  c.peak_flops_per_device = 0.0
  # Stage-1 workdir whose decoder turns sampled tokens into images.
  c.tokenizer_workdir = "/tmp/vq_tiny" if tiny else ""

  c.mesh = ml_collections.ConfigDict(
      dict(data=-1, fsdp=1, tensor=1, rules=parallel.DEFAULT_RULES))
  if variant == "large":  # 1.7B params: shard weights and optimizer state.
    c.mesh.data, c.mesh.fsdp = 1, -1

  c.data = ml_collections.ConfigDict(dict(
      source=TOKENS_PLACEHOLDER,  # Written by `python -m vimjax.encode`.
      image_size=32 if tiny else 256,
      num_train_examples=0,
      num_eval_examples=0,
      worker_count=0 if tiny else 16,
      prefetch_buffer_size=2,
  ))

  layers, heads, dim, mlp = SIZES[variant]
  c.model = ml_collections.ConfigDict(dict(
      codebook_size=256 if tiny else 8192,  # = the tokenizer's codebook.
      grid_size=8 if tiny else 32,  # Tokens per side: image_size / tokenizer patch.
      num_classes=18 if tiny else 1000,  # 0 = unconditional.
      num_layers=layers,
      num_heads=heads,
      emb_dim=dim,
      mlp_dim=mlp,
      dropout_rate=0.0 if tiny else 0.1,
      # Probability of training a row with the null class (enables guidance).
      # The paper has neither guidance (cfg_scale 1.0) nor condition dropout:
      # 0 in the paper variants; the demo uses it.
      cfg_dropout=0.1 if tiny else 0.0,
      # PaLM-style log(Z)^2 penalty on the logits; not in the paper (0 there).
      z_loss_weight=1e-4 if tiny else 0.0,
      scan_layers=not tiny,
      remat_policy="none" if tiny else "dots",
      dtype="float32" if tiny else "bfloat16",
      param_dtype="float32",
  ))

  # Paper: temperature 1.0, no top-k / top-p, no guidance. Tiny (the demo):
  # Parti tiny's sharper sampler; guidance doubles class accuracy (0.22 -> 0.47
  # at step 500; BUILD_NOTES.md "Demo recipe").
  c.sampling = ml_collections.ConfigDict(dict(
      temperature=0.7 if tiny else 1.0, top_k=32 if tiny else 0, top_p=1.0,
      cfg_scale=3.0 if tiny else 1.0, use_cache=True,
      # Cached decode in 4 loops with caches cut to the positions each reaches
      # (sampling.CACHE_SEGMENTS): 11% faster Parti sampling on the CPU.
      cache_segments=4,
      # The decode's compute dtype: bfloat16 casts the params once per call and
      # halves the weight bytes a step streams (float32-trained tiny models too:
      # Parti at issue 13's dims, 0.77-0.84 -> 0.53-0.59 s/image on the CPU;
      # BUILD_NOTES.md "Sixth round: sampling in bfloat16").
      dtype="bfloat16"))

  # Paper: Adafactor b=(0.9, 0.96), warm-up to 4.5e-4 over 5k steps, exponential
  # decay to 1e-5 from step 80k; weight decay and clipping are not given.
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adafactor", lr=4.5e-4, b1=0.9, b2=0.96, weight_decay=0.0,
      warmup_steps=5_000, schedule="exponential", end_lr=1e-5, decay_start_step=80_000,
      grad_clip_norm=1.0, accumulation_steps=1, ema_decay=0.0,
  ))
  if tiny:  # Adam converges in the demo's few hundred steps.
    c.optimizer.update(dict(name="adamw", lr=1e-3, b2=0.99, warmup_steps=20,
                            schedule="cosine", end_lr=1e-4, decay_start_step=0))

  c.lock()
  return c
