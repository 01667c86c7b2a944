"""reconstruction_accuracy: the shapes checker on a tokenizer's reconstructions."""
import jax
import numpy as np
import pytest

from vimjax.configs import vitvqgan
from vimjax.data import shapes
from vimjax.evaluation import reconstruction
from vimjax.tasks import tokenizer as tokenizer_task


@pytest.fixture(scope="module")
def held_out():
  return reconstruction.held_out_shapes(32, 48)


def test_held_out_images_are_the_validation_split(held_out):
  images, scenes = held_out
  source = shapes.ShapesSource("validation", 32, 48)
  np.testing.assert_array_equal(images[5], source[5]["image"])
  np.testing.assert_array_equal(scenes["position"][5], source[5]["position"])
  assert images.shape == (48, 32, 32, 3) and scenes["num_shapes"].shape == (48,)


def test_perfect_reconstructions_score_the_ceiling(held_out):
  images, scenes = held_out
  scores = reconstruction.shapes_scores(images, images.astype(np.float32) / 255.0, scenes)
  assert scores["reconstruction_accuracy_ceiling"] >= 0.95
  assert scores["reconstruction_accuracy"] == scores["reconstruction_accuracy_ceiling"]


def test_noise_and_blank_reconstructions_score_about_zero(held_out):
  images, scenes = held_out
  noise = np.random.default_rng(0).uniform(size=images.shape).astype(np.float32)
  for fake in (noise, np.zeros_like(noise)):
    scores = reconstruction.shapes_scores(images, fake, scenes)
    assert scores["reconstruction_accuracy"] <= 0.05
    assert scores["reconstruction_color_accuracy"] <= 0.05


def test_a_wrong_kind_fails_only_the_kind_checked_score():
  scene = shapes.parse_caption("a red circle at the top left and a blue square at the center")
  wrong = dict(scene, shape_kind=scene["shape_kind"].copy())
  wrong["shape_kind"][0] = shapes.KINDS.index("triangle")  # Red triangle, same place.
  originals = np.stack([shapes.render_scene(scene, 32)] * 2)
  recons = np.stack([originals[0], shapes.render_scene(wrong, 32)])
  scores = reconstruction.shapes_scores(originals, recons, shapes.stack_scenes([scene] * 2))
  assert scores == {"reconstruction_accuracy": 0.5, "reconstruction_accuracy_ceiling": 1.0,
                    "reconstruction_color_accuracy": 1.0}


def test_shape_mismatch_is_a_clear_error(held_out):
  images, scenes = held_out
  with pytest.raises(ValueError, match="same shape"):
    reconstruction.shapes_scores(images, images[:4], scenes)


def test_reconstruct_pads_the_last_batch_without_changing_rows(held_out):
  images, _ = held_out
  config = vitvqgan.get_config("tiny")
  model = tokenizer_task.build_model(config)
  params = model.init(jax.random.key(0), np.zeros((1, 32, 32, 3), np.float32),
                      train=False)["params"]
  five = reconstruction.reconstruct(model, params, images[:5], batch_size=4)  # 4 + 1 padded.
  whole = reconstruction.reconstruct(model, params, images[:8], batch_size=8)
  assert five.shape == (5, 32, 32, 3) and five.dtype == np.float32
  assert 0.0 <= five.min() and five.max() <= 1.0
  np.testing.assert_allclose(five, whole[:5], atol=1e-5)
