"""Stage-2 training shared by VIM and Parti: next-image-token cross-entropy.

A family module (vim.py, parti.py) builds its model and says how a batch feeds
it (an `apply_fn`) and how it samples; this module owns the rest: the train
state, classifier-free guidance condition dropout, the loss (softmax
cross-entropy over image tokens in float32 plus an optional z-loss), the eval
sums behind held-out loss and bits per token, and the `base.Task` parts the two
families share.

Batch fields: `tokens` int32 [b, n] (n = model.grid_size^2, written by
`python -m vimjax.encode`), `mask` int32 [b] (0 for eval padding rows) and the
family's condition fields (VIM `label`, Parti `text_ids` + `text_truncated`).

State: params / opt_state {"model": ...}; ema_params {"model": ...} when
optimizer.ema_decay > 0, else {}; extra {}.
"""
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from vimjax.tasks import base
from vimjax.tasks import inputs
from vimjax.train import optimizers
from vimjax.train.state import TrainState

LN2 = math.log(2.0)

# (params, batch, *, drop, train, rng) -> (logits [b, n, vocab] float32,
#  counts {name: [b]}), counts being per-example numbers summed into metrics.
ApplyFn = Callable[..., tuple[jax.Array, dict[str, jax.Array]]]


def transformer_kwargs(model_config) -> dict[str, Any]:
  """The constructor fields VIM and Parti share, from a `model` config section."""
  m = model_config
  return dict(vocab_size=m.codebook_size, grid_h=m.grid_size, grid_w=m.grid_size,
              num_heads=m.num_heads, emb_dim=m.emb_dim, mlp_dim=m.mlp_dim,
              dropout_rate=m.dropout_rate, scan_layers=m.scan_layers,
              remat_policy=m.remat_policy, dtype=jnp.dtype(m.dtype),
              param_dtype=jnp.dtype(m.param_dtype))


INPUT = "tokens"
EVAL_IMAGES = "samples"
flops_phases = base.single_phase
flops_mix = base.single_program


def tokens_per_example(config) -> int:
  return config.model.grid_size ** 2


def validate(config) -> None:
  """Checks shared by VIM and Parti (the token source); families add their own."""
  inputs.validate_token_source(config)


def drop_condition_mask(rng, batch_size: int, rate: float) -> jax.Array:
  """[batch_size] bool, each row True (train it with the null condition) w.p. `rate`."""
  if not 0.0 <= rate <= 1.0:
    raise ValueError(f"model.cfg_dropout={rate} must be in [0, 1].")
  return jax.random.bernoulli(rng, rate, (batch_size,))


def token_statistics(logits, tokens) -> dict[str, jax.Array]:
  """Per-example sums over the image tokens, in float32.

  Args:
    logits: [b, n, vocab] float; position i predicts tokens[:, i].
    tokens: [b, n] int targets.
  Returns:
    {"nll": [b] sum of -log softmax(logits)[token], "correct": [b] number of
     argmax hits, "logz_sq": [b] sum of logsumexp(logits)^2}.
  """
  logits = logits.astype(jnp.float32)
  logz = jax.nn.logsumexp(logits, axis=-1)
  # A one-hot product rather than a gather: partitions cleanly when vocab is sharded.
  target = jnp.sum(jax.nn.one_hot(tokens, logits.shape[-1], dtype=jnp.float32) * logits, -1)
  correct = jnp.argmax(logits, axis=-1) == tokens
  return {"nll": jnp.sum(logz - target, -1), "correct": jnp.sum(correct, -1, jnp.float32),
          "logz_sq": jnp.sum(jnp.square(logz), -1)}


def _check_tokens(tokens, num_tokens: int):
  if tokens.ndim != 2 or tokens.shape[1] != num_tokens:
    raise ValueError(f"Batch tokens have shape {tokens.shape}; the model needs [b, {num_tokens}] "
                     "(model.grid_size^2): were they encoded with a different tokenizer?")
  return tokens


