"""orbax checkpoints: async saves of the train state, the grain iterator and the config.

A restarted job resumes from the latest step on its own: `restore_or_none`
returns None for an empty workdir. Restoring takes an abstract state carrying
the *current* shardings, so a checkpoint saved on one mesh loads on another.
"""
import json
import os
from typing import Any

from absl import logging
from etils import epath
import grain
import jax
import ml_collections
import orbax.checkpoint as ocp


def checkpoints_dir(workdir: str) -> str:
  """WORKDIR/checkpoints; a gs:// URL is kept as is, a local path made absolute.

  A pod's processes must share the directory: a gs:// URL or a shared filesystem.
  """
  root = workdir if "://" in workdir else os.path.abspath(workdir)
  return os.path.join(root, "checkpoints")


class Checkpointer:
  """Saves {state, data, config} under `workdir/checkpoints/<step>`."""

  def __init__(self, workdir: str, *, every_steps: int, keep: int, async_save: bool = True):
    self.directory = checkpoints_dir(workdir)
    self.every_steps = every_steps
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=keep, enable_async_checkpointing=async_save, create=True))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    return step % self.every_steps == 0

  def save(self, step: int, state: Any, data_iterator: Any, config) -> None:
    """Starts an async save; blocks only for the device->host copy."""
    items = dict(state=ocp.args.StandardSave(state),
                 config=ocp.args.JsonSave(json.loads(config.to_json())))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    logging.info("Checkpoint save started for step %d in %s.", step, self.directory)

  def restore(self, step: int, abstract_state: Any, data_iterator: Any) -> Any:
    """Restores `state` (resharded to `abstract_state`'s shardings) and the iterator in place."""
    items = dict(state=ocp.args.StandardRestore(abstract_state))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointRestore(data_iterator)
    restored = self.manager.restore(step, args=ocp.args.Composite(**items))
    logging.info("Restored step %d from %s.", step, self.directory)
    return restored.state

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def load_workdir_config(workdir: str, flag: str = "--workdir") -> ml_collections.ConfigDict:
  """The config a training run saved as WORKDIR/config.json (local or gs://)."""
  if not workdir:
    raise ValueError(f"{flag} is required: a training workdir (it has config.json).")
  path = epath.Path(workdir) / "config.json"
  if not path.exists():
    raise ValueError(f"{flag}={workdir!r} has no config.json; pass the workdir of a "
                     "`python -m vimjax.train` run.")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def abstract_with_shardings(tree: Any, shardings: Any) -> Any:
  """ShapeDtypeStructs that carry the target shardings (for resharding restores)."""
  return jax.tree.map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)
