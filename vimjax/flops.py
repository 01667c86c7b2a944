"""FLOPs of compiled programs and device peaks, for MFU.

MFU = (FLOPs per step from XLA's cost analysis of the compiled, partitioned
step, per device) x steps/s / (peak FLOP/s per device). The peak comes from the
config, else from a table of known accelerators, else it is measured once with
a large matmul on one device.
"""
import functools
import time

from absl import logging
import jax
import jax.numpy as jnp

# Dense bf16 peak FLOP/s per chip (vendor numbers).
KNOWN_PEAKS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100 80GB HBM3": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
}


def compiled_flops(compiled) -> float:
  """FLOPs of one call of a compiled (per-device, partitioned) program; 0 if unknown."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return 0.0
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", 0.0))


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
  """The configured peak if > 0, a known accelerator's, else a measured one."""
  if configured > 0:
    return configured
  kind = jax.devices()[0].device_kind
  if kind in KNOWN_PEAKS:
    return KNOWN_PEAKS[kind]
  peak = measure_peak_flops(dtype_name)
  logging.info("Measured peak of %s (%s matmul): %.3g FLOP/s.", kind, dtype_name, peak)
  return peak
