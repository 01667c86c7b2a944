"""One training run per workdir: a lease file with host, PID and a heartbeat.

`WORKDIR/lock.json` names its holder (host, PID, start time) and a heartbeat
time that a daemon thread refreshes every `heartbeat_s`. Through etils.epath it
works on a local disk and on gs:// alike. A second run refuses at once with a
line naming the holder. A lock is stale, and is taken over with a warning, when
its holder is a dead process on this host, or when its heartbeat is older than
`stale_after_s` (a holder on another host that died).

Local paths are created with O_EXCL, so two starts cannot both win. Object
stores have no O_EXCL through epath: there the lease is written, then read
back after `settle_s`; of two runs that start in the same instant the one that
reads back someone else's lease refuses. The heartbeat thread re-reads the
lease too, so a holder that lost it (e.g. paused past `stale_after_s` and taken
over) stops at its next checkpoint with `lost()` instead of overwriting.
"""
import contextlib
import json
import os
import socket
import threading
import time

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import numpy as np

from vimjax import errors

LOCK_NAME = "lock.json"


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # Alive, owned by someone else.
    return True
  return True


def describe(holder: dict) -> str:
  age = time.time() - float(holder.get("heartbeat", 0))
  return (f"host {holder.get('host')!r} PID {holder.get('pid')} "
          f"(started {time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(holder.get('start', 0)))}, "
          f"last heartbeat {age:.0f}s ago)")


class WorkdirLock:
  """The lease on one workdir; `acquire()` then `release()` (or use as a context)."""

  def __init__(self, workdir: str, *, heartbeat_s: float = 30.0, stale_after_s: float = 300.0,
               settle_s: float = 1.0):
    self.path = epath.Path(workdir) / LOCK_NAME
    self.local = "://" not in str(workdir)
    self.heartbeat_s = heartbeat_s
    self.stale_after_s = stale_after_s
    self.settle_s = settle_s
    self.me = {"host": socket.gethostname(), "pid": os.getpid(), "start": time.time()}
    self._stop = threading.Event()
    self._thread = None
    self._lost = None

  def _lease(self) -> dict:
    return {**self.me, "heartbeat": time.time()}

  def read(self) -> dict | None:
    try:
      return json.loads(self.path.read_text())
    except FileNotFoundError:
      return None
    except (ValueError, OSError):  # Half-written or garbage: treat as a dead holder.
      return {}

  def _is_mine(self, holder: dict | None) -> bool:
    return bool(holder) and all(holder.get(k) == v for k, v in self.me.items())

  def _stale(self, holder: dict) -> str | None:
    """Why `holder`'s lease may be taken over, or None if it is live."""
    if not holder:
      return "it is unreadable"
    if holder.get("host") == self.me["host"] and not _pid_alive(int(holder.get("pid", -1))):
      return f"PID {holder.get('pid')} is not running on this host"
    age = time.time() - float(holder.get("heartbeat", 0))
    if age > self.stale_after_s:
      return f"its heartbeat is {age:.0f}s old (> {self.stale_after_s:.0f}s)"
    return None

  def _create_exclusive(self) -> bool:
    data = json.dumps(self._lease())
    if self.local:
      try:
        fd = os.open(os.fspath(self.path), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
      except FileExistsError:
        return False
      with os.fdopen(fd, "w") as f:
        f.write(data)
      return True
    if self.path.exists():
      return False
    self.path.write_text(data)
    time.sleep(self.settle_s)  # Last writer wins on object stores: check it was us.
    return self._is_mine(self.read())

  def acquire(self) -> "WorkdirLock":
    """Takes the lease or raises WorkdirLockedError naming the live holder."""
    try:
      return self._acquire()
    except OSError as e:
      raise errors.WorkdirLockedError(
          f"cannot write the workdir lock {self.path}: {errors.one_line(e)}; fix the "
          "workdir's permissions or free space, or use another --workdir.") from e

  def _acquire(self) -> "WorkdirLock":
    self.path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(3):
      if self._create_exclusive():
        break
      holder = self.read()
      if holder is None:
        continue  # Released between our two looks: try again.
      reason = self._stale(holder)
      if reason is None:
        raise errors.WorkdirLockedError(
            f"workdir {str(self.path.parent)!r} is in use by another training run: "
            f"{describe(holder)}; stop it first, or use another --workdir (lease: {self.path}).")
      logging.warning("Taking over the stale workdir lock of %s: %s.",
                      describe(holder) if holder else "an unknown holder", reason)
      self.path.unlink(missing_ok=True)
    else:
      raise errors.WorkdirLockedError(f"could not take the workdir lock {self.path} "
                                      "(another run keeps taking it).")
    self._thread = threading.Thread(target=self._beat, name="workdir-lock", daemon=True)
    self._thread.start()
    return self

  def _beat(self) -> None:
    while not self._stop.wait(self.heartbeat_s):
      try:
        holder = self.read()
        if holder is not None and not self._is_mine(holder):
          self._lost = describe(holder) if holder else "an unreadable lease"
          logging.error("Lost the workdir lock %s to %s.", self.path, self._lost)
          return
        self.path.write_text(json.dumps(self._lease()))
      except OSError as e:  # Keep beating: a transient store error must not kill the run.
        logging.warning("Workdir lock heartbeat failed: %s", e)

  def check(self) -> None:
    """Raises WorkdirLockedError if another run took the lease over (called before saves)."""
    if self._lost:
      raise errors.WorkdirLockedError(
          f"lost the workdir lock {self.path} to {self._lost}; stopping without saving so "
          "the two runs do not overwrite each other's checkpoints.")

  def release(self) -> None:
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=10)
    try:
      if self._lost is None and self._is_mine(self.read()):
        self.path.unlink(missing_ok=True)
    except OSError as e:
      logging.warning("Could not remove the workdir lock %s: %s", self.path, e)

  def __enter__(self):
    return self.acquire()

  def __exit__(self, *exc):
    self.release()


class _Follower:
  """Stands for process 0's lock on the other processes of a pod."""

  def check(self) -> None:
    pass


@contextlib.contextmanager
def hold(workdir: str, **kwargs):
  """Holds the workdir's lock for the block (process 0 takes it for the whole pod).

  Every process raises WorkdirLockedError together if process 0 could not take
  it, so none is left waiting in a collective.
  """
  lock, message = None, ""
  if jax.process_index() == 0:
    try:
      lock = WorkdirLock(workdir, **kwargs).acquire()
    except errors.WorkdirLockedError as e:
      message = str(e)
      if jax.process_count() == 1:
        raise
  if jax.process_count() > 1:
    failed = multihost_utils.broadcast_one_to_all(np.int32(lock is None))
    if int(failed):
      if lock is not None:
        lock.release()
      raise errors.WorkdirLockedError(message or "process 0 could not take the workdir lock.")
  try:
    yield lock if lock is not None else _Follower()
  finally:
    if lock is not None:
      lock.release()
