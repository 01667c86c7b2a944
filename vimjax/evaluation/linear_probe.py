"""The VIM linear probe (ViT-VQGAN paper, arXiv 2110.04627, Table 4).

A frozen VIM reads an image's tokens (teacher forcing, the null class as the
condition, so a class-conditional VIM is never shown the label); the output of
one intermediate block is averaged over the token positions, and a linear
softmax head trained with optax on those features predicts the class. The
paper's best VIM-L block is 15 of 36 (VIM-B: 10 of 24).

Blocks are numbered from 1 (block N = the output of the N-th transformer
block, as the paper counts). Features come from the blocks' sown outputs
(`layers.block_outputs`), so the checkpoint's parameter paths are unchanged
and scanned stacks work too.

Data: any labelled source. Token records of `python -m vimjax.encode` are read
as they are; image sources (shapes, tfds, folder) are encoded on the fly by
the tokenizer in the VIM config's `tokenizer_workdir`. Rows with a label < 0
(unlabelled) are dropped and counted.
"""
from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from vimjax import parallel
from vimjax import generate
from vimjax.data import pipeline
from vimjax.models import layers
from vimjax.models import transformer
from vimjax.tasks import vim


def pooled_block_features(model: transformer.VIM, params, tokens, blocks) -> jax.Array:
  """Token-averaged outputs of the given blocks.

  Args:
    model: a VIM.
    params: its params.
    tokens: [b, n] int32 image tokens.
    blocks: block numbers in [1, model.num_layers].
  Returns:
    [len(blocks), b, emb_dim] float32.
  """
  _, state = model.apply({"params": params}, tokens, None, train=False,
                         mutable=["intermediates"])
  outputs = layers.block_outputs(state["intermediates"]["decoder"], model.num_layers)
  chosen = outputs[jnp.asarray(blocks, jnp.int32) - 1].astype(jnp.float32)
  return jnp.mean(chosen, axis=2)


def check_blocks(blocks, num_layers: int) -> tuple[int, ...]:
  blocks = tuple(int(b) for b in blocks)
  if not blocks:
    raise ValueError(f"--block is required: one or more of 1..{num_layers}.")
  for b in blocks:
    if not 1 <= b <= num_layers:
      raise ValueError(f"--block={b} out of range; valid: 1..{num_layers} (the VIM has "
                       f"{num_layers} blocks, counted from 1).")
  return blocks


class Standardizer:
  """Per-dimension mean / std of the training features (std floored at 1e-6)."""

  def __init__(self, features: np.ndarray):
    self.mean = features.mean(0)
    self.std = np.maximum(features.std(0), 1e-6)

  def __call__(self, features: np.ndarray) -> np.ndarray:
    return ((features - self.mean) / self.std).astype(np.float32)


def train_linear_head(features: np.ndarray, labels: np.ndarray, num_classes: int, *,
                      steps: int, batch_size: int, lr: float, weight_decay: float,
                      seed: int = 0) -> dict:
  """Fits a linear softmax classifier with optax AdamW on minibatches.

  Args:
    features: [n, d] float32 (standardized).
    labels: [n] int in [0, num_classes).
    num_classes: output classes.
    steps: optimizer steps; batch_size: rows per step (sampled with replacement).
    lr: peak learning rate (cosine decay to 0); weight_decay: decoupled, on the kernel.
    seed: init and minibatch seed.
  Returns:
    {"kernel": [d, num_classes], "bias": [num_classes]} float32.
  """
  n, d = features.shape
  x, y = jnp.asarray(features), jnp.asarray(labels, jnp.int32)
  params = {"kernel": jnp.zeros((d, num_classes), jnp.float32),
            "bias": jnp.zeros((num_classes,), jnp.float32)}
  tx = optax.adamw(optax.cosine_decay_schedule(lr, steps), weight_decay=weight_decay,
                   mask={"kernel": True, "bias": False})
  batch_size = min(batch_size, n)

  def loss_fn(p, xb, yb):
    logits = xb @ p["kernel"] + p["bias"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, yb).mean()

  @jax.jit
  def train(params, key):
    def step(carry, k):
      p, opt_state = carry
      idx = jax.random.randint(k, (batch_size,), 0, n)
      grads = jax.grad(loss_fn)(p, x[idx], y[idx])
      updates, opt_state = tx.update(grads, opt_state, p)
      return (optax.apply_updates(p, updates), opt_state), None
    (params, _), _ = jax.lax.scan(step, (params, tx.init(params)), jax.random.split(key, steps))
    return params

  return jax.device_get(train(params, jax.random.key(seed)))


def predict(head: dict, features: np.ndarray) -> np.ndarray:
  """[n, d] standardized features -> [n] int class predictions."""
  return np.argmax(features @ head["kernel"] + head["bias"], axis=-1)


def _labelled_split(config, split: str, num_examples: int, featurize) -> tuple:
  """(features [len(blocks), m, d], labels [m], dropped unlabelled count) of one split."""
  data = ml_collections.ConfigDict(config.data.to_dict())
  data.update(num_train_examples=num_examples, num_eval_examples=num_examples)
  iterator = pipeline.create_iterator(data, split=split, global_batch_size=config.global_batch_size,
                                      seed=config.seed, train=False)
  features, labels, unlabelled = [], [], 0
  for batch in iterator:
    if "label" not in batch:
      raise ValueError(f"data.source={data.source!r} has no labels; the probe needs a "
                       "labelled source (token records of `vimjax.encode`, shapes, tfds, folder).")
    feats, label, mask = featurize(batch)  # The whole global batch, on every process.
    keep = mask > 0
    unlabelled += int(np.sum(keep & (label < 0)))
    keep &= label >= 0
    features.append(feats[:, keep])
    labels.append(label[keep])
  if not labels or not sum(len(l) for l in labels):
    raise ValueError(f"The {split!r} split of data.source={data.source!r} has no labelled "
                     f"examples ({unlabelled} unlabelled).")
  return np.concatenate(features, axis=1), np.concatenate(labels).astype(np.int32), unlabelled


