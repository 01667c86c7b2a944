"""The demo's scoring: adherence of true renders vs the same images on shuffled prompts."""
import numpy as np

from vimjax import demo
from vimjax.data import shapes


def test_held_out_prompts_are_distinct_validation_captions():
  prompts = demo.held_out_prompts(8)
  assert len(set(prompts)) == 8
  validation = {str(shapes.ShapesSource("validation", 32, 80)[i]["caption"]) for i in range(80)}
  assert set(prompts) <= validation


def test_true_renders_adhere_and_shuffled_prompts_do_not():
  prompts = demo.held_out_prompts(16)
  scenes = [shapes.parse_caption(p) for p in prompts]
  images = np.stack([shapes.render_scene(s, 32) for s in scenes])
  adherence = shapes.adherence(images, demo.stack_scenes(scenes))
  assert adherence.shape == (16,) and np.mean(adherence) >= 0.9
  assert demo.shuffled_adherence(images, scenes) <= 0.25


def test_shuffled_class_accuracy_uses_a_derangement():
  source = shapes.ShapesSource("validation", 32, 64)
  images = np.stack([np.asarray(source[i]["image"]) for i in range(64)])
  labels = shapes.classify_images(images)
  assert np.mean(labels == np.asarray([source[i]["label"] for i in range(64)])) >= 0.9
  assert demo.shuffled_class_accuracy(images, labels) < 0.5
