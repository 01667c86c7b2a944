"""TCMalloc for the binaries: XLA:CPU's buffers without a page fault per step.

XLA:CPU allocates every step's buffers with `malloc`. glibc serves blocks over
its mmap threshold (32 MiB at most) with `mmap` and gives them back with
`munmap` on free, so each step touches fresh pages: the tokenizer step at the
issue-13 dims (attention probabilities of 33.5 MB per layer) takes ~360k minor
page faults, 1.4 GB of zeroed pages, per step, and runs 1.45 s; with TCMalloc,
which keeps freed memory, ~1k faults and 1.2 s (BUILD_NOTES.md, "Speed").
The Cloud TPU VM images preload TCMalloc for the same reason.

A preload only works from the start of a process, so `reexec_with_tcmalloc()`
(called by `errors.run`, the start-up of every binary) re-executes the binary
once with `LD_PRELOAD` set when a TCMalloc library is installed
(Debian / Ubuntu: `apt-get install libtcmalloc-minimal4`) and not yet loaded.
`VIMJAX_MALLOC=system` keeps the process's allocator; `VIMJAX_TCMALLOC=PATH`
names the library.
"""
import ctypes.util
import os
import sys

MODE_ENV = "VIMJAX_MALLOC"          # "tcmalloc" (default) or "system".
LIBRARY_ENV = "VIMJAX_TCMALLOC"     # Path of the library, overriding the search.
_REEXEC_ENV = "VIMJAX_MALLOC_REEXEC"  # Set in the re-executed process: never twice.
MODES = ("tcmalloc", "system")


def mode(environ=os.environ) -> str:
  value = environ.get(MODE_ENV, "tcmalloc") or "tcmalloc"
  if value not in MODES:
    raise ValueError(f"${MODE_ENV}={value!r} must be one of {MODES}.")
  return value


def find_tcmalloc(environ=os.environ) -> str | None:
  """An installed TCMalloc shared library (a path, or a soname the loader finds), or None."""
  named = environ.get(LIBRARY_ENV)
  if named:
    if not os.path.isfile(named):
      raise ValueError(f"${LIBRARY_ENV}={named!r} is not a file (a TCMalloc shared library, "
                       "e.g. /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4).")
    return named
  for name in ("tcmalloc_minimal", "tcmalloc"):  # The loader's cache (ldconfig).
    found = ctypes.util.find_library(name)
    if found:
      return found
  return None


def loaded() -> str:
  """The allocator this process runs with: "tcmalloc" or "system"."""
  try:
    with open("/proc/self/maps") as maps:
      return "tcmalloc" if "tcmalloc" in maps.read() else "system"
  except OSError:  # Not Linux: no preload either.
    return "system"


def preload_environment(environ, library: str) -> dict:
  """`environ` with `library` first in LD_PRELOAD and the re-exec guard set."""
  env = dict(environ)
  env["LD_PRELOAD"] = ":".join(p for p in (library, environ.get("LD_PRELOAD", "")) if p)
  env[_REEXEC_ENV] = "1"
  # Some gperftools builds report every allocation over 1 GiB on stderr (checkpoint
  # restores of big models); 100 GiB, as the Cloud TPU VM images set it.
  env.setdefault("TCMALLOC_LARGE_ALLOC_REPORT_THRESHOLD", str(100 << 30))
  return env


def reexec_with_tcmalloc() -> None:
  """Re-executes this binary with TCMalloc preloaded, where it applies; else returns."""
  if (not sys.platform.startswith("linux") or mode() == "system"
      or os.environ.get(_REEXEC_ENV) or loaded() == "tcmalloc"):
    return
  library = find_tcmalloc()
  if library is None:  # The system malloc, as before (the benchmark reports it).
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(sys.executable, list(sys.orig_argv), preload_environment(os.environ, library))