def _featurizer(config, model, params, blocks, mesh, rules):
  """host batch -> (features [len(blocks), B, d], label [B], mask [B]) numpy.

  Computed sharded over the mesh; the outputs are replicated, so with several
  processes each gets the whole global batch B (all processes fit the same head).
  """
  batch_sharding = parallel.batch_sharding(mesh)
  features = jax.jit(
      lambda p, t, label, mask: (pooled_block_features(model, p, t, blocks), label, mask),
      out_shardings=parallel.replicated(mesh))
  tok_model = tok_params = encode = None

  def featurize(host_batch):
    nonlocal tok_model, tok_params, encode
    if "tokens" in host_batch:
      tokens = pipeline.to_global_batch({"tokens": host_batch["tokens"]}, mesh)["tokens"]
    else:  # An image source: tokens from the VIM's own tokenizer.
      if encode is None:
        tok_config, tok_model, tok_params = generate.load_tokenizer(
            config.tokenizer_workdir, mesh, rules)
        if tok_config.data.image_size != config.data.image_size:
          raise ValueError(f"data.image_size={config.data.image_size} differs from the "
                           f"tokenizer's {tok_config.data.image_size}; set "
                           f"--config.data.image_size={tok_config.data.image_size}.")
        encode = jax.jit(lambda p, x: tok_model.apply({"params": p}, x, train=False,
                                                      method="encode")[1]["codes"],
                         out_shardings=batch_sharding)
      images = pipeline.to_global_batch({"image": host_batch["image"]}, mesh)["image"]
      tokens = encode(tok_params, images)
    if tokens.shape[1] != model.num_tokens:
      raise ValueError(f"Tokens of length {tokens.shape[1]}; the VIM reads {model.num_tokens} "
                       "(model.grid_size^2): were they made by another tokenizer?")
    rows = pipeline.to_global_batch({"label": host_batch["label"], "mask": host_batch["mask"]},
                                    mesh)
    return tuple(np.asarray(x) for x in jax.device_get(
        features(params, tokens.astype(jnp.int32), rows["label"], rows["mask"])))

  return featurize


def run(config, workdir: str, *, blocks, num_train_examples: int = 0,
        num_eval_examples: int = 0, steps: int = 2000, batch_size: int = 512,
        lr: float = 1e-2, weight_decay: float = 1e-4, seed: int = 0) -> dict:
  """Linear probe of the VIM in `workdir` on config.data's train / eval splits.

  Args:
    config: the VIM workdir's config (data.source may be overridden).
    workdir: the VIM training workdir (latest checkpoint; EMA params if used).
    blocks: block numbers (1-based) to probe, one head each.
    num_train_examples, num_eval_examples: caps per split (0 = the whole split).
    steps, batch_size, lr, weight_decay, seed: the head's optimisation.
  Returns:
    {"accuracy": {block: top-1}, "best_block", "best_accuracy", "chance" (the
     eval split's majority-class frequency), "uniform_chance" (1 / classes),
     "num_classes", "num_train", "num_eval", "unlabelled" (dropped rows),
     "feature_dim", "step"}.
  """
  if config.get("task") != vim.NAME:
    raise ValueError(f"--workdir={workdir!r} holds task={config.get('task')!r}; the linear "
                     "probe reads a VIM workdir (task 'vim').")
  model = vim.build_model(config)
  blocks = check_blocks(blocks, model.num_layers)
  mesh = parallel.create_mesh(config.mesh)
  rules = parallel.rules_from_config(config.mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    params, step = generate.load_stage2_params(config, workdir, mesh, rules)
    featurize = _featurizer(config, model, params, blocks, mesh, rules)
    train_x, train_y, dropped_train = _labelled_split(config, "train", num_train_examples,
                                                      featurize)
    eval_x, eval_y, dropped_eval = _labelled_split(config, "eval", num_eval_examples, featurize)
  num_classes = int(max(train_y.max(), eval_y.max())) + 1
  logging.info("Probing blocks %s on %d train / %d eval examples, %d classes.", blocks,
               len(train_y), len(eval_y), num_classes)
  accuracy = {}
  for i, block in enumerate(blocks):
    standardize = Standardizer(train_x[i])
    head = train_linear_head(standardize(train_x[i]), train_y, num_classes, steps=steps,
                             batch_size=batch_size, lr=lr, weight_decay=weight_decay, seed=seed)
    accuracy[block] = float(np.mean(predict(head, standardize(eval_x[i])) == eval_y))
    logging.info("block %d: top-1 %.4f", block, accuracy[block])
  best = max(accuracy, key=accuracy.get)
  return {"accuracy": {str(b): a for b, a in accuracy.items()}, "best_block": best,
          "best_accuracy": accuracy[best],
          "chance": float(np.bincount(eval_y).max() / len(eval_y)),
          "uniform_chance": 1.0 / num_classes, "num_classes": num_classes,
          "num_train": len(train_y), "num_eval": len(eval_y),
          "unlabelled": dropped_train + dropped_eval, "feature_dim": int(train_x.shape[-1]),
          "num_layers": model.num_layers, "step": int(step),
          "source": config.data.source}
