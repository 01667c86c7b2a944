"""launch/ scripts: their --dry_run commands, usage errors on bad arguments,
options anywhere on the line, and the local config check before anything starts."""
import os
import re
import shlex
import stat
import subprocess

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
TRAIN = ["--config=configs/vim.py:base", "--workdir=gs://bucket/vim b", "--config.seed=3"]
# Valid on 8 and 16 devices (the tiny tokenizer: global batch 32, DP mesh).
VALID = ["--config=configs/vitvqgan.py:tiny", "--workdir=gs://bucket/vq", "--config.seed=3"]
# Invalid on any slice: the base tokenizer's perceptual loss has no weights file.
INVALID = ["--config=configs/vitvqgan.py:base", "--workdir=gs://bucket/vq"]


def _run(script, *args, env=None):
  return subprocess.run(["bash", os.path.join(LAUNCH, script), *args], capture_output=True,
                        text=True, timeout=120,
                        env=dict(os.environ, XLA_FLAGS="--xla_foo", **(env or {})))


def _dry_run(script, *args):
  proc = _run(script, "--dry_run", "--novalidate", *args)
  assert proc.returncode == 0, proc.stderr
  return [line for line in proc.stdout.splitlines() if line]


def _assert_usage_error(script, *args, says):
  proc = _run(script, *args)
  assert proc.returncode == 2 and says in proc.stderr and "Options" in proc.stderr, proc.stderr


def _train_args(words):
  """The arguments after `-m vimjax.train`."""
  return words[words.index("vimjax.train") + 1:]


def test_local_multiprocess_dry_run():
  lines = _dry_run("local_multiprocess.sh", "--devices_per_process=4", "--port=4321", "3", *TRAIN)
  assert lines[-1] == "wait"
  # Process 0 prints to the terminal, the others to LOG_DIR/process_I.log.
  commands = [shlex.split(line.split(" > ")[0].rstrip(" &")) for line in lines[:-1]]
  assert len(commands) == 3
  for i, words in enumerate(commands):
    assert words[0] == "env" and "JAX_PLATFORMS=cpu" in words
    assert "JAX_CPU_COLLECTIVES_IMPLEMENTATION=gloo" in words
    # The script's device count replaces an inherited one; other XLA flags stay.
    assert "XLA_FLAGS=--xla_foo --xla_force_host_platform_device_count=4" in words
    assert _train_args(words) == ["--coordinator_address=localhost:4321", "--num_processes=3",
                                  f"--process_id={i}", *TRAIN]
  assert "process_1.log" in lines[1] and "process_2.log" in lines[2]


@pytest.mark.parametrize("args,says", [
    ((), "Missing N"), (("0",), "positive integer"), (("two",), "positive integer"),
    (("--bogus", "2"), "Unknown argument")])
def test_local_multiprocess_usage_errors(args, says):
  _assert_usage_error("local_multiprocess.sh", *args, says=says)


TPU = ["--project=my-proj", "--zone=us-central2-b", "--accelerator_type=v4-32", "--name=pod"]


