"""Inception features of image batches, sharded over the mesh, with progress in the log.

`Extractor` holds the frozen Inception weights replicated on the mesh and one
jitted function: images [b, h, w, 3] batch-sharded over (data, fsdp) ->
{"pool", "spatial", "logits"} (see models/inception.py). Image sources for the
`fid` binary: a folder of PNG/JPEG files, an .npz of uint8 images (`arr_0`,
the ADM sample-batch convention, or `images`), or a vimjax data source's eval
split (the reference set prepared exactly as the eval data).
"""
import functools
import os
import time
from typing import Iterable, Iterator

from absl import logging
from etils import epath
import jax
import ml_collections
import numpy as np
from PIL import Image

from vimjax import parallel
from vimjax.models import inception

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
PROGRESS_EVERY_S = 10.0


@functools.lru_cache(maxsize=None)
def _jitted_features(size: int, mesh):
  """One jitted Inception per (size, mesh), shared by every Extractor (one compile)."""
  model = inception.InceptionV3()

  def features(params, images):
    return model.apply({"params": params}, inception.preprocess(images, size))

  # Replicated outputs: every process can fetch them (they are small per image).
  return jax.jit(features, in_shardings=(parallel.replicated(mesh), parallel.batch_sharding(mesh)),
                 out_shardings=parallel.replicated(mesh))


