"""Random-access sources of raw examples, chosen by a spec string (`data.source`).

Specs:
  shapes               the embedded procedural dataset (vimjax/data/shapes.py).
  tfds:NAME[:SPLIT]    a prepared TFDS dataset read with `tfds.data_source`
                       (ArrayRecord, random access; never downloads — run
                       `tfds build NAME --file_format=array_record` first).
  folder:PATH          images under PATH, local or gs:// (recursive; .jpg .jpeg .png .webp).
  array_record:GLOB    ArrayRecord files of `encode_record` dicts (local or gs://).

`PATH` and `GLOB` may contain `{split}`, replaced by the requested split name
("train", "eval", ...), e.g. `folder:/data/imagenet/{split}`; without it every
split reads the same files. Requested splits for tfds map "train" -> "train" and
"eval" -> "validation" unless the spec pins `SPLIT` (which then serves every
split); shapes maps "eval" to its "validation" split.

Every image source yields dicts with `image` (encoded bytes or uint8
[H, W, 3]; decoded and resized by the pipeline), `label` int32 [] (-1 when the
dataset has none) and `caption` str ("" when it has none). Folder examples also
carry `path` for error messages.

Multi-caption datasets (COCO: 5 per image) keep every caption: `caption` holds
them one per line (`CAPTION_SEPARATOR`; a folder `.txt` file likewise has one
caption per line). The train pipeline draws one per example and epoch
(`pipeline`), eval and `encode` keep them all, and Parti's tokenizer reads the
first one of an eval example.

Record encoding (array_record): msgpack via `flax.serialization`, so numpy
arrays keep dtype and shape, `str` stays str and `bytes` stays bytes. The
stage-2 `encode` binary writes e.g. {"tokens": int32 [L], "label": int32 [],
"caption": str} with `write_array_record`.
"""
import json
import os
import re
import tempfile
from typing import Any, Iterable

from absl import logging
from etils import epath
from flax import serialization
import grain
import numpy as np

from vimjax.data import shapes

# Separates the captions of a multi-caption example in its `caption` str.
CAPTION_SEPARATOR = "\n"

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp")
# Default sizes of the embedded dataset when no num_examples is given.
SHAPES_DEFAULT_SIZES = {"train": 100_000, "validation": 1_000}
_VALID_SPECS = "shapes, tfds:NAME[:SPLIT], folder:PATH, array_record:GLOB"
_TFDS_SPLITS = {"train": "train", "eval": "validation"}


def encode_record(record: dict[str, Any]) -> bytes:
  """Serialises a flat dict of numpy arrays / scalars / str / bytes to bytes."""
  if not isinstance(record, dict):
    raise ValueError(f"encode_record expects a dict, got {type(record).__name__}.")
  return serialization.msgpack_serialize(record)


def decode_record(data: bytes) -> dict[str, Any]:
  """Inverse of `encode_record`."""
  record = serialization.msgpack_restore(data)
  if not isinstance(record, dict):
    raise ValueError(f"Record of {len(data)} bytes does not hold a dict "
                     f"(got {type(record).__name__}); was it written by encode_record?")
  return record


def write_array_record(path: str, records: Iterable[dict[str, Any]]) -> int:
  """Writes `encode_record` dicts to one ArrayRecord file, local or gs://; returns the count.

  Uses group_size:1 so that `array_record:` sources read any record directly.
  ArrayRecordWriter writes local files only (its reader also reads gs://), so a
  remote `path` is written to a local temporary file, then copied with epath.
  """
  from array_record.python import array_record_module  # pylint: disable=g-import-not-at-top
  if "://" not in path:
    return _write_local(array_record_module, path, records)
  with tempfile.TemporaryDirectory(prefix="vimjax_shard_") as tmp:
    local = os.path.join(tmp, os.path.basename(path))
    count = _write_local(array_record_module, local, records)
    epath.Path(local).copy(epath.Path(path), overwrite=True)
  return count


def _write_local(array_record_module, path: str, records) -> int:
  writer = array_record_module.ArrayRecordWriter(path, "group_size:1")
  count = 0
  try:
    for record in records:
      writer.write(encode_record(record))
      count += 1
  finally:
    writer.close()
  return count


def _walk(root: str):
  """(dirpath str, dirnames, filenames) under `root`: os.walk (following links) or epath's."""
  if "://" not in root:
    yield from os.walk(root, followlinks=True)
  else:
    for dirpath, dirnames, filenames in epath.Path(root).walk():
      yield str(dirpath).rstrip("/"), dirnames, filenames


