"""The grain input pipeline for training and eval, and host batch -> global arrays.

  source -> [train: shuffle(seed), repeat] / [eval: pad to whole global batches]
         -> decode + resize shorter side + crop -> extra per-example transforms
         -> shard by JAX process -> count (and in train drop) corrupt images
         -> batch -> prefetch (worker processes, or a thread when worker_count=0)

`data_config` keys read: `source` (spec, see sources.py), `image_size`,
`num_train_examples` / `num_eval_examples` (0 = the source's own size; the
first is used when split == "train", the second otherwise), `worker_count`
(0 = in-process), `prefetch_buffer_size` (batches buffered per worker, or by
the prefetch thread).

A host batch is a dict of numpy arrays with leading dim global_batch_size //
process_count: `image` float32 [b, S, S, 3] in [0, 1] (when the source has
images), `label` int32 [b], the source's other numeric fields (scene arrays,
tokens; 64-bit values cast to 32-bit), `mask` int32 [b] (0 for eval padding and
corrupt eval images), `num_skipped` int32 [b] (corrupt images dropped just before
each example; `batch["num_skipped"].sum()` is exact) and `caption` str [b]
(a numpy unicode array: host-only, ignored by `to_global_batch`; Parti tokenizes
it on the host or via `transforms`).

Eval iterates the split once. It is padded (by repeating examples with
mask=0) to whole global batches so every process runs the same number of steps;
corrupt eval images are kept as mask=0 rows (with num_skipped=1) for the same
reason. Train batches always have mask=1.

Checkpointing the iterator with orbax (as in vimjax/checkpoint.py)::

  it = create_iterator(config.data, split="train", global_batch_size=64, seed=0, train=True)
  mngr = ocp.CheckpointManager(directory)
  mngr.save(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointSave(it)))
  mngr.wait_until_finished()
  # Later, on a freshly built iterator (restored in place):
  mngr.restore(step, args=ocp.args.Composite(data=grain.checkpoint.CheckpointRestore(it)))

`it.get_state()` / `it.set_state(state)` give the same without orbax.
"""
import io
from typing import Any, Sequence

from absl import flags
from absl import logging
import grain
import jax
import numpy as np
from PIL import Image

from vimjax import parallel
from vimjax.data import sources

# Threads decoding in each process/worker (PIL releases the GIL) and how many
# decoded examples they may run ahead; kept small since images are float32.
_READ_THREADS = 8
_MAX_READ_BUFFER = 256


def decode_image(image: Any) -> np.ndarray:
  """Encoded bytes or an array -> uint8 [H, W, 3]. Raises on unreadable data."""
  if isinstance(image, np.ndarray) and image.dtype.kind in "uif":
    array = image
    if array.dtype.kind == "f":  # Float images are taken to be in [0, 1].
      array = np.round(np.clip(array, 0, 1) * 255)
    array = array.astype(np.uint8)
    if array.ndim == 2:
      array = array[..., None]
    if array.ndim != 3 or array.shape[-1] not in (1, 3, 4):
      raise ValueError(f"image array of shape {image.shape} is not [H, W, 1|3|4].")
    return np.repeat(array, 3, axis=-1) if array.shape[-1] == 1 else array[..., :3]
  if isinstance(image, np.ndarray):  # 0-d object / bytes array from tfds.
    image = image.item()
  data = bytes(image)
  if not data:
    raise ValueError("empty image bytes")
  with Image.open(io.BytesIO(data)) as im:
    return np.asarray(im.convert("RGB"))  # convert() fully decodes: truncation raises here.


def resize_and_crop(image: np.ndarray, size: int, rng: np.random.Generator | None) -> np.ndarray:
  """Resizes the shorter side to `size`, then crops (random if `rng`, else center).

  Args:
    image: uint8 [H, W, 3].
    size: output side.
    rng: crop offsets are drawn from it; None = center crop.

  Returns:
    float32 [size, size, 3] in [0, 1].
  """
  h, w = image.shape[:2]
  scale = size / min(h, w)
  nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
  if (nh, nw) != (h, w):  # PIL filters with a support scaled to the ratio (antialiased).
    image = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BICUBIC))
  if rng is None:
    top, left = (nh - size) // 2, (nw - size) // 2
  else:
    top, left = int(rng.integers(0, nh - size + 1)), int(rng.integers(0, nw - size + 1))
  return image[top:top + size, left:left + size].astype(np.float32) / 255.0


