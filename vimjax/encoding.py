"""Token records of a dataset: a trained, frozen ViT-VQGAN run once over its splits.

The library behind `python -m vimjax.encode` (vimjax/encode/__main__.py: flags,
output layout) and the demo: restores the tokenizer's generator into the
mesh's shardings, encodes each split with the eval pipeline and writes
ArrayRecord shards plus metadata.json for stage 2.
"""
import itertools
import json
import math
import time

from absl import logging
from etils import epath
import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import ml_collections
import numpy as np

from vimjax import checkpoint
from vimjax import parallel
from vimjax.data import pipeline
from vimjax.data import sources
from vimjax.tasks import tokenizer

PROGRESS_EVERY_S = 30.0  # A progress line this often (a large split encodes for hours).

SHARD_GLOB = "tokens-*.array_record"


def load_tokenizer_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a tokenizer run saved in `workdir/config.json`."""
  return tokenizer.load_workdir_config(workdir, "--tokenizer_workdir")


def restore_generator(config, workdir: str, mesh, rules) -> tuple[dict, int]:
  """(generator params sharded over `mesh`, step) of the latest checkpoint.

  Only the generator's params (its EMA when optimizer.ema_decay > 0) are read,
  with the current mesh's shardings; optimizer states and the discriminator stay
  on disk.
  """
  model = tokenizer.build_model(config)
  size = config.data.image_size
  boxed = jax.eval_shape(lambda: model.init(
      {"params": jax.random.key(0)}, jnp.zeros((1, size, size, 3)), train=False)["params"])
  group = "ema_params" if config.optimizer.ema_decay > 0 else "params"
  return checkpoint.restore_params(
      workdir, f"{group}/generator", parallel.unbox(boxed),
      parallel.logical_to_shardings(boxed, mesh, rules), flag="--tokenizer_workdir")


def _sum_over_processes(values: dict[str, int]) -> dict[str, int]:
  if jax.process_count() == 1:
    return values
  totals = multihost_utils.process_allgather(np.array(list(values.values()), np.int64))
  return dict(zip(values, np.asarray(totals).sum(0).tolist()))


def _records(iterator, encode, params, mesh, counts, split: str, size: int):
  """Yields {"tokens", "label", "caption"} per real example, counting them; logs
  progress every PROGRESS_EVERY_S."""
  spec = parallel.batch_sharding(mesh).spec
  start = last = time.perf_counter()
  logging.info("Encoding %s: %d examples (the first batch compiles the encoder).", split, size)
  for batch in iterator:
    now = time.perf_counter()
    if now - last > PROGRESS_EVERY_S:
      done = counts["examples"]
      rate = done / (now - start)
      logging.info("Encoding %s: %d/%d examples on this process, %.1f examples/s, ETA %.0f s.",
                   split, done, size, rate, (size - done) / max(rate, 1e-9))
      last = now
    images = pipeline.to_global_batch({"image": batch["image"]}, mesh)["image"]
    codes = multihost_utils.global_array_to_host_local_array(encode(params, images), mesh, spec)
    codes = np.asarray(codes, np.int32)
    counts["skipped"] += int(batch["num_skipped"].sum())
    for i in np.flatnonzero(batch["mask"] > 0):
      counts["examples"] += 1
      yield {"tokens": codes[i], "label": np.int32(batch["label"][i]),
             "caption": str(batch["caption"][i])}


def encode_split(config, split: str, encode, params, mesh, output: str,
                 examples_per_shard: int) -> dict:
  """Encodes one split into this process's shards; returns global counts and shard names."""
  data = config.data
  num = data.num_train_examples if split == "train" else data.num_eval_examples
  size = len(sources.make_source(data.source, split, image_size=data.image_size,
                                 num_examples=int(num) or None))
  # Same shard count on every process: sized for the process with the most rows.
  per_process = math.ceil(size / jax.process_count())
  k = max(1, math.ceil(per_process / examples_per_shard))
  n = k * jax.process_count()
  iterator = pipeline.create_iterator(data, split=split, global_batch_size=config.global_batch_size,
                                      seed=config.seed, train=False)
  counts = {"examples": 0, "skipped": 0}
  records = _records(iterator, encode, params, mesh, counts, split, per_process)
  written = []
  for j in range(k):
    first = next(records, None)
    if first is None:  # Never an empty file.
      break
    name = f"tokens-{split}-{jax.process_index() * k + j:05d}-of-{n:05d}.array_record"
    sources.write_array_record(str(epath.Path(output) / name),
                               itertools.chain([first],
                                               itertools.islice(records, examples_per_shard - 1)))
    written.append(name)
  totals = _sum_over_processes({**counts, "shards": len(written)})
  logging.info("Encoded %s: %d examples (%d corrupt skipped) into %d shards.", split,
               totals["examples"], totals["skipped"], totals["shards"])
  return totals


