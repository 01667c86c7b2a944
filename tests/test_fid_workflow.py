"""Inception metrics in the workflow, on random Inception weights at 75 px:
the `fid` binary, rFID in training and `evaluate`, FID / IS of VIM and Parti samples,
and the config checks."""
import json
import os
import subprocess
import sys

import flax
import jax
import flax.linen as nn
import numpy as np
from PIL import Image
import pytest

from vimjax.configs import parti as parti_config
from vimjax.configs import vim as vim_config
from vimjax.configs import vitvqgan
from vimjax import config_lib
from vimjax import parallel
from vimjax.data import shapes
from vimjax.data import sources
from vimjax.data import text
from vimjax.evaluation import generative
from vimjax.evaluation import inception_metrics
from vimjax.models import inception
from vimjax.train import loop
from vimjax import tasks

pytestmark = pytest.mark.slow

IMAGE, PATCH, CODES = 16, 4, 64
GRID = IMAGE // PATCH
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("inception") / "random_inception.npz")
  flat = flax.traverse_util.flatten_dict(inception.random_params(0))
  np.savez(path, **{"/".join(k): v for k, v in flat.items()})
  return path


def _eval_overrides(weights, num_images=8, reference=""):
  return {"eval.inception_weights": weights, "eval.inception_size": inception.MIN_SIZE,
          "eval.num_images": num_images, "eval.batch_size": 8, "eval.fid_reference": reference}


def _common():
  return {"total_steps": 2, "global_batch_size": 8, "log_every_steps": 2,
          "checkpoint_every_steps": 2, "eval_every_steps": 2, "num_eval_images": 8,
          "peak_flops_per_device": 1e11, "data.num_train_examples": 16,
          "data.num_eval_examples": 16}


def _run(*args):
  env = dict(os.environ, PYTHONPATH=REPO)
  out = subprocess.run([sys.executable, "-m", "vimjax.fid", *args], capture_output=True,
                       text=True, env=env, cwd=REPO, timeout=600)
  return out


def _frechet_spy(calls):
  """A Fréchet distance that records its calls and computes on the first 16 dims only.

  The real 2048-dim sqrtm takes ~50 s on this loaded 2-core VM; the math is
  tested in test_inception_metrics.py, these tests check what is compared.
  """
  real = inception_metrics.frechet_distance

  def spy(mu1, sigma1, mu2, sigma2, eps=1e-6):
    calls.append((np.asarray(mu1), np.asarray(mu2)))
    return real(mu1[:16], sigma1[:16, :16], mu2[:16], sigma2[:16, :16], eps)
  return spy


@pytest.fixture
def fast_frechet(monkeypatch):
  calls = []
  monkeypatch.setattr(inception_metrics, "frechet_distance", _frechet_spy(calls))
  return calls


def test_fid_binary_images_to_stats_and_stats_pair(weights, tmp_path):
  rng = np.random.default_rng(0)
  folder = tmp_path / "images"
  folder.mkdir()
  for i, image in enumerate(rng.integers(0, 256, (10, 24, 24, 3), dtype=np.uint8)):
    Image.fromarray(image).save(folder / f"{i:03d}.png")
  stats = str(tmp_path / "stats.npz")
  out = _run(f"--images={folder}", f"--inception_weights={weights}", f"--out={stats}",
             f"--inception_size={inception.MIN_SIZE}", "--batch_size=8", "--save_features")
  assert out.returncode == 0, out.stderr[-3000:]
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result["num_images"] == 10 and result["inception_score"] >= 1.0
  saved = inception_metrics.load_stats(stats)
  assert saved["mu"].shape == (2048,) and saved["sigma"].shape == (2048, 2048)
  assert saved["mu_s"].shape == (3 * 3 * 7,) and saved["pool"].shape == (10, 2048)
  # Two known Gaussians: 3 * ((1 - 0)^2 + (2 - 1)^2) = 6.
  a, b = str(tmp_path / "a.npz"), str(tmp_path / "b.npz")
  np.savez(a, mu=np.zeros(3), sigma=np.eye(3))
  np.savez(b, mu=np.ones(3), sigma=4 * np.eye(3))
  out = _run(f"--stats_a={a}", f"--stats_b={b}")
  assert out.returncode == 0, out.stderr[-3000:]
  assert json.loads(out.stdout.strip().splitlines()[-1]) == {"fid": pytest.approx(6.0)}


