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

FLAGS = flags.FLAGS


def _define_flags():
  """Flags of the binary, defined when it runs."""
  flags.DEFINE_string("sweep", None, "Sweep file, configs/sweeps/FILE.py.")
  flags.DEFINE_string("workdir", None, "Sweep directory (trials/, results.csv, fit.json).")
  flags.DEFINE_enum("launcher", "local", launchers.LAUNCHERS, "Where trials run.")
  flags.DEFINE_bool("dry_run", False, "Print the commands, run nothing.")
  flags.DEFINE_bool("collect", False, "Only collect results and fit (no --sweep).")
  flags.DEFINE_integer("parallel", 1, "local: trials at once (GPUs split among them).")
  flags.DEFINE_list("trials", [], "Only these trial indices (default: all).")
  flags.DEFINE_list(
      "launcher_args", [], "Options for the launch script, e.g. --zone=us-central2-b,"
      "--accelerator_type=v4-32 (tpu_vm) or --nodes=2,--partition=a100 (slurm).")
  flags.DEFINE_integer("trials_per_slice", 1, "tpu_vm: trials run one after "
                       "another on one slice (1 = a slice per trial).")
  flags.DEFINE_list("tpu_steps", list(launchers.TPU_STEPS), "tpu_vm: launch/tpu_vm.sh "
                    "steps per slice; a re-run whose slices exist: --tpu_steps=train.")
  flags.DEFINE_string("name", "vimjax-sweep", "tpu_vm slice-name prefix / SLURM job name.")
  flags.DEFINE_integer("bootstrap", 1000, "Bootstrap resamples per fit.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not FLAGS.workdir:
    raise app.UsageError("--workdir is required.")
  workdir = FLAGS.workdir if "://" in FLAGS.workdir else os.path.abspath(FLAGS.workdir)
  if FLAGS.collect:
    if FLAGS.sweep:
      raise app.UsageError("--collect reads WORKDIR/sweep.json; drop --sweep.")
    result = report.collect_and_fit(workdir, FLAGS.bootstrap)
  else:
    if not FLAGS.sweep:
      raise app.UsageError("--sweep=configs/sweeps/FILE.py is required (or --collect).")
    result = run.launch(
        FLAGS.sweep, workdir, launcher=FLAGS.launcher, dry_run=FLAGS.dry_run,
        parallel=FLAGS.parallel, only=tuple(FLAGS.trials),
        launcher_args=tuple(FLAGS.launcher_args), trials_per_slice=FLAGS.trials_per_slice,
        name=FLAGS.name, tpu_steps=tuple(FLAGS.tpu_steps),
        distributed=runtime.DISTRIBUTED.value)
    local_done = FLAGS.launcher == "local" and not FLAGS.dry_run
    if local_done and not runtime.DISTRIBUTED.value:  # Packed slices: collect once, after.
      result = {**report.collect_and_fit(workdir, FLAGS.bootstrap), "launch": result}
  sys.stdout.flush()
  runtime.emit_result(result, None, "sweep_result")


if __name__ == "__main__":
  _define_flags()
  errors.run(main)
