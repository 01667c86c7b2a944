"""The benchmark binary: train mode (timings, model FLOPs, MFU), sample mode (cached == uncached)."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from vimjax.configs import parti as parti_config
from vimjax.configs import vim as vim_config
from vimjax.configs import vitvqgan
from vimjax import benchmark
from vimjax import flops
from vimjax import tasks
from vimjax.data import text
from vimjax.perf import allocator

pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRAIN_KEYS = ("step_time_s", "examples_per_sec", "tokens_per_sec", "flops_per_step",
              "flops_per_step_per_device", "compiled_flops_per_device",
              "peak_flops_per_device", "mfu", "compile_s", "num_params")


def _stage2(family, **overrides):
  config = (vim_config if family == "vim" else parti_config).get_config("tiny")
  with config.unlocked():
    config.update(global_batch_size=8, peak_flops_per_device=1e11)
    config.model.update(grid_size=4, codebook_size=32, emb_dim=32, mlp_dim=64, num_heads=2)
    if family == "vim":
      config.model.update(num_layers=1, num_classes=5)
    else:
      config.model.update(encoder_layers=1, decoder_layers=1, max_text_length=12,
                          text_vocab_size=256)
    for dotted, value in overrides.items():
      section, _, name = dotted.rpartition(".")
      (config[section] if section else config)[name] = value
  return config


def test_train_mode_binary_prints_the_json_line(tmp_path):
  """The CLI on the tiny tokenizer (shrunk by --config overrides), 2 timed steps."""
  shrink = ["data.image_size=16", "model.codebook_size=64", "model.lookup_dim=8",
            "global_batch_size=8", "discriminator.base_channels=8",
            "discriminator.max_channels=16"]
  for side in ("encoder", "decoder"):
    shrink += [f"model.{side}.num_layers=1", f"model.{side}.emb_dim=32",
               f"model.{side}.mlp_dim=64", f"model.{side}.num_heads=2"]
  cmd = [sys.executable, "-m", "vimjax.benchmark", "--config=configs/vitvqgan.py:tiny",
         "--mode=train", "--steps=2", "--warmup=1", f"--workdir={tmp_path}"]
  cmd += [f"--config.{s}" for s in shrink]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result == json.loads((tmp_path / "benchmark_result.json").read_text())
  for key in TRAIN_KEYS:
    assert result[key] > 0, key
  assert result["task"] == "tokenizer" and result["num_devices"] == 8
  # The binary re-executed itself with TCMalloc where one is installed.
  with_tcmalloc = allocator.find_tcmalloc() and allocator.mode() == "tcmalloc"
  assert result["allocator"] == ("tcmalloc" if with_tcmalloc else "system")
  assert result["start_step"] == 0  # tiny has no GAN phase.
  assert result["examples_per_sec"] == pytest.approx(8 / result["step_time_s"])
  # 16 px images in 4 px patches: 16 tokens per example.
  assert result["tokens_per_sec"] == pytest.approx(16 * result["examples_per_sec"])
  assert result["flops_per_step_per_device"] == pytest.approx(result["flops_per_step"] / 8)
  assert result["mfu"] == pytest.approx(result["flops_per_step_per_device"] /
                                        result["step_time_s"] / result["peak_flops_per_device"])


def test_tokenizer_is_timed_in_its_gan_phase():
  """The step is a cond on the GAN phase; cost analysis counts its costlier branch."""
  config = vitvqgan.get_config("tiny")
  with config.unlocked():
    config.loss.update(adversarial_weight=0.1, adversarial_start_step=7)
  assert benchmark._default_start_step(config) == 7  # pylint: disable=protected-access
  with config.unlocked():
    config.loss.adversarial_weight = 0.0
  assert benchmark._default_start_step(config) == 0  # pylint: disable=protected-access
  assert benchmark._default_start_step(_stage2("vim")) == 0  # pylint: disable=protected-access


def test_measured_peak_is_the_higher_of_before_and_after_the_steps(monkeypatch):
  """A slow start-up reading of the CPU peak must not inflate MFU."""
  monkeypatch.setattr(flops, "measured_peak_flops", lambda dtype: 2e9)  # At start-up.
  monkeypatch.setattr(flops, "measure_peak_flops", lambda dtype: 5e9)  # After the steps.
  result = benchmark.benchmark_train(_stage2("vim", peak_flops_per_device=0.0), steps=1,
                                     warmup=0)
  assert result["peak_flops_per_device"] == 5e9
  assert result["mfu"] == pytest.approx(result["flops_per_step_per_device"] /
                                        result["step_time_s"] / 5e9)
  configured = benchmark.benchmark_train(_stage2("vim"), steps=1, warmup=0)  # 1e11: kept.
  assert configured["peak_flops_per_device"] == 1e11


def _analytic_vim_train_flops(config) -> float:
  """Independent estimate: 3 x forward matmul FLOPs (backward = 2 x forward)."""
  m, b = config.model, config.global_batch_size
  n, d, f, v, layers = m.grid_size ** 2, m.emb_dim, m.mlp_dim, m.codebook_size, m.num_layers
  per_token_layer = 2 * (4 * d * d + 2 * d * f) + 2 * 2 * n * d  # q,k,v,o + MLP + scores, AV.
  forward = b * n * (layers * per_token_layer + 2 * d * v)
  return 3.0 * forward


@pytest.mark.parametrize("scan", [False, True])
def test_model_flops_count_every_layer(scan):
  config = _stage2("vim", **{"model.num_layers": 4, "model.scan_layers": scan})
  batch = tasks.get(config).synthetic_batch(config, config.global_batch_size, 0)
  model_flops = flops.model_flops_per_step(tasks.get(config), config, batch)
  # Within 25% of the hand count, scanned or not (XLA counts a scanned body once).
  assert model_flops == pytest.approx(_analytic_vim_train_flops(config), rel=0.25)


def test_synthetic_batches_match_the_task_inputs():
  parti = _stage2("parti")
  batch = tasks.get(parti).synthetic_batch(parti, 8, seed=1)
  assert batch["tokens"].shape == (8, 16) and batch["tokens"].max() < 32
  ids = batch["text_ids"]
  assert ids.shape == (8, 12) and ids.dtype == np.int32 and ids.max() < 256
  for row in ids:  # Pieces, one EOS, then padding only.
    end = int(np.argmax(row == text.EOS_ID))
    assert (row[:end] > text.UNK_ID).all() and (row[end + 1:] == text.PAD_ID).all()
  vim = tasks.get(_stage2("vim")).synthetic_batch(_stage2("vim"), 8)
  assert set(vim) == {"tokens", "label", "mask"} and vim["label"].max() < 5
  assert tasks.get(parti).tokens_per_example(parti) == 16


@pytest.mark.parametrize("family", ["vim", "parti"])
def test_sample_mode_cached_and_uncached_agree(family):
  # Parti: guidance 1.2 (its config's default), throwaway vocab. In float32 the two
  # paths agree exactly (bfloat16, the configs' default, rounds them apart).
  config = _stage2(family, **{"sampling.dtype": "float32"})
  result = benchmark.run(config, mode="sample", steps=1, warmup=0, sample_batch_size=8)
  assert result["tokens_identical"] is True and result["tokens_differing"] == 0
  assert result["sampling_dtype"] == "float32"
  assert result["sec_per_image_cached"] > 0 and result["sec_per_image_uncached"] > 0
  assert result["speedup"] == pytest.approx(
      result["sec_per_image_uncached"] / result["sec_per_image_cached"])
  assert result["tokens_per_image"] == 16 and result["num_devices"] == jax.device_count()


def test_sample_mode_reports_the_configs_bfloat16_decode():
  result = benchmark.run(_stage2("parti"), mode="sample", steps=1, warmup=0,
                         sample_batch_size=4, paths=("cached",))
  assert result["sampling_dtype"] == "bfloat16" and result["sec_per_image_cached"] > 0


def test_bad_mode_and_task_fail_clearly():
  with pytest.raises(ValueError, match=r"--mode=sample.*needs a model that samples image tokens"):
    benchmark.run(vitvqgan.get_config("tiny"), mode="sample", steps=1, warmup=0)
  with pytest.raises(ValueError, match="--mode='eval'"):
    benchmark.run(_stage2("vim"), mode="eval", steps=1, warmup=0)


def test_paths_flag_and_gan_mode_validate_before_anything_runs():
  assert benchmark.parse_paths("cached") == ("cached",)
  assert benchmark.parse_paths("uncached,cached") == ("uncached", "cached")
  for bad in ("", "cache", "cached,cached"):
    with pytest.raises(ValueError, match="valid: a comma-separated subset of cached,uncached"):
      benchmark.parse_paths(bad)
  with pytest.raises(ValueError, match="loss.adversarial_weight=0.0"):
    benchmark.run(vitvqgan.get_config("tiny"), mode="gan", steps=1, warmup=0)
  with pytest.raises(ValueError, match="task='vim'"):
    benchmark.run(_stage2("vim"), mode="gan", steps=1, warmup=0)
  lazy = vitvqgan.get_config("tiny")
  lazy.loss.update(adversarial_weight=0.1, r1_gamma=10.0, r1_interval=16)
  for mode in ("gan", "train"):  # Train mode times the GAN phase too (the default start).
    with pytest.raises(ValueError, match=r"--steps=2 with lazy R1 \(loss.r1_interval=16\).*"
                       r"use --steps=16"):
      benchmark.run(lazy, mode=mode, steps=2, warmup=0)
  benchmark.check_r1_periods(lazy, 2, start_step=0)  # Timed before the GAN: no R1 steps.
