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
from vimjax import parallel
from vimjax.models import cpu_kernels

def compiled_flops(compiled) -> float:
  """FLOPs of one call of a compiled (per-device) or lowered (global) program; 0 if unknown."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return 0.0
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", 0.0))


def model_flops_per_step(task, config, batch: Any = None, executed: bool = False) -> float:
  """Global model FLOPs of one train step of `config` (see the module docstring).

  Args:
    task: the config's task family (`vimjax.tasks.get(config)`, a `base.Task`).
    config: an experiment config (task, model, optimizer, ...). Parti's task
      loads `data.text_tokenizer`, so that file must exist.
    batch: the global train batch, {name: array or jax.ShapeDtypeStruct};
      default `task.batch_spec(config, config.global_batch_size)`.
    executed: keep the config's remat policy, so that what it recomputes in
      the backward pass is counted too: the FLOPs the chips execute (for a
      step-time estimate), not the model's (for MFU).
  Returns:
    FLOPs of the whole step over all devices (divide by the device count for
    a per-device number). A step with a `cond` (the tokenizer's adversarial
    phase) counts its costlier branch (`model_flops_by_phase` splits the run
    into the task's phases, for MFU); a step that alternates between programs
    (the tokenizer's lazy R1) counts their mean (`task.flops_mix`).
  """
  mix = task.flops_mix(config)
  if len(mix) > 1:
    return sum(weight * model_flops_per_step(task, part, batch, executed)
               for weight, part in mix)
  flat = config.copy_and_resolve_references()
  with flat.unlocked():
    flat.model.scan_layers = False
    if not executed:
      flat.model.remat_policy = "none"
  steps = task.build(flat, None)
  rng = jax.random.key(0)
  state = parallel.unbox(jax.eval_shape(steps.init, rng))
  if batch is None:
    batch = task.batch_spec(config, config.global_batch_size)
  batch = {k: jax.ShapeDtypeStruct(np.shape(v), v.dtype) for k, v in batch.items()}
  # XLA's ops: the cost analysis counts nothing inside the CPU kernels' custom calls.
  with cpu_kernels.xla_reference():
    lowered = jax.jit(steps.train_step).lower(state, batch, rng, steps.frozen)
  return compiled_flops(lowered)


def model_flops_by_phase(task, config, batch: Any = None) -> tuple[tuple[int, float], ...]:
  """((first state.step, global model FLOPs per step), ...) of the run's phases, in order.

  The phases are the task's (`task.flops_phases`): e.g. the tokenizer runs the
  discriminator and the adversarial loss only from loss.adversarial_start_step
  on; other tasks have one phase.
  """
  return tuple((start, model_flops_per_step(task, phase_config, batch))
               for start, phase_config in task.flops_phases(config))


def flops_between(phases: tuple[tuple[int, float], ...], first_step: int, end_step: int) -> float:
  """Model FLOPs of the steps whose state.step is in [first_step, end_step)."""
  total = 0.0
  for i, (start, per_step) in enumerate(phases):
    stop = phases[i + 1][0] if i + 1 < len(phases) else end_step
    total += max(0, min(end_step, stop) - max(first_step, start)) * per_step
  return total


def measure_peak_flops(dtype_name: str = "float32", size: int = 2048, repeats: int = 5) -> float:
  """Best observed matmul FLOP/s on the first local device, measured now."""
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


@functools.cache
def measured_peak_flops(dtype_name: str) -> float:
  """`measure_peak_flops`, once per process and dtype."""
  return measure_peak_flops(dtype_name)


def peak_is_measured(configured: float) -> bool:
  """Whether `peak_flops_per_device` measures the peak (none configured, none known)."""
  return configured <= 0 and hardware.by_device_kind(jax.devices()[0].device_kind) is None


def peak_flops_per_device(configured: float, dtype_name: str) -> float:
  """The configured peak if > 0, the device's from `hardware.CHIPS`, else a measured one."""
  if configured > 0:
    return configured
  kind = jax.devices()[0].device_kind
  peak = hardware.peak_flops(kind)  # Warns when the kind is unknown.
  if peak is not None:
    return peak
  peak = measured_peak_flops(dtype_name)
  logging.warning("Using the measured peak of %s (%s matmul) for MFU: %.3g FLOP/s.", kind,
                  dtype_name, peak)
  return peak
