"""orbax checkpoints: async saves of the train state, the grain iterator and the config.

A restarted job resumes from the latest step on its own (`restore_latest`;
None for an empty workdir). Restoring takes an abstract state carrying the
*current* shardings, so a checkpoint saved on one mesh loads on another.

Failure handling (README "Failure modes"): the directory is checked writable
before anything runs; a save that fails raises CheckpointError naming the path
and the cause; a broken newest checkpoint (empty folder, truncated file,
missing manifest, garbage metadata) is moved to WORKDIR/checkpoints_broken/ and
the newest intact one restored; retention keeps the last `keep` checkpoints
plus the newest one saved with `healthy` metrics (see train/guard.py).
"""
import dataclasses
import json
import os
import socket
import time
from typing import Any, Sequence

from absl import logging
from etils import epath
import grain
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from vimjax import errors


def absolute(path: str) -> str:
  """A URL (gs://...) as is, a local path made absolute (os.path.abspath breaks URLs)."""
  return path if "://" in path else os.path.abspath(path)


def checkpoints_dir(workdir: str) -> str:
  """WORKDIR/checkpoints; a gs:// URL is kept as is, a local path made absolute.

  A pod's processes must share the directory: a gs:// URL or a shared filesystem.
  """
  return os.path.join(absolute(workdir), "checkpoints")


def check_writable(directory: str) -> None:
  """Creates `directory` and writes/deletes a probe file; one-line CheckpointError if not."""
  path = epath.Path(directory)
  # Unique per process: a pod's processes probe the same shared folder at once.
  probe = path / f".write_probe.{socket.gethostname()}.{os.getpid()}.{jax.process_index()}"
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise errors.CheckpointError(
        f"cannot write checkpoints to {directory}: {errors.one_line(e)}; "
        "fix its permissions or free space, or use another --workdir.") from e


@dataclasses.dataclass
class KeepNewestHealthy:
  """orbax preservation policy: keeps the newest checkpoint whose metrics say healthy.

  Checkpoints saved without metrics (older runs) count as healthy.
  """

  def should_preserve(self, checkpoints: Sequence[Any], *, context: Any) -> list[bool]:
    del context
    keep = [False] * len(checkpoints)
    for i in range(len(checkpoints) - 1, -1, -1):
      metrics = checkpoints[i].metrics
      if not metrics or metrics.get("healthy", 1.0) > 0:
        keep[i] = True
        break
    return keep


