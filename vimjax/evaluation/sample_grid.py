"""Sample grids while VIM / Parti train: the same few conditions and seed at every eval.

At each eval step the training loop draws `NUM_SAMPLES` images with
`config.sampling` from the current weights (EMA ones when kept): VIM for class
ids 0..n-1 (mod num_classes; unconditional VIM: n samples), Parti for the
first n captions of the eval split; a fixed seed, so consecutive grids differ
only by what the model learnt. The stage-1 tokenizer in `config.tokenizer_workdir`
decodes the tokens. The loop writes the captioned grid as
`samples_STEP.png` in the workdir and as `eval/samples` in TensorBoard.
"""
from absl import logging
import jax
from jax.experimental import multihost_utils
import numpy as np

from vimjax import checkpoint
from vimjax import generate
from vimjax import parallel
from vimjax import tasks
from vimjax.data import sources
from vimjax.data import text
from vimjax.tasks import tokenizer as tokenizer_task

NUM_SAMPLES = 8
SEED = 0


def _conditions(config, family):
  """(captions, conditions): class ids [n], text ids [n, L] or None, by `family.conditioning`.

  Prompts are read by index from the eval source, not through the sharded
  pipeline, so that every process holds the same conditions.
  """
  conditioning = family.conditioning(config)
  if conditioning == "none":
    return [f"sample {i}" for i in range(NUM_SAMPLES)], None
  if conditioning == "class":
    labels = np.arange(NUM_SAMPLES, dtype=np.int32) % config.model.num_classes
    return [f"class {label}" for label in labels], labels
  source = sources.make_source(config.data.source, "eval", image_size=config.data.image_size)
  captions = [sources.split_captions(str(source[i]["caption"]))[0]
              for i in range(min(NUM_SAMPLES, len(source)))]
  tokenizer = text.TextTokenizer(config.data.text_tokenizer, config.model.max_text_length)
  text_ids, _ = tokenizer.encode(captions)
  return captions, np.asarray(text_ids, np.int32)


class Sampler:
  """Draws the grid's images from a train state: `sampler(state) -> [n, H, W, 3] in [0, 1]`."""

  def __init__(self, config, mesh, family):
    self._config = config
    rules = parallel.rules_from_config(config.mesh)
    _, self._tok_model, self._tok_params = generate.load_tokenizer(
        config.tokenizer_workdir, mesh, rules)
    self.captions, condition = _conditions(config, family)
    dp = parallel.data_parallel_size(mesh)
    self._padded = -(-len(self.captions) // dp) * dp  # Whole rows for every data shard.
    self._condition = None if condition is None else jax.device_put(
        np.resize(condition, (self._padded,) + condition.shape[1:]),
        parallel.batch_sharding(mesh))
    self._sample = family.make_sampler(config, family.build_model(config),
                                       batch_size=self._padded)

  def __call__(self, state) -> np.ndarray:
    c = self._config
    params = state.ema_params["model"] if c.optimizer.ema_decay > 0 else state.params["model"]
    tokens = self._sample(params, self._condition, jax.random.key(SEED))
    images = generate.decode_tokens(self._tok_model, self._tok_params, tokens)
    images = np.asarray(multihost_utils.process_allgather(images, tiled=True)
                        if jax.process_count() > 1 else jax.device_get(images))
    return np.clip(images[:len(self.captions)].astype(np.float32), 0.0, 1.0)


def make_sampler(config, mesh) -> Sampler | None:
  """The grid sampler of a run whose task samples image tokens, or None (other tasks;
  no tokenizer that can decode its tokens: said once in the log)."""
  family = tasks.get(config)
  if family.make_sampler is None:
    return None
  workdir = config.tokenizer_workdir
  try:
    tok = checkpoint.load_workdir_config(workdir, "tokenizer_workdir")
    grid, codes = tok.data.image_size // tok.model.patch_size, tokenizer_task.num_codes(tok)
    if (grid, codes) != (config.model.grid_size, config.model.codebook_size):
      raise ValueError(f"its tokens are {grid}x{grid} of {codes} codes, the model's "
                       f"{config.model.grid_size}x{config.model.grid_size} of "
                       f"{config.model.codebook_size}")
    return Sampler(config, mesh, family)
  except (ValueError, KeyError, AttributeError) as e:  # A preview must not stop training.
    logging.warning("No sample grids during training: tokenizer_workdir=%r cannot decode this "
                    "model's samples (%s); set --config.tokenizer_workdir to see them in "
                    "TensorBoard.", workdir, str(e).splitlines()[0] if str(e) else type(e))
    return None