class Extractor:
  """Sharded Inception feature extraction.

  Args:
    params: Inception params (`inception.load_inception_params`, or random
      ones in tests).
    mesh: the mesh; batches are split over its data and fsdp axes.
    size: the resize target (299 for comparable numbers).
    batch_size: images per call, rounded up to a multiple of the data-parallel size.
  """

  def __init__(self, params, mesh, *, size: int = inception.FID_SIZE, batch_size: int = 256):
    self.mesh = mesh
    self.size = size
    self._dp = parallel.data_parallel_size(mesh)
    self.batch_size = -(-batch_size // self._dp) * self._dp
    self._batch_sharding = parallel.batch_sharding(mesh)
    self.params = jax.device_put(params, parallel.replicated(mesh))
    self._fn = _jitted_features(size, mesh)

  def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
    """Features of one host batch (the same global batch on every process).

    Args:
      images: [n, h, w, 3] uint8, or float in [0, 1]; n <= batch_size.

    Returns:
      {"pool": [n, 2048], "spatial": [n, h'*w'*7] (h, w, c order as ADM),
       "logits": [n, 1008]} float32 NumPy.
    """
    n = len(images)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"Images must be [n, h, w, 3], got shape {images.shape}.")
    if not 0 < n <= self.batch_size:
      raise ValueError(f"A batch of {n} images; expected 1..{self.batch_size}.")
    # Padded (copies of the last image) to a multiple of the data-parallel size only:
    # a run compiles once per batch length (full batches and the last one), and a
    # small batch does not pay for batch_size images.
    padded = -(-n // self._dp) * self._dp
    if padded != n:
      images = np.concatenate([images, np.repeat(images[-1:], padded - n, axis=0)])
    x = jax.make_array_from_callback(images.shape, self._batch_sharding, lambda i: images[i])
    out = jax.device_get(self._fn(self.params, x))
    return {"pool": np.asarray(out["pool"][:n]),
            "spatial": np.asarray(out["spatial"][:n]).reshape(n, -1),
            "logits": np.asarray(out["logits"][:n])}

  def extract(self, batches: Iterable[np.ndarray], total: int | None = None,
              name: str = "images") -> dict[str, np.ndarray]:
    """Concatenated features of every batch, logging progress every 10 s."""
    outputs, seen, start, last = [], 0, time.perf_counter(), time.perf_counter()
    logging.info("Inception features of %s%s (the first batch compiles the network).", name,
                 f": {total} images" if total else "")
    for images in batches:
      for s in range(0, len(images), self.batch_size):
        outputs.append(self(images[s:s + self.batch_size]))
        seen += len(outputs[-1]["pool"])
      now = time.perf_counter()
      if now - last > PROGRESS_EVERY_S:
        logging.info("Inception features of %s: %d%s images, %.1f images/s.", name, seen,
                     f"/{total}" if total else "", seen / (now - start))
        last = now
    if not outputs:
      raise ValueError(f"No {name} to compute Inception features of.")
    logging.info("Inception features of %s: %d images in %.1f s.", name, seen,
                 time.perf_counter() - start)
    return {k: np.concatenate([o[k] for o in outputs]) for k in outputs[0]}


def _check_images(images: np.ndarray, source: str) -> np.ndarray:
  if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
    raise ValueError(f"{source}: images must be uint8 [n, h, w, 3], got {images.dtype} "
                     f"{images.shape}.")
  return images


def load_npz_images(path: str) -> np.ndarray:
  """uint8 [n, h, w, 3] from `arr_0` (ADM batches) or `images` of an .npz."""
  with epath.Path(path).open("rb") as f, np.load(f) as data:
    for key in ("arr_0", "images"):
      if key in data.files:
        return _check_images(np.asarray(data[key]), f"{path}[{key!r}]")
    raise ValueError(f"{path!r} holds no images: expected an 'arr_0' or 'images' array "
                     f"(uint8 [n, h, w, 3]), found {sorted(data.files)}.")


def image_files(directory: str) -> list[str]:
  """Sorted image files under a local `directory` (recursive, as the folder source)."""
  files = sorted(os.path.join(d, f) for d, _, names in os.walk(directory, followlinks=True)
                 for f in names if os.path.splitext(f)[1].lower() in IMAGE_SUFFIXES)
  if not files:
    raise ValueError(f"--images={directory!r} holds no image files ({', '.join(IMAGE_SUFFIXES)}).")
  return files


def folder_batches(files: list[str], batch_size: int) -> Iterator[np.ndarray]:
  """uint8 batches [<= batch_size, h, w, 3] of RGB images; all must share one size."""
  shape = None
  for start in range(0, len(files), batch_size):
    batch = []
    for path in files[start:start + batch_size]:
      with Image.open(path) as f:
        image = np.asarray(f.convert("RGB"))
      if shape is None:
        shape = image.shape
      elif image.shape != shape:
        raise ValueError(f"{path!r} is {image.shape[1]}x{image.shape[0]} but earlier images "
                         f"are {shape[1]}x{shape[0]}; resize the set to one size first.")
      batch.append(image)
    yield np.stack(batch)


def source_batches(source: str, batch_size: int, image_size: int,
                   num_images: int) -> Iterator[np.ndarray]:
  """Float [0, 1] batches of a vimjax data source's eval split (`shapes`,
  `tfds:NAME[:SPLIT]`, `folder:PATH`), decoded, resized (shorter side, PIL
  bicubic) and center-cropped exactly as the eval data of a training run."""
  from vimjax.data import pipeline  # pylint: disable=g-import-not-at-top
  data = ml_collections.ConfigDict(dict(
      source=source, image_size=image_size, num_train_examples=0,
      num_eval_examples=num_images, worker_count=0, prefetch_buffer_size=2))
  for batch in pipeline.create_iterator(data, split="eval", global_batch_size=batch_size,
                                        seed=0, train=False):
    yield np.asarray(batch["image"])[np.asarray(batch["mask"]) > 0]


def image_batches(source: str, batch_size: int, image_size: int = 256,
                  num_images: int = 0) -> tuple[Iterator[np.ndarray], int | None]:
  """(batches, number of images or None) of an .npz of uint8 images, a local
  folder of images, or a vimjax data source spec (see `source_batches`).

  `image_size` applies to data sources; `num_images` > 0 keeps the first ones.
  """
  if source.endswith(".npz"):
    if "://" not in source and not os.path.exists(source):
      raise FileNotFoundError(f"--images={source!r} not found.")
    images = load_npz_images(source)[:num_images or None]
    return (images[s:s + batch_size] for s in range(0, len(images), batch_size)), len(images)
  if os.path.isdir(source):
    files = image_files(source)[:num_images or None]
    return folder_batches(files, batch_size), len(files)
  if source == "shapes" or source.split(":")[0] in ("tfds", "folder"):
    return source_batches(source, batch_size, image_size, num_images), num_images or None
  raise ValueError(f"--images={source!r} is not an .npz, a local folder of images, or a data "
                   "source (shapes, tfds:NAME[:SPLIT], folder:PATH).")


def with_reference_features(ref: dict[str, np.ndarray], extractor: Extractor) -> dict:
  """Replaces an ADM reference batch's `images` (its 10k uint8 `arr_0`) by their
  `pool` features, which precision/recall need; other statistics pass through."""
  ref = dict(ref)
  images = ref.pop("images", None)
  if images is not None:
    step = extractor.batch_size
    ref["pool"] = extractor.extract((images[s:s + step] for s in range(0, len(images), step)),
                                    len(images), name="reference images")["pool"]
  return ref
