"""vimjax.sweep: fits, trial status and resume, launchers' dry runs, broken trials, N counts."""
import csv
import json
import os
import shlex
import subprocess
import sys

import numpy as np
import pytest

from vimjax import model_stats
from vimjax.sweep import collect
from vimjax.sweep import fit
from vimjax.sweep import launchers
from vimjax.sweep import report
from vimjax.sweep import spec

pytestmark = pytest.mark.slow

REPO = spec.REPO
SIZES = (16, 32, 48, 64, 96, 128)

SWEEP_FILE = '''
import ml_collections

def get_config():
  c = ml_collections.ConfigDict()
  c.base = "configs/parti.py:tiny"
  c.overrides = [{"total_steps": 40}]
  c.trials = [{"name": f"d{d}", "model.emb_dim": d, "model.mlp_dim": 4 * d} for d in %r]
  c.grid = []
  c.metric = "eval_bits_per_token"
  c.fit_against = []
  c.with_offset = True
  c.prepare = ""
  c.prepare_args = {}
  c.lock()
  return c
'''


def _sweep_file(tmp_path, sizes=SIZES):
  path = tmp_path / "sweep_file.py"
  path.write_text(SWEEP_FILE % (tuple(sizes),))
  return str(path)


def _binary(*args):
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-m", "vimjax.sweep", *args], capture_output=True,
                        text=True, cwd=REPO, env=env, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = [line for line in proc.stdout.splitlines() if line]
  return lines[:-1], json.loads(lines[-1])


