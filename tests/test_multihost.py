"""Multi-host and remeshing on CPU: 2 processes x 4 devices on loopback vs 1 x 8, preemption
and resume (launch/local_multiprocess.sh), and restoring a checkpoint on other meshes.

All runs train the same micro VIM on a few token records with an fsdp=8 mesh, so
parameters, optimizer state and checkpoints are sharded across the two processes.
"""
import contextlib
import glob
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time

import jax
from jax.sharding import PartitionSpec as P
import numpy as np
import pytest
from tensorboard.backend.event_processing import event_file_loader
from tensorboard.util import tensor_util

from vimjax.configs import vim as vim_config
from vimjax import checkpoint
from vimjax import parallel
from vimjax.data import sources
from vimjax.train import loop
from vimjax import tasks

pytestmark = pytest.mark.multiprocess

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(ROOT, "launch", "local_multiprocess.sh")
GRID, VOCAB, CLASSES = 4, 32, 4
STEPS = 4

# Dotted config overrides shared by the in-process and the command-line runs.
OVERRIDES = {
    "model.grid_size": GRID, "model.codebook_size": VOCAB, "model.num_classes": CLASSES,
    "model.num_layers": 1, "model.emb_dim": 32, "model.mlp_dim": 64, "model.num_heads": 2,
    # The drop mask is drawn per batch row, and two processes order the rows of a
    # global batch differently (process 0's examples first): no dropout keeps the
    # losses comparable.
    "model.cfg_dropout": 0.0,
    "global_batch_size": 8, "total_steps": STEPS, "log_every_steps": 1,
    "eval_every_steps": 1000, "checkpoint_every_steps": 2, "num_eval_images": 8,
    "peak_flops_per_device": 1e12, "tokenizer_workdir": "",
    # Constant LR: a run stopped early and resumed sees the same schedule.
    "optimizer.schedule": "constant", "optimizer.warmup_steps": 1,
    "mesh.data": 1, "mesh.fsdp": -1, "mesh.tensor": 1,
}


def _config(source, **overrides):
  config = vim_config.get_config("tiny")
  with config.unlocked():
    for dotted, value in {**OVERRIDES, "data.source": source, **overrides}.items():
      *parents, leaf = dotted.split(".")
      node = config
      for p in parents:
        node = node[p]
      node[leaf] = value
  return config


def _flags(source):
  return ["--config=configs/vim.py:tiny", f"--config.data.source={source}"] + [
      f"--config.{k}={v}" for k, v in OVERRIDES.items()]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
  root = tmp_path_factory.mktemp("tokens")
  def records(n, offset):
    for i in range(offset, offset + n):
      label = i % CLASSES
      yield {"tokens": ((5 * label + np.arange(GRID * GRID)) % VOCAB).astype(np.int32),
             "label": np.int32(label)}
  sources.write_array_record(str(root / "tokens-train-00000-of-00001.array_record"),
                             records(64, 0))
  sources.write_array_record(str(root / "tokens-eval-00000-of-00001.array_record"),
                             records(8, 1000))
  return f"array_record:{root}/tokens-{{split}}-*.array_record"


