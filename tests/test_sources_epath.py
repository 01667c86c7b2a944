"""Token shards, their glob and metadata through epath: local paths and a fake gs:// bucket."""
from etils.epath import gpath
from etils.epath import testing as epath_testing
import numpy as np
import pytest

from vimjax.configs import vim as vim_config
from vimjax import encoding
from vimjax.data import sources


@pytest.fixture
def fake_gcs(tmp_path, monkeypatch):
  """gs://... served from tmp_path/store by epath's os backend (no network, unseen by os.path)."""
  store = tmp_path / "store"
  (store / "bucket/tok").mkdir(parents=True)  # Folders exist, as in a bucket.
  local = lambda p: str(p).replace("gs://", f"{store}/")
  remote = lambda p: str(p).replace(f"{store}/", "gs://")
  one = lambda fn, path, *a, **k: fn(local(path), *a, **k)
  two = lambda fn, path, dst, *a, **k: fn(local(path), local(dst), *a, **k)
  monkeypatch.setattr(gpath, "_is_tf_installed", lambda: False)  # Else gs:// goes to tf.io.
  with epath_testing.mock_epath(
      open=one, exists=one, isdir=one, listdir=one, makedirs=one, mkdir=one, remove=one,
      rmtree=one, stat=one, copy=two, rename=two, replace=two,
      glob=lambda fn, pattern: [remote(p) for p in fn(local(pattern))],
      walk=lambda fn, top, **k: ((remote(d), ds, fs) for d, ds, fs in fn(local(top), **k))):
    yield store


def _records(n):
  return [{"tokens": np.arange(4, dtype=np.int32) + i, "label": np.int32(i), "caption": f"c{i}"}
          for i in range(n)]


def test_glob_paths_matches_wildcards_in_any_component(tmp_path, monkeypatch):
  for name in ("a/x-1.ar", "b/x-2.ar", "a/y-1.ar"):
    (tmp_path / name).parent.mkdir(exist_ok=True)
    (tmp_path / name).write_text("")
  assert sources.glob_paths(f"{tmp_path}/*/x-*.ar") == [f"{tmp_path}/a/x-1.ar",
                                                         f"{tmp_path}/b/x-2.ar"]
  assert sources.glob_paths(f"{tmp_path}/a/y-1.ar") == [f"{tmp_path}/a/y-1.ar"]
  assert sources.glob_paths(f"{tmp_path}/a/none-*") == []
  monkeypatch.chdir(tmp_path / "a")
  assert sources.glob_paths("x-*.ar") == ["x-1.ar"]


def test_array_record_shards_and_their_glob_on_gs(fake_gcs):
  shard = "gs://bucket/tok/tokens-train-00000-of-00001.array_record"
  assert sources.write_array_record(shard, _records(3)) == 3
  assert sources.glob_paths("gs://bucket/tok/tokens-train-*.array_record") == [shard]
  # The bytes landed in the bucket (read back from the fake's store; no wildcard, which
  # the fake would map back to gs:// and array_record would then fetch from GCS).
  stored = sources.ArrayRecordSource(str(fake_gcs / "bucket/tok" / shard.split("/")[-1]))
  assert [r["caption"] for r in (stored[i] for i in range(3))] == ["c0", "c1", "c2"]
  np.testing.assert_array_equal(stored[2]["tokens"], np.arange(4) + 2)


def test_encode_output_is_refused_and_cleared_on_gs(fake_gcs):
  out = "gs://bucket/tok"
  sources.write_array_record(f"{out}/tokens-eval-00000-of-00001.array_record", _records(1))
  with pytest.raises(ValueError, match=r"--output='gs://bucket/tok' already holds 1 token shards"):
    encoding._prepare_output(out, overwrite=False)
  encoding._prepare_output(out, overwrite=True)
  assert sources.glob_paths(f"{out}/tokens-*.array_record") == []


def test_tokens_metadata_on_gs_is_checked_against_the_config(fake_gcs):
  meta = fake_gcs / "bucket/tok/metadata.json"
  meta.write_text('{"grid_size": 5, "codebook_size": 64}')
  config = vim_config.get_config("tiny")
  with config.unlocked():
    config.data.source = "array_record:gs://bucket/tok/tokens-{split}-*.array_record"
  with pytest.raises(ValueError, match=r"model.grid_size=\d+ does not match the tokens in "
                                       r"gs://bucket/tok \(grid_size=5 in metadata.json\)"):
    sources.check_tokens_metadata(config)
  sources.check_tokens_metadata(config, remote=False)  # Offline validation: not read.


def test_image_folder_on_gs(fake_gcs):
  for name, text in (("cat/b.png", "a cat"), ("cat/a.png", None), ("dog/c.png", None),
                     ("top.png", None)):
    path = fake_gcs / "bucket/imgs" / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"png-" + name.encode())
    if text:
      path.with_suffix(".txt").write_text(text)
  src = sources.FolderSource("gs://bucket/imgs")
  assert src.files == ["gs://bucket/imgs/top.png", "gs://bucket/imgs/cat/a.png",
                       "gs://bucket/imgs/cat/b.png", "gs://bucket/imgs/dog/c.png"]
  assert src.classes == ["", "cat", "dog"] and list(src.labels) == [0, 1, 1, 2]
  assert src[2]["image"] == b"png-cat/b.png" and src[2]["caption"] == "a cat"
