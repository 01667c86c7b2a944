"""What the binaries log: the project's lines and warnings, not the libraries' chatter.

- `quiet_environment()` (run when `vimjax` is imported, before TensorFlow or
  libtpu load): TensorFlow's "oneDNN custom operations are on" banner is off
  (TF only decodes data here; its oneDNN kernels do no model math), and, on a
  machine without TPU chips (an AOT compile for a described slice), libtpu gets
  placeholder local-host values. Without them it prints `Failed to find host
  bounds` and `E... INVALID_ARGUMENT: unexpected worker hostname ...
  TPU_WORKER_HOSTNAMES` on every successful compile: it looks for the local
  TPU hosts, which an AOT compile never uses. Variables already set win.
- `install()` (run by `errors.run` for every binary): orbax's INFO lines (75-85%
  of a training log: one per file of every checkpoint save) are dropped;
  orbax's warnings and errors stay. `--verbosity=1` (absl's debug level) keeps
  them all.
- `progress(what)`: a line before a long silent call (compiling, counting
  FLOPs), one a minute while it runs, one with its time after.
- `create_metric_writer(logdir)`: TensorBoard only. clu's default writer also
  logs every scalar, which doubled each log step of the training loop, whose
  own line says more (loss, steps/s, MFU).
"""
import contextlib
import logging
import os
import threading
import time

from absl import logging as absl_logging

# Libraries whose INFO lines are progress chatter (by source path).
QUIET_PACKAGES = (f"{os.sep}orbax{os.sep}",)


def _has_local_tpu() -> bool:
  """TPU chips show up as /dev/accel* (v2-v4) or /dev/vfio/N (v5e and later)."""
  def names(directory):
    return os.listdir(directory) if os.path.isdir(directory) else []
  return (any(n.startswith("accel") for n in names("/dev"))
          or any(n.isdigit() for n in names("/dev/vfio")))


def quiet_environment() -> None:
  """Sets the variables above unless set; call before TensorFlow / libtpu load."""
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")
  if not _has_local_tpu():
    os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
    os.environ.setdefault("TPU_HOST_BOUNDS", "1,1,1")


class _QuietLibraries(logging.Filter):
  """Drops INFO-and-below records of QUIET_PACKAGES unless absl's verbosity is debug."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.WARNING or absl_logging.get_verbosity() >= absl_logging.DEBUG:
      return True
    return not any(package in record.pathname for package in QUIET_PACKAGES)


_FILTER = _QuietLibraries()


def install() -> None:
  """Adds the filter to absl's handler (idempotent); call once flags are parsed."""
  handler = absl_logging.get_absl_handler()
  if _FILTER not in handler.filters:
    handler.addFilter(_FILTER)


def create_metric_writer(logdir: str, write: bool = True):
  """A clu MetricWriter of TensorBoard event files under `logdir` (asynchronous);
  `write=False` (processes > 0) gives one that writes nothing."""
  from clu import metric_writers  # pylint: disable=g-import-not-at-top (imports TensorFlow)
  if not write:
    return metric_writers.MultiWriter([])
  return metric_writers.AsyncWriter(metric_writers.SummaryWriter(logdir))


def config_hparams(config) -> dict:
  """The config as TensorBoard hparams: {dotted key: bool / int / float / str}
  (other values, e.g. tuples and None, as their repr)."""
  flat = {}
  def visit(node, prefix):
    for key in sorted(node.keys()):
      value = node[key]
      if hasattr(value, "keys") and callable(value.keys):
        visit(value, f"{prefix}{key}.")
      else:
        flat[prefix + key] = value if isinstance(value, (bool, int, float, str)) else repr(value)
  visit(config, "")
  return flat


@contextlib.contextmanager
def progress(what: str, every_s: float = 60.0):
  """Logs `what` now, "... still <what>: N s" every `every_s` from a thread
  while the block runs (e.g. a compile: one C++ call that can take minutes), and
  "<what>: done in N s" at the end."""
  absl_logging.info("%s...", what)
  start, done = time.perf_counter(), threading.Event()

  def beat():
    while not done.wait(every_s):
      absl_logging.info("... still %s: %.0f s so far.", what.lower(), time.perf_counter() - start)

  thread = threading.Thread(target=beat, daemon=True, name="progress")
  thread.start()
  try:
    yield
  finally:
    done.set()
    thread.join()
  absl_logging.info("%s: done in %.1f s.", what, time.perf_counter() - start)