def _write_trial(sweep, trial, *, step=None, metric=None, flops_per_step=1.0, returncode=None,
                 log="", checkpoints=False):
  """A trial workdir as `python -m vimjax.train` and the local launcher leave it."""
  os.makedirs(trial.workdir, exist_ok=True)
  config = spec.trial_config(sweep, trial)
  with open(os.path.join(trial.workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort())
  if checkpoints:
    os.makedirs(os.path.join(trial.workdir, "checkpoints", str(step or 20)))
  if step is not None and metric is not None:
    result = {"step": step, "preempted": False, "flops_per_step": flops_per_step,
              "eval_bits_per_token": metric}
    with open(os.path.join(trial.workdir, "train_result.json"), "w") as f:
      json.dump(result, f)
  if returncode is not None:
    with open(os.path.join(trial.workdir, "sweep_trial.json"), "w") as f:
      json.dump({"returncode": returncode, "attempts": [
          {"returncode": returncode, "wall_s": 2.0, "cpu_s": 1.5}]}, f)
    with open(os.path.join(trial.workdir, "train.log"), "w") as f:
      f.write(log)


# Fits.

def test_fit_recovers_exact_laws():
  x = np.geomspace(1e4, 1e8, 8)
  got = fit.fit_power_law(x, 50 * x ** -0.35 + 0.4, bootstrap=0)
  np.testing.assert_allclose([got["a"], got["alpha"], got["c"]], [50, 0.35, 0.4], rtol=1e-4)
  pure = fit.fit_power_law(x, 3 * x ** -0.2, with_offset=False, bootstrap=0)
  np.testing.assert_allclose([pure["a"], pure["alpha"], pure["c"]], [3, 0.2, 0], atol=1e-9)


def test_fit_interval_covers_known_exponent():
  """Noisy synthetic sweeps: the 95% bootstrap interval holds the true alpha most times."""
  x = np.geomspace(1e4, 1e8, 10)
  rng = np.random.default_rng(0)
  covered, widths = 0, []
  for seed in range(6):
    y = (50 * x ** -0.35 + 0.4) * np.exp(rng.normal(0, 0.02, x.size))
    got = fit.fit_power_law(x, y, bootstrap=100, seed=seed)
    lo, hi = got["alpha_ci"]
    covered += lo <= 0.35 <= hi
    widths.append(hi - lo)
    assert lo <= got["alpha"] <= hi and 0.9 < got["r2_ci"][0] <= got["r2_ci"][1] <= 1
  assert covered >= 5, covered
  assert 0.005 < np.median(widths) < 0.2  # Neither degenerate nor uninformative.


def test_fit_rejects_too_few_points():
  with pytest.raises(ValueError, match="3 points cannot fit 3 parameters"):
    fit.fit_power_law([1, 2, 3], [3, 2, 1])


def test_pareto_frontier():
  cost, loss = np.array([1, 2, 3, 4, 5]), np.array([5, 6, 4, 4, 1])
  np.testing.assert_array_equal(fit.pareto_frontier(cost, loss), [0, 2, 4])


# Parameter counts.

def test_non_embedding_params_match_a_hand_count():
  from vimjax.configs import parti  # pylint: disable=g-import-not-at-top
  from vimjax import tasks  # pylint: disable=g-import-not-at-top
  config = parti.get_config("tiny")
  m = config.model
  d, mlp = m.emb_dim, m.mlp_dim
  attention = 4 * (d * d + d)  # q, k, v, out kernels and biases.
  dense = d * mlp + mlp + mlp * d + d
  norm = 2 * d
  encoder = m.encoder_layers * (attention + dense + 2 * norm)
  decoder = m.decoder_layers * (2 * attention + dense + 3 * norm)
  expected = encoder + decoder + 2 * norm  # + final encoder and decoder norms.
  params = tasks.abstract_params(config)
  assert model_stats.count_non_embedding_params(params) == expected
  embeddings = (m.text_vocab_size * d + m.max_text_length * d + 2 * m.grid_size * d + 2 * d
                + m.codebook_size * d + d * m.codebook_size + m.codebook_size)
  assert model_stats.count_params(params) == expected + embeddings


def test_flops_per_token_match_the_6n_rule():
  """VIM tiny: 6 (matmul params) per token + 12 L n d for attention (fwd + bwd), within 5%."""
  from vimjax.configs import vim  # pylint: disable=g-import-not-at-top
  from vimjax import tasks  # pylint: disable=g-import-not-at-top
  config = vim.get_config("tiny")
  m = config.model
  got = model_stats.summarize(config, with_flops=True)
  logits = model_stats.count_params(tasks.abstract_params(config)["logits"])
  expected = (6 * (got["non_embedding_params"] + logits)
              + 12 * m.num_layers * m.grid_size ** 2 * m.emb_dim)
  assert got["tokens_per_example"] == m.grid_size ** 2
  assert abs(got["flops_per_token"] / expected - 1) < 0.05, (got["flops_per_token"], expected)


# Trials, status, resume.

def test_sweep_file_errors(tmp_path):
  bad = tmp_path / "bad.py"
  bad.write_text(SWEEP_FILE.replace('"model.mlp_dim"', '"model.mlp_dimension"') % ((16,),))
  with pytest.raises(ValueError, match="no key 'model.mlp_dimension'"):
    spec.load_sweep(str(bad))
  missing = tmp_path / "missing.py"
  missing.write_text(SWEEP_FILE.replace('  c.metric = "eval_bits_per_token"\n', "") % ((16,),))
  with pytest.raises(ValueError, match="missing 'metric'"):
    spec.load_sweep(str(missing))
  unset = tmp_path / "unset.py"
  unset.write_text(SWEEP_FILE.replace('"model.mlp_dim"', '"model.conv_attention_kernel"') % ((16,),))
  with pytest.raises(ValueError, match="'model.conv_attention_kernel', which is None"):
    spec.load_sweep(str(unset))


def test_resumed_sweep_launches_only_unfinished_trials(tmp_path):
  path = _sweep_file(tmp_path, sizes=(16, 32, 48))
  sweep = spec.load_sweep(path)
  done, half, fresh = spec.trials(sweep, str(tmp_path / "w"))
  _write_trial(sweep, done, step=40, metric=2.0)
  _write_trial(sweep, half, checkpoints=True)  # Interrupted at step 20: no result.
  assert collect.trial_status(done.workdir)[0] == "finished"
  assert collect.trial_status(half.workdir)[0] == "incomplete"
  assert collect.trial_status(fresh.workdir)[0] == "pending"

  lines, result = _binary(f"--sweep={path}", f"--workdir={tmp_path / 'w'}", "--dry_run")
  assert result["skipped_finished"] == [done.name]
  assert result["started"] == [half.name, fresh.name]
  commands = [shlex.split(line) for line in lines]
  assert len(commands) == 2
  for words, trial in zip(commands, (half, fresh)):
    assert words[1:3] == ["-m", "vimjax.train"]
    # The trial's own workdir, so vimjax.train resumes `half` from its checkpoint.
    assert words[3:5] == ["--config=configs/parti.py:tiny", f"--workdir={trial.workdir}"]
    assert f"--config.model.emb_dim={trial.overrides['model.emb_dim']}" in words
    assert "--config.total_steps=40" in words


def test_run_local_records_exit_status_and_times(tmp_path):
  ok = [sys.executable, "-c", "print('trained')"]
  broken = [sys.executable, "-c", "raise ValueError('model.emb_dim=0 must be positive')"]
  jobs = [("ok", str(tmp_path / "ok"), ok), ("broken", str(tmp_path / "broken"), broken)]
  records = launchers.run_local(jobs, parallel=2)
  assert records["ok"]["returncode"] == 0 and records["broken"]["returncode"] == 1
  assert records["ok"]["cpu_s"] > 0 and records["ok"]["wall_s"] > 0
  status, reason = collect.trial_status(str(tmp_path / "broken"))
  assert status == "failed" and "model.emb_dim=0 must be positive" in reason
  with open(tmp_path / "ok" / "train.log") as f:
    assert f.read() == "trained\n"


# Broken trials in the fits.

def test_broken_trials_are_reported_and_excluded(tmp_path):
  path = _sweep_file(tmp_path, sizes=SIZES + (24, 40, 80))
  sweep = spec.load_sweep(path)
  workdir = str(tmp_path / "w")
  trials = spec.trials(sweep, workdir)
  spec.write_manifest(sweep, workdir, path, trials)
  from vimjax import tasks  # pylint: disable=g-import-not-at-top
  good = trials[:len(SIZES)]
  for trial in good:  # Losses on an exact law of the non-embedding count.
    n = model_stats.count_non_embedding_params(tasks.abstract_params(spec.trial_config(sweep, trial)))
    _write_trial(sweep, trial, step=40, metric=20 * n ** -0.3 + 0.5, flops_per_step=6.0 * n)
  nan, failed, cut = trials[len(SIZES):]
  _write_trial(sweep, nan, step=40, metric=float("nan"))
  _write_trial(sweep, failed, returncode=1, log="...\nFloatingPointError: Non-finite loss\n")
  _write_trial(sweep, cut, checkpoints=True)

  result = report.collect_and_fit(workdir, bootstrap=50)
  assert result["num_runs"] == len(SIZES) and result["num_trials"] == len(trials)
  excluded = {e["trial"]: e for e in result["excluded"]}
  assert excluded[nan.name]["status"] == "broken" and "nan" in excluded[nan.name]["reason"]
  assert excluded[failed.name]["status"] == "failed"
  assert "Non-finite loss" in excluded[failed.name]["reason"]
  assert excluded[cut.name]["status"] == "incomplete"
  np.testing.assert_allclose(result["alpha_L(N)"], 0.3, rtol=1e-3)
  np.testing.assert_allclose(result["alpha_L(C)"], 0.3, rtol=1e-3)  # C = 6N x steps.

  with open(os.path.join(workdir, "results.csv")) as f:
    rows = {row["trial"]: row for row in csv.DictReader(f)}
  assert set(rows) == {t.name for t in trials}  # Nothing dropped.
  assert rows[failed.name]["status"] == "failed" and rows[failed.name]["cpu_s"] == "1.5"
  with open(os.path.join(workdir, "fit.json")) as f:
    fits = json.load(f)
  assert fits["fits"]["L(N)"]["trials"] == [t.name for t in good]
  assert len(fits["excluded"]) == 3
  assert os.path.getsize(fits["fits"]["L(N)"]["plot"]) > 1000


def test_n_and_d_swept_fit_both_laws_and_the_frontier(tmp_path):
  """L = E + A / N^a + B / D^b on a sizes x steps grid (C = 6 N D)."""
  path = tmp_path / "grid_sweep.py"
  path.write_text(SWEEP_FILE.replace("c.grid = []", 'c.grid = [("total_steps", (40, 80, 160, 320))]')
                  % ((16, 32, 64, 96, 128),))
  sweep = spec.load_sweep(str(path))
  workdir = str(tmp_path / "w")
  trials = spec.trials(sweep, workdir)
  assert len(trials) == 20 and trials[1].name == "001-d16-total_steps=80"
  spec.write_manifest(sweep, workdir, str(path), trials)
  from vimjax import tasks  # pylint: disable=g-import-not-at-top
  counts = {}
  for trial in trials:
    config = spec.trial_config(sweep, trial)
    dim = config.model.emb_dim
    if dim not in counts:
      counts[dim] = model_stats.count_non_embedding_params(tasks.abstract_params(config))
    n = counts[dim]
    d = config.total_steps * config.global_batch_size * config.model.grid_size ** 2
    loss = 0.5 + 30 * n ** -0.4 + 80 * d ** -0.3
    _write_trial(sweep, trial, step=config.total_steps, metric=loss,
                 flops_per_step=6.0 * n * d / config.total_steps)
  result = report.collect_and_fit(workdir, bootstrap=20)
  assert result["num_runs"] == 20 and not result["excluded"]
  # At the largest D (N), the other term is a constant the offset absorbs: exact.
  np.testing.assert_allclose(result["alpha_L(N)"], 0.4, rtol=1e-3)
  np.testing.assert_allclose(result["alpha_L(D)"], 0.3, rtol=1e-3)
  with open(os.path.join(workdir, "fit.json")) as f:
    fits = json.load(f)["fits"]
  assert len(fits["L(N)"]["trials"]) == 5 and len(fits["L(D)"]["trials"]) == 4
  # On the frontier C = 6 N D, so the two allocation exponents sum to 1 exactly.
  n_opt, d_opt = fits["N_opt(C)"]["exponent"], fits["D_opt(C)"]["exponent"]
  assert n_opt > 0 and d_opt > 0
  np.testing.assert_allclose(n_opt + d_opt, 1.0, atol=1e-9)
  assert fits["N_opt(C)"]["trials"] == fits["L(C)"]["trials"]


def test_local_sweep_reports_a_crashing_trial(tmp_path):
  """The real path: vimjax.train exits with an error; the sweep's final line names it."""
  path = _sweep_file(tmp_path, sizes=(16,))  # data.source is still parti.py's placeholder.
  _, result = _binary(f"--sweep={path}", f"--workdir={tmp_path / 'w'}", "--bootstrap=10")
  assert result["num_runs"] == 0 and result["launch"]["failed"] == ["000-d16"]
  (excluded,) = result["excluded"]
  assert excluded["status"] == "failed" and "exit 1" in excluded["reason"]
  assert "data.source='array_record:<dir>" in excluded["reason"]
  with open(tmp_path / "w" / "results.csv") as f:
    assert [row["status"] for row in csv.DictReader(f)] == ["failed"]


# Remote launchers.

def test_tokenizer_sweep_tpu_vm_dry_run(tmp_path):
  workdir = str(tmp_path / "vq")
  lines, result = _binary("--sweep=configs/sweeps/vitvqgan_patch.py:gs://b", f"--workdir={workdir}",
                          "--launcher=tpu_vm", "--launcher_args=--zone=z,--accelerator_type=v4-64",
                          "--dry_run")
  assert result["started"] == ["000-patch_size=32", "001-patch_size=16", "002-patch_size=8",
                               "003-patch_size=4"]
  commands = [shlex.split(line) for line in lines]
  assert len(commands) == 3 * 4  # create, setup, train per slice.
  script = os.path.join(REPO, "launch", "tpu_vm.sh")
  for i, patch in enumerate((32, 16, 8, 4)):
    create, setup, train = commands[3 * i:3 * i + 3]
    head = ["bash", script, "--zone=z", "--accelerator_type=v4-64", f"--name=vimjax-sweep-{i:03d}"]
    assert create == head + ["create"] and setup == head + ["setup"]
    assert train[:len(head) + 2] == head + ["--no_follow", "train"]
    assert train[len(head) + 2:] == [
        "--config=configs/vitvqgan.py:bb", f"--workdir={workdir}/trials/{i:03d}-patch_size={patch}",
        "--config.data.source=tfds:imagenet2012",
        "--config.loss.perceptual_weights=gs://b/vgg16_lpips.npz",
        f"--config.model.patch_size={patch}"]
    # The script itself turns the line into one detached training job on every worker.
    proc = subprocess.run([*train[:2], "--dry_run", *train[2:]], capture_output=True, text=True)
    start = shlex.split(proc.stdout.splitlines()[0])
    assert proc.returncode == 0 and len(proc.stdout.splitlines()) == 1  # --no_follow: no tail.
    assert "--worker=all" in start and "vimjax.train --distributed --config=" in start[-1]


def test_packed_tpu_vm_commands_run_the_sweep_on_each_slice():
  trial_args = [(i, [f"--workdir=gs://b/t{i}"]) for i in range(3)]
  sweep_args = ["--sweep=configs/sweeps/x.py", "--workdir=gs://b"]
  lines = launchers.tpu_vm_commands(trial_args, ["--zone=z"], "sw", 2, sweep_args)
  assert len(lines) == 6
  train = shlex.split(lines[2])
  assert train[2:] == ["--zone=z", "--name=sw-g000", "--no_follow", "--module=vimjax.sweep",
                       "train", "--sweep=configs/sweeps/x.py", "--workdir=gs://b",
                       "--launcher=local", "--trials=0,1"]
  assert shlex.split(lines[5])[-1] == "--trials=2"
  again = launchers.tpu_vm_commands(trial_args, ["--zone=z"], "sw", 2, sweep_args, ("train",))
  assert again == [lines[2], lines[5]]  # A re-run on existing slices: train only.
  with pytest.raises(ValueError, match="--tpu_steps=delete"):
    launchers.tpu_vm_commands(trial_args, [], "sw", 1, [], ("delete",))
  proc = subprocess.run([*train[:2], "--dry_run", *train[2:]], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr
  assert "-m vimjax.sweep --distributed --sweep=configs/sweeps/x.py" in proc.stdout


def test_slurm_dry_run_is_one_array_job(tmp_path):
  path = _sweep_file(tmp_path, sizes=(16, 32))
  workdir = str(tmp_path / "w")
  lines, result = _binary(f"--sweep={path}", f"--workdir={workdir}", "--launcher=slurm",
                          "--launcher_args=--nodes=2,--partition=a100", "--dry_run")
  args_file = os.path.join(workdir, "slurm", "trials.args")
  assert lines[0] == f"# {args_file}:" and len(lines) == 4
  trials = spec.trials(spec.load_sweep(path), workdir)
  for line, trial in zip(lines[1:3], trials):
    assert shlex.split(line)[:2] == ["--config=configs/parti.py:tiny", f"--workdir={trial.workdir}"]
  assert shlex.split(lines[3]) == [
      "bash", os.path.join(REPO, "launch", "slurm_gpu.sh"), "--nodes=2", "--partition=a100",
      "--job_name=vimjax-sweep", f"--array_file={args_file}"]
  assert result["commands"] == 1 and not os.path.exists(args_file)  # Dry: nothing written.
  # What sbatch would get: one array task per trial line.
  os.makedirs(os.path.dirname(args_file))
  with open(args_file, "w") as f:
    f.write("\n".join(lines[1:3]) + "\n")
  words = shlex.split(lines[3])
  # --novalidate: this sweep's trials keep the placeholder token source (the
  # script's local config check would refuse them, rightly).
  proc = subprocess.run([*words[:2], "--dry_run", "--novalidate", f"--log_dir={tmp_path}",
                         *words[2:]],
                        capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr
  assert "#SBATCH --array=0-1\n" in proc.stdout and "%A_%a.out" in proc.stdout
  assert "SLURM_ARRAY_TASK_ID + 1" in proc.stdout and "vimjax.train --distributed $args" in proc.stdout