class Checkpointer:
  """Saves {state, data, config} under `workdir/checkpoints/<step>`."""

  def __init__(self, workdir: str, *, every_steps: int, keep: int, async_save: bool = True,
               read_only: bool = False):
    if int(keep) < 1:
      raise ValueError(f"keep_checkpoints={keep}; valid: an integer >= 1.")
    self.workdir = workdir
    self.directory = checkpoints_dir(workdir)
    self.every_steps = every_steps
    if not read_only:
      check_writable(self.directory)
    policy = ocp.checkpoint_managers
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            preservation_policy=policy.AnyPreservationPolicy(
                [policy.LatestN(n=int(keep)), KeepNewestHealthy()]),
            # A best_fn makes orbax write the metrics the policy reads.
            best_fn=lambda metrics: float(metrics.get("healthy", 1.0)),
            # A save killed mid-write leaves STEP.orbax-checkpoint-tmp-*: clear it on start.
            cleanup_tmp_directories=not read_only,
            enable_async_checkpointing=async_save, create=not read_only,
            read_only=read_only))

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def should_save(self, step: int) -> bool:
    return step % self.every_steps == 0

  def save(self, step: int, state: Any, data_iterator: Any, config,
           metrics: dict | None = None) -> None:
    """Starts an async save; blocks only for the device->host copy.

    `metrics` ({"healthy": 0/1, "loss": x}) drive retention (`KeepNewestHealthy`).
    Raises CheckpointError naming the path and the cause if this or the
    previous async save failed (e.g. a full disk).
    """
    items = dict(state=ocp.args.StandardSave(state),
                 config=ocp.args.JsonSave(json.loads(config.to_json())))
    if data_iterator is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iterator)
    try:
      self.manager.save(step, args=ocp.args.Composite(**items), force=True, metrics=metrics)
    except Exception as e:  # pylint: disable=broad-except (orbax wraps OS errors variously)
      raise self._save_error(step, e) from e
    logging.info("Checkpoint save started for step %d in %s.", step, self.directory)

  def _save_error(self, step, e: Exception) -> errors.CheckpointError:
    cause = e
    while cause.__cause__ is not None and not isinstance(cause, OSError):
      cause = cause.__cause__
    return errors.CheckpointError(
        f"saving checkpoint {step} to {self.directory} failed: {errors.one_line(cause)}")

  def last_good(self) -> str:
    """The newest checkpoint saved healthy, as a path (for messages)."""
    healthy = KeepNewestHealthy()
    infos = [_Info(s, self._metrics(s)) for s in self.manager.all_steps()]
    kept = [i.step for i, k in zip(infos, healthy.should_preserve(infos, context=None)) if k]
    return os.path.join(self.directory, str(kept[0])) if kept else "none"

  def _metrics(self, step: int) -> dict | None:
    try:
      return self.manager.metrics(step)
    except Exception:  # pylint: disable=broad-except (a broken one counts as without metrics)
      return None

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
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise self._save_error(self.manager.latest_step(), e) from e

  def close(self) -> None:
    """Finishes the in-flight async save, then closes. Raises CheckpointError if it failed."""
    try:
      self.wait()
    finally:
      self.manager.close()

  def close_quietly(self) -> None:
    """`close` on an error path: never raises over the original error, only logs."""
    try:
      self.close()
    except Exception as e:  # pylint: disable=broad-except
      logging.error("While stopping on an error, the in-flight checkpoint save failed: %s",
                    errors.one_line(e))

  # Start-up: restore the newest intact checkpoint.

  def problem(self, step: int, abstract_state: Any) -> str | None:
    """Why checkpoint `step` cannot be restored (None if it looks intact).

    Raises ValueError when it is intact but holds a different state than
    `abstract_state` (a changed model config, not a broken file).
    """
    why, saved = self.saved_state(step)
    if why is None:
      _check_same_structure(step, saved, abstract_state)
    return why

  def saved_state(self, step: int) -> tuple[str | None, Any]:
    """(why checkpoint `step` is broken or None, the saved state's metadata tree)."""
    step_dir = epath.Path(self.directory) / str(step)
    try:
      if not step_dir.is_dir() or not any(step_dir.iterdir()):
        return "an empty folder", None
      json.loads((step_dir / "_CHECKPOINT_METADATA").read_text())
      for item in ("state", "config"):
        if not (step_dir / item).is_dir():
          return f"no {item!r} item", None
      if not (step_dir / "state" / "manifest.ocdbt").exists():
        return "no state/manifest.ocdbt", None
      return None, ocp.StandardCheckpointHandler().metadata(step_dir / "state")
    except (OSError, ValueError) as e:
      return errors.one_line(e)[:300], None

  def move_aside(self, step: int, why: str) -> str:
    """Moves checkpoint `step` to WORKDIR/checkpoints_broken/ (never deletes it)."""
    dest_root = epath.Path(os.path.dirname(self.directory)) / "checkpoints_broken"
    dest = dest_root / f"{step}-{time.strftime('%Y%m%d-%H%M%S')}"
    if jax.process_index() == 0:
      dest_root.mkdir(parents=True, exist_ok=True)
      (epath.Path(self.directory) / str(step)).rename(dest)
      print(f"warning: checkpoint {self.directory}/{step} is broken ({why}); "
            f"moved it to {dest} and trying the previous one.", flush=True)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"vimjax_move_aside_{step}")
    self.manager.reload()
    return str(dest)

  def restore_latest(self, abstract_state: Any, data_iterator: Any, *,
                     move_broken: bool = True) -> tuple[Any, int | None]:
    """(state, step) of the newest intact checkpoint, or (None, None) if there is none.

    Broken ones are moved aside (`move_broken`, the trainer) or skipped with a
    warning (evaluation, which must not change a workdir).
    """
    for step in sorted(self.manager.all_steps(), reverse=True):
      why = self.problem(step, abstract_state)
      if why is None:
        try:
          return self.restore(step, abstract_state, data_iterator), step
        except Exception as e:  # pylint: disable=broad-except (any unreadable byte)
          why = f"restore failed: {errors.one_line(e)[:300]}"
      if move_broken:
        self.move_aside(step, why)
      else:
        print(f"warning: checkpoint {self.directory}/{step} is broken ({why}); "
              "using the previous one.", flush=True)
    return None, None


@dataclasses.dataclass
class _Info:
  step: int
  metrics: dict | None


