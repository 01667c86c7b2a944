"""Tests for data sources, the grain pipeline and host -> global batches."""
import io
import logging
import os

import grain
import jax
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from PIL import Image
import pytest

from vimjax import parallel
from vimjax.data import pipeline
from vimjax.data import shapes
from vimjax.data import sources


def _config(source="shapes", **overrides):
  cfg = dict(source=source, image_size=32, num_train_examples=24, num_eval_examples=10,
             worker_count=0, prefetch_buffer_size=2)
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def _assert_same_batches(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def _write_image(path, size=(40, 48), color=(255, 0, 0), fmt=None):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new("RGB", size, color).save(path, format=fmt)


@pytest.fixture
def image_folder(tmp_path):
  """4 readable images in classes cat/ dog/ (one nested, one captioned), 1 truncated JPEG."""
  root = tmp_path / "images"
  _write_image(str(root / "dog" / "d1.png"), color=(0, 0, 255))
  _write_image(str(root / "cat" / "c1.jpg"), color=(255, 0, 0))
  _write_image(str(root / "cat" / "sub" / "c2.webp"), color=(0, 255, 0))
  _write_image(str(root / "dog" / "d2.jpeg"), color=(255, 255, 0))
  (root / "cat" / "c1.txt").write_text("a red cat\n")
  buf = io.BytesIO()
  noise = np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)
  Image.fromarray(noise).save(buf, "JPEG")
  (root / "dog" / "broken.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
  (root / "notes.md").write_text("not an image")
  return str(root)


# ---------------------------------------------------------------------------
# Sources.


def test_make_source_errors(tmp_path):
  for spec in ("imagenet", "tfds", "folder:", "shapes:x"):
    with pytest.raises(ValueError, match=r"Unknown data source .*valid forms: shapes, tfds:NAME"):
      sources.make_source(spec, "train", image_size=32)
  with pytest.raises(ValueError, match="not a directory"):
    sources.make_source(f"folder:{tmp_path}/missing", "train", image_size=32)
  (tmp_path / "empty").mkdir()
  with pytest.raises(ValueError, match=f"{tmp_path}/empty.*no images"):
    sources.make_source(f"folder:{tmp_path}/empty", "train", image_size=32)
  with pytest.raises(ValueError, match=r"nothing-\*\.ar.*matches no files"):
    sources.make_source(f"array_record:{tmp_path}/nothing-*.ar", "train", image_size=32)
  with pytest.raises(ValueError, match="shapes has no split 'test'"):
    sources.make_source("shapes", "test", image_size=32)


def test_shapes_source_splits_and_sizes():
  train = sources.make_source("shapes", "train", image_size=32)
  val = sources.make_source("shapes", "eval", image_size=32, num_examples=5)
  assert len(train) == 100_000 and len(val) == 5
  assert val.split == "validation"
  assert val[0]["caption"] == shapes.ShapesSource("validation", 32, 5)[0]["caption"]


def test_folder_source(image_folder):
  src = sources.make_source(f"folder:{image_folder}", "train", image_size=32)
  assert len(src) == 5 and src.classes == ["cat", "dog"]
  by_name = {os.path.basename(src[i]["path"]): src[i] for i in range(len(src))}
  assert set(by_name) == {"c1.jpg", "c2.webp", "d1.png", "d2.jpeg", "broken.jpg"}
  assert by_name["c2.webp"]["label"] == 0 and by_name["d1.png"]["label"] == 1
  assert by_name["c1.jpg"]["caption"] == "a red cat" and by_name["d1.png"]["caption"] == ""
  assert isinstance(by_name["d1.png"]["image"], bytes)
  two = sources.make_source(f"folder:{image_folder}", "train", image_size=32, num_examples=2)
  assert len(two) == 2 and two[1]["path"] == src[1]["path"]


def test_record_encoding_and_array_record(tmp_path):
  record = {"tokens": np.arange(6, dtype=np.int32), "label": np.int32(4),
            "caption": "a small red square at the top", "image": b"\x89PNG..."}
  decoded = sources.decode_record(sources.encode_record(record))
  assert decoded.keys() == record.keys() and decoded["caption"] == record["caption"]
  assert decoded["tokens"].dtype == np.int32 and decoded["image"] == record["image"]
  np.testing.assert_array_equal(decoded["tokens"], record["tokens"])
  with pytest.raises(ValueError, match="dict"):
    sources.decode_record(sources.serialization.msgpack_serialize([1, 2]))

  (tmp_path / "train").mkdir()
  for shard in range(2):
    n = sources.write_array_record(
        str(tmp_path / "train" / f"tok-{shard}.ar"),
        ({"tokens": np.full((4,), 10 * shard + i, np.int32), "label": np.int32(i)}
         for i in range(3)))
    assert n == 3
  src = sources.make_source(f"array_record:{tmp_path}/{{split}}/tok-*.ar", "train", image_size=32)
  assert len(src) == 6
  assert [int(src[i]["tokens"][0]) for i in range(6)] == [0, 1, 2, 10, 11, 12]


def test_tfds_field_mapping(monkeypatch):
  rng = np.random.default_rng(0)
  fake = {
      ("imagenet2012", "validation"): [{"image": b"jpeg", "label": np.int64(7)}],
      ("coco_captions", "val"): [{"image": rng.integers(0, 255, (8, 8, 3), np.uint8),
                                  "captions": {"id": np.array([1, 2]),
                                               "text": np.array([b"two dogs", b"dogs"], object)}}],
  }
  opened = []

  def fake_open(name, split):
    opened.append((name, split))
    return fake[(name, split)]

  monkeypatch.setattr(sources, "_tfds_data_source", fake_open)
  inet = sources.make_source("tfds:imagenet2012", "eval", image_size=32)
  assert inet[0]["label"] == 7 and inet[0]["label"].dtype == np.int32 and inet[0]["caption"] == ""
  coco = sources.make_source("tfds:coco_captions:val", "train", image_size=32)
  # Every caption is kept, one per line (the pipeline draws one per epoch).
  assert coco[0]["caption"] == "two dogs\ndogs" and coco[0]["label"] == -1
  assert sources.split_captions(coco[0]["caption"]) == ["two dogs", "dogs"]
  assert opened == [("imagenet2012", "validation"), ("coco_captions", "val")]


# ---------------------------------------------------------------------------
# Image decoding and cropping.


def test_decode_image_forms():
  gray = np.arange(12, dtype=np.uint8).reshape(3, 4)
  np.testing.assert_array_equal(pipeline.decode_image(gray), np.stack([gray] * 3, -1))
  rgba = np.zeros((3, 4, 4), np.uint8)
  assert pipeline.decode_image(rgba).shape == (3, 4, 3)
  assert pipeline.decode_image(np.full((2, 2, 3), 0.5, np.float32))[0, 0, 0] == 128
  buf = io.BytesIO()
  Image.new("RGBA", (5, 3), (10, 20, 30, 40)).save(buf, "PNG")
  decoded = pipeline.decode_image(buf.getvalue())
  assert decoded.shape == (3, 5, 3) and tuple(decoded[0, 0]) == (10, 20, 30)
  for bad in (b"", b"not an image", buf.getvalue()[:20]):
    with pytest.raises(Exception):
      pipeline.decode_image(bad)


def test_resize_and_crop():
  image = np.zeros((40, 80, 3), np.uint8)
  image[:, :40, 0] = 255  # Left half red, right half blue.
  image[:, 40:, 2] = 255
  out = pipeline.resize_and_crop(image, 20, None)  # -> 20 x 40, center columns 10..30.
  assert out.shape == (20, 20, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out[:, :9], [[[1, 0, 0]] * 9] * 20, atol=1e-6)
  np.testing.assert_allclose(out[:, 11:], [[[0, 0, 1]] * 9] * 20, atol=1e-6)
  lefts = set()
  for seed in range(20):
    crop = pipeline.resize_and_crop(image, 20, np.random.default_rng(seed))
    lefts.add(int(round(crop[0, :, 0].sum())))  # Number of red columns = 20 - left.
  assert len(lefts) > 5 and max(lefts) <= 20 and min(lefts) >= 0


# ---------------------------------------------------------------------------
# The pipeline.


def test_train_batches_cover_an_epoch_and_match_the_source():
  cfg = _config(num_train_examples=16)
  it = pipeline.create_iterator(cfg, split="train", global_batch_size=8, seed=3, train=True)
  b1, b2, b3, b4 = _take(it, 4)
  assert b1["image"].shape == (8, 32, 32, 3) and b1["image"].dtype == np.float32
  for key in ("label", "mask", "num_skipped", "num_shapes"):
    assert b1[key].shape == (8,) and b1[key].dtype == np.int32
  assert b1["color"].shape == (8, 3) and b1["caption"].shape == (8,)
  assert (b1["mask"] == 1).all() and (b1["num_skipped"] == 0).all()
  src = shapes.ShapesSource("train", 32, 16)
  by_caption = {src[i]["caption"]: src[i] for i in range(16)}
  epoch1 = list(b1["caption"]) + list(b2["caption"])
  assert sorted(epoch1) == sorted(by_caption)  # One epoch = a permutation.
  assert epoch1 != [src[i]["caption"] for i in range(16)]  # Shuffled...
  assert epoch1 != list(b3["caption"]) + list(b4["caption"])  # ...differently per epoch.
  for row in range(8):
    ex = by_caption[b1["caption"][row]]
    np.testing.assert_allclose(b1["image"][row], ex["image"] / 255.0, atol=1e-6)
    assert b1["label"][row] == ex["label"]
    np.testing.assert_array_equal(b1["position"][row], ex["position"])
  other = pipeline.create_iterator(cfg, split="train", global_batch_size=8, seed=4, train=True)
  assert list(next(other)["caption"]) != list(b1["caption"])
  it.close()
  other.close()


def test_eval_pads_with_mask_and_shards_by_process(monkeypatch):
  cfg = _config(num_eval_examples=10)
  seen = []
  for index in range(2):  # Pretend to be each of 2 processes.
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda i=index: i)
    batches = list(pipeline.create_iterator(cfg, split="eval", global_batch_size=8, seed=0,
                                            train=False))
    assert len(batches) == 2 and all(b["image"].shape[0] == 4 for b in batches)
    seen.extend(c for b in batches for c, m in zip(b["caption"], b["mask"]) if m)
  val = shapes.ShapesSource("validation", 32, 10)
  assert sorted(seen) == sorted(val[i]["caption"] for i in range(10))  # Each example once.
  monkeypatch.setattr(jax, "process_count", lambda: 3)
  with pytest.raises(ValueError, match=r"global_batch_size=8 .*processes \(3\)"):
    pipeline.create_iterator(cfg, split="eval", global_batch_size=8, seed=0, train=False)


