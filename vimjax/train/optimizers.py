"""Optimizers and learning-rate schedules from an `optimizer` config section.

Keys: name (adam | adamw | adafactor), lr, b1, b2, weight_decay (decoupled),
warmup_steps, schedule (constant | cosine | exponential), end_lr,
decay_start_step (exponential: hold the peak until then), grad_clip_norm (0 =
off), accumulation_steps (1 = off), ema_decay (0 = no EMA of weights; applied by
the task's step, not here).

Step counts in the config (total_steps, warmup_steps, decay_start_step) are
train-loop steps. With accumulation_steps = k the optimizer updates once every
k loop steps and its schedule counts updates, so the schedule is built over
total_steps // k updates (warm-up and hold divided by k too): the last update
of the run gets the end-of-schedule rate. `learning_rate_fn` gives the rate
that the update at a loop step applies (what the tasks log as `lr`).

Every optimizer is `scale_by_<name>` -> decoupled weight decay -> learning
rate, so a step moves a weight by -lr_t * (direction + weight_decay * w) and a
zero-gradient step shrinks it by exactly lr_t * weight_decay (AdamW's rule).
"""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

# optax.adafactor's default: dims smaller than this are never factored.
MIN_DIM_SIZE_TO_FACTOR = 128
# Adafactor's update clipping (Shazeer & Stern 2018, d = 1; optax's default).
ADAFACTOR_CLIP_THRESHOLD = 1.0

OPTIMIZERS = ("adam", "adamw", "adafactor")
SCHEDULES = ("constant", "cosine", "exponential")


def num_updates(opt, steps: int) -> int:
  """Optimizer updates in `steps` loop steps (one per accumulation_steps)."""
  return steps // max(1, opt.accumulation_steps)


def create_schedule(opt, total_steps: int) -> optax.Schedule:
  """Update count -> rate: linear warm-up to `lr`, then `opt.schedule` to `end_lr`.

  Built in optimizer updates: `total_steps`, `opt.warmup_steps` and
  `opt.decay_start_step` (loop steps) are divided by `opt.accumulation_steps`.
  """
  if opt.schedule not in SCHEDULES:
    raise ValueError(f"optimizer.schedule={opt.schedule!r}; valid: {SCHEDULES}.")
  total = num_updates(opt, total_steps)
  warmup_steps = num_updates(opt, opt.warmup_steps)
  warmup = optax.linear_schedule(0.0, opt.lr, max(1, warmup_steps))
  decay_steps = max(1, total - warmup_steps)
  if opt.schedule == "constant":
    decay = optax.constant_schedule(opt.lr)
  elif opt.schedule == "cosine":
    decay = optax.cosine_decay_schedule(opt.lr, decay_steps, alpha=opt.end_lr / opt.lr)
  else:  # Hold, then exponential decay that reaches end_lr at total_steps (Parti, VIM).
    hold = max(0, num_updates(opt, opt.decay_start_step) - warmup_steps)
    steps = max(1, decay_steps - hold)
    decay = optax.join_schedules(
        [optax.constant_schedule(opt.lr),
         optax.exponential_decay(opt.lr, steps, opt.end_lr / opt.lr, end_value=opt.end_lr)],
        [hold])
  return optax.join_schedules([warmup, decay], [warmup_steps])


