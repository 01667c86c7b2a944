"""python -m vimjax.sweep --sweep=configs/sweeps/parti_shapes.py --workdir=/tmp/sweep

Runs a sweep file's trials (each a normal `python -m vimjax.train` workdir
under WORKDIR/trials/), skipping finished ones and resuming unfinished ones,
then collects and fits (local launcher). `--launcher=slurm|tpu_vm` submits
through launch/*.sh; `--dry_run` prints the commands and runs nothing;
`--workdir=DIR --collect` (no --sweep) gathers results.csv, fit.json and plots.
Final line: {"num_runs": ..., "alpha_N": ..., ...} (collect) or the launch summary.
"""
import json
import os
import subprocess
import sys

from absl import app
from absl import flags
from absl import logging
from etils import epath

from vimjax import runtime
from vimjax.sweep import launchers
from vimjax.sweep import prepare
from vimjax.sweep import report
from vimjax.sweep import spec

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
_NAME = flags.DEFINE_string("name", "vimjax-sweep", "tpu_vm slice-name prefix / SLURM job name.")
_BOOTSTRAP = flags.DEFINE_integer("bootstrap", 1000, "Bootstrap resamples per fit.")


def launch(sweep_path: str, workdir: str) -> dict:
  """Starts (or, with --dry_run, prints) the unfinished trials; returns a summary."""
  from vimjax.sweep import collect  # pylint: disable=g-import-not-at-top
  sweep = spec.load_sweep(sweep_path)
  trials = spec.trials(sweep, workdir)
  if _TRIALS.value:
    valid = {str(t.index) for t in trials}
    bad = [i for i in _TRIALS.value if i not in valid]
    if bad:
      raise ValueError(f"--trials={','.join(bad)}: no such trial; valid: 0..{len(trials) - 1}.")
    trials = [t for t in trials if str(t.index) in _TRIALS.value]
  remote = _LAUNCHER.value != "local"
  if remote and sweep.prepare:
    raise ValueError(f"--launcher={_LAUNCHER.value}: the sweep's prepare={sweep.prepare!r} "
                     "stage runs only with --launcher=local; point `overrides` at tokens "
                     "written by `python -m vimjax.encode` instead.")
  statuses = {t.name: collect.trial_status(t.workdir) for t in trials}
  todo = [t for t in trials if statuses[t.name][0] != "finished"]
  skipped = [t.name for t in trials if t not in todo]
  for name in skipped:
    logging.info("trial %s: finished before, skipped.", name)
  if not _DRY_RUN.value:
    spec.write_manifest(sweep, workdir, sweep_path, spec.trials(sweep, workdir))
  extra, prepared = {}, {}
  if sweep.prepare and todo:
    if _DRY_RUN.value:
      print(f"# prepare stage {sweep.prepare} ({dict(sweep.prepare_args)}) in {workdir}/prepare")
      extra = prepare.planned_overrides(sweep.prepare, workdir)
    else:
      prepare_args = sweep.prepare_args.to_dict()
      extra = prepare.run(sweep.prepare, workdir, prepare_args)
      prepared = json.loads(epath.Path(prepare.done_path(workdir)).read_text())
  forward = ["--distributed"] if runtime.DISTRIBUTED.value else []
  args = {t.name: spec.train_args(sweep, t, extra) + forward for t in todo}
  summary = {"num_trials": len(trials), "skipped_finished": skipped,
             "started": [t.name for t in todo], "launcher": _LAUNCHER.value}

  if _LAUNCHER.value == "local":
    jobs = [(t.name, t.workdir, launchers.local_command(args[t.name])) for t in todo]
    if _DRY_RUN.value:
      for _, _, argv in jobs:
        print(spec.shell_line(argv))
      return {**summary, "dry_run": True}
    records = launchers.run_local(jobs, _PARALLEL.value)
    summary["failed"] = sorted(n for n, r in records.items() if r["returncode"])
    summary["trials_cpu_s"] = sum(r["cpu_s"] for r in records.values())
    summary["trials_wall_s"] = sum(r["wall_s"] for r in records.values())
    if prepared:
      summary["prepare_cpu_s"], summary["prepare_wall_s"] = prepared["cpu_s"], prepared["wall_s"]
    return summary

  if _LAUNCHER.value == "slurm":
    args_file = os.path.join(workdir, "slurm", "trials.args")
    lines = [spec.shell_line(args[t.name]) for t in todo]
    commands = launchers.slurm_commands(args_file, _LAUNCHER_ARGS.value, _NAME.value)
    if _DRY_RUN.value:
      print(f"# {args_file}:")
      print("\n".join(lines))
    elif lines:
      os.makedirs(os.path.dirname(args_file), exist_ok=True)
      with open(args_file, "w") as f:
        f.write("\n".join(lines) + "\n")
  else:
    sweep_args = [f"--sweep={sweep_path}", f"--workdir={workdir}"]
    commands = launchers.tpu_vm_commands(
        [(t.index, args[t.name]) for t in todo], _LAUNCHER_ARGS.value, _NAME.value,
        _TRIALS_PER_SLICE.value, sweep_args)
    if not workdir.startswith("gs://"):
      logging.warning("--workdir=%s is not gs://: the slices cannot share it.", workdir)
  if not todo:
    commands = []
  for line in commands:
    print(line)
    if not _DRY_RUN.value:
      subprocess.run(["bash", "-c", line], check=True)
  return {**summary, "commands": len(commands), "dry_run": _DRY_RUN.value}


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
    result = launch(_SWEEP.value, workdir)
    local_done = _LAUNCHER.value == "local" and not _DRY_RUN.value
    if local_done and not runtime.DISTRIBUTED.value:  # Packed slices: collect once, after.
      result = {**report.collect_and_fit(workdir, _BOOTSTRAP.value), "launch": result}
  sys.stdout.flush()
  runtime.emit_result(result, None, "sweep_result")


if __name__ == "__main__":
  app.run(main)
