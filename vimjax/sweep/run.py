"""Running a sweep: trials -> skip the finished -> prepare stage -> launcher."""
import os
import subprocess

from absl import logging

from vimjax.sweep import collect
from vimjax.sweep import launchers
from vimjax.sweep import prepare
from vimjax.sweep import spec


def launch(sweep_path: str, workdir: str, *, launcher: str = "local", dry_run: bool = False,
           parallel: int = 1, only: tuple = (), launcher_args: tuple = (),
           trials_per_slice: int = 1, name: str = "vimjax-sweep",
           tpu_steps: tuple = launchers.TPU_STEPS, distributed: bool = False) -> dict:
  """Starts (or, with dry_run, prints) the sweep's unfinished trials; returns a summary.

  Args:
    sweep_path: the sweep file, FILE.py[:arg].
    workdir: the sweep directory (absolute, or gs://).
    launcher: one of launchers.LAUNCHERS.
    dry_run: print the commands (and the prepare stage) and run nothing.
    parallel: local trials at once.
    only: trial indices (strings) to consider; empty = all.
    launcher_args: options for launch/slurm_gpu.sh or launch/tpu_vm.sh.
    trials_per_slice: tpu_vm: trials run one after another per slice.
    name: tpu_vm slice-name prefix / SLURM job name.
    tpu_steps: tpu_vm.sh steps per slice (create, setup, train).
    distributed: forward --distributed to the trials (packed TPU slices).
  """
  sweep = spec.load_sweep(sweep_path)
  trials = spec.trials(sweep, workdir)
  if only:
    valid = {str(t.index) for t in trials}
    bad = [i for i in only if i not in valid]
    if bad:
      raise ValueError(f"--trials={','.join(bad)}: no such trial; valid: 0..{len(trials) - 1}.")
    trials = [t for t in trials if str(t.index) in only]
  remote = launcher != "local"
  if remote and sweep.prepare:
    raise ValueError(f"--launcher={launcher}: the sweep's prepare={sweep.prepare!r} "
                     "stage runs only with --launcher=local; point `overrides` at tokens "
                     "written by `python -m vimjax.encode` instead.")
  statuses = {t.name: collect.trial_status(t.workdir) for t in trials}
  todo = [t for t in trials if statuses[t.name][0] != "finished"]
  skipped = [t.name for t in trials if t not in todo]
  for trial_name in skipped:
    logging.info("trial %s: finished before, skipped.", trial_name)
  if not dry_run:
    spec.write_manifest(sweep, workdir, sweep_path, spec.trials(sweep, workdir))
  extra, prepared = {}, {}
  if sweep.prepare and todo:
    if dry_run:
      print(f"# prepare stage {sweep.prepare} ({dict(sweep.prepare_args)}) in {workdir}/prepare")
      extra = prepare.planned_overrides(sweep.prepare, workdir)
    else:
      prepared = prepare.run(sweep.prepare, workdir, sweep.prepare_args.to_dict())
      extra = prepared["overrides"]
  forward = ["--distributed"] if distributed else []
  args = {t.name: spec.train_args(sweep, t, extra) + forward for t in todo}
  summary = {"num_trials": len(trials), "skipped_finished": skipped,
             "started": [t.name for t in todo], "launcher": launcher}

  if launcher == "local":
    jobs = [(t.name, t.workdir, launchers.local_command(args[t.name])) for t in todo]
    if dry_run:
      for _, _, argv in jobs:
        print(spec.shell_line(argv))
      return {**summary, "dry_run": True}
    records = launchers.run_local(jobs, parallel)
    summary["failed"] = sorted(n for n, r in records.items() if r["returncode"])
    summary["trials_cpu_s"] = sum(r["cpu_s"] for r in records.values())
    summary["trials_wall_s"] = sum(r["wall_s"] for r in records.values())
    if prepared.get("ran"):
      summary["prepare_cpu_s"], summary["prepare_wall_s"] = prepared["cpu_s"], prepared["wall_s"]
    return summary

  if launcher == "slurm":
    args_file = os.path.join(workdir, "slurm", "trials.args")
    lines = [spec.shell_line(args[t.name]) for t in todo]
    commands = launchers.slurm_commands(args_file, list(launcher_args), name)
    if dry_run:
      print(f"# {args_file}:")
      print("\n".join(lines))
    elif lines:
      os.makedirs(os.path.dirname(args_file), exist_ok=True)
      with open(args_file, "w") as f:
        f.write("\n".join(lines) + "\n")
  else:
    sweep_args = [f"--sweep={sweep_path}", f"--workdir={workdir}"]
    commands = launchers.tpu_vm_commands(
        [(t.index, args[t.name]) for t in todo], list(launcher_args), name,
        trials_per_slice, sweep_args, tuple(tpu_steps))
    if not workdir.startswith("gs://"):
      logging.warning("--workdir=%s is not gs://: the slices cannot share it.", workdir)
  if not todo:
    commands = []
  for line in commands:
    print(line)
    if not dry_run:
      subprocess.run(["bash", "-c", line], check=True)
  return {**summary, "commands": len(commands), "dry_run": dry_run}