def learning_rate_fn(opt, total_steps: int) -> optax.Schedule:
  """Loop step (0-based `state.step`) -> the rate the update at that step applies.

  With accumulation the update applied at the last micro-step of a group uses
  the rate of its update count, step // k (optax.MultiSteps advances the inner
  schedule once per update).
  """
  schedule = create_schedule(opt, total_steps)
  k = max(1, opt.accumulation_steps)
  return lambda step: schedule(step // k)


def _adafactor_decay_rate(b2: float):
  """Fixed-b2 decay of the factored second moment, bias-corrected as Adam's.

  The moment after t updates is the normalised EMA (1-b2) sum_i b2^(t-i) g_i^2 /
  (1 - b2^t), whose one-step recurrence decays by b2 (1 - b2^(t-1)) / (1 - b2^t)
  (Lingvo's and T2T's `adafactor_decay_rate_adam`). optax's default is
  1 - t^-0.8, which ignores b2.
  """
  def rate(count, default_rate):
    del default_rate  # optax passes its `decay_rate`; the fixed b2 replaces it.
    t = jnp.asarray(count, jnp.float32) + 1.0
    return b2 * (1.0 - b2 ** (t - 1.0)) / (1.0 - b2 ** t)
  return rate


def _scale_by(opt) -> optax.GradientTransformation:
  """The update direction of `opt.name`, before weight decay and learning rate."""
  if opt.name in ("adam", "adamw"):
    return optax.scale_by_adam(b1=opt.b1, b2=opt.b2)
  # Adafactor: factored second moments with a fixed b2, update clipping, then a
  # first moment with b1 (the papers keep it in int8; here it is float32).
  parts = [optax.scale_by_factored_rms(
               decay_rate_fn=_adafactor_decay_rate(opt.b2),
               min_dim_size_to_factor=MIN_DIM_SIZE_TO_FACTOR),
           optax.clip_by_block_rms(ADAFACTOR_CLIP_THRESHOLD)]
  if opt.b1 > 0:
    parts.append(optax.ema(opt.b1, debias=False))
  return optax.chain(*parts)


def create_optimizer(opt, total_steps: int,
                     start_step: int = 0) -> optax.GradientTransformation:
  """Returns clip -> direction -> decoupled weight decay -> lr [-> accumulation].

  Args:
    opt: an `optimizer` config section.
    total_steps: loop steps of the run.
    start_step: the loop step of this optimizer's first update (the
      discriminator's adversarial_start_step): its schedule is read at the
      global step, not at its own update count, so it neither warms up again
      nor stops short of end_lr.
  """
  if opt.name not in OPTIMIZERS:
    raise ValueError(f"optimizer.name={opt.name!r}; valid: {OPTIMIZERS}.")
  if int(opt.accumulation_steps) < 1:
    raise ValueError(f"optimizer.accumulation_steps={opt.accumulation_steps} must be >= 1 "
                     "(1 = no accumulation).")
  if opt.name == "adam" and opt.weight_decay:
    raise ValueError(f"optimizer.name='adam' with weight_decay={opt.weight_decay}: plain Adam "
                     "has no weight decay; use name='adamw' (decoupled) or weight_decay=0.")
  schedule = create_schedule(opt, total_steps)
  offset = num_updates(opt, start_step)
  parts = []
  if opt.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(opt.grad_clip_norm))
  parts.append(_scale_by(opt))
  if opt.weight_decay:
    parts.append(optax.add_decayed_weights(opt.weight_decay))
  parts.append(optax.scale_by_learning_rate(
      (lambda count: schedule(count + offset)) if offset else schedule))
  tx = optax.chain(*parts)
  if opt.accumulation_steps > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=opt.accumulation_steps)
  return tx


def update_ema(ema_params, params, decay: float):
  """Exponential moving average of weights: ema <- decay * ema + (1 - decay) * params."""
  return optax.incremental_update(params, ema_params, step_size=1.0 - decay)


def init_state(tx: optax.GradientTransformation, params):
  """`tx.init(params)` with logical names fitted to Adafactor's factored moments.

  Optimizer state built from `nn.Partitioned` params inherits each param's
  names, right for Adam's moments, but Adafactor's factored second moments drop
  a dim: v_row drops the largest dim d0, v_col the second largest d1 (optax's
  rule), so each keeps the names of the dims it keeps (a [embed, mlp] kernel's
  v_col is [mlp] split over `tensor`, not `fsdp`); the (1,) placeholders get none.
  """
  return jax.tree.map(lambda s: _name_factored(s, params), tx.init(params),
                      is_leaf=lambda s: isinstance(s, optax.FactoredState))


def _factored_dims(shape) -> tuple[int, int] | None:
  """(d1, d0): the axes Adafactor factors over, or None when it keeps a full moment.

  A copy of optax's private rule (optax/_src/factorized.py `_factored_dims`,
  optax 0.2.8), kept here to name the moments without a private import: the two
  largest dims (ties by np.argsort), if the smaller of them is at least
  MIN_DIM_SIZE_TO_FACTOR; v_row drops d0, v_col drops d1.
  """
  if len(shape) < 2:
    return None
  sorted_dims = np.argsort(shape)
  if shape[sorted_dims[-2]] < MIN_DIM_SIZE_TO_FACTOR:
    return None
  return int(sorted_dims[-2]), int(sorted_dims[-1])


def _name_factored(state, params):
  if not isinstance(state, optax.FactoredState):
    return state

  def moment(which):
    def fit(box, param):
      if not isinstance(box, nn.Partitioned) or not isinstance(param, nn.Partitioned):
        return box
      dims = _factored_dims(param.value.shape)
      placeholder = (None,) * box.value.ndim
      if which == "v":  # The full moment of an unfactored param, else a placeholder.
        names = param.names if box.value.shape == param.value.shape else placeholder
      elif dims is None:
        names = placeholder
      else:  # v_row drops d0 = dims[1], v_col drops d1 = dims[0].
        drop = dims[1] if which == "v_row" else dims[0]
        names = tuple(n for i, n in enumerate(param.names) if i != drop)
      return box.replace(names=names if len(names) == box.value.ndim else placeholder)
    return jax.tree.map(fit, getattr(state, which), params,
                        is_leaf=lambda x: isinstance(x, nn.Partitioned))

  return state._replace(v_row=moment("v_row"), v_col=moment("v_col"), v=moment("v"))
