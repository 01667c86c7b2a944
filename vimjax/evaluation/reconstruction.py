"""Does the tokenizer keep what a prompt names? The shapes checker on reconstructions.

PSNR says how close a reconstruction is in pixels, not whether a circle is
still a circle. On the shapes dataset the analytic checker (vimjax/data/
shapes.py) reads kind, colour and position of every shape, so the fraction of
held-out reconstructions that pass it with the original scene (all-or-nothing,
kind included) is the tokenizer's ceiling for stage 2: a Parti sample cannot
adhere to its prompt better than the decoder can draw it. The same checker on
the original images is the ceiling of the metric itself.
"""
import functools
from typing import Any, Mapping

import jax
import numpy as np

from vimjax.data import shapes


def held_out_shapes(image_size: int, num_images: int) -> tuple[np.ndarray, dict]:
  """The first `num_images` of the shapes validation split (never trained on).

  Returns:
    (images uint8 [n, S, S, 3], stacked scenes as `shapes.adherence` takes them).
  """
  source = shapes.ShapesSource("validation", image_size, num_images)
  examples = [source[i] for i in range(num_images)]
  images = np.stack([np.asarray(e["image"]) for e in examples])
  scenes = shapes.stack_scenes([{k: e[k] for k in (*shapes.SCENE_KEYS, "num_shapes")}
                                for e in examples])
  return images, scenes


@functools.partial(jax.jit, static_argnums=0)
def _reconstruct(model, params, images):
  decoded, _ = model.apply({"params": params}, images, train=False)
  return decoded["image"].clip(0.0, 1.0)


def reconstruct(model, params, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
  """Encode -> quantize -> decode with a vit_vqgan.Model.

  Args:
    model: the tokenizer `vit_vqgan.Model`.
    params: its generator params.
    images: uint8 [n, S, S, 3].
    batch_size: images per call (the last call is padded to it: one compile).

  Returns:
    float32 [n, S, S, 3] in [0, 1].
  """
  x = np.asarray(images, np.float32) / 255.0
  n = len(x)
  pad = -n % batch_size
  x = np.concatenate([x, np.repeat(x[-1:], pad, axis=0)]) if pad else x
  out = [np.asarray(_reconstruct(model, params, x[i:i + batch_size]))
         for i in range(0, len(x), batch_size)]
  return np.concatenate(out)[:n]


def shapes_scores(originals: np.ndarray, reconstructions: np.ndarray,
                  scenes: Mapping[str, Any]) -> dict[str, float]:
  """The checker (kind, colour and position; all-or-nothing) on both image sets.

  Args:
    originals: [n, S, S, 3] uint8 or float in [0, 1].
    reconstructions: same shape.
    scenes: the originals' scenes, stacked (`held_out_shapes`).

  Returns:
    reconstruction_accuracy (reconstructions), reconstruction_accuracy_ceiling
    (originals: the checker's own accuracy), reconstruction_color_accuracy
    (kind not required, as prompt_adherence scores samples).
  """
  if np.shape(originals) != np.shape(reconstructions):
    raise ValueError(f"originals {np.shape(originals)} and reconstructions "
                     f"{np.shape(reconstructions)} must have the same shape.")
  return {
      "reconstruction_accuracy": float(np.mean(shapes.adherence(reconstructions, scenes))),
      "reconstruction_accuracy_ceiling": float(np.mean(shapes.adherence(originals, scenes))),
      "reconstruction_color_accuracy": float(np.mean(
          shapes.adherence(reconstructions, scenes, check_kind=False))),
  }
