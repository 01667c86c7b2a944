"""What a task family provides: the `Task` protocol, the `Steps` it builds, shared helpers.

A task family is one module of this package (tokenizer.py, vim.py, parti.py,
contrastive.py) whose module-level names satisfy `Task`; `vimjax.tasks.TASKS`
maps `config.task` to it. Callers (the training loop, benchmark, aot_compile,
sample, flops, config_lib, evaluation) ask the task, never branch on its name,
so adding a family means adding one module here.
"""
import dataclasses
import os
from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np

from vimjax import parallel
from vimjax import sampling

# What a sampler is conditioned on (`Task.conditioning`).
CONDITIONINGS = ("none", "class", "prompt")
# What a task's Inception metrics compare (`Task.EVAL_IMAGES`): the tokenizer's
# reconstructions against their originals (rFID), or generated samples against
# reference statistics (FID); None: no images, no Inception metrics.
EVAL_IMAGES = ("reconstructions", "samples", None)
# What a task's batches are built from (`Task.INPUT`): images, or the token
# records of `python -m vimjax.encode`.
INPUTS = ("images", "tokens")


@dataclasses.dataclass(frozen=True)
class Steps:
  """The pure functions of one training task (`Task.build`).

  Attributes:
    init: rng -> TrainState whose params carry `nn.Partitioned` logical names.
    train_step: (state, batch, rng, frozen) -> (state, {name: scalar}).
    eval_step: (state, batch, frozen) -> {name: per-example array}.
    summarize_eval: list of host eval outputs -> ({name: float}, images or None),
      images being a [n, H, W, 3] grid-ready array in [0, 1].
    frozen: constant inputs of the steps (e.g. perceptual-net weights), or None.
    compute_dtype: the model's compute dtype, for the measured peak FLOP/s.
    data_transforms: extra per-example grain maps (e.g. caption tokenization),
      run in the data workers for the train and eval iterators.
    intermittent_metrics: train metrics that some steps do not compute (NaN on
      them, e.g. the tokenizer's lazy `r1`); logs average them over the steps
      that did.
  """
  init: Callable[..., Any]
  train_step: Callable[..., Any]
  eval_step: Callable[..., Any]
  summarize_eval: Callable[..., Any]
  frozen: Any = None
  compute_dtype: str = "float32"
  data_transforms: tuple = ()
  intermittent_metrics: tuple[str, ...] = ()


# (params, conditions, rng, lower=False) -> tokens [b, n] int32 (with `lower`, the
# `jax.stages.Lowered` call, to compile or profile it); conditions: None, labels
# int32 [b] or text ids int32 [b, L] (see `Task.condition_spec`).
Sampler = Callable[..., jax.Array]


class Task(Protocol):
  """A task family: the module-level names each module of this package defines.

  Attributes:
    NAME: the `config.task` value.
    INPUT: what its batches are built from, one of `INPUTS`.
    EVAL_IMAGES: what its Inception metrics compare, one of `EVAL_IMAGES`.
    LAYER_KEYS: dotted keys under config.model of its (scanned) layer counts,
      e.g. ("encoder_layers", "decoder_layers"); aot_compile probes them.
    make_sampler: `(config, model, *, batch_size, **overrides) -> Sampler`
      for families that sample image tokens (VIM, Parti), else None. Those
      also define `sampling_settings(config, **overrides) -> dict`, the
      settings their sampler uses (`sampling_settings` below plus family
      rules), and `synthetic_conditions`.
  """
  NAME: str
  INPUT: str
  EVAL_IMAGES: str | None
  LAYER_KEYS: tuple[str, ...]
  make_sampler: Callable[..., Sampler] | None

  def build_model(self, config) -> Any:
    """The family's Linen model (the one whose params are `state.params[...]`)."""

  def build(self, config, mesh) -> Steps:
    """The train-time step bundle."""

  def abstract_params(self, config) -> dict:
    """{top-level module: abstract unboxed params}, nothing materialised."""

  def batch_spec(self, config, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
    """The global train batch its train step reads (shapes and dtypes)."""

  def synthetic_batch(self, config, batch_size: int, seed: int) -> dict[str, np.ndarray]:
    """A host batch of `batch_spec`'s layout with valid values (benchmarks, tests)."""

  def tokens_per_example(self, config) -> int:
    """Tokens one example holds: image tokens, or the tokenizer's patches."""

  def validate(self, config) -> None:
    """The family's config checks (config_lib.validate calls it); ValueError."""

  def flops_phases(self, config) -> tuple[tuple[int, Any], ...]:
    """((first step, config whose train step runs from it), ...) in step order."""

  def flops_mix(self, config) -> tuple[tuple[float, Any], ...]:
    """((weight, config), ...): one step of `config` costs, on average, the
    weighted FLOPs of these configs' steps (a step that alternates between
    programs, e.g. the tokenizer's lazy R1); most tasks: ((1.0, config),)."""

  def conditioning(self, config) -> str:
    """What its samples are conditioned on, one of `CONDITIONINGS`."""

  def condition_spec(self, config, batch_size: int) -> jax.ShapeDtypeStruct | None:
    """The conditions a sampler call takes for `batch_size` images (None: none)."""

  def synthetic_conditions(self, config, batch_size: int, seed: int) -> np.ndarray | None:
    """Random valid conditions of `condition_spec`'s layout (benchmarks)."""


def single_phase(config) -> tuple[tuple[int, Any], ...]:
  """`Task.flops_phases` of a task whose step is the same all run long."""
  return ((0, config),)


def single_program(config) -> tuple[tuple[float, Any], ...]:
  """`Task.flops_mix` of a task whose every step runs the same program."""
  return ((1.0, config),)


def spec(shape, dtype=np.int32) -> jax.ShapeDtypeStruct:
  return jax.ShapeDtypeStruct(tuple(shape), jnp.dtype(dtype))


def abstract_params(model, init_args: tuple) -> dict:
  """Top-level module / parameter name -> abstract unboxed params of `model.init(*init_args)`."""
  params = jax.eval_shape(
      lambda: model.init({"params": jax.random.key(0)}, *init_args, train=False)["params"])
  return dict(parallel.unbox(params))


def sampling_settings(config, *, cfg_scale=None, temperature=None, top_k=None, top_p=None,
                      use_cache=None, dtype=None) -> dict[str, Any]:
  """config.sampling, each value replaced by its override when that is not None."""
  s = config.sampling
  pick = lambda value, default: default if value is None else value
  dtype = pick(dtype, s.get("dtype"))
  if dtype is not None and dtype not in sampling.DTYPES:
    raise ValueError(f"sampling.dtype={dtype!r}; valid: {sampling.DTYPES}.")
  return dict(cfg_scale=float(pick(cfg_scale, s.cfg_scale)),
              temperature=float(pick(temperature, s.temperature)),
              top_k=int(pick(top_k, s.top_k)), top_p=float(pick(top_p, s.top_p)),
              use_cache=bool(pick(use_cache, s.use_cache)),
              # Absent from configs saved before they existed (a workdir's config.json):
              # then the default, and the model's own dtype.
              cache_segments=int(s.get("cache_segments", sampling.CACHE_SEGMENTS)),
              dtype=dtype)


def exists(path: str) -> bool:
  """A local path that exists, or a remote (`scheme://`) one taken on trust."""
  return "://" in path or os.path.exists(path)
