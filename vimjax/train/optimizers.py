"""Optimizers and learning-rate schedules from an `optimizer` config section.

Keys: name (adam | adamw | adafactor), lr, b1, b2, weight_decay (decoupled),
warmup_steps, schedule (constant | cosine | exponential), end_lr,
decay_start_step (exponential: hold the peak until then), grad_clip_norm (0 =
off), accumulation_steps (1 = off), ema_decay (0 = no EMA of weights; applied by
the task's step, not here).
"""
import flax.linen as nn
import jax
import optax
from optax._src import factorized

# optax.adafactor's default: dims smaller than this are never factored.
MIN_DIM_SIZE_TO_FACTOR = 128

OPTIMIZERS = ("adam", "adamw", "adafactor")
SCHEDULES = ("constant", "cosine", "exponential")


def create_schedule(opt, total_steps: int) -> optax.Schedule:
  """Linear warm-up to `lr`, then the decay named by `opt.schedule` to `end_lr`."""
  if opt.schedule not in SCHEDULES:
    raise ValueError(f"optimizer.schedule={opt.schedule!r}; valid: {SCHEDULES}.")
  warmup = optax.linear_schedule(0.0, opt.lr, max(1, opt.warmup_steps))
  decay_steps = max(1, total_steps - opt.warmup_steps)
  if opt.schedule == "constant":
    decay = optax.constant_schedule(opt.lr)
  elif opt.schedule == "cosine":
    decay = optax.cosine_decay_schedule(opt.lr, decay_steps, alpha=opt.end_lr / opt.lr)
  else:  # Hold, then exponential decay that reaches end_lr at total_steps (Parti, VIM).
    hold = max(0, opt.decay_start_step - opt.warmup_steps)
    steps = max(1, decay_steps - hold)
    decay = optax.join_schedules(
        [optax.constant_schedule(opt.lr),
         optax.exponential_decay(opt.lr, steps, opt.end_lr / opt.lr, end_value=opt.end_lr)],
        [hold])
  return optax.join_schedules([warmup, decay], [opt.warmup_steps])


def create_optimizer(opt, total_steps: int) -> optax.GradientTransformation:
  """Returns clip -> optimizer (with decoupled weight decay) [-> accumulation]."""
  if opt.name not in OPTIMIZERS:
    raise ValueError(f"optimizer.name={opt.name!r}; valid: {OPTIMIZERS}.")
  schedule = create_schedule(opt, total_steps)
  if opt.name == "adam":
    tx = optax.adam(schedule, b1=opt.b1, b2=opt.b2)
  elif opt.name == "adamw":
    tx = optax.adamw(schedule, b1=opt.b1, b2=opt.b2, weight_decay=opt.weight_decay)
  else:
    # Factored second moments with optax's step-dependent decay 1 - t^-0.8 (b2 is
    # not used: optax has no fixed-b2 factored RMS); first moment with b1 (the
    # papers keep it in int8, here it is float32).
    tx = optax.adafactor(schedule, momentum=opt.b1,
                         weight_decay_rate=opt.weight_decay or None,
                         multiply_by_parameter_scale=False)
  if opt.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), tx)
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
                      is_leaf=lambda s: isinstance(s, factorized.FactoredState))


def _name_factored(state, params):
  if not isinstance(state, factorized.FactoredState):
    return state

  def moment(which):
    def fit(box, param):
      if not isinstance(box, nn.Partitioned) or not isinstance(param, nn.Partitioned):
        return box
      dims = factorized._factored_dims(  # pylint: disable=protected-access
          param.value.shape, True, MIN_DIM_SIZE_TO_FACTOR)
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
