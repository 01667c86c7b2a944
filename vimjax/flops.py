"""Model FLOPs per train step, FLOPs of compiled programs, device peaks: for MFU.

MFU = (model FLOPs per step / devices) x steps/s / (peak FLOP/s per device).

Model FLOPs (`model_flops_per_step`) are XLA's cost analysis of the *lowered*,
global (unpartitioned) train step of a copy of the config whose layers are
unrolled and not rematerialised. XLA's cost analysis of a compiled program counts
a `while` body once (so a scanned stack of N layers counts as one layer) and it
counts remat recomputation, so the compiled program's own count understates
scanned models and overstates rematerialised ones. Nothing is compiled here.

The peak comes from the config, else from `hardware.CHIPS`, else it is measured
once with a large matmul on one device (with a warning).
"""
import functools
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from vimjax import hardware

def compiled_flops(compiled) -> float:
  """FLOPs of one call of a compiled (per-device) or lowered (global) program; 0 if unknown."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return 0.0
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", 0.0))


def train_batch_shapes(config, batch_size: int | None = None) -> dict[str, jax.ShapeDtypeStruct]:
  """Abstract global train batch of `config.task` (the fields its train step reads).

  Tokenizer: `image` float32 [b, S, S, 3], `label` int32 [b]. VIM: `tokens` int32
  [b, grid_size^2], `label` int32 [b]. Parti, contrastive: `tokens`, `text_ids` int32
  [b, max_text_length], `text_truncated` int32 [b]. All: `mask` int32 [b].
  """
  b = config.global_batch_size if batch_size is None else batch_size
  spec = lambda shape, dtype=np.int32: jax.ShapeDtypeStruct(shape, jnp.dtype(dtype))
  batch = {"mask": spec((b,))}
  if config.task == "tokenizer":
    size = config.data.image_size
    return {**batch, "image": spec((b, size, size, 3), np.float32), "label": spec((b,))}
  m = config.model
  batch["tokens"] = spec((b, m.grid_size ** 2))
  if config.task == "vim":
    return {**batch, "label": spec((b,))}
  return {**batch, "text_ids": spec((b, m.max_text_length)), "text_truncated": spec((b,))}


def model_flops_per_step(config, batch: Any = None, executed: bool = False) -> float:
  """Global model FLOPs of one train step of `config` (see the module docstring).

  Args:
    config: an experiment config (task, model, optimizer, ...). Parti's task
      loads `data.text_tokenizer`, so that file must exist.
    batch: the global train batch, {name: array or jax.ShapeDtypeStruct};
      default `train_batch_shapes(config)`.
    executed: keep the config's remat policy, so that what it recomputes in
      the backward pass is counted too: the FLOPs the chips execute (for a
      step-time estimate), not the model's (for MFU).
  Returns:
    FLOPs of the whole step over all devices (divide by the device count for
    a per-device number). The tokenizer's step is a `cond` on the adversarial
    phase; the costlier (GAN) branch is counted (`model_flops_by_phase` splits
    the run into its phases, for MFU).
  """
  from vimjax import parallel  # pylint: disable=g-import-not-at-top
  from vimjax.train import tasks  # pylint: disable=g-import-not-at-top (tasks -> loop -> flops)
  flat = config.copy_and_resolve_references()
  with flat.unlocked():
    flat.model.scan_layers = False
    if not executed:
      flat.model.remat_policy = "none"
  task = tasks.build(flat, None)
  rng = jax.random.key(0)
  state = parallel.unbox(jax.eval_shape(task.init, rng))
  if batch is None:
    batch = train_batch_shapes(config)
  batch = {k: jax.ShapeDtypeStruct(np.shape(v), v.dtype) for k, v in batch.items()}
  return compiled_flops(jax.jit(task.train_step).lower(state, batch, rng, task.frozen))


def model_flops_by_phase(config, batch: Any = None) -> tuple[tuple[int, float], ...]:
  """((first state.step, global model FLOPs per step), ...) of the run's phases, in order.

  The tokenizer's step runs the discriminator and the adversarial loss only
  from loss.adversarial_start_step on (a `cond`); before that its FLOPs are the
  ones of the same config without the GAN. Other tasks have one phase.
  """
  full = model_flops_per_step(config, batch)
  if (config.task != "tokenizer" or config.loss.adversarial_weight <= 0
      or config.loss.adversarial_start_step <= 0):
    return ((0, full),)
  before = config.copy_and_resolve_references()
  with before.unlocked():
    before.loss.adversarial_weight = 0.0
  return ((0, model_flops_per_step(before, batch)), (config.loss.adversarial_start_step, full))


def flops_between(phases: tuple[tuple[int, float], ...], first_step: int, end_step: int) -> float:
  """Model FLOPs of the steps whose state.step is in [first_step, end_step)."""
  total = 0.0
  for i, (start, per_step) in enumerate(phases):
    stop = phases[i + 1][0] if i + 1 < len(phases) else end_step
    total += max(0, min(end_step, stop) - max(first_step, start)) * per_step
  return total


@functools.cache
def measure_peak_flops(dtype_name: str = "float32", size: int = 2048, repeats: int = 5) -> float:
  """Best observed matmul FLOP/s on the first local device."""
  dtype = jnp.dtype(dtype_name)
  device = jax.local_devices()[0]
  a = jax.device_put(jnp.ones((size, size), dtype), device)
  matmul = jax.jit(lambda x: x @ x)
  matmul(a).block_until_ready()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    matmul(a).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2 * size**3 / best


def peak_flops_per_device(configured: float, dtype_name: str) -> float:
  """The configured peak if > 0, the device's from `hardware.CHIPS`, else a measured one."""
  if configured > 0:
    return configured
  kind = jax.devices()[0].device_kind
  peak = hardware.peak_flops(kind)  # Warns when the kind is unknown.
  if peak is not None:
    return peak
  peak = measure_peak_flops(dtype_name)
  logging.warning("Using the measured peak of %s (%s matmul) for MFU: %.3g FLOP/s.", kind,
                  dtype_name, peak)
  return peak