def glob_paths(pattern: str) -> list[str]:
  """Sorted paths matching a glob `pattern`, local or any epath filesystem (gs://).

  Wildcards may appear in any component, e.g. gs://b/tokens/*/tokens-train-*.array_record.
  """
  parts = pattern.split("/")
  first = next((i for i, p in enumerate(parts) if re.search(r"[*?[]", p)), None)
  if first is None:
    return [pattern] if epath.Path(pattern).exists() else []
  root = "/".join(parts[:first]) or ("/" if pattern.startswith("/") else ".")
  return sorted(str(p) for p in epath.Path(root).glob("/".join(parts[first:])))


class _Subset:
  """The first `num_examples` elements of a source."""

  def __init__(self, source, num_examples: int):
    self.source, self.num_examples = source, num_examples

  def __len__(self) -> int:
    return self.num_examples

  def __getitem__(self, index: int):
    if not 0 <= index < self.num_examples:
      raise IndexError(f"Index {index} out of range for {self!r}.")
    return self.source[index]

  def __repr__(self) -> str:
    return f"{self.source!r}[:{self.num_examples}]"


def as_text(value: Any) -> str:
  """A caption field (str, bytes, array or list of them, {"text": ...}) -> str.

  Several captions (a list or array) are all kept, one per line.
  """
  if isinstance(value, dict):  # e.g. coco_captions: {"id": [...], "text": [...]}.
    value = value.get("text", "")
  if isinstance(value, np.ndarray):
    value = list(value.reshape(-1))
  if isinstance(value, (list, tuple)):
    return CAPTION_SEPARATOR.join(
        " ".join(as_text(v).split()) for v in value if as_text(v).strip())
  if isinstance(value, (bytes, np.bytes_)):
    return bytes(value).decode("utf-8", errors="replace")
  return str(value)


def split_captions(caption: str) -> list[str]:
  """The non-empty captions of a `caption` field (one per line)."""
  return [c.strip() for c in caption.split(CAPTION_SEPARATOR) if c.strip()]


class FolderSource:
  """Images under a directory, local or gs://; class = first sub-folder below `root`.

  Classes are the sorted names of those sub-folders ("" for files directly in
  `root`). The caption is the text of a same-named `.txt` file, else "".
  """

  def __init__(self, root: str):
    if not epath.Path(root).is_dir():
      raise ValueError(f"folder source {root!r} is not a directory.")
    self.root = root.rstrip("/") or "/"
    files = [(tuple(dirpath[len(self.root):].split("/")), name)
             for dirpath, _, filenames in _walk(self.root) for name in filenames
             if name.lower().endswith(IMAGE_EXTENSIONS)]
    if not files:
      raise ValueError(f"folder source {root!r} holds no images ({', '.join(IMAGE_EXTENSIONS)}).")
    # Sorted as a top-down walk with sorted folders: a folder's files, then its sub-folders.
    self.files = [f"{self.root}{'/'.join(parts)}/{name}" for parts, name in sorted(files)]
    top = [self._class_of(f) for f in self.files]
    self.classes = sorted(set(top))
    index = {c: i for i, c in enumerate(self.classes)}
    self.labels = np.array([index[c] for c in top], np.int32)

  def _class_of(self, path: str) -> str:
    parts = path[len(self.root):].lstrip("/").split("/")
    return parts[0] if len(parts) > 1 else ""

  def __len__(self) -> int:
    return len(self.files)

  def __getitem__(self, index: int) -> dict[str, Any]:
    path = self.files[index]
    try:
      image = epath.Path(path).read_bytes()
    except OSError as e:  # Counted as a corrupt image by the pipeline.
      logging.warning("Cannot read %s: %s", path, e)
      image = b""
    caption = ""
    txt = epath.Path(os.path.splitext(path)[0] + ".txt")
    if txt.exists():
      caption = txt.read_bytes().decode("utf-8", errors="replace").strip()
    return {"image": image, "label": self.labels[index], "caption": caption, "path": path}

  def __repr__(self) -> str:
    return f"FolderSource({self.root!r}, {len(self)} images, {len(self.classes)} classes)"


