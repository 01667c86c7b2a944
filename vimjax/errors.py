"""One-line errors for every binary: `error: ...` on stderr and exit code 1.

`run(main)` replaces `absl.app.run(main)`. Flag parsing and `main` are wrapped so
that the project's own errors (config validation, data sources, checkpoints,
workdir locks, divergence, OS errors such as a full disk) print one line
instead of a traceback. `--debug` (or VIMJAX_DEBUG=1) re-raises them, so the
traceback is one flag away. Bugs (any other exception) keep their traceback.
"""
import difflib
import importlib.util
import os
import sys
from typing import Callable

from absl import app
from absl import flags

from vimjax import log_setup
from vimjax.perf import allocator

DEBUG_ENV = "VIMJAX_DEBUG"
_DEBUG = flags.DEFINE_bool(
    "debug", False, f"Show the traceback of user-facing errors (or set ${DEBUG_ENV}=1).")


class Error(Exception):
  """Base of the project's user-facing runtime errors (not config validation)."""


class CheckpointError(Error):
  """A checkpoint cannot be saved or restored (names the path and the cause)."""


class WorkdirLockedError(Error):
  """Another live training process holds the workdir."""


class DivergedError(Error, FloatingPointError):
  """Training produced a non-finite loss or gradient norm."""


# What a user can fix from one line; everything else is a bug and keeps its traceback.
USER_ERRORS = (Error, ValueError, OSError, FloatingPointError)


def one_line(exc: BaseException) -> str:
  """The exception as one line (OSErrors name the path and the cause)."""
  if isinstance(exc, OSError) and exc.strerror:
    where = f" ({exc.filename})" if exc.filename else ""
    text = f"{exc.strerror}{where}"
  else:
    text = str(exc) or type(exc).__name__
  lines = [line.strip() for line in text.splitlines() if line.strip()]
  return "; ".join(lines) if lines else type(exc).__name__


def debug_enabled(argv=None) -> bool:
  argv = sys.argv if argv is None else argv
  if os.environ.get(DEBUG_ENV, "") not in ("", "0"):
    return True
  if any(a in ("--debug", "--debug=true", "--debug=1") for a in argv[1:]):
    return True
  try:
    return bool(_DEBUG.value)
  except flags.UnparsedFlagAccessError:
    return False


def _fail(message: str) -> None:
  sys.stderr.flush()
  print(f"error: {message}", file=sys.stderr, flush=True)
  raise SystemExit(1)


def dotted_keys(config, prefix: str = "") -> list[str]:
  """Every dotted key of a ConfigDict, sections included ("optimizer", "optimizer.lr")."""
  keys = []
  for name in config.keys():
    dotted = f"{prefix}{name}"
    keys.append(dotted)
    child = config[name]
    if hasattr(child, "keys") and callable(child.keys) and not isinstance(child, dict):
      keys += dotted_keys(child, dotted + ".")
  return keys


def unknown_key_message(key: str, config) -> str | None:
  """'`foo` is not a config key' with the closest valid key, or None if `key` exists."""
  valid = dotted_keys(config)
  if key in valid:
    return None
  # Longest prefix that exists: `model.encoder.nmu_layers` -> inside `model.encoder`.
  parts = key.split(".")
  for depth in range(len(parts) - 1, 0, -1):
    parent = ".".join(parts[:depth])
    if parent in valid and not any(k.startswith(parent + ".") for k in valid):
      return f"--config.{key}: {parent!r} is a value, not a section, so {key!r} is not a config key."
  leaf = parts[-1]
  candidates = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
  if not candidates:  # `--config.lr` -> `optimizer.lr`: same leaf elsewhere.
    same_leaf = sorted((k for k in valid if k.split(".")[-1] == leaf), key=len)
    candidates = same_leaf[:1] or difflib.get_close_matches(
        leaf, [k.split(".")[-1] for k in valid], n=1, cutoff=0.6)
    if candidates and candidates[0] not in valid:
      candidates = [k for k in valid if k.split(".")[-1] == candidates[0]][:1]
  if candidates:
    hint = f"; did you mean {candidates[0]!r}?"
  else:
    parent = ".".join(parts[:-1])
    siblings = [k for k in valid if k.count(".") == parent.count(".") + bool(parent)
                and k.startswith(parent + "." if parent else "")]
    hint = f"; valid keys {'in ' + repr(parent) if parent else 'at the top'}: {', '.join(siblings)}."
  return f"--config.{key}: {key!r} is not a config key{hint}"


def _load_config_file(spec: str):
  """The ConfigDict of `--config=PATH[:VARIANT]` (for messages only)."""
  path, _, variant = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("_vimjax_config_for_errors", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()


def _config_for_messages(argv, flag_values):
  if "config" in flag_values and flag_values["config"].value is not None:
    return flag_values["config"].value
  for arg in argv[1:]:
    if arg.startswith("--config="):
      try:
        return _load_config_file(arg.split("=", 1)[1])
      except Exception:  # pylint: disable=broad-except (the original error is reported)
        return None
  return None


def _parse_error_message(exc: BaseException, argv, flag_values) -> str:
  """One line for a flag-parsing failure; unknown config keys get a suggestion."""
  config = _config_for_messages(argv, flag_values)
  if config is not None:
    for arg in argv[1:]:
      if arg.startswith("--config."):
        key = arg[len("--config."):].split("=", 1)[0]
        message = unknown_key_message(key, config)
        if message:
          return message
  return one_line(exc)


def parse_flags(argv, flag_values=flags.FLAGS):
  """`flag_values(argv)` with one-line errors (the `flags_parser` of `run`)."""
  try:
    return flag_values(argv)
  except flags.Error as e:
    if debug_enabled(argv):
      raise
    _fail(f"{_parse_error_message(e, argv, flag_values)} (see --helpshort)")
  except (AttributeError, KeyError, TypeError, ValueError) as e:  # ml_collections overrides.
    if debug_enabled(argv):
      raise
    _fail(_parse_error_message(e, argv, flag_values))


def guarded(main: Callable) -> Callable:
  """`main` with the project's errors turned into `error: ...` and exit code 1."""
  def wrapper(argv):
    try:
      return main(argv)
    except USER_ERRORS as e:
      if debug_enabled(argv):
        raise
      _fail(one_line(e))
  return wrapper


def run(main: Callable) -> None:
  """`absl.app.run(main)` with one-line errors from flag parsing and from `main`,
  the libraries' INFO chatter filtered out (log_setup.py), and TCMalloc
  preloaded where it is installed (perf/allocator.py: re-executes the binary)."""
  try:
    allocator.reexec_with_tcmalloc()
  except ValueError as e:
    _fail(one_line(e))
  log_setup.install()
  app.run(guarded(main), flags_parser=parse_flags)
