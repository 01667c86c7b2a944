"""The sample binary end to end: tiny tokenizer + VIM / Parti trained by the real loop, then
sampled, decoded and written (PNG grid, tokens .npy, JSON line); cached == uncached tokens."""
import glob
import json
import os
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image
import pytest

from vimjax.configs import contrastive as contrastive_config
from vimjax.configs import parti as parti_config
from vimjax.configs import vim as vim_config
from vimjax import checkpoint
from vimjax import config_lib
from vimjax import parallel
from vimjax import generate
from vimjax.data import shapes
from vimjax.data import sources
from vimjax.data import text
from vimjax.models import dual_encoder
from vimjax.train import loop
from vimjax import tasks

pytestmark = pytest.mark.slow

IMAGE, PATCH, CODES = 16, 4, 64
GRID = IMAGE // PATCH
TEXT_LEN = 24
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red circle at the center", "a small blue square at the top left and "
           "a green triangle at the bottom right"]


def _set(config, **overrides):
  return config_lib.override(config, **overrides)


def _common(total_steps=2):
  return {"total_steps": total_steps, "global_batch_size": 8, "log_every_steps": total_steps,
          "checkpoint_every_steps": total_steps, "eval_every_steps": total_steps,
          "num_eval_images": 8, "peak_flops_per_device": 1e11, "data.num_train_examples": 16,
          "data.num_eval_examples": 8}


def _caption(i: int) -> str:
  return shapes.caption_from_scene(shapes.sample_scene("train", i))


@pytest.fixture(scope="module")
def workdirs(tiny_tokenizer, tmp_path_factory):
  """Trains (2 steps each) a class-conditional VIM and a Parti on the session's tiny
  tokenizer (conftest: 16 px, 4x4 grid, 64 codes)."""
  root = tmp_path_factory.mktemp("sample")
  tok_dir = tiny_tokenizer

  rs = np.random.RandomState(0)
  records = lambda n, offset: [  # pylint: disable=g-long-lambda
      {"tokens": rs.randint(0, CODES, (GRID * GRID,)).astype(np.int32),
       "label": np.int32(shapes.scene_label(shapes.sample_scene("train", i))),
       "caption": _caption(i)} for i in range(offset, offset + n)]
  tokens = root / "tokens"
  tokens.mkdir()
  sources.write_array_record(str(tokens / "tokens-train-00000.array_record"), records(16, 0))
  sources.write_array_record(str(tokens / "tokens-eval-00000.array_record"), records(8, 100))
  spm = text.train_sentencepiece([_caption(i) for i in range(300)], str(root / "spm"), 256)

  stage2 = {**_common(), "tokenizer_workdir": tok_dir,
            "data.source": f"array_record:{tokens}/tokens-{{split}}-*.array_record",
            "data.image_size": IMAGE, "model.grid_size": GRID, "model.codebook_size": CODES,
            "model.emb_dim": 32, "model.mlp_dim": 64, "model.num_heads": 2}
  vim = _set(vim_config.get_config("tiny"), **stage2, **{"model.num_layers": 1})
  parti = _set(parti_config.get_config("tiny"), **stage2, **{
      "model.encoder_layers": 1, "model.decoder_layers": 1, "model.max_text_length": TEXT_LEN,
      "data.text_tokenizer": spm["model"]})
  dirs = {"root": root, "tokenizer": tok_dir, "stage2": stage2, "spm": spm["model"]}
  for name, config in (("vim", vim), ("parti", parti)):
    dirs[name] = str(root / name)
    loop.train_and_evaluate(config, dirs[name])
  return dirs


def _sample(workdir, **kwargs):
  return generate.sample_from_workdir(checkpoint.load_workdir_config(workdir), workdir, **kwargs)


