"""Start-up and result plumbing shared by the thin absl binaries."""
import json
import os
import sys

from absl import flags
from absl import logging
import jax

COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for multi-process runs.")
NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes in a multi-process run.")
PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() with auto-detection "
    "(Cloud TPU, SLURM) even without --coordinator_address.")


def initialize() -> None:
  """jax.distributed start-up when asked, then logs the process and device layout."""
  if COORDINATOR.value or DISTRIBUTED.value:
    jax.distributed.initialize(coordinator_address=COORDINATOR.value,
                               num_processes=NUM_PROCESSES.value, process_id=PROCESS_ID.value)
  logging.info("Process %d/%d, %d local / %d global devices (%s).", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].device_kind)


def emit_result(result: dict, workdir: str | None, name: str) -> None:
  """Prints `result` as the final JSON line and writes it to workdir/NAME.json."""
  if jax.process_index() != 0:
    return
  line = json.dumps(result, sort_keys=True, default=float)
  if workdir:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, f"{name}.json"), "w") as f:
      f.write(line + "\n")
  sys.stdout.flush()
  print(line, flush=True)