def build_task(config, model, init_args: tuple, apply_fn: ApplyFn, *, conditional: bool,
               data_transforms: tuple = ()) -> base.Steps:
  """Returns the pure init/step/eval functions of a stage-2 task.

  Args:
    config: the experiment config (optimizer, total_steps, model.cfg_dropout,
      model.z_loss_weight are read).
    model: VIM or Parti.
    init_args: example positional inputs of `model.init` (batch of 1).
    apply_fn: see `ApplyFn`; `drop` is a [b] bool mask in training and None in
      eval, `rng` the dropout rng (None in eval).
    conditional: whether rows have a condition to drop (CFG).
    data_transforms: per-example grain maps the task's batches need.
  """
  tx = optimizers.create_optimizer(config.optimizer, config.total_steps)
  learning_rate = optimizers.learning_rate_fn(config.optimizer, config.total_steps)
  ema_decay = config.optimizer.ema_decay
  cfg_dropout = float(config.model.cfg_dropout)
  z_loss_weight = float(config.model.z_loss_weight)
  num_tokens = model.num_tokens

  def init(rng):
    params = model.init({"params": rng}, *init_args, train=False)["params"]
    return TrainState(step=jnp.zeros((), jnp.int32), params={"model": params},
                      opt_state={"model": optimizers.init_state(tx, params)},
                      ema_params={"model": params} if ema_decay > 0 else {}, extra={})

  def train_step(state, batch, rng, frozen):
    del frozen
    tokens = _check_tokens(batch["tokens"], num_tokens)
    weights = batch["mask"].astype(jnp.float32)  # All ones in training batches.
    drop_rng, dropout_rng = jax.random.split(rng)
    drop = (drop_condition_mask(drop_rng, tokens.shape[0], cfg_dropout)
            if conditional else None)
    denominator = jnp.maximum(weights.sum(), 1.0) * num_tokens

    def loss_fn(params):
      logits, counts = apply_fn(params, batch, drop=drop, train=True, rng=dropout_rng)
      stats = {k: jnp.sum(v * weights) for k, v in token_statistics(logits, tokens).items()}
      cross_entropy = stats["nll"] / denominator
      z_loss = z_loss_weight * stats["logz_sq"] / denominator
      metrics = {"loss": cross_entropy + z_loss, "cross_entropy": cross_entropy,
                 "z_loss": z_loss, "bits_per_token": cross_entropy / LN2,
                 "accuracy": stats["correct"] / denominator,
                 **{k: jnp.sum(v * weights) for k, v in counts.items()}}
      return metrics["loss"], metrics

    params = state.params["model"]
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    updates, opt_state = tx.update(grads, state.opt_state["model"], params)
    new_params = optax.apply_updates(params, updates)
    ema_params = state.ema_params
    if ema_decay > 0:
      ema_params = {"model": optimizers.update_ema(ema_params["model"], new_params, ema_decay)}
    metrics.update(grad_norm=optax.global_norm(grads), param_norm=optax.global_norm(new_params),
                   update_norm=optax.global_norm(updates), lr=learning_rate(state.step))
    if drop is not None:
      metrics["cfg_drop_fraction"] = jnp.mean(drop.astype(jnp.float32))
    new_state = state.replace(step=state.step + 1, params={"model": new_params},
                              opt_state={"model": opt_state}, ema_params=ema_params)
    return new_state, metrics

  def eval_step(state, batch, frozen):
    del frozen
    params = state.ema_params["model"] if ema_decay > 0 else state.params["model"]
    tokens = _check_tokens(batch["tokens"], num_tokens)
    logits, counts = apply_fn(params, batch, drop=None, train=False, rng=None)
    stats = token_statistics(logits, tokens)
    return {"nll": stats["nll"], "correct": stats["correct"], "mask": batch["mask"], **counts}

  def summarize_eval(outputs):
    # Eval batches are padded to whole global batches with mask=0 rows.
    cat = {k: np.concatenate([np.asarray(o[k], np.float64) for o in outputs])
           for k in outputs[0]}
    valid = cat.pop("mask") > 0
    num_examples = int(valid.sum())
    tokens_seen = max(num_examples * num_tokens, 1)
    loss = float(cat.pop("nll")[valid].sum() / tokens_seen)
    metrics = {"loss": loss, "bits_per_token": loss / LN2, "perplexity": math.exp(loss),
               "accuracy": float(cat.pop("correct")[valid].sum() / tokens_seen),
               "num_examples": num_examples}
    metrics.update({k: float(v[valid].sum()) for k, v in cat.items()})
    return metrics, None

  return base.Steps(init=init, train_step=train_step, eval_step=eval_step,
                    summarize_eval=summarize_eval, compute_dtype=config.model.dtype,
                    data_transforms=tuple(data_transforms))