def test_tpu_vm_dry_runs():
  (create,) = _dry_run("tpu_vm.sh", *TPU, "--spot", "create")
  assert shlex.split(create) == [
      "gcloud", "compute", "tpus", "tpu-vm", "create", "pod", "--zone=us-central2-b",
      "--project=my-proj", "--accelerator-type=v4-32", "--version=tpu-ubuntu2204-base", "--spot"]

  tar, scp, install = (shlex.split(line) for line in _dry_run("tpu_vm.sh", *TPU, "setup"))
  assert tar[:2] == ["tar", "czf"] and "--exclude=.git" in tar
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"] and scp[5] == tar[2]
  assert "--worker=all" in scp and "--worker=all" in install
  assert "pip install -q -e \"$HOME/vimjax[tpu]\"" in install[-1]

  start, stream = (shlex.split(line) for line in _dry_run("tpu_vm.sh", *TPU, "train", *TRAIN))
  assert start[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod"]
  assert "--worker=all" in start
  remote = shlex.split(start[-1].removeprefix("--command="))
  assert _train_args(remote)[:4] == ["--distributed", *TRAIN]  # Same command on every worker.
  assert "--worker=0" in stream and "tail" in stream[-1]

  (logs,) = _dry_run("tpu_vm.sh", *TPU, "--worker=3", "logs")
  assert "--worker=3" in shlex.split(logs)
  (stop,) = _dry_run("tpu_vm.sh", *TPU, "stop")
  assert "--worker=all" in stop and "kill -TERM" in stop
  (delete,) = _dry_run("tpu_vm.sh", *TPU, "delete")
  assert shlex.split(delete)[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "pod"]


@pytest.mark.parametrize("args,says", [
    (("create",), "--zone is required"), (("--zone=z",), "Missing the step"),
    (("--zone=z", "launch"), "Unknown step"), (("--zone=z", "train", "--workdir=gs://b"),
                                               "--config"),
    (("--zone=z", "--worker=x", "logs"), "worker index")])
def test_tpu_vm_usage_errors(args, says):
  _assert_usage_error("tpu_vm.sh", *args, says=says)


def test_slurm_dry_run_one_process_per_gpu(tmp_path):
  lines = _dry_run("slurm_gpu.sh", "--nodes=2", "--partition=a100", "--python=python3",
                   f"--log_dir={tmp_path}", *TRAIN)
  script = "\n".join(lines[1:lines.index("# submit:")])
  for directive in ("--nodes=2", "--ntasks-per-node=8", "--gpus-per-node=8", "--partition=a100",
                    "--requeue", "--signal=TERM@300", f"--output={tmp_path}/%x-%j.out"):
    assert f"#SBATCH {directive}\n" in script + "\n", directive
  assert "ids 0..15" in script and "JAX_LOCAL_DEVICE_IDS" not in script
  (srun,) = [shlex.split(line) for line in lines if line.startswith("srun")]
  assert srun[:2] == ["srun", "--kill-on-bad-exit=1"]
  assert _train_args(srun) == ["--distributed", *TRAIN]
  assert lines[-1] == f"sbatch {tmp_path}/vimjax.sbatch"
  path = tmp_path / "job.sbatch"
  path.write_text(script)
  assert subprocess.run(["bash", "-n", str(path)]).returncode == 0


def test_slurm_dry_run_one_process_per_node():
  lines = _dry_run("slurm_gpu.sh", "--nodes=3", "--gpus_per_node=4", "--per=node", *TRAIN)
  assert "#SBATCH --ntasks-per-node=1" in lines and "#SBATCH --gpus-per-node=4" in lines
  assert any(re.match(r"export JAX_LOCAL_DEVICE_IDS=0,1,2,3\b", line) for line in lines)
  assert any("ids 0..2" in line for line in lines)


@pytest.mark.parametrize("args,says", [
    ((), "Missing --config"), (("--config=c",), "Missing --workdir"),
    (("--per=host", *TRAIN), "--per=host"), (("--nodes=x", *TRAIN), "positive integer"),
    (("--bogus", *TRAIN), "Unknown argument"),
    (("--array_file=/nonexistent/trials.args",), "missing or empty"),
    (("--array_file=/dev/null",), "missing or empty"),
    (("--array_file=" + os.path.abspath(__file__), *TRAIN), "takes the train arguments from FILE"),
    (("--array_parallel=0", *TRAIN), "positive integer")])
def test_slurm_usage_errors(args, says):
  _assert_usage_error("slurm_gpu.sh", *args, says=says)


# Options anywhere, the local config check, the interpreter: with fake sbatch,
# gcloud and python on PATH that record their calls.

@pytest.fixture
def fakes(tmp_path):
  """PATH with recording sbatch / gcloud; a python that records, then runs the real one."""
  bin_dir, calls = tmp_path / "bin", tmp_path / "calls.txt"
  bin_dir.mkdir()
  real_python = os.path.join(REPO, ".venv", "bin", "python")
  for name in ("sbatch", "gcloud", "python"):
    body = f'echo "{name} $*" >> {calls}\n'
    if name == "python":  # Only the config check runs for real.
      body += f'[[ "$*" != *vimjax.check_config* ]] || exec {real_python} "$@"\n'
    (bin_dir / name).write_text("#!/bin/bash\n" + body)
    (bin_dir / name).chmod(stat.S_IRWXU)
  env = {"PATH": f"{bin_dir}:{os.environ['PATH']}", "PYTHON": str(bin_dir / "python")}

  def run(script, *args):
    proc = _run(script, *args, env=env)
    lines = calls.read_text().splitlines() if calls.exists() else []
    calls.unlink(missing_ok=True)
    return proc, lines
  run.python = str(bin_dir / "python")
  return run


def test_dry_run_after_the_train_flags_submits_nothing(fakes, tmp_path):
  """The old scripts took a trailing --dry_run for a train flag and ran for real."""
  log_dir = tmp_path / "slurm_logs"
  proc, calls = fakes("slurm_gpu.sh", "--nodes=2", f"--log_dir={log_dir}",
                      f"--python={fakes.python}", *VALID, "--dry_run")
  assert proc.returncode == 0, proc.stderr
  assert not any(c.startswith("sbatch") for c in calls) and not log_dir.exists()
  srun = [shlex.split(line) for line in proc.stdout.splitlines() if line.startswith("srun")]
  assert _train_args(srun[0]) == ["--distributed", *VALID]  # --dry_run is not a train flag.

  proc, calls = fakes("tpu_vm.sh", "train", *VALID, "--zone=z", "--dry_run")
  assert proc.returncode == 0, proc.stderr
  assert not any(c.startswith("gcloud") for c in calls)
  assert "--zone=z" in proc.stdout and "--dry_run" not in proc.stdout

  proc, calls = fakes("local_multiprocess.sh", "2", *VALID, "--devices_per_process=4",
                      "--dry_run")
  assert proc.returncode == 0, proc.stderr
  assert [c for c in calls if "vimjax.train" in c] == []
  assert "device_count=4" in proc.stdout and "--dry_run" not in proc.stdout


@pytest.mark.parametrize("script,args", [
    ("slurm_gpu.sh", (*TRAIN, "--nodez=2")), ("tpu_vm.sh", ("--zone=z", "train", *TRAIN, "--spott")),
    ("local_multiprocess.sh", ("2", *TRAIN, "--devices=4"))])
def test_a_misplaced_or_misspelt_option_is_refused(fakes, script, args):
  proc, calls = fakes(script, *args)
  assert proc.returncode == 2 and "Unknown argument" in proc.stderr, proc.stderr
  assert calls == []


@pytest.mark.slow  # Starts Pythons that import jax (the config checks).
def test_bad_config_fails_here_before_anything_is_created(fakes, tmp_path):
  log_dir = tmp_path / "logs"
  proc, calls = fakes("slurm_gpu.sh", f"--log_dir={log_dir}", f"--python={fakes.python}",
                      *INVALID)
  assert proc.returncode == 1 and "error: loss.perceptual_weight > 0 needs" in proc.stderr
  assert not log_dir.exists() and [c.split()[0] for c in calls] == ["python"]
  assert "vimjax.check_config --slice_devices=8 --slice_processes=8 -- " + shlex.join(
      INVALID) in calls[0]

  # The slice's device count matters: v4 names count TensorCores (2 per chip).
  fixed = [*VALID, "--config.mesh.data=1", "--config.mesh.tensor=-1",
           "--config.mesh.fsdp=32"]
  proc, calls = fakes("tpu_vm.sh", "--zone=z", "--accelerator_type=v4-32", "train", *fixed)
  assert proc.returncode == 1 and "does not divide the 16 devices" in proc.stderr
  assert calls == []  # Checked with this checkout's interpreter, nothing on the slice.
  proc, _ = fakes("tpu_vm.sh", "check", *fixed, "--accelerator_type=v4-64")
  assert proc.returncode == 0 and "Config OK for 32 devices" in proc.stderr, proc.stderr

  proc, calls = fakes("local_multiprocess.sh", "2", "--devices_per_process=4", *INVALID)
  assert proc.returncode == 1 and "perceptual_weight" in proc.stderr
  assert [c for c in calls if "vimjax.train" in c] == []


@pytest.mark.slow  # Starts Pythons that import jax (the config checks).
def test_array_file_lines_are_each_checked(fakes, tmp_path):
  args_file = tmp_path / "trials.args"
  args_file.write_text(shlex.join(VALID) + "\n" + shlex.join(INVALID) + "\n")
  proc, calls = fakes("slurm_gpu.sh", f"--array_file={args_file}", f"--log_dir={tmp_path}")
  assert proc.returncode == 1 and "error: command 2 of 2: loss.perceptual_weight" in proc.stderr
  assert not any(c.startswith("sbatch") for c in calls)


def test_scripts_find_this_checkouts_venv():
  venv = os.path.join(REPO, ".venv", "bin", "python")
  expected = venv if os.access(venv, os.X_OK) else subprocess.run(
      ["bash", "-c", "command -v python3"], capture_output=True, text=True).stdout.strip()
  lines = _dry_run("slurm_gpu.sh", *TRAIN)
  (srun,) = [shlex.split(line) for line in lines if line.startswith("srun")]
  assert srun[2] == expected
  env = {k: v for k, v in os.environ.items() if k != "PYTHON"}
  proc = subprocess.run(["bash", os.path.join(LAUNCH, "local_multiprocess.sh"), "--dry_run",
                         "--novalidate", "2", *TRAIN], capture_output=True, text=True, env=env)
  assert f" {expected} -m vimjax.train " in proc.stdout, proc.stderr


def _readme_launch_examples() -> list[list[str]]:
  """The launch-script commands of README's "Running on a pod", as words (`$T` expanded)."""
  with open(os.path.join(REPO, "README.md")) as f:
    readme = f.read()
  section = readme[readme.index("## Running on a pod"):]
  section = section[:section.index("\n## ", 3)]
  blocks = re.findall(r"```sh\n(.*?)```", section, re.S)
  variables, commands = {}, []
  for line in "\n".join(blocks).replace("\\\n", " ").splitlines():
    line = line.split(" # ")[0].strip()
    if re.match(r"^\w+=\"", line):  # T="launch/tpu_vm.sh ..."
      name, value = line.split("=", 1)
      variables[name] = shlex.split(value)[0]
      continue
    for name, value in variables.items():
      line = line.replace(f"${name} ", value + " ")
    words = shlex.split(line) if line.startswith("launch/") else []
    if words and (not words[0].endswith("tpu_vm.sh") or {"check", "train"} & set(words)):
      commands.append(words)
  return commands


@pytest.mark.slow  # Starts Pythons that import jax (the config checks).
def test_readme_pod_examples_pass_the_config_check(tmp_path):
  """Each README launch example, as written, passes the scripts' local config check
  (its files under /shared/runs made here: the SentencePiece model)."""
  from vimjax.data import text  # pylint: disable=g-import-not-at-top
  text.train_sentencepiece([f"a {c} circle above a {c} square" for c in ("red", "blue")] * 50,
                           str(tmp_path / "spm16k"), vocab_size=100)
  commands = _readme_launch_examples()
  scripts = sorted({os.path.basename(words[0]) for words in commands})
  assert scripts == ["local_multiprocess.sh", "slurm_gpu.sh", "tpu_vm.sh"], commands
  seen = set()
  for words in commands:
    words = [w.replace("/shared/runs", str(tmp_path)) for w in words]
    key = tuple(w for w in words if w not in ("check", "train"))
    if key in seen:  # `check` then `train` of one config: one check is enough.
      continue
    seen.add(key)
    proc = subprocess.run(["bash", os.path.join(REPO, words[0]), *words[1:], "--dry_run",
                           f"--log_dir={tmp_path}"] if "slurm" in words[0] else
                          ["bash", os.path.join(REPO, words[0]), *words[1:], "--dry_run"],
                          capture_output=True, text=True, timeout=120, cwd=REPO)
    assert proc.returncode == 0 and "Config OK" in proc.stderr, (words, proc.stderr)
