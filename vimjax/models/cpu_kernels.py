"""vimjax's C++ kernels for XLA:CPU: built on first use, cached, registered with jax.ffi.

A `Library` is one C++ source (with the shared helpers of cpu_kernels.h) and the
FFI handlers it exports. It is compiled on first use, for this machine
(`-march=native`), with the C++ compiler in $CXX (default g++), against
jaxlib's FFI headers, into $VIMJAX_KERNEL_CACHE (default ~/.cache/vimjax/kernels)
under a name that hashes the sources, the flags, the compiler, jaxlib and the
CPU, so hosts sharing a home directory do not share binaries. Without a
compiler, or if the build fails, the models run on XLA as before, with one
warning. Each library has its own switch ($VIMJAX_CPU_ATTENTION,
$VIMJAX_CPU_LAYERS: "0" turns it off, for A/B runs).

`xla_reference()` makes the models trace XLA's ops instead of every kernel while
model FLOPs are counted: XLA's cost analysis cannot see inside a custom call.
"""
import contextlib
import ctypes
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile
import threading

from absl import logging
import jax
import jaxlib

HEADER = pathlib.Path(__file__).with_name("cpu_kernels.h")
CACHE_ENV = "VIMJAX_KERNEL_CACHE"
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")

_reference = threading.local()


def in_xla_reference() -> bool:
  """Inside `xla_reference()`: models trace XLA's ops instead of the kernels."""
  return getattr(_reference, "on", False)


@contextlib.contextmanager
def xla_reference():
  """Within: models trace XLA's ops, not the kernels (model FLOPs counts)."""
  previous = getattr(_reference, "on", False)
  _reference.on = True
  try:
    yield
  finally:
    _reference.on = previous


def _cpu_identity() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return "".join(line for line in f if line.startswith(("model name", "flags")))[:4096]
  except OSError:
    return ""


def _compiler() -> str:
  return os.environ.get("CXX", "g++")


class Library:
  """One kernel source: its build, its cache entry and its registration with XLA.

  Args:
    name: the cached library's file name prefix (e.g. "cpu_attention").
    source: the .cc file, next to cpu_kernels.h.
    targets: {FFI target name: exported handler symbol}.
    enable_env: the environment variable that turns it off ("0") or on ("1").
  """

  def __init__(self, name: str, source: pathlib.Path, targets: dict[str, str],
               enable_env: str):
    self.name, self.source, self.targets, self.enable_env = name, source, targets, enable_env
    self._lock = threading.Lock()
    self._registered: bool | None = None  # None: not tried yet.

  def enabled(self) -> bool:
    """$enable_env: "1" (default) or "0"."""
    value = os.environ.get(self.enable_env, "1")
    if value not in ("0", "1"):
      raise ValueError(f"${self.enable_env}={value!r}; valid: 1 (use the {self.name} kernels "
                       "where they fit, the default) or 0 (always XLA).")
    return value == "1"

  def path(self) -> pathlib.Path:
    """Where this source, built for this machine, is (or would be) cached."""
    key = hashlib.sha256("\0".join([
        self.source.read_text(), HEADER.read_text(), _compiler(), " ".join(_FLAGS),
        jaxlib.__version__, _cpu_identity(),
    ]).encode()).hexdigest()[:16]
    cache = pathlib.Path(os.environ.get(CACHE_ENV) or
                         pathlib.Path.home() / ".cache" / "vimjax" / "kernels")
    return cache / f"{self.name}-{key}.so"

  def build(self) -> pathlib.Path:
    """Compiles the source into the cache (if not there yet); returns the library's path.

    Raises:
      RuntimeError: no compiler, or the compiler failed (its output included).
    """
    path = self.path()
    if path.exists():
      return path
    compiler = _compiler()
    if shutil.which(compiler) is None:
      raise RuntimeError(f"no C++ compiler {compiler!r} on PATH (set $CXX)")
    path.parent.mkdir(parents=True, exist_ok=True)
    # Built under a temporary name and renamed: concurrent builds (test workers) are safe.
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
    os.close(fd)
    command = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", f"-I{HEADER.parent}",
               str(self.source), "-o", tmp]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
      os.unlink(tmp)
      raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
    os.replace(tmp, path)
    return path

  def available(self) -> bool:
    """Whether the kernels are enabled and registered with XLA (built on first call)."""
    if not self.enabled():
      return False
    with self._lock:
      if self._registered is None:
        try:
          library = ctypes.cdll.LoadLibrary(str(self.build()))
          for target, symbol in self.targets.items():
            jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                        platform="cpu")
          self._registered = True
        except (RuntimeError, OSError) as e:
          logging.warning("%s kernels unavailable, XLA runs those ops: %s", self.name, e)
          self._registered = False
      return self._registered

  def require(self, caller: str) -> None:
    """Raises a one-line RuntimeError unless `available()` (registering on first call)."""
    if not self.available():
      raise RuntimeError(f"{caller}: the kernel is not available (${self.enable_env}="
                         f"{os.environ.get(self.enable_env, '1')!r}, or its build failed: see "
                         "the warning above); check its `fits` first.")