def test_images_against_an_adm_reference_batch(weights, tmp_path, fast_frechet):
  """The binary's library path: an ADM batch (arr_0 images + mu/sigma/mu_s/sigma_s) of
  the same images as a PNG folder gives FID 0 and precision = recall = 1."""
  from vimjax import fid as fid_binary  # pylint: disable=g-import-not-at-top
  images = np.random.default_rng(1).integers(0, 256, (10, 24, 24, 3), dtype=np.uint8)
  folder = tmp_path / "images"
  folder.mkdir()
  for i, image in enumerate(images):
    Image.fromarray(image).save(folder / f"{i:03d}.png")
  kwargs = dict(batch_size=8, size=inception.MIN_SIZE, save_features=False)
  stats = str(tmp_path / "stats.npz")
  fid_binary.images_metrics(str(folder), weights, stats, None, **kwargs)
  saved = inception_metrics.load_stats(stats)
  adm = str(tmp_path / "adm_ref.npz")
  np.savez(adm, arr_0=images, **saved)
  images_npz = str(tmp_path / "images.npz")
  np.savez(images_npz, arr_0=images)
  result = fid_binary.images_metrics(images_npz, weights, None, adm, **kwargs)
  assert result["fid"] == pytest.approx(0.0, abs=1e-6)
  assert result["sfid"] == pytest.approx(0.0, abs=1e-6)
  assert result["precision"] == 1.0 and result["recall"] == 1.0
  assert result["num_ref_images"] == 10
  np.testing.assert_allclose(fast_frechet[0][1], saved["mu"])  # Compared with the reference.


def test_fid_binary_one_line_errors(tmp_path):
  out = _run("--images=/nonexistent_dir", "--out=x.npz")
  assert out.returncode != 0 and "--inception_weights" in out.stderr.strip().splitlines()[-1]
  out = _run("--stats_a=a.npz")
  assert "go together" in out.stderr.strip().splitlines()[-1]
  np.savez(tmp_path / "bad.npz", mean=np.zeros(3))
  out = _run(f"--stats_a={tmp_path / 'bad.npz'}", f"--stats_b={tmp_path / 'bad.npz'}")
  assert "lacks 'mu' and 'sigma'" in out.stderr.strip().splitlines()[-1]


def _tokenizer_config(weights):
  config = config_lib.override(vitvqgan.get_config("tiny"), **_common(), **{
      "data.image_size": IMAGE, "model.patch_size": PATCH, "model.codebook_size": CODES,
      "model.lookup_dim": 8, "loss.adversarial_weight": 0.0}, **_eval_overrides(weights))
  for side in (config.model.encoder, config.model.decoder):
    side.update(num_layers=1, num_heads=2, emb_dim=32, mlp_dim=64)
  return config


@pytest.fixture(scope="module")
def tokenizer_run(weights, tmp_path_factory):
  """A tiny tokenizer trained 2 steps with rFID at its eval (the training-loop path)."""
  workdir = str(tmp_path_factory.mktemp("fid_tokenizer"))
  config = _tokenizer_config(weights)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(inception_metrics, "frechet_distance", _frechet_spy([]))
    return config, workdir, loop.train_and_evaluate(config, workdir)


def test_rfid_in_training_and_evaluate(tokenizer_run, fast_frechet):
  config, workdir, result = tokenizer_run
  assert result["eval_fid_num_images"] == 8
  for key in ("eval_rfid", "eval_rsfid", "eval_rprecision", "eval_rrecall",
              "eval_inception_score"):
    assert np.isfinite(result[key]), key
  assert result["eval_rfid"] > 0.0  # Reconstructions of a 2-step tokenizer are not the images.
  assert os.listdir(os.path.join(workdir, "tb"))
  evaluated = loop.evaluate_workdir(config, workdir)  # Same checkpoint, same numbers.
  assert evaluated["rfid"] == pytest.approx(result["eval_rfid"], rel=1e-4)
  assert evaluated["rsfid"] == pytest.approx(result["eval_rsfid"], rel=1e-4)
  assert len(fast_frechet) == 2  # rfid (pool) and rsfid (spatial): reconstructions vs originals.