class _Indexed:
  """Adds `_index` (source index) and `mask`; indices >= len(source) wrap as mask=0 padding."""

  def __init__(self, source, length: int | None = None):
    self.source, self.length = source, length or len(source)

  def __len__(self) -> int:
    return self.length

  def __getitem__(self, index: int) -> dict[str, Any]:
    n = len(self.source)
    return {**self.source[index % n], "_index": index % n, "mask": np.int32(index < n)}

  def __repr__(self) -> str:
    return repr(self.source)


def _host_value(key: str, value: Any) -> Any:
  """Value kept in the example (32-bit numerics, str caption), or None to drop it."""
  if key == "caption":
    return value if isinstance(value, str) else sources.as_text(value)
  if isinstance(value, (str, bytes)):
    return None
  array = np.asarray(value)
  if array.dtype.kind not in "biuf":
    return None
  if array.dtype in (np.int64, np.uint64):
    return array.astype(np.int32)
  if array.dtype == np.float64:
    return array.astype(np.float32)
  return array


class _Preprocess(grain.transforms.MapWithIndex):
  """Decodes and crops `image`; on failure marks the example `_decode_ok=False`."""

  def __init__(self, image_size: int, *, train: bool, seed: int, source_name: str):
    self.image_size, self.train, self.seed, self.source_name = image_size, train, seed, source_name

  def map_with_index(self, index: int, element: dict[str, Any]) -> dict[str, Any]:
    element = dict(element)
    source_index = element.pop("_index")
    path = element.pop("path", None)
    ok = True
    if "image" in element:
      rng = np.random.default_rng([self.seed, index]) if self.train else None
      try:
        element["image"] = resize_and_crop(decode_image(element["image"]), self.image_size, rng)
      except Exception as e:  # pylint: disable=broad-except
        where = path or f"example {source_index} of {self.source_name}"
        logging.warning("Skipping unreadable image %s: %s: %s", where, type(e).__name__, e)
        element["image"] = np.zeros((self.image_size,) * 2 + (3,), np.float32)
        ok = False
    out = {k: v for k, v in ((k, _host_value(k, v)) for k, v in element.items()) if v is not None}
    if self.train and "caption" in out:
      # One of the example's captions, drawn anew each epoch (the index runs
      # over the repeated stream), as Parti / DALL-E train on COCO.
      captions = sources.split_captions(out["caption"])
      if len(captions) > 1:
        draw = np.random.default_rng([self.seed, index, 1]).integers(len(captions))
        out["caption"] = captions[draw]
    out["_decode_ok"] = ok
    return out


class _CountCorruptIterDataset(grain.IterDataset):
  """Drops (train) or masks (eval) examples whose decode failed, counting them.

  Each yielded example gets `num_skipped` int32 []: corrupt examples dropped
  since the previous yielded one (drop=True), or 1 for a masked corrupt example
  (drop=False). Dropped examples never straddle a yield, so the iterator state is
  just the parent's and resuming reproduces the same counts.
  """

  def __init__(self, parent: grain.IterDataset, *, drop: bool, max_consecutive: int):
    super().__init__(parent)
    self._drop, self._max_consecutive = drop, max_consecutive

  def __iter__(self) -> "_CountCorruptIterator":
    return _CountCorruptIterator(self._parent.__iter__(), drop=self._drop,
                                 max_consecutive=self._max_consecutive)

  def __str__(self) -> str:
    return f"CountCorruptIterDataset(drop={self._drop})"


class _CountCorruptIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, *, drop: bool, max_consecutive: int):
    super().__init__(parent)
    self._drop, self._max_consecutive = drop, max_consecutive

  def __next__(self) -> dict[str, Any]:
    skipped, last = 0, None
    while True:
      try:
        element = dict(next(self._parent))
      except StopIteration:
        if not skipped:
          raise
        # Trailing corrupt examples of a finite stream: one masked row carries the count.
        last.update(mask=np.int32(0), num_skipped=np.int32(skipped))
        return last
      ok = element.pop("_decode_ok")
      real = bool(element["mask"])
      if ok or not self._drop:
        if not ok:
          element["mask"] = np.int32(0)
        element["num_skipped"] = np.int32(skipped + (not ok and real))
        return element
      skipped += int(real)
      last = element
      if skipped > self._max_consecutive:
        raise ValueError(f"More than {self._max_consecutive} consecutive images failed to "
                         "decode (see the warnings); is the data source readable?")

  def get_state(self) -> dict[str, Any]:
    return self._parent.get_state()

  def set_state(self, state: dict[str, Any]) -> None:
    self._parent.set_state(state)


