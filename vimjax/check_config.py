"""python -m vimjax.check_config --slice_devices=16 -- --config=configs/vitvqgan.py:tiny --workdir=DIR

Validates training command lines on this machine, before a pod is paid for:
the launch scripts (launch/*.sh) run it before they create or submit
anything. Each command line (the arguments after `--`, or one line of
`--args_file`, as `launch/slurm_gpu.sh --array_file` takes) is parsed as
`vimjax.train` parses it (`--config=FILE[:variant]`, `--config.KEY=VALUE`
overrides, `--workdir`) and checked by `config_lib.validate` for the slice's
device and process counts: value ranges, mesh divisibility, global batch,
placeholder sources, missing weight files (local paths; `gs://` ones are
checked on the pod). Data sources are opened by the run itself (they may live
only on the pod). Prints one JSON line; a bad config is `error: ...`, exit 1.
"""
import json
import math
import shlex

from absl import app
from absl import flags
from ml_collections import config_flags

from vimjax import config_lib
from vimjax import errors
from vimjax import parallel

_NUM_DEVICES = flags.DEFINE_integer(
    "slice_devices", 0, "Devices of the target slice (all processes); 0 = unknown: the mesh's "
    "fixed axes only.")
_NUM_PROCESSES = flags.DEFINE_integer("slice_processes", 1, "Processes of the target job.")
_ARGS_FILE = flags.DEFINE_string(
    "args_file", None, "One training command line (shell words) per line, e.g. a sweep's "
    "slurm/trials.args.")


def parse_train_args(args: list[str]):
  """The config that `python -m vimjax.train ARGS` would build (one-line errors)."""
  argv = ["vimjax.train", *(a for a in args if a.startswith(("--config", "--workdir")))]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "Experiment config.", flag_values=flag_values,
                                  sys_argv=argv)  # Overrides come from argv, not sys.argv.
  flags.DEFINE_string("workdir", None, "Workdir.", flag_values=flag_values)
  errors.parse_flags(argv, flag_values)
  missing = [f"--{name}" for name in ("config", "workdir") if flag_values[name].value is None]
  if missing:
    raise ValueError(f"{shlex.join(args)!r} has no {' or '.join(missing)}.")
  return flag_values["config"].value


def check(args: list[str], num_devices: int, num_processes: int) -> str:
  """Validates one command line for the slice; returns the config's task."""
  config = parse_train_args(args)
  if num_devices <= 0:  # Unknown slice: the smallest one the mesh allows.
    num_devices = max(1, math.prod(int(config.mesh[a]) for a in parallel.MESH_AXES
                                if int(config.mesh[a]) > 0))
  config_lib.validate(config, num_devices, num_processes)
  return config.task


def main(argv):
  commands = [argv[1:]] if len(argv) > 1 else []
  if _ARGS_FILE.value:
    with open(_ARGS_FILE.value) as f:
      commands += [shlex.split(line) for line in f if line.strip()]
  if not commands:
    raise app.UsageError("Pass the training arguments after `--`, or --args_file=FILE.")
  tasks = []
  for number, args in enumerate(commands, 1):
    try:
      tasks.append(check(args, _NUM_DEVICES.value, _NUM_PROCESSES.value))
    except ValueError as e:
      where = f"command {number} of {len(commands)}: " if len(commands) > 1 else ""
      raise ValueError(f"{where}{errors.one_line(e)}") from e
  # Printed, not runtime.emit_result: that would start a jax backend (grab a GPU) here.
  print(json.dumps({"valid": True, "commands": len(commands), "tasks": sorted(set(tasks)),
                    "slice_devices": _NUM_DEVICES.value,
                    "slice_processes": _NUM_PROCESSES.value}, sort_keys=True), flush=True)


if __name__ == "__main__":
  errors.run(main)
