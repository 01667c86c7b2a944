"""The demo's scoring: adherence of true renders vs the same images on shuffled prompts."""
import numpy as np

from vimjax import benchmark  # pylint: disable=unused-import
from vimjax import convert_inception  # pylint: disable=unused-import
from vimjax import convert_weights  # pylint: disable=unused-import
from vimjax import demo
from vimjax import evaluate  # pylint: disable=unused-import
from vimjax import fid  # pylint: disable=unused-import
from vimjax import encoding  # pylint: disable=unused-import
from vimjax import summary  # pylint: disable=unused-import
from vimjax.configs import parti as parti_configs
from vimjax.configs import vim as vim_configs
from vimjax.data import shapes
from vimjax.data import vocab  # pylint: disable=unused-import
import pytest

pytestmark = pytest.mark.slow


def test_binaries_import_together_without_flag_clashes():
  # Flags of programs are defined under __main__ only (demo imports several).
  assert demo.run and summary and encoding and vocab and benchmark
  assert fid.images_metrics and convert_inception.convert_state_dict and evaluate.main
  assert convert_weights.convert_state_dicts


def test_held_out_prompts_are_distinct_validation_captions():
  prompts = demo.held_out_prompts(8)
  assert len(set(prompts)) == 8
  validation = {str(shapes.ShapesSource("validation", 32, 80)[i]["caption"]) for i in range(80)}
  assert set(prompts) <= validation


def test_true_renders_adhere_and_shuffled_prompts_do_not():
  prompts = demo.held_out_prompts(16)
  scenes = [shapes.parse_caption(p) for p in prompts]
  images = np.stack([shapes.render_scene(s, 32) for s in scenes])
  scores = demo.prompt_scores(images, scenes)
  assert scores["prompt_adherence"] >= 0.9 and scores["shape_recall"] >= 0.9
  assert scores["shuffled_adherence"] <= 0.25 and scores["shuffled_shape_recall"] <= 0.5


def test_shape_recall_gives_partial_credit_by_hand():
  scene = shapes.parse_caption("a red circle at the top and a green square at the bottom")
  full = shapes.render_scene(scene, 32)
  one = shapes.render_scene(shapes.parse_caption("a red circle at the top"), 32)
  extra = shapes.render_scene(
      shapes.parse_caption("a red circle at the top, a green square at the bottom "
                           "and a blue circle at the left"), 32)
  wrong_colour = shapes.render_scene(
      shapes.parse_caption("a blue circle at the top and a green square at the bottom"), 32)
  images = np.stack([full, one, extra, wrong_colour, np.zeros_like(full)])
  stacked = shapes.stack_scenes([scene] * 5)
  np.testing.assert_allclose(shapes.shape_recall(images, stacked), [1, 0.5, 1, 0.5, 0])
  # All-or-nothing adherence: the extra shape and the missing one both fail.
  np.testing.assert_allclose(shapes.adherence(images, stacked, check_kind=False), [1, 0, 0, 0, 0])


def test_shuffled_class_accuracy_uses_a_derangement():
  source = shapes.ShapesSource("validation", 32, 64)
  images = np.stack([np.asarray(source[i]["image"]) for i in range(64)])
  labels = shapes.classify_images(images)
  assert np.mean(labels == np.asarray([source[i]["label"] for i in range(64)])) >= 0.9
  assert demo.shuffled_class_accuracy(images, labels) < 0.5


def _stub_stages(monkeypatch):
  """Replaces every stage of demo.run by a recorder: (trained seeds, sampler calls)."""
  trained, sampled = [], []
  metrics = dict(psnr=0.0, ssim=0.0, codebook_usage=0.0, perplexity=0.0, bits_per_token=0.0,
                 image_to_text=0.0, text_to_image=0.0, chance=0.0)
  monkeypatch.setattr(demo.loop, "train_and_evaluate",
                      lambda config, workdir: trained.append(config.seed) or {})
  monkeypatch.setattr(demo.loop, "evaluate_workdir", lambda config, workdir: dict(metrics))
  monkeypatch.setattr(demo, "reconstruction_scores", lambda workdir: {})
  monkeypatch.setattr(demo.encoding, "run", lambda *args, **kwargs: None)
  monkeypatch.setattr(demo.vocab, "run", lambda *args, **kwargs: {"model": "spm.model"})

  def sample(config, workdir, **kwargs):
    sampled.append(kwargs)
    conditions = kwargs.get("prompts") or kwargs.get("class_ids")
    return {"images": np.zeros((kwargs["num_samples"] * len(conditions), 32, 32, 3)),
            "candidate_prompt_adherence": 0.0, "oracle_prompt_adherence": 0.0,
            "class_accuracy": 0.0}

  monkeypatch.setattr(demo.generate, "sample_from_workdir", sample)
  monkeypatch.setattr(demo.generate, "write_outputs", lambda result, out: None)
  return trained, sampled


@pytest.mark.parametrize("seed, expected", [(3, 3), (None, 0)])
def test_seed_reaches_every_stage(monkeypatch, tmp_path, seed, expected):
  """--seed seeds the tokenizer, Parti, the reranker and the sampler; unset, the configs' 0."""
  trained, sampled = _stub_stages(monkeypatch)
  demo.run(str(tmp_path), seed=seed)
  assert trained == [expected] * 3  # Tokenizer, Parti, reranker.
  assert [call["seed"] for call in sampled] == [expected]


@pytest.mark.parametrize("stage2, kwargs, conditions, per_condition", [
    ("parti", {}, 16, 2),
    ("vim", {}, 18, 4),  # Every class of the tiny VIM, 4 samples each.
    ("vim", dict(num_prompts=5, samples_per_prompt=3), 5, 3),
])
def test_sample_counts(monkeypatch, tmp_path, stage2, kwargs, conditions, per_condition):
  """Defaults: 16 Parti prompts x 2; every VIM class x 4 (32 samples left VIM's class
  accuracy at the mercy of float rounding); explicit counts win."""
  _, sampled = _stub_stages(monkeypatch)
  config = (vim_configs if stage2 == "vim" else parti_configs).get_config("tiny")
  demo.run(str(tmp_path), config, **kwargs)
  (call,) = sampled
  ids = call.get("prompts") or call.get("class_ids")
  assert len(ids) == conditions and call["num_samples"] == per_condition
  if stage2 == "vim":
    assert list(ids) == [i % 18 for i in range(conditions)]


@pytest.mark.parametrize("kwargs", [dict(num_prompts=-1), dict(samples_per_prompt=-2)])
def test_negative_sample_counts_are_refused_before_training(monkeypatch, tmp_path, kwargs):
  trained, _ = _stub_stages(monkeypatch)
  with pytest.raises(ValueError, match="valid: >= 0"):
    demo.run(str(tmp_path), **kwargs)
  assert not trained
