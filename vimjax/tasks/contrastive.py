"""Task `contrastive`: the CLIP-style dual encoder that reranks Parti's samples.

Batches: `tokens` int32 [b, grid_size^2] (the token records of
`python -m vimjax.encode`, as Parti trains on) and `caption` str, which
`text.TokenizeCaptions` (data.text_tokenizer) turns into `text_ids` int32
[b, max_text_length] and `text_truncated` int32 [b].

Loss: CLIP's symmetric softmax cross-entropy over the global batch's
image-text similarity matrix (exp(logit_scale) * cosine, learned temperature).
One deviation: rows whose captions are identical (same ids) are all positives
of each other, the target spread evenly over them. A small caption grammar
such as shapes' repeats captions within a batch, and CLIP's one-hot target
would then push identical captions apart.

Eval: image->text and text->image top-1 retrieval within each eval batch (a
retrieved caption with the same ids as the true one counts), against chance
(the fraction of the batch's candidates that are correct, averaged).

State: params / opt_state {"model": ...}; ema_params {"model": ...} when
optimizer.ema_decay > 0; extra {}.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vimjax.data import text
from vimjax.models import dual_encoder
from vimjax.tasks import base
from vimjax.tasks import inputs
from vimjax.train import optimizers
from vimjax.train.state import TrainState

NAME = "contrastive"
INPUT = "tokens"
EVAL_IMAGES = None  # A dual encoder generates no images.
LAYER_KEYS = ("image_layers", "text_layers")
make_sampler = None  # It scores samples (reranking), it does not draw them.
flops_phases = base.single_phase
flops_mix = base.single_program


def build_model(config) -> dual_encoder.DualEncoder:
  m = config.model
  return dual_encoder.DualEncoder(
      vocab_size=m.codebook_size, grid_h=m.grid_size, grid_w=m.grid_size,
      text_vocab_size=m.text_vocab_size, max_text_length=m.max_text_length,
      image_layers=m.image_layers, text_layers=m.text_layers, num_heads=m.num_heads,
      emb_dim=m.emb_dim, mlp_dim=m.mlp_dim, out_dim=m.out_dim,
      temperature_init=m.temperature_init, dropout_rate=m.dropout_rate,
      scan_layers=m.scan_layers, remat_policy=m.remat_policy, dtype=jnp.dtype(m.dtype),
      param_dtype=jnp.dtype(m.param_dtype))


def _init_args(model: dual_encoder.DualEncoder) -> tuple:
  return (jnp.zeros((1, model.num_tokens), jnp.int32),
          jnp.ones((1, model.max_text_length), jnp.int32))


def same_caption(text_ids) -> jax.Array:
  """[b, b] bool: rows i and j have identical caption ids.

  Compares two 32-bit hashes per row (random multipliers, wrapping uint32
  arithmetic) rather than the [b, b, L] ids: a false match needs both to
  collide (~2^-64 per pair).
  """
  length = text_ids.shape[1]
  multipliers = jax.random.bits(jax.random.key(0), (2, length), jnp.uint32) | 1
  hashes = jnp.sum(text_ids.astype(jnp.uint32)[:, None, :] * multipliers[None], axis=-1)
  return jnp.all(hashes[:, None, :] == hashes[None, :, :], axis=-1)


def contrastive_loss(logits, positives, valid) -> jax.Array:
  """Symmetric cross-entropy of [b, b] image-text logits (float32 []).

  Args:
    logits: [b, b], logits[i, j] = scaled similarity of image i and text j.
    positives: [b, b] bool, True where text j describes image i (the diagonal
      and identical captions).
    valid: [b] bool; invalid rows are neither queries nor candidates.
  """
  pair = valid[:, None] & valid[None, :]
  targets = (positives & pair).astype(jnp.float32)
  logits = jnp.where(pair, logits, jnp.finfo(jnp.float32).min)

  def direction(lg, tg):  # Rows are queries.
    tg = tg / jnp.maximum(tg.sum(-1, keepdims=True), 1.0)
    return -jnp.sum(tg * jax.nn.log_softmax(lg, axis=-1), axis=-1)

  per_row = 0.5 * (direction(logits, targets) + direction(logits.T, targets.T))
  weights = valid.astype(jnp.float32)
  return jnp.sum(per_row * weights) / jnp.maximum(weights.sum(), 1.0)


def retrieval(logits, positives, valid) -> dict[str, jax.Array]:
  """Per-row top-1 retrieval hits and chance within the batch ({name: [b] float32})."""
  pair = valid[:, None] & valid[None, :]
  masked = jnp.where(pair, logits, -jnp.inf)
  rows = jnp.arange(logits.shape[0])
  i2t = positives[rows, jnp.argmax(masked, axis=1)]
  t2i = positives[jnp.argmax(masked, axis=0), rows]
  chance = jnp.sum(positives & pair, axis=1) / jnp.maximum(jnp.sum(valid), 1)
  f32 = lambda x: x.astype(jnp.float32)
  return {"image_to_text": f32(i2t), "text_to_image": f32(t2i), "chance": f32(chance)}


def build(config, mesh) -> base.Steps:
  """Returns the dual encoder's pure init/step/eval functions and its caption transform."""
  del mesh  # Shardings come from logical names.
  model = build_model(config)
  tokenize = text.TokenizeCaptions(config.data.text_tokenizer, config.model.max_text_length)
  tx = optimizers.create_optimizer(config.optimizer, config.total_steps)
  schedule = optimizers.create_schedule(config.optimizer, config.total_steps)
  ema_decay = config.optimizer.ema_decay

  def init(rng):
    params = model.init({"params": rng}, *_init_args(model), train=False)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params={"model": params},
                      opt_state={"model": optimizers.init_state(tx, params)},
                      ema_params={"model": params} if ema_decay > 0 else {}, extra={})

  def logits_of(params, batch, *, train, rng=None):
    image, txt, scale = model.apply({"params": params}, batch["tokens"], batch["text_ids"],
                                    train=train, rngs={"dropout": rng} if train else None)
    return scale * image @ txt.T, scale

  def train_step(state, batch, rng, frozen):
    del frozen
    positives = same_caption(batch["text_ids"])
    valid = batch["mask"] > 0

    def loss_fn(params):
      logits, scale = logits_of(params, batch, train=True, rng=rng)
      loss = contrastive_loss(logits, positives, valid)
      hits = retrieval(jax.lax.stop_gradient(logits), positives, valid)
      return loss, {"loss": loss, "temperature": 1.0 / scale,
                    "image_to_text": jnp.mean(hits["image_to_text"]),
                    "text_to_image": jnp.mean(hits["text_to_image"]),
                    "text_truncated": jnp.sum(batch["text_truncated"])}

    params = state.params["model"]
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, state.opt_state["model"], params)
    new_params = optax.apply_updates(params, updates)
    ema_params = state.ema_params
    if ema_decay > 0:
      ema_params = {"model": optimizers.update_ema(ema_params["model"], new_params, ema_decay)}
    metrics.update(grad_norm=optax.global_norm(grads), param_norm=optax.global_norm(new_params),
                   update_norm=optax.global_norm(updates), lr=schedule(state.step))
    return state.replace(step=state.step + 1, params={"model": new_params},
                         opt_state={"model": opt_state}, ema_params=ema_params), metrics

  def eval_step(state, batch, frozen):
    del frozen
    params = state.ema_params["model"] if ema_decay > 0 else state.params["model"]
    positives = same_caption(batch["text_ids"])
    valid = batch["mask"] > 0
    logits, _ = logits_of(params, batch, train=False)
    loss = contrastive_loss(logits, positives, valid)
    return {**retrieval(logits, positives, valid), "mask": batch["mask"],
            "loss": jnp.broadcast_to(loss, valid.shape)}

  def summarize_eval(outputs):
    cat = {k: np.concatenate([np.asarray(o[k], np.float64) for o in outputs])
           for k in outputs[0]}
    valid = cat.pop("mask") > 0
    metrics = {k: float(v[valid].mean()) for k, v in cat.items()}
    metrics["num_examples"] = int(valid.sum())
    return metrics, None

  return base.Steps(init=init, train_step=train_step, eval_step=eval_step,
                    summarize_eval=summarize_eval, compute_dtype=config.model.dtype,
                    data_transforms=(tokenize,))



def abstract_params(config) -> dict:
  """Top-level module / parameter name -> abstract params (nothing materialised)."""
  model = build_model(config)
  return base.abstract_params(model, _init_args(model))


def batch_spec(config, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """`mask`, `tokens` int32 [b, grid_size^2], `text_ids` int32 [b, max_text_length],
  `text_truncated` int32 [b]."""
  return {**inputs.token_spec(config, batch_size), **inputs.caption_spec(config, batch_size)}


def synthetic_batch(config, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  rs = np.random.RandomState(seed)
  return {**inputs.synthetic_tokens(config, batch_size, rs),
          **inputs.synthetic_captions(config, batch_size, rs)}


def tokens_per_example(config) -> int:
  return config.model.grid_size ** 2


def validate(config) -> None:
  inputs.validate_token_source(config)
  inputs.validate_text_tokenizer(config)


def conditioning(config) -> str:
  del config
  return "none"


def condition_spec(config, batch_size: int) -> None:
  del config, batch_size


def synthetic_conditions(config, batch_size: int, seed: int = 0) -> None:
  del config, batch_size, seed
