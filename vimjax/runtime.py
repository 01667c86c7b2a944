"""Start-up and result plumbing shared by the thin absl binaries."""
import argparse
import atexit
import json
import os
import shutil
import sys
import tempfile

from absl import flags
from absl import logging
from etils import epath
import jax
from ml_collections import config_flags

from vimjax import configs

COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 for multi-process runs "
    "(default: $JAX_COORDINATOR_ADDRESS).")
NUM_PROCESSES = flags.DEFINE_integer(
    "num_processes", None, "Processes in a multi-process run (default: $JAX_NUM_PROCESSES).")
PROCESS_ID = flags.DEFINE_integer(
    "process_id", None, "This process's index (default: $JAX_PROCESS_ID).")
DISTRIBUTED = flags.DEFINE_bool(
    "distributed", False, "Call jax.distributed.initialize() with auto-detection "
    "(Cloud TPU, SLURM, Open MPI) even without --coordinator_address.")


def _env_int(name: str) -> int | None:
  value = os.environ.get(name)
  if value is None or value == "":
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"${name}={value!r} must be an integer.") from None


def distributed_args() -> dict | None:
  """jax.distributed.initialize kwargs from flags, then environment; None = single process.

  A run is multi-process when --coordinator_address (or $JAX_COORDINATOR_ADDRESS)
  is set, or --distributed asks jax to auto-detect the cluster (Cloud TPU, SLURM,
  Open MPI); whatever stays None is auto-detected by jax.
  """
  coordinator = COORDINATOR.value or os.environ.get("JAX_COORDINATOR_ADDRESS") or None
  if not (coordinator or DISTRIBUTED.value):
    return None
  num_processes = NUM_PROCESSES.value
  if num_processes is None:
    num_processes = _env_int("JAX_NUM_PROCESSES")
  process_id = PROCESS_ID.value
  if process_id is None:
    process_id = _env_int("JAX_PROCESS_ID")
  return dict(coordinator_address=coordinator, num_processes=num_processes,
              process_id=process_id)


def initialize() -> None:
  """jax.distributed start-up when asked, then logs the process and device layout."""
  args = distributed_args()
  if args is not None:
    # Cross-process collectives on CPU (the loopback stand-in pod) need gloo
    # unless the environment picks MPI; TPU and GPU backends ignore the setting.
    if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    logging.info("jax.distributed.initialize(%s)",
                 ", ".join(f"{k}={v}" for k, v in args.items() if v is not None)
                 or "auto-detect")
    jax.distributed.initialize(**args)
  logging.info("Process %d/%d, %d local / %d global devices (%s).", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count(),
               jax.devices()[0].device_kind)


def emit_result(result: dict, workdir: str | None, name: str) -> None:
  """Prints `result` as the final JSON line and writes it to workdir/NAME.json."""
  if jax.process_index() != 0:
    return
  line = json.dumps(result, sort_keys=True, default=float)
  if workdir:
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)  # Local or gs://.
    (epath.Path(workdir) / f"{name}.json").write_text(line + "\n")
  sys.stdout.flush()
  print(line, flush=True)


def define_config_file(default: str | None = None,
                       help_string: str = "Experiment config file[:variant].") -> None:
  """Defines --config as a config file (`configs/...` found in the package too).

  `--config=configs/...` arguments in sys.argv and the default are resolved with
  `vimjax.configs.find` before absl parses them.
  """
  for i, arg in enumerate(sys.argv):
    if arg.startswith("--config="):
      sys.argv[i] = "--config=" + configs.find(arg[len("--config="):])
  config_flags.DEFINE_config_file(
      "config", None if default is None else configs.find(default), help_string)


def scratch_dir(prefix: str) -> str:
  """A new temporary directory, removed with its files when the process exits
  (the stand-in vocabulary / LPIPS files of benchmark and aot_compile)."""
  directory = tempfile.mkdtemp(prefix=prefix)
  atexit.register(shutil.rmtree, directory, ignore_errors=True)
  return directory


def define_config_from_workdir(workdir_flag: str, load) -> None:
  """Defines --config as the config a workdir saved, read before absl parses flags.

  `--config.*` overrides are typed by the saved config, so it must exist before
  the flags are parsed. `load(workdir)` returns it; its ValueError (no workdir,
  no config.json, wrong task) is a one-line error with exit code 1.
  """
  parser = argparse.ArgumentParser(add_help=False)
  parser.add_argument(f"--{workdir_flag}", default=None)
  known, _ = parser.parse_known_args(sys.argv[1:])
  try:
    saved = load(getattr(known, workdir_flag))
  except ValueError as e:
    raise SystemExit(f"error: {e}") from None
  config_flags.DEFINE_config_dict("config", saved)