def _check_same_structure(step: int, saved: Any, abstract_state: Any) -> None:
  """ValueError naming the first key whose presence, shape or dtype differs."""
  def name(k):
    for attr in ("key", "name", "idx"):
      if hasattr(k, attr):
        return str(getattr(k, attr))
    return str(k)

  def flat(tree):
    return {".".join(name(k) for k in p): x
            for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  have, want = flat(saved), flat(abstract_state)
  for key in sorted(set(have) | set(want)):
    if key not in have or key not in want:
      where = "the config's state" if key not in have else f"checkpoint {step}"
      raise ValueError(f"checkpoint {step} does not match the config: {key} is missing from "
                       f"{where} (a changed model config?); use a new --workdir or the "
                       "config the run was started with.")
    a, b = have[key], want[key]
    if tuple(a.shape) != tuple(b.shape) or (a.dtype is not None and a.dtype != b.dtype):
      raise ValueError(f"checkpoint {step} does not match the config: {key} is "
                       f"{a.dtype}{list(a.shape)} there but {b.dtype}{list(b.shape)} here "
                       "(a changed model config?); use a new --workdir or the original config.")


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


def restore_params(workdir: str, subtree: str, abstract: Any = None, shardings: Any = None, *,
                   step: int | None = None, flag: str = "--workdir") -> tuple[Any, int]:
  """One subtree of the newest intact checkpoint's train state, e.g. the EMA generator.

  Only that subtree is read (orbax partial restore): the optimizer state and the
  other groups stay on disk, and arrays land straight in `shardings`. A broken
  newest checkpoint is skipped with a warning, never moved: evaluation and
  sampling binaries must not change a training workdir.

  Args:
    workdir: a training workdir, local or gs:// (checkpoints in WORKDIR/checkpoints).
    subtree: '/'-separated keys into the saved TrainState, e.g. "ema_params/model",
      "params/generator", "extra/usage_ema".
    abstract: the subtree's shapes and dtypes (e.g. the unboxed `jax.eval_shape` of
      the model's init); None takes them from the checkpoint. A mismatch raises.
    shardings: the matching shardings to restore onto; None restores host numpy arrays.
    step: restore exactly this step (no fallback), e.g. a second subtree of one step.
    flag: the flag that named `workdir`, for error messages.
  Returns:
    (the subtree, its step).
  Raises:
    ValueError, one line: no checkpoint, none intact, or a subtree that differs
    from `abstract` (a changed model config).
  """
  directory = checkpoints_dir(workdir)
  if not epath.Path(directory).is_dir():
    raise ValueError(f"{flag}={workdir!r} has no checkpoints/ folder; pass the workdir of a "
                     "`python -m vimjax.train` run.")
  keys = tuple(subtree.split("/"))
  ckpt = Checkpointer(workdir, every_steps=1, keep=1, async_save=False, read_only=True)
  broken = []
  try:
    steps = ckpt.manager.all_steps() if step is None else [step]
    for s in sorted(steps, reverse=True):
      why, saved = ckpt.saved_state(s)
      if why is None:
        item, restore_args = _restore_target(
            s, _subtree(saved.tree, keys, s, subtree), abstract, shardings, keys)
        try:
          restored = ckpt.manager.restore(s, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
              item=item, restore_args=restore_args, partial_restore=True)))
          logging.info("Restored %s of %s step %d.", subtree, directory, s)
          return _subtree(restored.state, keys, s, subtree), s
        except Exception as e:  # pylint: disable=broad-except (any unreadable byte)
          why = f"restore failed: {errors.one_line(e)[:300]}"
      broken.append(f"{s} ({why})")
      print(f"warning: checkpoint {directory}/{s} is broken ({why}); trying the previous one.",
            flush=True)
  finally:
    ckpt.close()
  if not broken:
    raise ValueError(f"{flag}={workdir!r} has no checkpoint under {directory}; train it first "
                     "with `python -m vimjax.train`.")
  raise ValueError(f"{flag}={workdir!r} has no intact checkpoint under {directory}; broken: "
                   f"{', '.join(broken)}.")


def _subtree(tree: Any, keys: tuple[str, ...], step: int, subtree: str) -> Any:
  for i, key in enumerate(keys):
    if not isinstance(tree, dict) or key not in tree:
      have = sorted(tree) if isinstance(tree, dict) else []
      raise ValueError(f"checkpoint {step} has no {'/'.join(keys[:i + 1])!r} (asked for "
                       f"{subtree!r}); it has {have}.")
    tree = tree[key]
  return tree


def _restore_target(step: int, saved: Any, abstract: Any, shardings: Any,
                    keys: tuple[str, ...]) -> tuple[Any, Any]:
  """(partial-restore item, its RestoreArgs), both nested under `keys`."""
  if abstract is not None:
    _check_same_structure(step, saved, abstract)
  else:
    abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype), saved)
  if shardings is None:  # Host numpy arrays, no placeholder memory.
    item = abstract
    args = jax.tree.map(lambda x: ocp.RestoreArgs(restore_type=np.ndarray, dtype=x.dtype),
                        abstract)
  else:
    item = abstract_with_shardings(abstract, shardings)
    args = ocp.checkpoint_utils.construct_restore_args(item)
  for key in reversed(keys):
    item, args = {key: item}, {key: args}
  return item, args
