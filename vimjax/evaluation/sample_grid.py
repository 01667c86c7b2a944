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
from vimjax import parallel
from vimjax import sampling
from vimjax.data import sources
from vimjax.data import text

NUM_SAMPLES = 8
SEED = 0
STAGE2 = ("vim", "parti")


def _conditions(config, num_classes: int):
  """(captions, condition): VIM labels [n] (None if unconditional), Parti text_ids [n, L].

  Read by index from the eval source, not through the sharded pipeline, so that
  every process holds the same conditions.
  """
  if config.task == "vim":
    if num_classes == 0:
      return [f"sample {i}" for i in range(NUM_SAMPLES)], None
    labels = np.arange(NUM_SAMPLES, dtype=np.int32) % num_classes
    return [f"class {label}" for label in labels], labels
  source = sources.make_source(config.data.source, "eval", image_size=config.data.image_size)
  captions = [sources.split_captions(str(source[i]["caption"]))[0]
              for i in range(min(NUM_SAMPLES, len(source)))]
  tokenizer = text.TextTokenizer(config.data.text_tokenizer, config.model.max_text_length)
  text_ids, _ = tokenizer.encode(captions)
  return captions, np.asarray(text_ids, np.int32)


class Sampler:
  """Draws the grid's images from a train state: `sampler(state) -> [n, H, W, 3] in [0, 1]`."""

  def __init__(self, config, mesh, model):
    from vimjax import sample as sample_lib  # pylint: disable=g-import-not-at-top (binary)
    self._config, self._model = config, model
    rules = parallel.rules_from_config(config.mesh)
    _, self._tok_model, self._tok_params = sample_lib.load_tokenizer(
        config.tokenizer_workdir, mesh, rules)
    self._decode = sample_lib.decode_tokens
    self.captions, condition = _conditions(config, getattr(model, "num_classes", 0))
    dp = parallel.data_parallel_size(mesh)
    self._padded = -(-len(self.captions) // dp) * dp  # Whole rows for every data shard.
    self._condition = None if condition is None else jax.device_put(
        np.resize(condition, (self._padded,) + condition.shape[1:]),
        parallel.batch_sharding(mesh))

  def __call__(self, state) -> np.ndarray:
    c, s = self._config, self._config.sampling
    params = state.ema_params["model"] if c.optimizer.ema_decay > 0 else state.params["model"]
    settings = dict(rng=jax.random.key(SEED), temperature=s.temperature, top_k=s.top_k,
                    top_p=s.top_p, cfg_scale=s.cfg_scale, use_cache=s.use_cache)
    if c.task == "vim":
      if self._condition is None:  # Unconditional: guidance has nothing to contrast.
        settings["cfg_scale"] = 1.0
      tokens = sampling.sample_vim(self._model, params, self._condition,
                                   batch_size=self._padded, **settings)
    else:
      tokens = sampling.sample_parti(self._model, params, self._condition, **settings)
    images = self._decode(self._tok_model, self._tok_params, tokens)
    images = np.asarray(multihost_utils.process_allgather(images, tiled=True)
                        if jax.process_count() > 1 else jax.device_get(images))
    return np.clip(images[:len(self.captions)].astype(np.float32), 0.0, 1.0)


def make_sampler(config, mesh) -> Sampler | None:
  """The grid sampler of a VIM / Parti run, or None (other tasks; no tokenizer to
  decode with: said once in the log)."""
  if config.task not in STAGE2:
    return None
  # pylint: disable=g-import-not-at-top (tasks import the loop)
  from vimjax.train import tasks
  from vimjax.train import tokenizer as tokenizer_task
  workdir = config.tokenizer_workdir
  try:
    tok = checkpoint.load_workdir_config(workdir, "tokenizer_workdir")
    grid, codes = tok.data.image_size // tok.model.patch_size, tokenizer_task.num_codes(tok)
    if (grid, codes) != (config.model.grid_size, config.model.codebook_size):
      raise ValueError(f"its tokens are {grid}x{grid} of {codes} codes, the model's "
                       f"{config.model.grid_size}x{config.model.grid_size} of "
                       f"{config.model.codebook_size}")
    return Sampler(config, mesh, tasks.TASKS[config.task].build_model(config))
  except (ValueError, KeyError, AttributeError) as e:  # A preview must not stop training.
    logging.warning("No sample grids during training: tokenizer_workdir=%r cannot decode this "
                    "model's samples (%s); set --config.tokenizer_workdir to see them in "
                    "TensorBoard.", workdir, str(e).splitlines()[0] if str(e) else type(e))
    return None
