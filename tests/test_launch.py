"""launch/ scripts: their --dry_run commands, and usage errors on bad arguments."""
import os
import re
import shlex
import subprocess

import pytest

LAUNCH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "launch")
TRAIN = ["--config=configs/vim.py:base", "--workdir=gs://bucket/vim b", "--config.seed=3"]


def _run(script, *args):
  return subprocess.run(["bash", os.path.join(LAUNCH, script), *args], capture_output=True,
                        text=True, timeout=30, env=dict(os.environ, XLA_FLAGS="--xla_foo"))


def _dry_run(script, *args):
  proc = _run(script, "--dry_run", *args)
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
    (("--bogus", "2"), "Unknown option")])
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
    (("--bogus", *TRAIN), "Unknown option"),
    (("--array_file=/nonexistent/trials.args",), "missing or empty"),
    (("--array_file=/dev/null",), "missing or empty"),
    (("--array_file=" + os.path.abspath(__file__), *TRAIN), "takes the train arguments from FILE"),
    (("--array_parallel=0", *TRAIN), "positive integer")])
def test_slurm_usage_errors(args, says):
  _assert_usage_error("slurm_gpu.sh", *args, says=says)
