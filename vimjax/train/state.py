"""The train state: plain data, one pytree, donated to every step."""
from typing import Any

from flax import struct
import jax


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