def _tfds_data_source(name: str, split: str):
  """Opens a prepared TFDS dataset; images stay encoded (decoded in the pipeline)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top (heavy, optional)
  try:
    builder = tfds.builder(name)
    decoders = ({"image": tfds.decode.SkipDecoding()}
                if "image" in builder.info.features else None)
    return builder.as_data_source(split=split, decoders=decoders)
  except Exception as e:  # pylint: disable=broad-except
    raise ValueError(
        f"tfds:{name} split {split!r} cannot be opened as a data source ({type(e).__name__}: "
        f"{str(e).splitlines()[0] if str(e) else ''}); prepare it with `tfds build {name} "
        "--file_format=array_record` (TFDS_DATA_DIR sets where).") from e


class TfdsSource:
  """A TFDS data source with fields mapped to image / label / caption."""

  def __init__(self, name: str, split: str):
    self.name, self.split = name, split
    self.source = _tfds_data_source(name, split)
    if len(self.source) == 0:
      raise ValueError(f"tfds:{name} split {split!r} has no examples.")

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    ex = self.source[index]
    out = {"image": ex["image"],
           "label": np.int32(ex["label"]) if "label" in ex else np.int32(-1),
           "caption": ""}
    for key in ("caption", "captions", "text"):
      if key in ex:
        out["caption"] = as_text(ex[key])
        break
    return out

  def __repr__(self) -> str:
    return f"TfdsSource({self.name!r}, split={self.split!r})"


class ArrayRecordSource:
  """`encode_record` dicts stored in ArrayRecord files."""

  def __init__(self, pattern: str):
    self.pattern = pattern
    self.paths = glob_paths(pattern)
    if not self.paths:
      raise ValueError(f"array_record source {pattern!r} matches no files.")
    self.source = grain.sources.ArrayRecordDataSource(self.paths)
    if len(self.source) == 0:
      raise ValueError(f"array_record source {pattern!r} holds no records.")

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int) -> dict[str, Any]:
    return decode_record(self.source[index])

  def __repr__(self) -> str:
    return f"ArrayRecordSource({self.pattern!r}, {len(self.paths)} files)"


def make_source(spec: str, split: str, *, image_size: int,
                num_examples: int | None = None):
  """Returns a grain random-access source of raw examples.

  Args:
    spec: one of the forms in the module docstring.
    split: requested split, e.g. "train" or "eval".
    image_size: rendering size for `shapes` (other sources are resized later).
    num_examples: size of `shapes`; for other sources the first `num_examples`
      examples are used (all if None or larger than the source).

  Raises:
    ValueError: unknown spec, empty or missing data, bad split.
  """
  kind, _, arg = spec.partition(":")
  if kind == "shapes" and not arg:
    shapes_split = "validation" if split == "eval" else split
    if shapes_split not in SHAPES_DEFAULT_SIZES:
      raise ValueError(f"shapes has no split {split!r}; valid: train, eval (= validation).")
    return shapes.ShapesSource(shapes_split, image_size,
                               num_examples or SHAPES_DEFAULT_SIZES[shapes_split])
  if kind == "tfds" and arg:
    name, _, pinned = arg.partition(":")
    source = TfdsSource(name, pinned or _TFDS_SPLITS.get(split, split))
  elif kind == "folder" and arg:
    source = FolderSource(arg.replace("{split}", split))
  elif kind == "array_record" and arg:
    source = ArrayRecordSource(arg.replace("{split}", split))
  else:
    raise ValueError(f"Unknown data source {spec!r}; valid forms: {_VALID_SPECS}.")
  if num_examples and num_examples < len(source):
    return _Subset(source, num_examples)
  if num_examples and num_examples > len(source):
    logging.warning("%r has %d examples, fewer than the %d requested; using all of them.",
                    source, len(source), num_examples)
  return source


def check_tokens_metadata(config, remote: bool = True) -> None:
  """model.grid_size / codebook_size against `encode`'s metadata.json beside the shards.

  Reads it through epath (local or, with `remote`, gs://); no metadata.json, or a
  `{split}` in the shards' folder, is not checked.
  """
  kind, _, pattern = config.data.source.partition(":")
  directory = os.path.dirname(pattern)
  if (kind != "array_record" or "{split}" in directory or "grid_size" not in config.model
      or (not remote and "://" in directory)):
    return
  metadata = epath.Path(directory) / "metadata.json"
  if not metadata.exists():
    return
  written = json.loads(metadata.read_text())
  for key in ("grid_size", "codebook_size"):
    if written[key] != config.model[key]:
      raise ValueError(f"model.{key}={config.model[key]} does not match the tokens in "
                       f"{directory} ({key}={written[key]} in metadata.json); set "
                       f"--config.model.{key}={written[key]}.")
