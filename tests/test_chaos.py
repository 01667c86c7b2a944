"""Chaos: SIGKILL training at random moments, resume, and match the uninterrupted run bit for bit.

Seeded trials. Each starts `python -m vimjax.train`, kills it with SIGKILL at a
drawn moment (while a chosen step's async save is being written, or a random
delay after a chosen checkpoint committed), possibly twice, then reruns the
same command to the end. The final train state and data-iterator state must
equal those of one uninterrupted run, bit for bit. A persistent compilation
cache keeps every process after the first from recompiling, so the whole test
is a few process start-ups (106-240 s measured on 2 cores shared with other jobs).
"""
import json
import os
import random
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STEPS = 6
TRIALS = 3
SEED = 10
ARGS = ["--config=tests/survive_configs.py", f"--config.total_steps={STEPS}",
        "--config.checkpoint_every_steps=1", "--config.log_every_steps=3",
        "--config.keep_checkpoints=2"]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  cache = str(tmp_path_factory.mktemp("jax_cache"))
  # XLA_FLAGS (8 devices, cheap codegen) come from conftest through os.environ.
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO, JAX_COMPILATION_CACHE_DIR=cache,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
              JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def _start(workdir, env):
  return subprocess.Popen([sys.executable, "-m", "vimjax.train", f"--workdir={workdir}", *ARGS],
                          cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)


def _finish(workdir, env):
  proc = _start(workdir, env)
  _, err = proc.communicate(timeout=300)
  assert proc.returncode == 0, err[-3000:]


def _moment_reached(ckpt_dir, step, during_save) -> bool:
  try:
    names = os.listdir(ckpt_dir)
  except FileNotFoundError:
    return False
  # A save can be quicker than one poll: its committed folder also ends the wait.
  return str(step) in names or (
      during_save and any(n.startswith(f"{step}.") and "tmp" in n for n in names))


def _latest(ckpt_dir) -> int:
  try:
    return max([int(n) for n in os.listdir(ckpt_dir) if n.isdigit()], default=0)
  except FileNotFoundError:
    return 0


def _kill_at(workdir, env, rng) -> str:
  """Starts training and SIGKILLs it at a drawn moment after its resume point."""
  ckpt_dir = os.path.join(workdir, "checkpoints")
  step = rng.randint(min(_latest(ckpt_dir) + 1, STEPS - 1), STEPS - 1)
  during_save = rng.random() < 0.5
  delay = 0.0 if during_save else rng.uniform(0.0, 0.5)
  proc = _start(workdir, env)
  deadline = time.time() + 300
  while proc.poll() is None and time.time() < deadline:
    if _moment_reached(ckpt_dir, step, during_save):
      time.sleep(delay)
      break
    time.sleep(0.002)
  if proc.poll() is not None:
    proc.communicate()
    return f"finished before the kill at step {step}"
  proc.send_signal(signal.SIGKILL)
  proc.communicate(timeout=60)
  return f"killed {'during the save of' if during_save else f'{delay:.2f}s after'} step {step}"


def _final(workdir):
  step_dir = os.path.join(workdir, "checkpoints", str(STEPS))
  state = ocp.StandardCheckpointer().restore(os.path.join(step_dir, "state"))
  with open(os.path.join(step_dir, "data", "process_0-of-1.json")) as f:
    data = json.load(f)
  return jax.tree.map(np.asarray, state), data


def test_sigkill_at_random_moments_resumes_bit_exact(tmp_path, env):
  reference = str(tmp_path / "reference")
  _finish(reference, env)
  want_state, want_data = _final(reference)
  rng = random.Random(SEED)
  for trial in range(TRIALS):
    workdir = str(tmp_path / f"trial{trial}")
    events = [_kill_at(workdir, env, rng) for _ in range(rng.choice((1, 2)))]
    _finish(workdir, env)
    print(f"trial {trial}: {'; '.join(events)}")
    assert any(e.startswith("killed") for e in events), events
    got_state, got_data = _final(workdir)
    assert got_data == want_data, (trial, events)
    jax.tree.map(np.testing.assert_array_equal, got_state, want_state)
    names = os.listdir(os.path.join(workdir, "checkpoints"))
    assert not [n for n in names if "tmp" in n], (trial, events, names)
    assert json.loads(open(os.path.join(workdir, "train_result.json")).read())["step"] == STEPS
