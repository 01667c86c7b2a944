"""What a training run logs: the project's lines once each, progress and compile
times, no library chatter; the config as TensorBoard hparams."""
import glob
import os
import subprocess
import sys

import pytest

from vimjax.configs import vitvqgan
from vimjax import log_setup

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _events(logdir):
  """(tag, plugin name) of every summary value in the event files under `logdir`."""
  from tensorboard.backend.event_processing import event_file_loader  # pylint: disable=g-import-not-at-top
  found = []
  for path in glob.glob(os.path.join(logdir, "**", "events.out.tfevents.*"), recursive=True):
    for event in event_file_loader.EventFileLoader(path).Load():
      found += [(v.tag, v.metadata.plugin_data.plugin_name) for v in event.summary.value]
  return found


@pytest.mark.slow  # One training subprocess (~40 s on an idle 2-core machine).
def test_a_short_run_logs_each_line_once_without_library_noise(tmp_path):
  workdir = tmp_path / "run"
  env = {k: v for k, v in os.environ.items() if k not in ("TF_ENABLE_ONEDNN_OPTS",)}
  env.update(PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  proc = subprocess.run(
      [sys.executable, "-m", "vimjax.train", "--config=tests/survive_configs.py",
       f"--workdir={workdir}"], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stderr.splitlines()
  # Before: 133 lines for 6 steps and 2 checkpoints (orbax 75-85%, every step twice,
  # TensorFlow's oneDNN banner). Now the project's own lines only.
  assert not [l for l in lines if "orbax" in l or "oneDNN" in l or "logging_writer" in l], lines
  assert sum("step 2/4 loss" in l for l in lines) == 1
  assert sum("step 4/4 loss" in l for l in lines) == 1
  assert any(l.endswith("Compiling the train step...") for l in lines)
  assert any("Compiling the train step: done in" in l for l in lines)
  assert any("ETA" in l and "(4/4)" in l for l in lines)  # clu ReportProgress.
  assert len(lines) <= 16, "\n".join(lines)
  # The config as TensorBoard hparams.
  assert ("_hparams_/session_start_info", "hparams") in _events(str(workdir / "tb"))


def test_config_hparams_are_flat_scalars():
  hparams = log_setup.config_hparams(vitvqgan.get_config("tiny"))
  assert hparams["optimizer.lr"] > 0 and hparams["model.encoder.num_layers"] == 2
  assert hparams["mesh.rules"].startswith("(")  # A tuple: its repr.
  assert hparams["task"] == "tokenizer"
  assert all(isinstance(v, (bool, int, float, str)) for v in hparams.values())


def test_progress_beats_while_a_long_call_runs(caplog):
  import time  # pylint: disable=g-import-not-at-top
  caplog.set_level("INFO")
  with log_setup.progress("Compiling the thing", every_s=0.05):
    time.sleep(0.3)
  messages = [r.getMessage() for r in caplog.records]
  assert messages[0] == "Compiling the thing..."
  assert any(m.startswith("... still compiling the thing: ") for m in messages[1:-1])
  assert messages[-1].startswith("Compiling the thing: done in 0.")
