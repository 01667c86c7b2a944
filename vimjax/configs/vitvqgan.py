r"""python -m vimjax.train --config=configs/vitvqgan.py:tiny --workdir=/tmp/vq_tiny

ViT-VQGAN image tokenizer (Yu et al. 2021, arXiv 2110.04627).

Variants: `tiny` (the demo: shapes at 32 px, trains on 2 CPU cores in minutes),
`small`|`base`|`large` (paper Table 2 sizes for both sides; `small` == `ss`),
and the paper's encoder+decoder pairings `ss`, `bb`, `sl`. Paper variants train
on ImageNet at 256 px with 8x8 patches, 8192 codes, lookup dim 32, e.g.

  python -m vimjax.train --config=configs/vitvqgan.py:bb --workdir=gs://b/vq_bb \
    --config.data.source=tfds:imagenet2012 \
    --config.loss.perceptual_weights=gs://b/vgg16_lpips.npz

Any field can be overridden: `--config.optimizer.lr=3e-4`.
Decoder fine-tuning as in Parti (freeze encoder + codebook, train a bigger
decoder): `--config.finetune_decoder_from=/path/to/tokenizer_workdir
--config.model.decoder=large` style overrides of the decoder sizes.
"""
import ml_collections

from vimjax import config_lib
from vimjax import parallel

# Paper Table 2 (one side): (blocks, heads, dim, mlp).
SIZES = {
    "tiny": (2, 4, 64, 128),
    "small": (8, 8, 512, 2048),
    "base": (12, 12, 768, 3072),
    "large": (32, 16, 1280, 5120),
}
PAIRINGS = {"ss": ("small", "small"), "bb": ("base", "base"), "sl": ("small", "large"),
            "small": ("small", "small"), "base": ("base", "base"), "large": ("large", "large")}
VARIANTS = ("tiny",) + tuple(PAIRINGS)


def transformer_size(name: str) -> ml_collections.ConfigDict:
  layers, heads, dim, mlp = SIZES[name]
  return ml_collections.ConfigDict(
      dict(num_layers=layers, num_heads=heads, emb_dim=dim, mlp_dim=mlp))


