"""Codebook metrics: usage (ViT-VQGAN's definition) and code perplexity.

Usage follows ViT-VQGAN (arXiv 2110.04627): the fraction of codebook entries
used at least once in a group of 256 test images, averaged over the groups of
the test set. It depends on the group size, so the group size is fixed and
groups are cut from the image stream whatever the eval batch size is.

Perplexity is exp(entropy) of the code histogram over the whole eval set, in
[1, codebook_size]; it is codebook_size when every code is equally frequent.

`code_histogram` runs inside `jit`; `CodebookStats` accumulates on the host.
"""
import jax.numpy as jnp
import numpy as np

USAGE_GROUP_IMAGES = 256  # ViT-VQGAN: "per batch of 256 test images".


def code_histogram(codes, codebook_size: int):
  """Counts of each code id, for use inside jit.

  Args:
    codes: int array of any shape (e.g. [b, n] or [b, h, w]) with ids in
      [0, codebook_size); ids outside that range are not counted.
    codebook_size: K, static.

  Returns:
    [K] int32 counts.
  """
  codes = jnp.ravel(jnp.asarray(codes))
  valid = (codes >= 0) & (codes < codebook_size)
  # jnp.bincount clips negatives to 0, so out-of-range ids get weight 0 instead.
  return jnp.bincount(jnp.where(valid, codes, 0), weights=valid.astype(jnp.int32),
                      length=codebook_size).astype(jnp.int32)


def perplexity(histogram):
  """exp(entropy in nats) of a code histogram; on the host or inside `jit`.

  Args:
    histogram: [K] non-negative counts (np or jax array). A numpy histogram is
      checked (1-D, non-negative, not all zero); inside `jit` an all-zero one
      (a step without valid codes) gives 1.

  Returns:
    [] float32 perplexity in [1, K] (a jax scalar: `float()` it on the host).
  """
  if isinstance(histogram, np.ndarray):
    total = histogram.sum()
    if histogram.ndim != 1 or total <= 0 or (histogram < 0).any():
      raise ValueError(f"perplexity needs a 1-D histogram of non-negative counts with a "
                       f"positive total, got shape {histogram.shape} and total {total}.")
  counts = jnp.asarray(histogram, jnp.float32)
  p = counts / jnp.maximum(counts.sum(), 1.0)
  return jnp.exp(-jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0)))


class CodebookStats:
  """Streaming codebook usage and perplexity over eval batches of any size.

  Images are cut into consecutive groups of exactly `images_per_usage_batch`
  images across `update` calls; each full group contributes the fraction of
  the codebook it uses. Final partial group: if at least one full group exists
  the trailing partial group is dropped from usage (fewer images use fewer
  codes, so it would bias usage down) and its size is reported as
  `usage_images_dropped`; if the whole set is smaller than one group, that
  single partial group is used so small evals still get a number. Perplexity
  always counts every image.

  Multi-host: each process sees only its shard; gather codes to one process
  (e.g. `multihost_utils.process_allgather`) before `update`, or groups become
  per-host.

  Example:
    stats = CodebookStats(8192)
    for batch in eval_batches:
      stats.update(np.asarray(codes))  # [b, n] int
    stats.result()  # {'codebook_usage': 0.95, 'perplexity': 7012.3, ...}
  """

  def __init__(self, codebook_size: int, images_per_usage_batch: int = USAGE_GROUP_IMAGES):
    if codebook_size < 1:
      raise ValueError(f"codebook_size must be >= 1, got {codebook_size}.")
    if images_per_usage_batch < 1:
      raise ValueError(f"images_per_usage_batch must be >= 1, got {images_per_usage_batch}.")
    self.codebook_size = int(codebook_size)
    self.images_per_usage_batch = int(images_per_usage_batch)
    self._histogram = np.zeros(self.codebook_size, np.int64)
    self._group_used = np.zeros(self.codebook_size, bool)  # Codes seen in the open group.
    self._group_images = 0  # Images in the open group.
    self._usage_sum = 0.0  # Sum of usage fractions of the closed (full) groups.
    self._full_groups = 0
    self._images = 0

  def update(self, codes: np.ndarray) -> None:
    """Adds one batch of code ids.

    Args:
      codes: [b, n] (or [b, h, w]) integer ids in [0, codebook_size); b may be
        any size, including 0.
    """
    codes = np.asarray(codes)
    if codes.ndim < 2 or not np.issubdtype(codes.dtype, np.integer):
      raise ValueError(f"codes must be an integer array [b, n] (or [b, h, w]), got "
                       f"dtype {codes.dtype} shape {codes.shape}.")
    codes = codes.reshape(codes.shape[0], int(np.prod(codes.shape[1:])))
    if codes.size and (codes.min() < 0 or codes.max() >= self.codebook_size):
      raise ValueError(f"code ids must be in [0, {self.codebook_size}), got range "
                       f"[{codes.min()}, {codes.max()}].")
    self._histogram += np.bincount(codes.ravel(), minlength=self.codebook_size)
    self._images += codes.shape[0]
    start = 0
    while start < codes.shape[0]:  # Fill the open group, closing it when full.
      take = min(self.images_per_usage_batch - self._group_images, codes.shape[0] - start)
      self._group_used[codes[start:start + take].ravel()] = True
      self._group_images += take
      start += take
      if self._group_images == self.images_per_usage_batch:
        self._usage_sum += self._group_used.mean()
        self._full_groups += 1
        self._group_used[:] = False
        self._group_images = 0

  def result(self) -> dict:
    """Returns the metrics so far.

    Returns:
      dict with `codebook_usage` (float in [0, 1], mean over groups),
      `perplexity` (float in [1, K]), `usage_groups` (groups averaged) and
      `usage_images_dropped` (images of a trailing partial group left out).
    """
    if self._images == 0:
      raise ValueError("CodebookStats.result() called before any images were added; "
                       "call update() with at least one image.")
    if self._full_groups:
      usage, groups, dropped = (self._usage_sum / self._full_groups, self._full_groups,
                                self._group_images)
    else:
      usage, groups, dropped = float(self._group_used.mean()), 1, 0
    return dict(codebook_usage=float(usage), perplexity=float(perplexity(self._histogram)),
                usage_groups=int(groups), usage_images_dropped=int(dropped))