def _caption(i: int) -> str:
  return shapes.caption_from_scene(shapes.sample_scene("train", i))


@pytest.mark.parametrize("family", ["vim", "parti"])
def test_stage2_sample_fid_against_reference(tokenizer_run, weights, tmp_path, family,
                                              fast_frechet):
  _, tok_dir, _ = tokenizer_run
  rs = np.random.RandomState(0)
  records = [{"tokens": rs.randint(0, CODES, (GRID * GRID,)).astype(np.int32),
              "label": np.int32(i % 4), "caption": _caption(i)} for i in range(16)]
  tokens = tmp_path / "tokens"
  tokens.mkdir()
  sources.write_array_record(str(tokens / "tokens-eval-00000.array_record"), records)
  sources.write_array_record(str(tokens / "tokens-train-00000.array_record"), records)
  # Reference statistics of random images (pytorch-fid / ADM keys).
  feats = {"pool": rs.normal(size=(20, 2048)), "spatial": rs.normal(size=(20, 63))}
  ref = str(tmp_path / "ref.npz")
  inception_metrics.save_stats(ref, inception_metrics.stats_from_features(feats))
  overrides = {**_common(), **_eval_overrides(weights, num_images=10, reference=ref),
               "tokenizer_workdir": tok_dir,
               "data.source": f"array_record:{tokens}/tokens-{{split}}-*.array_record",
               "data.image_size": IMAGE, "model.grid_size": GRID, "model.codebook_size": CODES,
               "model.emb_dim": 32, "model.mlp_dim": 64, "model.num_heads": 2}
  if family == "vim":
    config = config_lib.override(vim_config.get_config("tiny"), **overrides,
                                 **{"model.num_layers": 1, "model.num_classes": 4})
  else:
    spm = text.train_sentencepiece([_caption(i) for i in range(300)], str(tmp_path / "spm"), 256)
    config = config_lib.override(parti_config.get_config("tiny"), **overrides, **{
        "model.encoder_layers": 1, "model.decoder_layers": 1, "model.max_text_length": 24,
        "data.text_tokenizer": spm["model"]})
  config_lib.validate(config, jax.device_count())
  mesh = parallel.create_mesh(config.mesh)
  rules = parallel.rules_from_config(config.mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    task = tasks.build(config, mesh)
    state, _ = loop.create_sharded_state(task, mesh, rules, jax.random.key(0))
    metrics = generative.fid_metrics(config, state, mesh, task)
  assert metrics["fid_num_images"] == 10
  assert np.isfinite(metrics["fid"]) and metrics["fid"] > 0
  assert np.isfinite(metrics["sfid"]) and metrics["inception_score"] >= 1.0
  assert "precision" not in metrics  # The reference holds statistics only.
  ref_stats = inception_metrics.load_stats(ref)
  np.testing.assert_allclose(fast_frechet[0][1], ref_stats["mu"])  # Samples vs the reference.
  np.testing.assert_allclose(fast_frechet[1][1], ref_stats["mu_s"])


def test_config_checks_for_the_eval_section(weights, tmp_path):
  config = _tokenizer_config(str(tmp_path / "missing.npz"))
  with pytest.raises(ValueError, match="eval.inception_weights=.*does not exist"):
    config_lib.validate(config, 8)
  config = config_lib.override(_tokenizer_config(weights), **{"eval.inception_size": 64})
  with pytest.raises(ValueError, match="eval.inception_size=64 must be >= 75"):
    config_lib.validate(config, 8)
  vim = config_lib.override(vim_config.get_config("tiny"), **{
      "eval.inception_weights": weights, "data.source": "shapes"})
  with pytest.raises(ValueError, match="eval.fid_reference is empty"):
    config_lib.validate(vim, 8)
  # Off by default: the configs validate without weights.
  config_lib.validate(config_lib.override(vim_config.get_config("tiny"),
                                          **{"data.source": "shapes"}), 8)