def test_train_shards_are_disjoint(monkeypatch):
  cfg = _config(num_train_examples=16)
  captions = []
  for index in range(2):
    monkeypatch.setattr(jax, "process_count", lambda: 2)
    monkeypatch.setattr(jax, "process_index", lambda i=index: i)
    it = pipeline.create_iterator(cfg, split="train", global_batch_size=8, seed=0, train=True)
    captions.append([c for b in _take(it, 2) for c in b["caption"]])
    it.close()
  assert sorted(captions[0] + captions[1]) == sorted(
      shapes.ShapesSource("train", 32, 16)[i]["caption"] for i in range(16))


def test_resume_from_state_reproduces_batches():
  cfg = _config()
  it = pipeline.create_iterator(cfg, split="train", global_batch_size=4, seed=1, train=True)
  _take(it, 3)
  state = it.get_state()
  expected = _take(it, 4)
  it.close()
  resumed = pipeline.create_iterator(cfg, split="train", global_batch_size=4, seed=1, train=True)
  resumed.set_state(state)
  _assert_same_batches(_take(resumed, 4), expected)
  resumed.close()


def test_orbax_checkpoint_of_the_iterator(tmp_path):
  cfg = _config()
  it = pipeline.create_iterator(cfg, split="train", global_batch_size=4, seed=2, train=True)
  _take(it, 2)
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
    mngr.save(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
    mngr.wait_until_finished()
  expected = _take(it, 3)
  it.close()
  fresh = pipeline.create_iterator(cfg, split="train", global_batch_size=4, seed=2, train=True)
  with ocp.CheckpointManager(str(tmp_path / "ckpt")) as mngr:
    assert mngr.latest_step() == 7
    mngr.restore(7, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(fresh)))
  _assert_same_batches(_take(fresh, 3), expected)
  fresh.close()


