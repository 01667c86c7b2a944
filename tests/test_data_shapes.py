"""Tests for the embedded shapes dataset, its caption grammar and its checker."""
import grain
import numpy as np
import pytest

from vimjax.data import shapes


def _stack(examples):
  keys = shapes.SCENE_KEYS + ("num_shapes", "label")
  images = np.stack([e["image"] for e in examples])
  return images, {k: np.stack([e[k] for e in examples]) for k in keys}


def _blur(images, sigma):
  """Gaussian blur of [n, h, w, 3] (a perturbation, not a reference)."""
  r = int(np.ceil(3 * sigma))
  t = np.arange(-r, r + 1, dtype=np.float64)
  k = np.exp(-t**2 / (2 * sigma**2))
  k /= k.sum()
  x = np.pad(images.astype(np.float64), ((0, 0), (r, r), (r, r), (0, 0)), mode="edge")
  h, w = images.shape[1:3]
  x = sum(k[i] * x[:, i:i + h] for i in range(2 * r + 1))
  return sum(k[j] * x[:, :, j:j + w] for j in range(2 * r + 1))


@pytest.fixture(scope="module")
def val32():
  src = shapes.ShapesSource("validation", 32, 300)
  return _stack([src[i] for i in range(len(src))])


def test_example_fields_and_determinism():
  a, b = shapes.ShapesSource("train", 32, 50), shapes.ShapesSource("train", 32, 50)
  for i in (0, 7, 49):
    ex = a[i]
    assert ex["image"].dtype == np.uint8 and ex["image"].shape == (32, 32, 3)
    assert ex["label"].dtype == np.int32 and ex["label"].shape == ()
    n = int(ex["num_shapes"])
    assert 1 <= n <= shapes.MAX_SHAPES
    for key in shapes.SCENE_KEYS:
      assert ex[key].dtype == np.int32 and ex[key].shape == (3,)
      assert (ex[key][n:] == -1).all() and (ex[key][:n] >= 0).all()
    assert list(ex["position"][:n]) == sorted(set(ex["position"][:n]))  # Reading order.
    assert ex["label"] == ex["shape_kind"][0] * len(shapes.COLORS) + ex["color"][0]
    again = b[i]
    np.testing.assert_array_equal(ex["image"], again["image"])
    assert ex["caption"] == again["caption"]
  # Same scene at another resolution.
  big = shapes.ShapesSource("train", 64, 50)[7]
  assert big["caption"] == a[7]["caption"] and big["image"].shape == (64, 64, 3)


def test_splits_differ():
  train, val = shapes.ShapesSource("train", 32, 100), shapes.ShapesSource("validation", 32, 100)
  same = sum(train[i]["caption"] == val[i]["caption"] for i in range(100))
  assert same < 10
  assert len({train[i]["caption"] for i in range(100)}) > 90


def test_source_errors_and_grain():
  with pytest.raises(ValueError, match="test"):
    shapes.ShapesSource("test", 32, 10)
  src = shapes.ShapesSource("train", 32, 10)
  with pytest.raises(IndexError):
    src[10]
  ds = grain.MapDataset.source(src)
  assert len(ds) == 10 and ds[3]["caption"] == src[3]["caption"]


def test_rendered_areas_match_geometry():
  # Large shapes at 96 px: half extent h = 0.85 * 32 / 2 = 13.6 px. The 4x4
  # supersampling quantises edges to 1/4 px, hence the 2.5% tolerance.
  h = 0.85 * 32 / 2
  expected = {"circle": np.pi * h**2, "square": (2 * h) ** 2, "triangle": 2 * h**2}
  for kind, area in expected.items():
    scene = shapes.parse_caption(f"a blue {kind} at the center")
    image = shapes.render_scene(scene, 96)
    assert image[..., :2].max() == 0  # Pure blue, black elsewhere.
    np.testing.assert_allclose(image[..., 2].astype(np.float64).sum() / 255, area, rtol=0.025)
    assert image[48, 48, 2] == 255 and image[0:32, 0:32].max() == 0


def test_caption_round_trip(val32):
  src = shapes.ShapesSource("validation", 32, 200)
  for i in range(200):
    ex = src[i]
    scene = shapes.parse_caption(ex["caption"])
    for key in shapes.SCENE_KEYS + ("num_shapes",):
      np.testing.assert_array_equal(scene[key], ex[key])
    assert shapes.caption_from_scene(scene) == ex["caption"]


