"""Stand-ins that let a config compile or run without its data and weight files.

Used by `python -m vimjax.benchmark` and `python -m vimjax.aot_compile`: batches
come from the task (`base.Task.batch_spec` / `synthetic_batch`), so the token
source is replaced by a name that is never opened; a captioned task gets a
throwaway shapes vocabulary when data.text_tokenizer is missing, and a
perceptual loss gets zero VGG weights of the right shapes when
loss.perceptual_weights is missing (only shapes matter to the compiler and
to timing).
"""
import os

from absl import logging
import numpy as np

from vimjax import config_lib
from vimjax import runtime
from vimjax import tasks
from vimjax.data import shapes
from vimjax.data import text
from vimjax.models import perceptual

SOURCE = "synthetic"  # Stands in for data.source: batches are made by the caller.


def ensure_text_tokenizer(config) -> None:
  """Captioned tasks load a SentencePiece model; make a throwaway one if none is given."""
  path = config.data.text_tokenizer
  if "<dir>" not in path and ("://" in path or os.path.exists(path)):
    return
  directory = runtime.scratch_dir(prefix="vimjax_synthetic_spm_")
  captions = (shapes.caption_from_scene(shapes.sample_scene("train", i)) for i in range(2000))
  trained = text.train_sentencepiece(captions, os.path.join(directory, "spm"),
                                     min(config.model.text_vocab_size, 512))
  logging.info("data.text_tokenizer=%r does not exist; using a throwaway shapes vocabulary "
               "%s (%d pieces): text ids are synthetic anyway.", path, trained["model"],
               trained["vocab_size"])
  config.data.text_tokenizer = trained["model"]


def ensure_lpips_weights(config) -> None:
  """A perceptual loss loads VGG weights: zeros stand in (same shapes) when they are missing."""
  path = config.loss.perceptual_weights
  if path and ("://" in path or os.path.exists(path)):
    return
  out = os.path.join(runtime.scratch_dir(prefix="vimjax_synthetic_lpips_"), "lpips.npz")
  np.savez(out, **{k: np.zeros(s, np.float32)
                   for k, s in perceptual.expected_param_shapes().items()})
  logging.info("loss.perceptual_weights=%r does not exist; zeros of the same shapes stand in "
               "(%s): only shapes matter to the compiler.", path, out)
  config.loss.perceptual_weights = out


def prepare_config(config, num_devices: int, num_processes: int) -> None:
  """Synthetic data and throwaway vocab/LPIPS files stand in; validates for the devices."""
  if tasks.get(config).INPUT == "tokens":
    config.data.source = SOURCE
  if "text_tokenizer" in config.data:
    ensure_text_tokenizer(config)
  if "loss" in config and config.loss.get("perceptual_weight", 0) > 0:
    ensure_lpips_weights(config)
  config_lib.validate(config, num_devices, num_processes)