def test_corrupt_image_is_skipped_and_counted(image_folder, caplog):
  cfg = _config(f"folder:{image_folder}", num_train_examples=0, num_eval_examples=0)
  with caplog.at_level(logging.WARNING):
    it = pipeline.create_iterator(cfg, split="train", global_batch_size=2, seed=0, train=True)
    batches = _take(it, 4)  # 8 rows = 2 epochs of the 4 readable images.
    it.close()
  assert sum(int(b["num_skipped"].sum()) for b in batches) == 2  # Once per epoch.
  assert all(b["image"].shape == (2, 32, 32, 3) for b in batches)
  assert all((b["mask"] == 1).all() for b in batches)
  assert any("broken.jpg" in r.getMessage() for r in caplog.records)

  # Resizing: 40x48 images become 32x32 of their solid colour.
  expected = np.array([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)])
  found = set()
  for b in batches:
    for pixel in b["image"][:, 16, 16] * 255:  # JPEG/WebP are lossy: nearest colour.
      distance = np.abs(expected - pixel).max(axis=1)
      assert distance.min() <= 4
      found.add(int(distance.argmin()))
  assert found == {0, 1, 2, 3}

  # Eval keeps the row (mask 0, counted once) so every process runs the same steps.
  ev = list(pipeline.create_iterator(cfg, split="eval", global_batch_size=4, seed=0, train=False))
  assert len(ev) == 2
  mask = np.concatenate([b["mask"] for b in ev])
  skipped = np.concatenate([b["num_skipped"] for b in ev])
  assert mask.sum() == 4 and skipped.sum() == 1 and mask[skipped == 1].sum() == 0


