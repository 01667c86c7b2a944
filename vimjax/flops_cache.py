"""Model FLOPs of a run, counted once: cached in the workdir, counted off the critical path.

`flops.model_flops_by_phase` lowers the whole unrolled train step (about 3
minutes for the 20B Parti, on every host). A run needs the number only for
MFU, so `StepFlops`:

  * reads WORKDIR/model_flops.json when it holds the count for this
    fingerprint: a restarted or resumed run lowers nothing;
  * else counts in a background thread, while the real (scanned) step
    compiles, and process 0 writes the file. Log lines before the count is done
    carry no MFU; a failed count is a warning, never a failed run.

The fingerprint covers everything that can change the count: the config minus
the keys that only steer the run (`RUN_ONLY_KEYS`), jax's version and the
source of the vimjax package (an edited model recounts).
"""
import hashlib
import json
import pathlib
import threading
from typing import Any

from absl import logging
from etils import epath
import jax

from vimjax import flops

CACHE_FILE = "model_flops.json"
# Config keys that do not change the train step's program (its FLOPs).
RUN_ONLY_KEYS = ("total_steps", "log_every_steps", "eval_every_steps", "checkpoint_every_steps",
                 "keep_checkpoints", "num_eval_images", "seed", "peak_flops_per_device",
                 "max_loss_ratio", "tokenizer_workdir", "eval")
RUN_ONLY_DATA_KEYS = ("source", "num_train_examples", "num_eval_examples")

Phases = tuple[tuple[int, float], ...]


def fingerprint(config) -> str:
  """sha256 of what decides the model FLOPs of `config`'s train step."""
  cfg = json.loads(config.to_json_best_effort())
  for key in RUN_ONLY_KEYS:
    cfg.pop(key, None)
  for key in RUN_ONLY_DATA_KEYS:
    cfg.get("data", {}).pop(key, None)
  digest = hashlib.sha256(json.dumps(cfg, sort_keys=True).encode())
  digest.update(jax.__version__.encode())
  package = pathlib.Path(__file__).parent
  for path in sorted(package.rglob("*.py")):
    digest.update(str(path.relative_to(package)).encode())
    digest.update(path.read_bytes())
  return digest.hexdigest()


def read(workdir: str, key: str) -> Phases | None:
  """The cached phases for fingerprint `key`, or None."""
  path = epath.Path(workdir) / CACHE_FILE
  try:
    entry = json.loads(path.read_text()).get(key) if path.exists() else None
  except (OSError, ValueError) as e:
    logging.warning("Ignoring the unreadable %s: %s", path, e)
    return None
  return None if entry is None else tuple((int(s), float(f)) for s, f in entry)


def write(workdir: str, key: str, phases: Phases) -> None:
  """Adds `phases` under `key` (other fingerprints' entries are kept)."""
  path = epath.Path(workdir) / CACHE_FILE
  try:
    cache = json.loads(path.read_text()) if path.exists() else {}
  except (OSError, ValueError):
    cache = {}
  cache[key] = [list(p) for p in phases]
  path.write_text(json.dumps(cache, indent=1))


class StepFlops:
  """The run's model FLOPs per phase (see `flops.model_flops_by_phase`), counted once."""

  def __init__(self, task, config, workdir: str):
    self._key = fingerprint(config)
    self._phases = read(workdir, self._key)
    self._thread = None
    if self._phases is not None:
      logging.info("Model FLOPs per step from %s/%s.", workdir, CACHE_FILE)
      return
    write_cache = jax.process_index() == 0

    def count():
      try:
        phases = flops.model_flops_by_phase(task, config)
        if write_cache:
          write(workdir, self._key, phases)
        self._phases = phases
        logging.info("Counted model FLOPs per step: %s.", phases)
      except Exception as e:  # pylint: disable=broad-except (MFU must never stop a run)
        logging.warning("Could not count the model FLOPs (%s); MFU is not reported.", e)
    self._thread = threading.Thread(target=count, name="vimjax-model-flops", daemon=True)
    self._thread.start()

  @property
  def counted_now(self) -> bool:
    """True when this start counted (a cache miss), False when it read the cache."""
    return self._thread is not None

  def phases(self, wait: bool = False) -> Phases | None:
    """The phases, or None while the count runs (always waits when `wait`)."""
    if wait and self._thread is not None:
      self._thread.join()
    return self._phases

  def per_step(self, wait: bool = False) -> Any:
    """Global model FLOPs of one step of the last phase, or None (see `phases`)."""
    phases = self.phases(wait)
    return None if phases is None else phases[-1][1]
