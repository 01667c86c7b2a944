r"""python -m vimjax.sweep --sweep=configs/sweeps/vitvqgan_patch.py:gs://BUCKET --workdir=gs://BUCKET/sweeps/vq_patch --launcher=tpu_vm --launcher_args=--zone=us-central2-b,--accelerator_type=v4-64

Tokenizer loss against patch size, the patchification paper's axis (Wang et
al. 2025, "Scaling Laws in Patchification": loss keeps falling as the patch
shrinks, down to 1x1): ViT-VQGAN-BB (configs/vitvqgan.py:bb, ImageNet at
256 px, 8192 codes) with patches of 32, 16, 8 (the paper's) and 4 pixels,
i.e. 64 to 4096 tokens per image. The variant is the bucket root holding
ImageNet's TFDS data dir and the LPIPS weights `vgg16_lpips.npz`
(`python -m vimjax.convert_weights`). The metric is the held-out L2
reconstruction error; `fit_against` adds L(patch size) to L(N), L(C), L(D)
(D counts tokens, so it grows as the patch shrinks). Patch 4 is 16x the
sequence of the paper's 8: set --launcher_args' accelerator type accordingly.
"""
import ml_collections

PATCH_SIZES = (32, 16, 8, 4)


def get_config(bucket: str = "gs://BUCKET"):
  c = ml_collections.ConfigDict()
  c.base = "configs/vitvqgan.py:bb"
  c.overrides = [{"data.source": "tfds:imagenet2012",
                  "loss.perceptual_weights": f"{bucket}/vgg16_lpips.npz"}]
  c.trials = []
  c.grid = [("model.patch_size", PATCH_SIZES)]
  c.metric = "eval_l2"
  c.fit_against = ["model.patch_size"]
  c.with_offset = True
  c.prepare = ""
  c.prepare_args = {}
  c.lock()
  return c