def test_worker_process_skip_counts_and_resume(image_folder):
  # One test, since each worker process takes seconds to start.
  cfg = _config(f"folder:{image_folder}", num_train_examples=0, worker_count=1)
  it = pipeline.create_iterator(cfg, split="train", global_batch_size=2, seed=5, train=True)
  first = _take(it, 2)
  state = it.get_state()
  rest = _take(it, 4)
  # Exact count: broken examples met in the shuffled stream before the 12th good one.
  names = [os.path.basename(f) for f in sources.FolderSource(image_folder).files]
  broken = names.index("broken.jpg")
  stream = grain.MapDataset.range(5).shuffle(5).repeat()
  good, expected_skips, i = 0, 0, 0
  while good < 12:
    if stream[i] == broken:
      expected_skips += 1
    else:
      good += 1
    i += 1
  assert sum(int(b["num_skipped"].sum()) for b in first + rest) == expected_skips
  # Same batches as in-process loading.
  in_process = pipeline.create_iterator(_config(f"folder:{image_folder}", num_train_examples=0),
                                        split="train", global_batch_size=2, seed=5, train=True)
  _assert_same_batches(_take(in_process, 6), first + rest)
  in_process.close()
  # Restoring the state replays the same batches (and counts).
  it.set_state(state)
  _assert_same_batches(_take(it, 4), rest)
  it.close()


def test_tokens_source_without_images_and_extra_transforms(tmp_path):
  path = str(tmp_path / "tokens.ar")
  sources.write_array_record(path, ({"tokens": np.arange(5, dtype=np.int32) + i,
                                     "label": i, "caption": f"c{i}"} for i in range(6)))

  class AddLength(grain.transforms.Map):

    def map(self, element):
      return {**element, "length": np.int32(len(element["tokens"]))}

  cfg = _config(f"array_record:{path}", num_train_examples=0)
  it = pipeline.create_iterator(cfg, split="train", global_batch_size=3, seed=0, train=True,
                                transforms=[AddLength()])
  batch = next(it)
  it.close()
  assert "image" not in batch and batch["tokens"].shape == (3, 5)
  assert batch["label"].dtype == np.int32 and (batch["length"] == 5).all()
  np.testing.assert_array_equal(batch["tokens"][:, 0], batch["label"])


def test_to_global_batch_on_8_devices():
  mesh = parallel.create_mesh(ml_collections.ConfigDict(
      dict(data=2, fsdp=4, tensor=1)))
  host = {"image": np.random.default_rng(0).random((8, 4, 4, 3), np.float32),
          "label": np.arange(8, dtype=np.int32), "caption": np.array(["x"] * 8)}
  out = pipeline.to_global_batch(host, mesh)
  assert set(out) == {"image", "label"}
  assert out["image"].shape == (8, 4, 4, 3) and out["label"].shape == (8,)
  assert out["image"].sharding.spec == P(("data", "fsdp"))
  assert len(out["label"].addressable_shards) == 8
  assert {s.data.shape for s in out["image"].addressable_shards} == {(1, 4, 4, 3)}
  np.testing.assert_array_equal(np.asarray(out["label"]), host["label"])
  with pytest.raises(ValueError, match="'label' has 6 global rows"):
    pipeline.to_global_batch({"label": np.arange(6)}, mesh)


def test_multi_caption_examples_train_on_every_caption(tmp_path):
  # COCO-style: 5 captions per image. Training draws one per example and epoch
  # (all 5 are seen, each with its own image); eval keeps them all.
  root = tmp_path / "coco"
  for label, color in (("a", (255, 0, 0)), ("b", (0, 0, 255))):
    _write_image(str(root / label / "img.png"), color=color)
    (root / label / "img.txt").write_text("".join(f"{label} caption {i}\n" for i in range(5)))
  cfg = _config(f"folder:{root}", num_train_examples=0, num_eval_examples=0)
  seen = {0: set(), 1: set()}
  for batch in _take(pipeline.create_iterator(cfg, split="train", global_batch_size=2, seed=0,
                                              train=True), 30):
    for label, caption in zip(batch["label"], batch["caption"]):
      seen[int(label)].add(str(caption))
  assert seen == {0: {f"a caption {i}" for i in range(5)}, 1: {f"b caption {i}" for i in range(5)}}
  (batch,) = _take(pipeline.create_iterator(cfg, split="eval", global_batch_size=2, seed=0,
                                            train=False), 1)
  assert [sources.split_captions(str(c)) for c in batch["caption"]] == [
      [f"{label} caption {i}" for i in range(5)] for label in "ab"]