def _prepare_output(output: str, overwrite: bool) -> None:
  """Refuses (or, with `overwrite`, clears) an output that holds shards; local or gs://."""
  existing = [epath.Path(p) for p in sources.glob_paths(str(epath.Path(output) / SHARD_GLOB))]
  metadata = epath.Path(output) / "metadata.json"
  if (existing or metadata.exists()) and not overwrite:
    raise ValueError(f"--output={output!r} already holds {len(existing)} token shards; pass "
                     "--overwrite to replace them.")
  if jax.process_index() == 0:
    epath.Path(output).mkdir(parents=True, exist_ok=True)
    for path in existing + ([metadata] if metadata.exists() else []):
      path.unlink()
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices("vimjax.encode: output ready")


def run(config, tokenizer_workdir: str, output: str, *, splits=("train", "eval"),
        num_examples: int = 0, examples_per_shard: int = 100_000,
        overwrite: bool = False) -> dict:
  """Encodes `splits` of config.data with the tokenizer in `tokenizer_workdir`.

  Args:
    config: the tokenizer's config (load_tokenizer_config), possibly overridden.
    tokenizer_workdir: the tokenizer run's workdir (checkpoints/).
    output: directory for the shards and metadata.json.
    splits: split names the data source understands.
    num_examples: cap per split (0 = all).
    examples_per_shard: records per shard file, at most.
    overwrite: replace existing shards instead of refusing.

  Returns:
    {"output", "num_examples": {split: n}, "skipped": {split: n}, "shards": total}.
  """
  if examples_per_shard <= 0:
    raise ValueError(f"--examples_per_shard={examples_per_shard} must be positive.")
  config = ml_collections.ConfigDict(config.to_dict())
  if num_examples:
    config.data.num_train_examples = config.data.num_eval_examples = num_examples
  mesh = parallel.create_mesh(config.mesh)
  rules = parallel.rules_from_config(config.mesh)
  # Not config_lib.validate: encoding needs no training-only inputs (perceptual weights).
  multiple = math.lcm(parallel.data_parallel_size(mesh), jax.process_count())
  if config.global_batch_size % multiple:
    raise ValueError(f"global_batch_size={config.global_batch_size} is not a multiple of "
                     f"{multiple} (data-parallel shards and processes); set "
                     "--config.global_batch_size.")
  _prepare_output(output, overwrite)
  model = tokenizer.build_model(config)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    params, step = restore_generator(config, tokenizer_workdir, mesh, rules)
    param_shardings = jax.tree.map(lambda x: x.sharding, params)
    batch = parallel.batch_sharding(mesh)
    encode = jax.jit(
        lambda p, x: model.apply({"params": p}, x, train=False, method="encode")[1]["codes"],
        in_shardings=(param_shardings, batch), out_shardings=batch)
    totals = {split: encode_split(config, split, encode, params, mesh, output,
                                  examples_per_shard) for split in splits}
  result = {"output": output,
            "num_examples": {s: t["examples"] for s, t in totals.items()},
            "skipped": {s: t["skipped"] for s, t in totals.items()},
            "shards": sum(t["shards"] for t in totals.values())}
  if jax.process_index() == 0:
    metadata = {**result, "grid_size": config.data.image_size // config.model.patch_size,
                "codebook_size": tokenizer.num_codes(config),
                "image_size": config.data.image_size, "source": config.data.source,
                "tokenizer_workdir": checkpoint.absolute(tokenizer_workdir),
                "tokenizer_step": step}
    (epath.Path(output) / "metadata.json").write_text(json.dumps(metadata, indent=2))
  return result