def test_parti_cached_equals_uncached_and_outputs(workdirs, tmp_path):
  kwargs = dict(prompts=PROMPTS, num_samples=3, seed=7, temperature=1.0, top_k=0, top_p=1.0,
                cfg_scale=1.5)
  cached = _sample(workdirs["parti"], use_cache=True, **kwargs)
  uncached = _sample(workdirs["parti"], use_cache=False, **kwargs)
  np.testing.assert_array_equal(cached["tokens"], uncached["tokens"])
  assert cached["tokens"].shape == (6, GRID * GRID) and cached["tokens"].dtype == np.int32
  assert cached["tokens"].min() >= 0 and cached["tokens"].max() < CODES
  assert cached["images"].shape == (6, IMAGE, IMAGE, 3)
  assert 0.0 <= cached["images"].min() and cached["images"].max() <= 1.0
  assert cached["captions"] == [PROMPTS[0]] * 3 + [PROMPTS[1]] * 3
  assert 0.0 <= cached["prompt_adherence"] <= 1.0  # Both prompts are in the grammar.
  # Another seed draws other tokens (the seed is honoured).
  other = _sample(workdirs["parti"], use_cache=True, **{**kwargs, "seed": 8})
  assert not np.array_equal(other["tokens"], cached["tokens"])

  out = str(tmp_path / "grid.png")
  summary = generate.write_outputs(cached, out)
  assert summary["out"] == out and summary["tokens"] == str(tmp_path / "grid_tokens.npy")
  np.testing.assert_array_equal(np.load(summary["tokens"]), cached["tokens"])
  png = np.asarray(Image.open(out))
  # 2 rows x 3 columns of 8x-upscaled 16 px tiles (128 px) plus captions and padding.
  assert png.shape[1] == 2 + 3 * (128 + 2) and png.shape[0] > 2 + 2 * (128 + 2)
  json.dumps(summary)  # The JSON line is serialisable.


def test_vim_batches_and_class_captions(workdirs):
  kwargs = dict(class_ids=[0, 7], num_samples=5, seed=3, temperature=1.0, top_k=8)
  whole = _sample(workdirs["vim"], **kwargs)
  # 10 images in calls of 2 -> rounded up to the 8-way data parallelism: 2 calls, padded.
  batched = _sample(workdirs["vim"], batch_size=2, **kwargs)
  assert whole["tokens"].shape == batched["tokens"].shape == (10, GRID * GRID)
  np.testing.assert_array_equal(batched["tokens"][:8], whole["tokens"][:8])  # Call 0 = seed's.
  assert whole["captions"] == [shapes.class_name(0)] * 5 + [shapes.class_name(7)] * 5
  assert 0.0 <= whole["class_accuracy"] <= 1.0
  uncached = _sample(workdirs["vim"], use_cache=False, **kwargs)
  np.testing.assert_array_equal(whole["tokens"], uncached["tokens"])


def test_bad_requests_fail_with_one_line_errors(workdirs, tmp_path):
  with pytest.raises(ValueError, match="Parti needs prompts"):
    _sample(workdirs["parti"])
  with pytest.raises(ValueError, match=r"--class_id=18 out of range; valid: 0..17"):
    _sample(workdirs["vim"], class_ids=[18])
  with pytest.raises(ValueError, match="class-conditional"):
    _sample(workdirs["vim"])
  with pytest.raises(ValueError, match="has no config.json"):
    checkpoint.load_workdir_config(str(tmp_path / "missing"))
  config = checkpoint.load_workdir_config(workdirs["vim"])
  config.tokenizer_workdir = str(tmp_path / "nope")
  with pytest.raises(ValueError, match="tokenizer_workdir=.*does not exist"):
    generate.sample_from_workdir(config, workdirs["vim"], class_ids=[0])
  with pytest.raises(ValueError, match="needs a model that samples image tokens"):
    _sample(workdirs["tokenizer"])
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("a red circle at the top\n\n  a blue square at the left \n")
  assert generate.read_prompts(["x"], str(prompts)) == [
      "x", "a red circle at the top", "a blue square at the left"]


def test_binary_writes_png_tokens_and_json(workdirs, tmp_path):
  out = tmp_path / "cli.png"
  prompts = tmp_path / "prompts.txt"
  prompts.write_text("\n".join(PROMPTS) + "\n")
  cmd = [sys.executable, "-m", "vimjax.sample", f"--workdir={workdirs['parti']}",
         f"--prompts_file={prompts}", "--num_samples=2", "--seed=1", f"--out={out}",
         "--config.sampling.top_k=4"]
  proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["out"] == str(out) and os.path.exists(out)
  assert result["num_images"] == 4 and result["top_k"] == 4
  assert np.load(result["tokens"]).shape == (4, GRID * GRID)
  assert result["sec_per_image"] > 0 and 0.0 <= result["prompt_adherence"] <= 1.0

  bad = subprocess.run(cmd[:4] + [f"--out={out}"], cwd=REPO, capture_output=True, text=True,
                       timeout=300)
  assert bad.returncode != 0
  assert bad.stderr.strip().splitlines()[-1].startswith("error: Parti needs prompts")