def get_config(variant: str = "tiny") -> ml_collections.ConfigDict:
  """Returns the locked config for `variant` (one of VARIANTS)."""
  if variant not in VARIANTS:
    raise ValueError(f"Unknown vitvqgan variant {variant!r}; valid: {', '.join(VARIANTS)}.")
  tiny = variant == "tiny"
  c = ml_collections.ConfigDict()
  c.task = "tokenizer"
  c.seed = 0
  # Tiny: steps make kinds tellable apart in reconstructions (the checker's
  # reconstruction_accuracy 0.80 at 600 steps, 0.90-0.93 at 1500, 0.98-0.99 at
  # 2500 over seeds 0-2; BUILD_NOTES.md "Demo recipe", "Tenth round").
  c.total_steps = 2500 if tiny else 500_000
  c.global_batch_size = 32 if tiny else 256
  c.log_every_steps = 50 if tiny else 100
  c.checkpoint_every_steps = 500 if tiny else 5_000
  c.eval_every_steps = 2500 if tiny else 10_000
  c.keep_checkpoints = 3
  # Divergence guard (README "Failure modes"): False stops at a NaN/inf loss or
  # gradient norm, True drops that update and counts it; a checkpoint whose loss
  # is over max_loss_ratio x the best so far is marked unhealthy (0 = off).
  c.skip_nonfinite_updates = False
  c.max_loss_ratio = 10.0
  c.num_eval_images = 256 if tiny else 10_000
  # rFID (reconstructions vs originals) over the 50k ImageNet validation images.
  c.eval = config_lib.eval_config(num_images=256 if tiny else 50_000)
  # Peak FLOP/s per device for MFU; 0 = known table for TPU/GPU, else measured.
  c.peak_flops_per_device = 0.0
  # Decoder fine-tuning (Parti): workdir of a trained tokenizer whose encoder and
  # codebook are loaded and frozen; "" trains everything from scratch.
  c.finetune_decoder_from = ""

  c.mesh = ml_collections.ConfigDict(
      dict(data=-1, fsdp=1, tensor=1, rules=parallel.DEFAULT_RULES))

  c.data = ml_collections.ConfigDict(dict(
      source="shapes",
      image_size=32 if tiny else 256,
      num_train_examples=0,  # 0 = the whole source
      num_eval_examples=0,
      worker_count=0 if tiny else 16,
      prefetch_buffer_size=2,
  ))

  enc, dec = ("tiny", "tiny") if tiny else PAIRINGS[variant]
  c.model = ml_collections.ConfigDict(dict(
      patch_size=4 if tiny else 8,
      encoder=transformer_size(enc),
      decoder=transformer_size(dec),
      quantizer="factorized",  # or "fsq"
      codebook_size=256 if tiny else 8192,
      lookup_dim=8 if tiny else 32,
      fsq_levels=(8, 5, 5, 5),
      output="logit_laplace",  # or "rgb" (Parti's fine-tuned decoder)
      dropout_rate=0.0,
      scan_layers=not tiny,
      remat_policy="none" if tiny else "dots",
      dtype="float32" if tiny else "bfloat16",
      param_dtype="float32",
  ))

  # Paper: L_VQ + 0.1 L_adv + 0.1 L_perceptual + 0.1 L_logit-laplace + 1.0 L_2.
  c.loss = ml_collections.ConfigDict(dict(
      vq_beta=0.25,
      # Tiny on shapes: L2 only. The logit-laplace gradient, sharp on the ~80%
      # black background, drowned the straight-through signal that teaches the
      # encoder colour (16.4 -> 20.0 dB PSNR at 300 steps; BUILD_NOTES.md).
      l2_weight=10.0 if tiny else 1.0,
      logit_laplace_weight=0.0 if tiny else 0.1,
      perceptual_weight=0.0 if tiny else 0.1,
      perceptual_weights="",  # .npz from `python -m vimjax.convert_weights`
      # The StyleGAN discriminator costs ~5x the generator step on a 2-core CPU,
      # so the demo trains without it; tests cover the adversarial path.
      adversarial_weight=0.0 if tiny else 0.1,
      adversarial_start_step=300 if tiny else 50_000,
      r1_gamma=0.0 if tiny else 10.0,
      # StyleGAN2's lazy regularisation: R1 on every 16th D step, weighted x16
      # (r1_interval=1: every step).
      r1_interval=16,
      lecam_weight=0.0 if tiny else 1e-3,
      lecam_ema_decay=0.99,
      entropy_weight=0.01 if tiny else 0.0,
      entropy_temperature=0.01,
      # Re-seed unused codes from encoder outputs: a demo aid on 32 px shapes;
      # the paper has no restarts (l2-normalised factorized codes reach 95%+
      # usage without them), so the paper variants keep it off.
      restart_dead_codes=tiny,
      dead_code_threshold=1e-3,
      usage_ema_decay=0.99,
  ))

  c.discriminator = ml_collections.ConfigDict(dict(
      # StyleGAN2's 256 px discriminator widths (64 at 256 px, doubling per
      # halving, capped at 512); the paper does not give them.
      base_channels=8 if tiny else 64,
      max_channels=32 if tiny else 512,
      mbstd_group_size=4,
  ))

  # Paper: Adam b=(0.9, 0.99), warm-up to 1e-4 over 50k then cosine to 5e-5, wd 1e-4.
  c.optimizer = ml_collections.ConfigDict(dict(
      name="adamw", lr=1e-3 if tiny else 1e-4, b1=0.9, b2=0.99, weight_decay=1e-4,
      warmup_steps=50 if tiny else 50_000, schedule="cosine",
      end_lr=5e-5 if not tiny else 1e-4, decay_start_step=0,
      grad_clip_norm=1.0, accumulation_steps=1, ema_decay=0.0,
  ))
  c.disc_optimizer = ml_collections.ConfigDict(c.optimizer.to_dict())
  c.disc_optimizer.ema_decay = 0.0

  c.lock()
  return c
