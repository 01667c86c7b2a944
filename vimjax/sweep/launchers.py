"""Launchers: turn trials into running `python -m vimjax.train` jobs.

local    subprocesses on this machine, one after another or `parallel` at a time
         (GPUs split with CUDA_VISIBLE_DEVICES); each trial's log is
         TRIAL/train.log and its exit status, wall and CPU seconds go to
         TRIAL/sweep_trial.json.
slurm    one SLURM array job through launch/slurm_gpu.sh --array_file: line i of
         WORKDIR/slurm/trials.args holds trial i's train arguments.
tpu_vm   launch/tpu_vm.sh: one slice per trial (create, setup, train), or
         `trials_per_slice` trials run one after another on one slice by this
         binary's local launcher there (`--module=vimjax.sweep`).

Scheduling belongs to SLURM, Cloud TPU or the local process pool, not here.
"""
import concurrent.futures
import json
import os
import subprocess
import sys
import time

from absl import logging

from vimjax.sweep import spec

LAUNCHERS = ("local", "tpu_vm", "slurm")
SCRIPTS = os.path.join(spec.REPO, "launch")


def device_envs(parallel: int) -> list[dict]:
  """Extra environment of each of `parallel` local slots (disjoint GPUs when on GPU)."""
  if parallel < 1:
    raise ValueError(f"--parallel={parallel} must be >= 1.")
  if parallel == 1:
    return [{}]
  import jax  # pylint: disable=g-import-not-at-top
  platform = jax.default_backend()
  if platform == "cpu":
    return [{} for _ in range(parallel)]  # CPU trials share the cores.
  if platform != "gpu":
    raise ValueError(f"--parallel={parallel} on {platform}: a TPU host's chips belong to one "
                     "process; use --parallel=1, or --launcher=tpu_vm with one slice per trial.")
  ids = [d.local_hardware_id for d in jax.local_devices()]
  if len(ids) % parallel:
    raise ValueError(f"--parallel={parallel} does not divide the {len(ids)} local GPUs.")
  k = len(ids) // parallel
  return [{"CUDA_VISIBLE_DEVICES": ",".join(map(str, ids[i * k:(i + 1) * k]))}
          for i in range(parallel)]


def local_command(args: list[str]) -> list[str]:
  return [sys.executable, "-m", "vimjax.train", *args]


def run_trial(name: str, workdir: str, argv: list[str], env: dict) -> dict:
  """Runs one trial to its end; returns (and records) its exit status and times."""
  os.makedirs(workdir, exist_ok=True)
  full_env = dict(os.environ, **env)
  full_env["PYTHONPATH"] = os.pathsep.join(
      p for p in (spec.REPO, os.environ.get("PYTHONPATH", "")) if p)
  start = time.perf_counter()
  with open(os.path.join(workdir, "train.log"), "a") as log:
    proc = subprocess.Popen(argv, cwd=spec.REPO, env=full_env, stdout=log,
                            stderr=subprocess.STDOUT)
    _, status, usage = os.wait4(proc.pid, 0)  # Exact CPU time of this child.
    proc.returncode = os.waitstatus_to_exitcode(status)
  record = {"returncode": proc.returncode, "wall_s": time.perf_counter() - start,
            "cpu_s": usage.ru_utime + usage.ru_stime, "command": spec.shell_line(argv),
            **({"env": env} if env else {})}
  path = os.path.join(workdir, "sweep_trial.json")
  attempts = []
  if os.path.exists(path):
    with open(path) as f:
      attempts = json.load(f).get("attempts", [])
  attempts.append(record)
  with open(path, "w") as f:
    json.dump({**record, "attempts": attempts}, f, indent=2)
  logging.info("trial %s: exit %d, %.0f s wall, %.0f s CPU.", name, proc.returncode,
               record["wall_s"], record["cpu_s"])
  return record


def run_local(jobs: list[tuple[str, str, list[str]]], parallel: int = 1) -> dict[str, dict]:
  """Runs (name, workdir, argv) jobs, `parallel` at a time; returns name -> record."""
  envs = device_envs(parallel)
  free = list(range(parallel))
  results = {}
  with concurrent.futures.ThreadPoolExecutor(parallel) as pool:
    pending = {}
    queue = list(jobs)
    while queue or pending:
      while queue and free:
        slot = free.pop()
        name, workdir, argv = queue.pop(0)
        logging.info("trial %s: %s", name, spec.shell_line(argv))
        pending[pool.submit(run_trial, name, workdir, argv, envs[slot])] = (name, slot)
      done, _ = concurrent.futures.wait(pending, return_when=concurrent.futures.FIRST_COMPLETED)
      for future in done:
        name, slot = pending.pop(future)
        results[name] = future.result()
        free.append(slot)
  return results


def slurm_commands(args_file: str, options: list[str], job_name: str) -> list[str]:
  """The command that submits the array job whose tasks' arguments are in `args_file`."""
  return [spec.shell_line(["bash", os.path.join(SCRIPTS, "slurm_gpu.sh"), *options,
                           f"--job_name={job_name}", f"--array_file={args_file}"])]


TPU_STEPS = ("create", "setup", "train")


def tpu_vm_commands(trial_args: list[tuple[int, list[str]]], options: list[str],
                    slice_prefix: str, trials_per_slice: int,
                    sweep_args: list[str], steps: tuple = TPU_STEPS) -> list[str]:
  """create / setup / train lines per slice (`steps` of them: a re-run whose
  slices exist passes ("train",), or ("setup", "train") after a code change).

  trial_args: (trial index, its train arguments) of the trials to start.
  sweep_args: this binary's --sweep/--workdir, for packed slices, which run
    `python -m vimjax.sweep --launcher=local --trials=i,j,..` on every worker.
  """
  if trials_per_slice < 1:
    raise ValueError(f"--trials_per_slice={trials_per_slice} must be >= 1.")
  if not steps or any(step not in TPU_STEPS for step in steps):
    raise ValueError(f"--tpu_steps={','.join(steps)}; valid: a subset of {','.join(TPU_STEPS)}.")
  script = ["bash", os.path.join(SCRIPTS, "tpu_vm.sh"), *options]
  lines = []
  for g in range(0, len(trial_args), trials_per_slice):
    group = trial_args[g:g + trials_per_slice]
    if trials_per_slice == 1:
      index, args = group[0]
      name, train = f"{slice_prefix}-{index:03d}", ["train", *args]
    else:
      name = f"{slice_prefix}-g{g // trials_per_slice:03d}"
      indices = ",".join(str(i) for i, _ in group)
      train = ["--module=vimjax.sweep", "train", *sweep_args, "--launcher=local",
               f"--trials={indices}"]
    named = [*script, f"--name={name}"]
    lines += [spec.shell_line([*named, step]) for step in ("create", "setup") if step in steps]
    if "train" in steps:
      lines.append(spec.shell_line([*named, "--no_follow", *train]))
  return lines