@pytest.fixture(scope="module")
def reference(source, tmp_path_factory):
  """One process, 8 devices, uninterrupted: checkpoints at steps 2 and 4."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  result = loop.train_and_evaluate(_config(source), workdir)
  assert result["step"] == STEPS
  return workdir, result


def _losses(workdir):
  """{step: train loss} from the TensorBoard events of every run in workdir."""
  losses = {}
  for path in glob.glob(os.path.join(workdir, "tb", "events.*")):
    for event in event_file_loader.EventFileLoader(path).Load():
      for value in event.summary.value:
        if value.tag == "loss":
          losses[event.step] = float(tensor_util.make_ndarray(value.tensor))
  return losses


def _restore(workdir, step, config, devices=None):
  """The train state at `step` restored onto the mesh `config.mesh` builds over `devices`."""
  mesh = parallel.create_mesh(config.mesh, devices)
  rules = parallel.rules_from_config(config.mesh)
  with jax.set_mesh(mesh):
    task = tasks.build(config, mesh)
    abstract, shardings = loop.state_shardings(task, mesh, rules, jax.random.key(0))
    ckpt = checkpoint.Checkpointer(workdir, every_steps=1, keep=3)
    state = ckpt.restore(step, checkpoint.abstract_with_shardings(abstract, shardings), None)
    ckpt.close()
  return state


def _relative_diff(a, b):
  a, b = jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))
  diff = sum(float(np.sum((np.asarray(x) - np.asarray(y)) ** 2)) for x, y in zip(a, b))
  return (diff / sum(float(np.sum(np.asarray(x) ** 2)) for x in a)) ** 0.5


def _assert_matches_reference(ref_dir, params, config):
  """`params` equal the reference's at STEPS to within 1% of its last two steps' update.

  Meshes round differently, and Adam's normalised update turns a rounding-level
  gradient difference on a near-zero gradient into a parameter difference of
  up to ~lr, so a fixed relative tolerance on the parameters is fragile; a
  skipped, repeated or mis-sharded step moves them by a sizeable fraction of
  an update.
  """
  ref = _restore(ref_dir, STEPS, config).params
  two_steps = _relative_diff(ref, _restore(ref_dir, STEPS - 2, config).params)
  diff = _relative_diff(ref, params)
  assert diff < 0.01 * two_steps, (diff, two_steps)


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _launch(args, log_dir, out_path, env):
  cmd = ["bash", LAUNCH, "--devices_per_process=4", f"--port={_free_port()}",
         f"--log_dir={log_dir}", f"--python={sys.executable}", "2"] + args
  with open(out_path, "w") as out:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def _wait_for(paths, text, proc, timeout):
  deadline = time.monotonic() + timeout
  while time.monotonic() < deadline:
    if all(os.path.exists(p) and text in open(p, errors="replace").read() for p in paths):
      return
    assert proc.poll() is None, f"launcher exited early ({proc.returncode})"
    time.sleep(0.2)
  raise TimeoutError(f"{text!r} not in all of {paths}")


def _check_exit(proc, out_path, timeout=300):
  try:
    rc = proc.wait(timeout=timeout)
  except subprocess.TimeoutExpired:
    # The training processes are in their own process groups: kill them by pid.
    started = re.search(r"pids ([\d ]+)\)", open(out_path, errors="replace").read())
    for pid in (started.group(1).split() if started else []):
      with contextlib.suppress(ProcessLookupError):
        os.kill(int(pid), signal.SIGKILL)
    proc.kill()
    raise
  assert rc == 0, open(out_path, errors="replace").read()[-3000:]


def test_two_processes_match_one_then_preempt_and_resume(source, reference, tmp_path):
  ref_dir, ref_result = reference
  workdir = str(tmp_path / "pod")
  args = _flags(source) + [f"--workdir={workdir}"]
  # Later runs reuse the first run's compiled programs.
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla_cache"),
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
             JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")

  # Preempt both processes (SIGTERM to the launcher, which forwards it) once
  # both have built their mesh: jax's preemption service makes them agree on
  # one step, where they save a checkpoint together and exit cleanly.
  logs, out = tmp_path / "logs1", str(tmp_path / "run1.log")
  proc = _launch(args, logs, out, env)
  _wait_for([out, str(logs / "process_1.log")], "Mesh {", proc, timeout=240)
  proc.send_signal(signal.SIGTERM)
  _check_exit(proc, out)
  first = json.load(open(os.path.join(workdir, "train_result.json")))
  stopped = first["step"]
  assert first["preempted"] and 1 <= stopped < STEPS, first
  assert checkpoint.Checkpointer(workdir, every_steps=1, keep=3).latest_step() == stopped
  # Each process checkpointed its own data-iterator state.
  data_files = sorted(os.listdir(os.path.join(workdir, "checkpoints", str(stopped), "data")))
  assert [f for f in data_files if f.startswith("process_")] == [
      "process_0-of-2.json", "process_1-of-2.json"]

  # Re-running the same command resumes to the end.
  logs, out = tmp_path / "logs2", str(tmp_path / "run2.log")
  proc = _launch(args, logs, out, env)
  _check_exit(proc, out)
  result = json.load(open(os.path.join(workdir, "train_result.json")))
  assert result["step"] == STEPS and not result["preempted"]
  assert f"Restored step {stopped}" in open(logs / "process_1.log").read()

  # Same losses as one process with 8 devices, at every step, across the restart.
  pod, ref = _losses(workdir), _losses(ref_dir)
  assert sorted(pod) == sorted(ref) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([pod[s] for s in ref], list(ref.values()), rtol=1e-5)
  np.testing.assert_allclose(result["eval_loss"], ref_result["eval_loss"], rtol=1e-5)
  # Only process 0 writes TensorBoard events: one file per run.
  assert len(glob.glob(os.path.join(workdir, "tb", "events.*"))) == 2

  # The two-process checkpoint restores in this single process; same parameters.
  config = _config(source)
  _assert_matches_reference(ref_dir, _restore(workdir, STEPS, config).params, config)


def _kernel(state):
  return state.params["model"]["decoder"]["layers_0"]["mlp"]["wi"]["kernel"]  # [32, 64]


def test_checkpoint_restores_on_other_meshes(source, reference, tmp_path):
  ref_dir, ref_result = reference
  # The reference's step-2 checkpoint (saved on fsdp=8), alone in a new workdir,
  # resumed on data=2 x fsdp=2 x tensor=2 to the end.
  workdir = tmp_path / "remesh"
  shutil.copytree(os.path.join(ref_dir, "checkpoints", "2"), workdir / "checkpoints" / "2")
  mesh222 = _config(source, **{"mesh.data": 2, "mesh.fsdp": 2, "mesh.tensor": 2})
  result = loop.train_and_evaluate(mesh222, str(workdir))
  assert result["step"] == STEPS
  losses, ref = _losses(str(workdir)), _losses(ref_dir)
  assert sorted(losses) == [3, 4]
  np.testing.assert_allclose([losses[3], losses[4]], [ref[3], ref[4]], rtol=1e-5)
  np.testing.assert_allclose(result["eval_loss"], ref_result["eval_loss"], rtol=1e-5)

  final = _restore(str(workdir), STEPS, mesh222)
  _assert_matches_reference(ref_dir, final.params, _config(source))
  assert dict(_kernel(final).sharding.mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  assert _kernel(final).sharding.spec == P("fsdp", "tensor")
  assert _kernel(final).addressable_shards[0].data.shape == (16, 32)
  ref_final = _restore(ref_dir, STEPS, _config(source))
  assert _kernel(ref_final).addressable_shards[0].data.shape == (4, 64)  # fsdp=8.

  # On 4 of the 8 devices (data=2 x tensor=2): the same values, resharded.
  four_devices = jax.devices()[:4]
  config4 = _config(source, **{"mesh.data": 2, "mesh.fsdp": 1, "mesh.tensor": 2})
  four = _restore(ref_dir, 2, config4, four_devices)
  eight = _restore(ref_dir, 2, _config(source))
  kernel = _kernel(four)
  assert kernel.sharding.device_set == set(four_devices)
  assert dict(kernel.sharding.mesh.shape) == {"data": 2, "fsdp": 1, "tensor": 2}
  assert kernel.addressable_shards[0].data.shape == (32, 32)
  mu = four.opt_state["model"][1].mu["decoder"]["layers_0"]["mlp"]["wi"]["kernel"]
  assert mu.sharding.device_set == set(four_devices) and mu.sharding.spec == kernel.sharding.spec
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(eight), jax.device_get(four))


def test_distributed_args_from_flags_then_environment(monkeypatch):
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl.testing import flagsaver  # pylint: disable=g-import-not-at-top
  from vimjax import runtime  # pylint: disable=g-import-not-at-top
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()
  for name in ("JAX_COORDINATOR_ADDRESS", "JAX_NUM_PROCESSES", "JAX_PROCESS_ID"):
    monkeypatch.delenv(name, raising=False)
  assert runtime.distributed_args() is None  # Single process.
  with flagsaver.flagsaver(distributed=True):  # Cloud TPU / SLURM: jax detects the rest.
    assert runtime.distributed_args() == dict(
        coordinator_address=None, num_processes=None, process_id=None)
  monkeypatch.setenv("JAX_COORDINATOR_ADDRESS", "10.0.0.2:1234")
  monkeypatch.setenv("JAX_NUM_PROCESSES", "4")
  monkeypatch.setenv("JAX_PROCESS_ID", "3")
  assert runtime.distributed_args() == dict(
      coordinator_address="10.0.0.2:1234", num_processes=4, process_id=3)
  with flagsaver.flagsaver(coordinator_address="h:1", num_processes=2, process_id=0):
    assert runtime.distributed_args() == dict(  # Flags win over the environment.
        coordinator_address="h:1", num_processes=2, process_id=0)
  monkeypatch.setenv("JAX_PROCESS_ID", "one")
  with pytest.raises(ValueError, match="JAX_PROCESS_ID='one'"):
    runtime.distributed_args()