def test_rerank_keeps_the_best_scoring_candidate(workdirs):
  """The kept sample per prompt is the candidate the dual encoder scores highest, among the
  same candidates (same seed and model) that sampling without reranking draws."""
  stage2 = {k: v for k, v in workdirs["stage2"].items()
            if not k.startswith("model.") or k in ("model.grid_size", "model.codebook_size")}
  clip = _set(contrastive_config.get_config("tiny"), **stage2, **{
      "model.image_layers": 1, "model.text_layers": 1,
      "model.emb_dim": 32, "model.mlp_dim": 64, "model.num_heads": 2, "model.out_dim": 16,
      "model.max_text_length": TEXT_LEN, "data.text_tokenizer": workdirs["spm"]})
  clip_dir = str(workdirs["root"] / "contrastive")
  loop.train_and_evaluate(clip, clip_dir)

  kwargs = dict(prompts=PROMPTS, seed=5, temperature=1.0, top_k=0)
  plain = _sample(workdirs["parti"], num_samples=4, **kwargs)
  kept = _sample(workdirs["parti"], num_samples=1, rerank_workdir=clip_dir, num_candidates=4,
                 **kwargs)
  # Independent scores of the 8 candidates with the restored reranker.
  model = tasks.TASKS["contrastive"].build_model(clip)
  mesh = parallel.create_mesh(clip.mesh)
  rules = parallel.rules_from_config(clip.mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    params, _ = generate.load_stage2_params(clip, clip_dir, mesh, rules)
    ids = text.TextTokenizer(workdirs["spm"], TEXT_LEN).encode(
        [p for p in PROMPTS for _ in range(4)])[0]
    scores = np.asarray(dual_encoder.similarity(model, params, jnp.asarray(plain["tokens"]),
                                                jnp.asarray(ids)))
  best = scores.reshape(2, 4).argmax(1) + np.array([0, 4])
  np.testing.assert_array_equal(kept["tokens"], plain["tokens"][best])
  np.testing.assert_allclose(kept["rerank_scores"], scores[best], rtol=1e-4)
  assert kept["num_images"] == 2 and kept["captions"] == PROMPTS
  assert kept["candidate_prompt_adherence"] == pytest.approx(plain["prompt_adherence"])
  assert kept["oracle_prompt_adherence"] >= kept["prompt_adherence"]

  with pytest.raises(ValueError, match=r"--num_candidates=1 must be >= --num_samples=2"):
    _sample(workdirs["parti"], num_samples=2, rerank_workdir=clip_dir, num_candidates=1,
            **kwargs)
  with pytest.raises(ValueError, match="--num_candidates=4 needs --rerank_workdir"):
    _sample(workdirs["parti"], num_candidates=4, **kwargs)
  with pytest.raises(ValueError, match="Parti only"):
    _sample(workdirs["vim"], class_ids=[0], rerank_workdir=clip_dir, num_candidates=2)
  with pytest.raises(ValueError, match="it must be a 'contrastive' run"):
    _sample(workdirs["parti"], num_samples=1, rerank_workdir=workdirs["parti"],
            num_candidates=2, **kwargs)


def test_training_writes_sample_grids_and_hparams(workdirs):
  """Stage 2 can be watched: each eval step writes a captioned sample grid (fixed
  conditions and seed) as PNG and to TensorBoard, next to the config as hparams."""
  from tensorboard.backend.event_processing import event_file_loader  # pylint: disable=g-import-not-at-top
  step = workdirs["stage2"]["total_steps"]
  for name in ("vim", "parti"):
    png = os.path.join(workdirs[name], f"samples_{step}.png")
    with Image.open(png) as image:  # 8 samples in 4 columns, captioned, upscaled x8.
      assert image.width >= 4 * IMAGE * 8 and image.height >= 2 * IMAGE * 8
    tags = set()
    for path in glob.glob(os.path.join(workdirs[name], "tb", "events.out.tfevents.*")):
      for event in event_file_loader.EventFileLoader(path).Load():
        tags |= {(v.tag, v.metadata.plugin_data.plugin_name) for v in event.summary.value}
    assert ("eval/samples", "images") in tags, (name, tags)
    assert ("_hparams_/session_start_info", "hparams") in tags, (name, tags)


def test_no_sample_grids_when_the_tokenizer_cannot_decode(workdirs, caplog):
  from vimjax.evaluation import sample_grid  # pylint: disable=g-import-not-at-top
  config = _set(vim_config.get_config("tiny"), **{**workdirs["stage2"], "model.num_layers": 1,
                                                 "model.grid_size": GRID * 2})
  mesh = parallel.create_mesh(config.mesh)
  caplog.set_level("WARNING")
  assert sample_grid.make_sampler(config, mesh) is None
  assert f"its tokens are {GRID}x{GRID} of {CODES} codes" in caplog.text
  assert sample_grid.make_sampler(_set(config, **{"tokenizer_workdir": ""}), mesh) is None
