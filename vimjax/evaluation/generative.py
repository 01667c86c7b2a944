"""FID in the workflow: rFID of a tokenizer, FID / IS of VIM and Parti samples.

Run by `vimjax.evaluate` and, every `eval_every_steps`, by the training loop
when `config.eval.inception_weights` is set (`config.eval`: see
`config_lib.eval_config`, checked by `config_lib.validate`):
- tokenizer: `config.eval.num_images` eval images and their reconstructions;
  rFID = FID(reconstructions, originals), as the ViT-VQGAN paper reports it,
  plus sFID, precision/recall and the Inception Score of the reconstructions.
- VIM / Parti: `config.eval.num_images` samples (VIM: class-balanced labels
  i % num_classes; Parti: the eval split's captions in order), drawn with
  `config.sampling` from `fold_in(key(config.eval.seed), chunk)`, decoded by
  the stage-1 tokenizer, scored against `config.eval.fid_reference` (a
  pytorch-fid / ADM statistics file): fid, sfid (when the reference has
  spatial stats), precision/recall (when it holds images, as ADM reference
  batches do, or `pool` features) and the Inception Score.
Images are quantised to 8 bits before Inception, as PNGs would be.
"""
from typing import Any

from absl import logging
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from vimjax import generate
from vimjax import parallel
from vimjax import tasks
from vimjax.data import pipeline
from vimjax.evaluation import inception_features
from vimjax.evaluation import inception_metrics
from vimjax.models import inception


def enabled(config) -> bool:
  return bool(config.eval.inception_weights)


def make_extractor(config, mesh) -> inception_features.Extractor:
  params = inception.load_inception_params(config.eval.inception_weights)
  return inception_features.Extractor(params, mesh, size=int(config.eval.inception_size),
                                      batch_size=int(config.eval.batch_size))


def _host(x) -> np.ndarray:
  """A global array -> all of it as NumPy on every process."""
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def _eval_batches(config, mesh, fields, transforms=()):
  """Global eval batches ({field: global array}, valid row indices), at most
  config.eval.num_images valid rows in all; every process sees every row."""
  iterator = pipeline.create_iterator(
      config.data, split="eval", global_batch_size=config.global_batch_size,
      seed=config.seed, train=False, transforms=transforms)
  seen = 0
  for host_batch in iterator:
    if seen >= config.eval.num_images:
      return
    batch = pipeline.to_global_batch({k: host_batch[k] for k in (*fields, "mask")}, mesh)
    take = np.flatnonzero(_host(batch.pop("mask")) > 0)[:config.eval.num_images - seen]
    seen += len(take)
    yield batch, take


def tokenizer_metrics(config, state, mesh, extractor) -> dict[str, float]:
  """rFID etc. of the tokenizer in `state` on `config.eval.num_images` eval images."""
  model = tasks.get(config).build_model(config)
  params = state.ema_params["generator"] if config.optimizer.ema_decay > 0 else state.params[
      "generator"]
  reconstruct = jax.jit(
      lambda p, x: jnp.clip(model.apply({"params": p}, x, train=False)[0]["image"], 0.0, 1.0))
  originals, reconstructions = [], []
  for batch, take in _eval_batches(config, mesh, ("image",)):
    recon = _host(reconstruct(params, batch["image"]))
    originals.append(extractor.extract([_host(batch["image"])[take]], name="originals"))
    reconstructions.append(extractor.extract([recon[take]], name="reconstructions"))
    logging.info("rFID: %d/%d eval images and reconstructions through Inception.",
                 sum(len(r["pool"]) for r in reconstructions), config.eval.num_images)
  cat = lambda parts: {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  real, fake = cat(originals), cat(reconstructions)
  scores = inception_metrics.compare(fake, real)
  return {"rfid": scores.pop("fid"), **{f"r{k}" if k != "inception_score" else k: v
                                        for k, v in scores.items()},
          "fid_num_images": len(real["pool"])}


def _conditions(config, kind: str, mesh, num_images: int,
                transforms) -> list[tuple[int, Any]]:
  """Per chunk (number of images, condition) for the conditioning `kind`:
  class labels [n] (class-balanced), None (unconditional) or text_ids [n, L]
  (the eval split's captions in order)."""
  chunk = config.global_batch_size
  if kind != "prompt":
    labels = (np.arange(num_images) % max(config.model.get("num_classes", 0), 1)).astype(np.int32)
    return [(len(labels[s:s + chunk]), None if kind == "none" else labels[s:s + chunk])
            for s in range(0, num_images, chunk)]
  texts = [_host(batch["text_ids"])[take] for batch, take in
           _eval_batches(config, mesh, ("text_ids",), transforms)]
  texts = np.concatenate(texts)[:num_images]
  return [(len(texts[s:s + chunk]), texts[s:s + chunk]) for s in range(0, len(texts), chunk)]


def stage2_metrics(config, state, mesh, extractor, steps) -> dict[str, float]:
  """FID / IS of `config.eval.num_images` samples of the VIM/Parti model in `state`."""
  task = tasks.get(config)
  rules = parallel.rules_from_config(config.mesh)
  model = task.build_model(config)
  params = state.ema_params["model"] if config.optimizer.ema_decay > 0 else state.params["model"]
  _, tok_model, tok_params = generate.load_tokenizer(config.tokenizer_workdir, mesh, rules)
  dp = parallel.data_parallel_size(mesh)
  data_sharding = parallel.batch_sharding(mesh)
  kind = task.conditioning(config)

  def image_batches():
    for c, (n, cond) in enumerate(_conditions(config, kind, mesh, int(config.eval.num_images),
                                              steps.data_transforms)):
      rng = jax.random.fold_in(jax.random.key(config.eval.seed), c)
      padded = -(-n // dp) * dp
      sample = task.make_sampler(config, model, batch_size=padded)
      x = None if cond is None else jax.device_put(
          np.resize(cond, (padded,) + cond.shape[1:]), data_sharding)
      tokens = sample(params, x, rng)
      images = _host(generate.decode_tokens(tok_model, tok_params, tokens))[:n]
      yield np.clip(images.astype(np.float32), 0.0, 1.0)

  ref = inception_metrics.load_stats(config.eval.fid_reference)
  features = extractor.extract(image_batches(), int(config.eval.num_images), name="samples")
  ref = inception_features.with_reference_features(ref, extractor)  # ADM batch: its 10k images.
  scores = inception_metrics.compare({**inception_metrics.stats_from_features(features),
                                      "pool": features["pool"], "logits": features["logits"]},
                                     ref)
  return {**scores, "fid_num_images": len(features["pool"])}


def fid_metrics(config, state, mesh, steps, extractor=None) -> dict[str, float]:
  """The task's Inception metrics ({} when config.eval.inception_weights is unset).

  What is compared is the task's `EVAL_IMAGES`: reconstructions (rFID) or samples (FID).
  """
  if not enabled(config):
    return {}
  extractor = extractor or make_extractor(config, mesh)
  if tasks.get(config).EVAL_IMAGES == "reconstructions":
    return tokenizer_metrics(config, state, mesh, extractor)
  return stage2_metrics(config, state, mesh, extractor, steps)
