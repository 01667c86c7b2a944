"""Wall time of a jitted call, for the stand-alone micro-benchmarks (benchmarks/)."""
import time

import jax


def milliseconds_per_call(fn, *args, repeats: int = 3) -> float:
  """Mean milliseconds of `fn(*args)` over `repeats` calls, after one untimed call
  (the compile); blocks on the last result."""
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  out = None
  for _ in range(repeats):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / repeats * 1e3
