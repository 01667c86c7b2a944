"""Runs that survive (issue 9): NaN guard, broken checkpoints, config checks, workdir lock,
save errors, in-flight saves on errors, one-line errors, SIGTERM at start-up, finished
reruns, long prompts."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from PIL import ImageFont
import pytest

from survive_configs import fast_config
from vimjax.configs import vitvqgan
from vimjax import checkpoint
from vimjax import config_lib
from vimjax import errors
from vimjax import workdir_lock
from vimjax.evaluation import grid
from vimjax.train import guard
from vimjax.train import loop
from vimjax.train import state as state_lib

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8",
           JAX_PLATFORMS="cpu", PYTHONPATH=REPO)


def _run(args, timeout=240, env=ENV):
  return subprocess.run([sys.executable, *args], cwd=REPO, capture_output=True, text=True,
                        timeout=timeout, env=env)


def _error_lines(stderr: str) -> list[str]:
  """stderr without log lines (absl's `I1201 02:46:06.9 ...`, jax's start-up noise)."""
  return [l for l in stderr.splitlines()
          if l.strip() and not re.match(r"[IWE]\d{4} ", l)
          and not any(s in l for s in ("oneDNN", "absl::InitializeLog"))]


# 1. Divergence.

def test_guard_step_skips_a_nonfinite_update_and_counts_it():
  def step(state, batch, rng, frozen):
    del rng, frozen
    params = state.params + batch
    return (state.replace(step=state.step + 1, params=params),
            {"loss": jnp.sum(params), "g_grad_norm": jnp.float32(1.0)})

  state = state_lib.TrainState(step=jnp.int32(0), params=jnp.ones(3), opt_state={},
                               ema_params={}, extra={})
  skipping = jax.jit(guard.guard_step(step, skip_nonfinite=True))
  new, metrics = skipping(state, jnp.full(3, jnp.nan), None, None)
  np.testing.assert_array_equal(new.params, np.ones(3))  # Update dropped.
  assert int(new.step) == 1 and float(metrics["nonfinite"]) == 1.0
  assert float(metrics["loss"]) == 0.0  # Zeroed, so window averages stay finite.
  health = guard.track(guard.empty_health(), metrics, 7)
  new, metrics = skipping(new, jnp.ones(3), None, None)
  np.testing.assert_array_equal(new.params, np.full(3, 2.0))
  health = guard.track(health, metrics, 8)
  assert guard.read(health) == (7, 1)
  stopping = jax.jit(guard.guard_step(step, skip_nonfinite=False))
  new, metrics = stopping(state, jnp.full(3, jnp.inf), None, None)
  assert float(metrics["nonfinite"]) == 1.0 and not np.isfinite(new.params).any()


def test_loss_watch_marks_a_finite_blow_up_unhealthy():
  watch = guard.LossWatch(max_ratio=10.0)
  assert watch.healthy(0.5, 1) and watch.healthy(0.2, 2) and watch.healthy(1.9, 3)
  assert not watch.healthy(3.0, 4)  # 15x the best 0.2 (psnr 16.9 -> 3.3 in the issue).
  assert not watch.healthy(float("nan"), 5)


def _saved_params_finite(workdir, step):
  restored = ocp.StandardCheckpointer().restore(
      os.path.join(workdir, "checkpoints", str(step), "state"))
  return all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(restored["params"]))


def test_diverging_run_stops_and_keeps_the_good_checkpoints(tmp_path):
  workdir = str(tmp_path / "run")
  # lr=1e30: step 1 is finite (huge params), step 2 overflows. Log steps far apart,
  # saves every step: the case, where NaN checkpoints replaced the good ones.
  bad = fast_config(total_steps=6, log_every_steps=100, checkpoint_every_steps=1,
                    keep_checkpoints=1, **{"optimizer.lr": 1e30, "optimizer.warmup_steps": 0})
  with pytest.raises(errors.DivergedError) as info:
    loop.train_and_evaluate(bad, workdir)
  message = str(info.value)
  assert "\n" not in message and "non-finite loss or gradient norm at step" in message
  first_bad = int(message.split("at step ")[1].split(";")[0])
  steps = sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints")) if s.isdigit())
  assert steps and max(steps) < first_bad, (steps, message)
  assert f"Last good checkpoint: {os.path.join(workdir, 'checkpoints', str(max(steps)))}." in message
  assert all(_saved_params_finite(workdir, s) for s in steps)
  assert not [n for n in os.listdir(os.path.join(workdir, "checkpoints")) if "tmp" in n]


def test_retention_keeps_the_newest_healthy_checkpoint():
  class Info:
    def __init__(self, step, healthy):
      self.step, self.metrics = step, (None if healthy is None else {"healthy": healthy})

  infos = [Info(1, None), Info(2, 1.0), Info(3, 0.0), Info(4, 0.0), Info(5, 0.0)]
  keep = checkpoint.KeepNewestHealthy().should_preserve(infos, context=None)
  assert keep == [False, True, False, False, False]
  latest = ocp.checkpoint_managers.LatestN(n=2).should_preserve(infos, context=None)
  assert [a or b for a, b in zip(keep, latest)] == [False, True, False, True, True]


# 2. Broken checkpoints.

def _tiny_state(value):
  return {"w": jnp.full((4, 3), float(value)), "step": jnp.int32(value)}


def _write_checkpoints(workdir, steps=(2, 4)):
  config = fast_config()
  ckpt = checkpoint.Checkpointer(workdir, every_steps=1, keep=5)
  for step in steps:
    ckpt.save(step, _tiny_state(step), None, config)
  ckpt.close()


def _break(step_dir, how):
  if how == "empty":
    subprocess.run(["rm", "-rf", step_dir], check=True)
    os.mkdir(step_dir)
  elif how == "truncated":
    for root, _, files in os.walk(os.path.join(step_dir, "state")):
      for name in files:
        if os.path.basename(root) == "d":  # ocdbt data and b-tree files.
          with open(os.path.join(root, name), "r+b") as f:
            f.truncate(7)
  elif how == "no_manifest":
    for root, _, files in os.walk(step_dir):
      for name in files:
        if name == "manifest.ocdbt":
          os.remove(os.path.join(root, name))
  elif how == "garbage_metadata":
    with open(os.path.join(step_dir, "_CHECKPOINT_METADATA"), "w") as f:
      f.write("\x00garbage{")
    with open(os.path.join(step_dir, "state", "_METADATA"), "w") as f:
      f.write("not json")


@pytest.mark.parametrize("how", ["empty", "truncated", "no_manifest", "garbage_metadata"])
def test_broken_newest_checkpoint_is_moved_aside_and_the_previous_restored(tmp_path, how,
                                                                           capsys):
  workdir = str(tmp_path / "run")
  _write_checkpoints(workdir)
  _break(os.path.join(workdir, "checkpoints", "4"), how)
  abstract = jax.eval_shape(lambda: _tiny_state(0))
  reader = checkpoint.Checkpointer(workdir, every_steps=1, keep=5, read_only=True)
  state, step = reader.restore_latest(abstract, None, move_broken=False)  # evaluate's way.
  reader.close()
  assert step == 2 and os.path.isdir(os.path.join(workdir, "checkpoints", "4"))
  ckpt = checkpoint.Checkpointer(workdir, every_steps=1, keep=5)
  state, step = ckpt.restore_latest(abstract, None)
  ckpt.close()
  assert step == 2 and float(state["w"][0, 0]) == 2.0
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
  moved = os.listdir(os.path.join(workdir, "checkpoints_broken"))
  assert len(moved) == 1 and moved[0].startswith("4-")
  lines = [l for l in capsys.readouterr().out.splitlines() if "is broken" in l]
  assert len(lines) == 2 and "moved it to" in lines[1]


def test_a_changed_config_is_an_error_not_a_broken_checkpoint(tmp_path):
  workdir = str(tmp_path / "run")
  _write_checkpoints(workdir, steps=(2,))
  other = {"w": jax.ShapeDtypeStruct((5, 3), jnp.float32),
           "step": jax.ShapeDtypeStruct((), jnp.int32)}
  ckpt = checkpoint.Checkpointer(workdir, every_steps=1, keep=5)
  with pytest.raises(ValueError, match=r"checkpoint 2 does not match the config: w is "
                                       r"float32\[4, 3\] there but float32\[5, 3\] here"):
    ckpt.restore_latest(other, None)
  ckpt.close()
  assert os.listdir(os.path.join(workdir, "checkpoints")) == ["2"]  # Not moved.


# 3. Config values.

@pytest.mark.parametrize("key,value,says", [
    ("keep_checkpoints", 0, "keep_checkpoints=0; valid: an integer >= 1."),
    ("keep_checkpoints", -1, "keep_checkpoints=-1; valid: an integer >= 1."),
    ("num_eval_images", 0, "num_eval_images=0; valid: an integer >= 1."),
    ("optimizer.lr", float("inf"), "optimizer.lr=inf; valid: a finite number > 0."),
    ("optimizer.b2", 1.0, "optimizer.b2=1.0; valid: a number in [0, 1)."),
    ("model.encoder.num_heads", 3,
     "model.encoder.emb_dim=64 is not divisible by model.encoder.num_heads=3."),
])
def test_bad_values_fail_validation(key, value, says):
  config = config_lib.override(vitvqgan.get_config("tiny"), **{key: value})
  with pytest.raises(ValueError) as info:
    config_lib.validate(config, 8)
  assert str(info.value) == says


# 4. Workdir lock.

def test_second_run_refuses_and_a_dead_holder_is_taken_over(tmp_path, caplog):
  workdir = str(tmp_path / "run")
  first = workdir_lock.WorkdirLock(workdir, heartbeat_s=0.2).acquire()
  with pytest.raises(errors.WorkdirLockedError, match=r"in use by another training run: host "
                                                      r".* PID \d+"):
    workdir_lock.WorkdirLock(workdir).acquire()
  with pytest.raises(errors.WorkdirLockedError, match="in use by another training run"):
    loop.train_and_evaluate(fast_config(), workdir)  # Refuses before anything is written.
  assert sorted(os.listdir(workdir)) == ["lock.json"]
  time.sleep(0.5)
  assert json.loads((tmp_path / "run" / "lock.json").read_text())["heartbeat"] > time.time() - 2
  first.release()
  assert not os.path.exists(os.path.join(workdir, "lock.json"))

  dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                        capture_output=True, text=True, check=True)
  holder = {"host": workdir_lock.socket.gethostname(), "pid": int(dead.stdout), "start": 1.0,
            "heartbeat": time.time()}
  (tmp_path / "run" / "lock.json").write_text(json.dumps(holder))
  with workdir_lock.hold(workdir) as lock:  # Dead PID on this host: taken over.
    assert lock.read()["pid"] == os.getpid()
  assert "Taking over the stale workdir lock" in caplog.text
  holder.update(host="elsewhere", pid=1, heartbeat=time.time() - 1000)
  (tmp_path / "run" / "lock.json").write_text(json.dumps(holder))
  with workdir_lock.hold(workdir, stale_after_s=300):  # Silent for 1000 s: taken over.
    pass


def test_a_holder_that_lost_its_lease_stops_before_saving(tmp_path):
  lock = workdir_lock.WorkdirLock(str(tmp_path), heartbeat_s=0.1).acquire()
  (tmp_path / "lock.json").write_text(json.dumps(
      {"host": "other", "pid": 1, "start": 0.0, "heartbeat": time.time()}))
  time.sleep(0.5)
  with pytest.raises(errors.WorkdirLockedError, match="lost the workdir lock"):
    lock.check()
  lock.release()
  assert json.loads((tmp_path / "lock.json").read_text())["host"] == "other"  # Not removed.


# 5. Unwritable workdirs and failing saves.

def test_unwritable_checkpoints_dir_fails_at_once(tmp_path):
  workdir = tmp_path / "run"
  workdir.mkdir()
  (workdir / "checkpoints").write_text("a file where the folder should be")
  start = time.time()
  with pytest.raises(errors.CheckpointError, match=r"cannot write checkpoints to .*checkpoints"):
    loop.train_and_evaluate(fast_config(), str(workdir))
  assert time.time() - start < 60
  assert not (workdir / "lock.json").exists()  # Released on the way out.


def test_a_failing_save_is_one_line_naming_path_and_cause(tmp_path, monkeypatch):
  ckpt = checkpoint.Checkpointer(str(tmp_path), every_steps=1, keep=2)

  def full_disk(*args, **kwargs):
    raise OSError(28, "No space left on device", str(tmp_path / "checkpoints" / "3"))

  monkeypatch.setattr(ckpt.manager, "save", full_disk)
  with pytest.raises(errors.CheckpointError) as info:
    ckpt.save(3, _tiny_state(3), None, fast_config())
  assert str(info.value) == (f"saving checkpoint 3 to {tmp_path}/checkpoints failed: No space "
                             f"left on device ({tmp_path}/checkpoints/3)")
  monkeypatch.undo()
  ckpt.close()


def _scalars(workdir, step):
  """{tag: value} written to TensorBoard at `step`."""
  from tensorboard.backend.event_processing import event_file_loader  # pylint: disable=g-import-not-at-top
  from tensorboard.util import tensor_util  # pylint: disable=g-import-not-at-top
  out = {}
  for name in os.listdir(os.path.join(workdir, "tb")):
    for event in event_file_loader.EventFileLoader(os.path.join(workdir, "tb", name)).Load():
      if event.step == step:
        for value in event.summary.value:
          out[value.tag] = float(tensor_util.make_ndarray(value.tensor))
  return out


# 6. The in-flight save on an error path; 1. skipped NaN updates counted; 2. a broken
# checkpoint in train; 8. finished reruns.

def test_error_in_the_loop_then_broken_checkpoint_then_finished_rerun(tmp_path, monkeypatch):
  workdir = str(tmp_path / "run")
  calls = {"n": 0}
  real = loop._device_batch  # pylint: disable=protected-access

  def nan_then_fail(host_batch, mesh):
    calls["n"] += 1
    if calls["n"] == 1:  # Step 1: a NaN batch, skipped with skip_nonfinite_updates.
      host_batch = {**host_batch, "image": np.full_like(host_batch["image"], np.nan)}
    if calls["n"] == 3:  # Step 3, right after step 2's async save started.
      raise ValueError("bad batch")
    return real(host_batch, mesh)

  monkeypatch.setattr(loop, "_device_batch", nan_then_fail)
  with pytest.raises(ValueError, match="bad batch"):
    loop.train_and_evaluate(fast_config(skip_nonfinite_updates=True), workdir)
  logged = _scalars(workdir, step=2)
  assert logged["skipped_nonfinite_updates"] == 1 and np.isfinite(logged["loss"])
  assert _saved_params_finite(workdir, 2)
  names = os.listdir(os.path.join(workdir, "checkpoints"))
  assert names == ["2"], names  # Committed, no N.orbax-checkpoint-tmp left.
  assert os.path.exists(os.path.join(workdir, "checkpoints", "2", "commit_success.txt"))
  assert not os.path.exists(os.path.join(workdir, "lock.json"))
  monkeypatch.undo()

  os.mkdir(os.path.join(workdir, "checkpoints", "3"))  # A broken (empty) newest checkpoint.
  # max_loss_ratio=0.5 marks every save after the first of a process unhealthy: with
  # keep_checkpoints=1, retention must still keep the newest healthy one (3) next to 4.
  config = fast_config(checkpoint_every_steps=1, keep_checkpoints=1, max_loss_ratio=0.5)
  first = loop.train_and_evaluate(config, workdir)
  assert first["step"] == 4 and np.isfinite(first["loss"])
  assert os.listdir(os.path.join(workdir, "checkpoints_broken"))[0].startswith("3-")
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "4"]
  reader = checkpoint.Checkpointer(workdir, every_steps=1, keep=1, read_only=True)
  assert reader.manager.metrics(3)["healthy"] == 1.0
  assert reader.manager.metrics(4)["healthy"] == 0.0
  assert reader.last_good().endswith("checkpoints/3")
  reader.close()
  saved = (tmp_path / "run" / "train_result.json").read_text()

  def no_compile(*args, **kwargs):
    raise AssertionError("a finished run must not compile again")

  monkeypatch.setattr(loop, "jit_train_step", no_compile)
  again = loop.train_and_evaluate(config, workdir)
  assert again["already_finished"] and again["loss"] == first["loss"]
  assert (tmp_path / "run" / "train_result.json").read_text() == saved


# 7. One-line errors.

def test_data_source_errors_come_before_anything_is_written(tmp_path):
  for source, says in [(f"folder:{tmp_path}/missing", "is not a directory"),
                       ("nosuch:x", "Unknown data source 'nosuch:x'")]:
    workdir = tmp_path / source.split(":")[0]
    with pytest.raises(ValueError, match=says):
      loop.train_and_evaluate(fast_config(**{"data.source": source}), str(workdir))
    assert not workdir.exists()


def test_unknown_key_names_the_key_and_suggests_one():
  config = vitvqgan.get_config("tiny")
  assert errors.unknown_key_message("optimizer.lrr", config) == (
      "--config.optimizer.lrr: 'optimizer.lrr' is not a config key; did you mean "
      "'optimizer.lr'?")
  assert errors.unknown_key_message("lr", config).endswith("did you mean 'optimizer.lr'?")
  assert errors.unknown_key_message("foo", config).startswith(
      "--config.foo: 'foo' is not a config key; valid keys at the top: checkpoint_every_steps,")
  assert errors.unknown_key_message("optimizer.lr", config) is None


def test_binaries_print_one_line_errors_and_debug_shows_the_traceback(tmp_path):
  base = ["-m", "vimjax.train", "--config=configs/vitvqgan.py:tiny",
          f"--workdir={tmp_path}/run"]
  proc = _run(base + ["--config.foo=1"])
  assert proc.returncode == 1 and _error_lines(proc.stderr) == [
      "error: --config.foo: 'foo' is not a config key; valid keys at the top: "
      "checkpoint_every_steps, data, disc_optimizer, discriminator, eval, eval_every_steps, "
      "finetune_decoder_from, global_batch_size, keep_checkpoints, log_every_steps, loss, "
      "max_loss_ratio, mesh, model, num_eval_images, optimizer, peak_flops_per_device, seed, "
      "skip_nonfinite_updates, task, total_steps."]
  proc = _run(base + ["--config.global_batch_size=12"])
  assert proc.returncode == 1 and _error_lines(proc.stderr) == [
      "error: global_batch_size=12 is not divisible by the data-parallel size 8 "
      "(mesh.data=8 x mesh.fsdp=1)."]
  assert not os.path.exists(f"{tmp_path}/run")
  proc = _run(base + ["--config.global_batch_size=12", "--debug"])
  assert proc.returncode == 1 and "Traceback" in proc.stderr
  proc = _run(["-m", "vimjax.evaluate", f"--workdir={tmp_path}/none", "--config.seed=1"])
  assert proc.returncode == 1 and _error_lines(proc.stderr)[-1].startswith("error: ")


# 8. SIGTERM during start-up.

def test_sigterm_during_startup_stops_cleanly(tmp_path):
  workdir = tmp_path / "run"
  proc = subprocess.Popen(
      [sys.executable, "-m", "vimjax.train", "--config=tests/survive_configs.py",
       f"--workdir={workdir}"], cwd=REPO, env=ENV, stdout=subprocess.PIPE,
      stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while not (workdir / "lock.json").exists() and time.time() < deadline:
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)  # Before the first step: config / compile.
  out, err = proc.communicate(timeout=240)
  assert proc.returncode == 0, err[-3000:]
  result = json.loads(out.strip().splitlines()[-1])
  assert result["preempted"] and result["step"] == 0


# 9. Long prompts.

def test_long_captions_are_cut_to_a_few_lines():
  images = np.zeros((2, 32, 32, 3), np.float32)
  short = grid.make_image_grid(images, columns=2, captions=["a red circle", "x"])
  long = grid.make_image_grid(images, columns=2, captions=["word " * 2000, "y" * 10_000])
  font = ImageFont.load_default()
  line_h = sum(font.getmetrics())
  assert long.shape[0] <= short.shape[0] + (grid.MAX_CAPTION_LINES - 1) * line_h
  lines = grid.shorten_lines(grid.wrap_text("y" * 10_000, font, 32), font, 32, 4)
  assert len(lines) == 4 and lines[-1].endswith("...") and font.getlength(lines[-1]) <= 32


def test_truncated_prompts_are_named_in_a_warning(capsys):
  from vimjax import generate  # pylint: disable=g-import-not-at-top

  class Tokenizer:
    max_length = 32

    def encode(self, texts):
      return None, sum(len(t) > 40 for t in texts)

  assert generate.warn_truncated(Tokenizer(), ["short", "z" * 10_000]) == 1
  err = capsys.readouterr().err
  assert "1 prompt(s) are longer than model.max_text_length=32 tokens" in err
  assert "'" + "z" * 40 + "...'" in err
