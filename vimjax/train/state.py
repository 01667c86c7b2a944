"""The train state: plain data, one pytree, donated to every step."""
from typing import Any

from flax import struct
import jax

from vimjax import parallel


@struct.dataclass
class TrainState:
  """Everything a step reads and writes.

  Attributes:
    step: int32 [] number of optimizer steps taken.
    params: {group: params}; one group per optimizer, e.g. the tokenizer's
      {"generator": ..., "discriminator": ...} or {"model": ...} for stage 2.
    opt_state: {group: optax state}, same keys as `params`.
    ema_params: {group: EMA of params} for groups with EMA on, else {}.
    extra: task statistics carried between steps (codebook usage EMA,
      LeCam EMAs, ...), {} when none.
  """
  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any
  extra: Any


def state_shardings(steps, mesh, rules, rng):
  """(abstract unboxed state, NamedShardings) of `steps.init` from the params' logical names."""
  abstract = jax.eval_shape(steps.init, rng)
  shardings = parallel.logical_to_shardings(abstract, mesh, rules)
  return parallel.unbox(abstract), shardings


def create_sharded_state(steps, mesh, rules, rng):
  """Initialises the train state directly sharded (never gathered on one device)."""
  _, shardings = state_shardings(steps, mesh, rules, rng)
  init = jax.jit(lambda r: parallel.unbox(steps.init(r)), out_shardings=shardings)
  return init(rng), shardings
