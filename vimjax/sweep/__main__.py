"""python -m vimjax.sweep --sweep=configs/sweeps/parti_shapes.py --workdir=/tmp/sweep

Runs a sweep file's trials (each a normal `python -m vimjax.train` workdir
under WORKDIR/trials/), skipping finished ones and resuming unfinished ones,
then collects and fits (local launcher). `--launcher=slurm|tpu_vm` submits
through launch/*.sh; `--dry_run` prints the commands and runs nothing;
`--workdir=DIR --collect` (no --sweep) gathers results.csv, fit.json and plots.
Final line: {"num_runs": ..., "alpha_N": ..., ...} (collect) or the launch summary.
"""
import os
import sys

from absl import app
from absl import flags

from vimjax import errors
from vimjax import runtime
from vimjax.sweep import launchers
from vimjax.sweep import report
from vimjax.sweep import run

_SWEEP = flags.DEFINE_string("sweep", None, "Sweep file, configs/sweeps/FILE.py.")
_WORKDIR = flags.DEFINE_string("workdir", None, "Sweep directory (trials/, results.csv, fit.json).")
_LAUNCHER = flags.DEFINE_enum("launcher", "local", launchers.LAUNCHERS, "Where trials run.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Print the commands, run nothing.")
_COLLECT = flags.DEFINE_bool("collect", False, "Only collect results and fit (no --sweep).")
_PARALLEL = flags.DEFINE_integer("parallel", 1, "local: trials at once (GPUs split among them).")
_TRIALS = flags.DEFINE_list("trials", [], "Only these trial indices (default: all).")
_LAUNCHER_ARGS = flags.DEFINE_list(
    "launcher_args", [], "Options for the launch script, e.g. --zone=us-central2-b,"
    "--accelerator_type=v4-32 (tpu_vm) or --nodes=2,--partition=a100 (slurm).")
_TRIALS_PER_SLICE = flags.DEFINE_integer("trials_per_slice", 1, "tpu_vm: trials run one after "
                                         "another on one slice (1 = a slice per trial).")
_TPU_STEPS = flags.DEFINE_list("tpu_steps", list(launchers.TPU_STEPS), "tpu_vm: launch/tpu_vm.sh "
                               "steps per slice; a re-run whose slices exist: --tpu_steps=train.")
_NAME = flags.DEFINE_string("name", "vimjax-sweep", "tpu_vm slice-name prefix / SLURM job name.")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", 1000, "Bootstrap resamples per fit.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not _WORKDIR.value:
    raise app.UsageError("--workdir is required.")
  workdir = _WORKDIR.value if "://" in _WORKDIR.value else os.path.abspath(_WORKDIR.value)
  if _COLLECT.value:
    if _SWEEP.value:
      raise app.UsageError("--collect reads WORKDIR/sweep.json; drop --sweep.")
    result = report.collect_and_fit(workdir, _BOOTSTRAP.value)
  else:
    if not _SWEEP.value:
      raise app.UsageError("--sweep=configs/sweeps/FILE.py is required (or --collect).")
    result = run.launch(
        _SWEEP.value, workdir, launcher=_LAUNCHER.value, dry_run=_DRY_RUN.value,
        parallel=_PARALLEL.value, only=tuple(_TRIALS.value),
        launcher_args=tuple(_LAUNCHER_ARGS.value), trials_per_slice=_TRIALS_PER_SLICE.value,
        name=_NAME.value, tpu_steps=tuple(_TPU_STEPS.value),
        distributed=runtime.DISTRIBUTED.value)
    local_done = _LAUNCHER.value == "local" and not _DRY_RUN.value
    if local_done and not runtime.DISTRIBUTED.value:  # Packed slices: collect once, after.
      result = {**report.collect_and_fit(workdir, _BOOTSTRAP.value), "launch": result}
  sys.stdout.flush()
  runtime.emit_result(result, None, "sweep_result")


if __name__ == "__main__":
  errors.run(main)