def _prefetch(ds: grain.IterDataset, workers: int, buffer_size: int) -> grain.IterDataset:
  if workers > 0:
    if not flags.FLAGS.is_parsed():
      # grain's workers read its absl flags; outside an absl app (tests,
      # notebooks) mark them parsed so their defaults apply.
      flags.FLAGS.mark_as_parsed()
    return ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=workers, per_worker_buffer_size=max(1, buffer_size)))
  return grain.experimental.ThreadPrefetchIterDataset(ds, prefetch_buffer_size=buffer_size)


def create_iterator(data_config, *, split: str, global_batch_size: int, seed: int,
                    train: bool, transforms: Sequence[Any] = ()) -> grain.DatasetIterator:
  """Builds this process's iterator of host batches (see the module docstring).

  Args:
    data_config: ConfigDict with the keys listed in the module docstring.
    split: "train", "eval", or a split name the source understands.
    global_batch_size: examples per step over all processes.
    seed: shuffle and crop seed (train).
    train: shuffle + repeat forever, random crops, drop corrupt images; else
      one padded pass in order with center crops.
    transforms: extra per-example `grain.transforms.Map`s (e.g.
      `text.TokenizeCaptions`), run in the workers after decoding.

  Returns:
    A checkpointable `grain.DatasetIterator` (`get_state` / `set_state`).
  """
  process_count, process_index = jax.process_count(), jax.process_index()
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise ValueError(f"global_batch_size={global_batch_size} must be a positive multiple of "
                     f"the number of processes ({process_count}).")
  batch = global_batch_size // process_count
  workers = int(data_config.worker_count)
  if workers < 0:
    raise ValueError(f"data.worker_count={workers} must be >= 0 (0 = in-process).")
  num = data_config.num_train_examples if split == "train" else data_config.num_eval_examples
  source = sources.make_source(data_config.source, split, image_size=data_config.image_size,
                               num_examples=int(num) or None)
  seed %= 2**32
  if train:
    ds = grain.MapDataset.source(_Indexed(source)).shuffle(seed).repeat()
  else:
    padded = -(-len(source) // global_batch_size) * global_batch_size
    ds = grain.MapDataset.source(_Indexed(source, padded))
  # Before sharding, so an example's crop does not depend on the process count.
  ds = ds.map_with_index(_Preprocess(data_config.image_size, train=train, seed=seed,
                                     source_name=repr(source)))
  for transform in transforms:
    ds = ds.map(transform)
  ds = ds[process_index::process_count]
  ds = ds.to_iter_dataset(grain.ReadOptions(
      num_threads=_READ_THREADS, prefetch_buffer_size=min(max(2 * batch, 16), _MAX_READ_BUFFER)))
  ds = _CountCorruptIterDataset(ds, drop=train, max_consecutive=len(source))
  buffer = int(data_config.prefetch_buffer_size)
  if train:  # Batches are built in the workers.
    ds = _prefetch(ds.batch(batch, drop_remainder=True), workers, buffer)
  else:
    # Workers each take a slice of examples; batching after them keeps every
    # batch full, since each process's share is a whole number of batches.
    ds = _prefetch(ds, workers, buffer * batch).batch(batch, drop_remainder=False)
  return iter(ds)


def to_global_batch(host_batch: dict[str, Any], mesh) -> dict[str, jax.Array]:
  """Host batch (this process's rows) -> global arrays split over data x fsdp.

  The one place that builds global input arrays. Non-numeric fields (captions)
  are left out.

  Args:
    host_batch: dict of numpy arrays with leading dim = per-process batch.
    mesh: the (data, fsdp, tensor) mesh.

  Returns:
    dict of jax.Array with leading dim = per-process batch * process count,
    sharded by `parallel.batch_sharding(mesh)`.
  """
  sharding = parallel.batch_sharding(mesh)
  shards = parallel.data_parallel_size(mesh)
  out = {}
  for key, value in host_batch.items():
    value = np.asarray(value)
    if value.dtype.kind not in "biuf":
      continue
    global_rows = value.shape[0] * jax.process_count()
    if global_rows % shards:
      raise ValueError(f"Batch field {key!r} has {global_rows} global rows, not divisible by "
                       f"the {shards} data-parallel shards (mesh data x fsdp).")
    out[key] = jax.make_array_from_process_local_data(sharding, value)
  return out