def test_parse_caption_grammar():
  scene = shapes.parse_caption(
      "A Red circle at the bottom, a small blue square at the top left "
      "and a green triangle at the top")
  assert int(scene["num_shapes"]) == 3
  assert list(scene["position"]) == [0, 1, 7]  # Sorted into reading order.
  assert list(scene["color"]) == [2, 1, 0] and list(scene["size"]) == [0, 1, 1]
  assert list(scene["shape_kind"]) == [1, 2, 0]
  for bad in ("a purple circle at the top", "a red circle at the top and",
              "a red circle at the top, a blue square at the left",
              "a red circle at the top and a blue square at the top", "hello"):
    with pytest.raises(ValueError, match="Caption"):
      shapes.parse_caption(bad)


def test_class_names():
  assert shapes.NUM_CLASSES == 18
  assert shapes.class_name(0) == "red circle" and shapes.class_name(17) == "cyan triangle"
  with pytest.raises(ValueError, match="18"):
    shapes.class_name(18)


def test_checker_on_ground_truth_and_shuffled(val32):
  images, scenes = val32
  np.testing.assert_array_equal(shapes.adherence(images, scenes, check_size=True), 1.0)
  assert all(shapes.score_image(images[i], {k: v[i] for k, v in scenes.items()}) == 1.0
             for i in range(5))
  perm = np.random.default_rng(0).permutation(len(images))
  shuffled = {k: v[perm] for k, v in scenes.items()}
  assert shapes.adherence(images, shuffled).mean() < 0.05
  assert shapes.adherence(images, shuffled, check_kind=False).mean() < 0.05
  np.testing.assert_array_equal(shapes.classify_images(images), scenes["label"])
  assert [shapes.classify_image(im) for im in images[:3]] == list(scenes["label"][:3])
  # Float images in [0, 1] are read the same as uint8.
  first20 = {k: v[:20] for k, v in scenes.items()}
  np.testing.assert_array_equal(shapes.adherence(images[:20] / 255.0, first20), 1.0)


def test_checker_rejects_wrong_images():
  scene = shapes.parse_caption("a red circle at the top left and a small blue square at the center")
  good = shapes.render_scene(scene, 32)
  assert shapes.score_image(good, scene) == 1.0
  recolored = shapes.render_scene({**scene, "color": np.array([0, 3, -1], np.int32)}, 32)
  assert shapes.score_image(recolored, scene) == 0.0
  other_kind = shapes.render_scene({**scene, "shape_kind": np.array([2, 1, -1], np.int32)}, 32)
  assert shapes.score_image(other_kind, scene) == 0.0
  assert shapes.score_image(other_kind, scene, check_kind=False) == 1.0
  other_size = shapes.render_scene({**scene, "size": np.array([0, 0, -1], np.int32)}, 32)
  assert shapes.score_image(other_size, scene) == 1.0
  assert shapes.score_image(other_size, scene, check_size=True) == 0.0
  missing = shapes.render_scene({**scene, "num_shapes": np.int32(1)}, 32)
  assert shapes.score_image(missing, scene) == 0.0
  extra = shapes.render_scene(shapes.parse_caption(
      "a red circle at the top left, a small blue square at the center "
      "and a green square at the right"), 32)
  assert shapes.score_image(extra, scene) == 0.0
  assert shapes.classify_image(np.zeros((32, 32, 3), np.uint8)) == -1


def test_checker_robust_to_blur_and_noise(val32):
  images, scenes = val32
  rng = np.random.default_rng(1)
  soft = _blur(images / 255.0, sigma=0.8) + rng.normal(0, 0.04, images.shape)
  soft = np.clip(soft, 0, 1)
  assert np.abs(soft - images / 255.0).mean() > 0.02  # The perturbation is real.
  assert shapes.adherence(soft, scenes).mean() >= 0.98
  assert shapes.adherence(soft, scenes, check_size=True).mean() >= 0.98
  assert shapes.adherence(soft, scenes, check_kind=False).mean() == 1.0
  assert (shapes.classify_images(soft) == scenes["label"]).mean() >= 0.98


@pytest.mark.parametrize("size", [64, 256])
def test_other_resolutions(size):
  src = shapes.ShapesSource("train", size, 6)
  images, scenes = _stack([src[i] for i in range(6)])
  assert images.shape == (6, size, size, 3)
  np.testing.assert_array_equal(shapes.adherence(images, scenes), 1.0)
  soft = np.clip(_blur(images[:2] / 255.0, sigma=size / 40), 0, 1)
  np.testing.assert_array_equal(shapes.adherence(soft, {k: v[:2] for k, v in scenes.items()}), 1.0)
