"""Fused softmax attention on XLA:CPU: a C++ kernel (cpu_attention.cc) behind jax.ffi.

`layers.Attention` takes it on the CPU where it fits (`fits`): float32, no mask,
not causal, no attention dropout, head_dim 16, 32 or 64, query lengths that are
multiples of 8 and key lengths multiples of 32 (the ViT tokenizer's attention).
Everything else takes `layers.heads_major_attention`. At issue 13's tokenizer
dims the forward + backward of a layer takes 21 ms here against 43 for XLA's
batched matmuls, transposes and softmax (BUILD_NOTES.md, "Speed (issue 13)",
seventh round; `benchmarks/micro_attention.py attention_backward_designs`).

The kernel is compiled on first use, for this machine (`-march=native`), with the
C++ compiler in $CXX (default g++), against jaxlib's FFI headers, into
$VIMJAX_KERNEL_CACHE (default ~/.cache/vimjax/kernels) under a name that hashes
the source, the flags, the compiler, jaxlib and the CPU, so hosts sharing a home
directory do not share binaries. Without a compiler, or if the build fails, the
model runs on XLA as before, with one warning. `VIMJAX_CPU_ATTENTION=0` turns the
kernel off (A/B runs); `xla_reference()` does the same while model FLOPs are
counted, since XLA's cost analysis cannot see inside a custom call.

Under a mesh the kernel runs per shard (`jax.shard_map`) over the batch and
heads axes the logical axis rules give the activations, as splash does on TPU;
a sharded length or head_dim falls back to XLA.
"""
import contextlib
import ctypes
import functools
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile
import threading

from absl import logging
import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

from vimjax.models import splash

SOURCE = pathlib.Path(__file__).with_name("cpu_attention.cc")
HEAD_DIMS = (16, 32, 64)
QUERY_BLOCK, KEY_BLOCK = 8, 32  # Lengths must be multiples of these.
ENABLE_ENV, CACHE_ENV = "VIMJAX_CPU_ATTENTION", "VIMJAX_KERNEL_CACHE"
_FLAGS = ("-O3", "-march=native", "-std=c++17", "-shared", "-fPIC")
_TARGETS = {"vimjax_attention_forward": "VimjaxAttentionForward",
            "vimjax_attention_backward": "VimjaxAttentionBackward"}

_lock = threading.Lock()
_registered: bool | None = None  # None: not tried yet.
_reference = threading.local()


def enabled() -> bool:
  """$VIMJAX_CPU_ATTENTION: "1" (default) or "0"."""
  value = os.environ.get(ENABLE_ENV, "1")
  if value not in ("0", "1"):
    raise ValueError(f"${ENABLE_ENV}={value!r}; valid: 1 (use the CPU attention kernel "
                     "where it fits, the default) or 0 (always XLA).")
  return value == "1"


def in_xla_reference() -> bool:
  """Inside `xla_reference()`: models trace XLA's attention instead of the kernel."""
  return getattr(_reference, "on", False)


@contextlib.contextmanager
def xla_reference():
  """Within: models trace XLA's attention (model FLOPs counts; `in_xla_reference`)."""
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


def library_path() -> pathlib.Path:
  """Where this source, built for this machine, is (or would be) cached."""
  key = hashlib.sha256("\0".join([
      SOURCE.read_text(), _compiler(), " ".join(_FLAGS), jaxlib.__version__, _cpu_identity(),
  ]).encode()).hexdigest()[:16]
  cache = pathlib.Path(os.environ.get(CACHE_ENV) or
                       pathlib.Path.home() / ".cache" / "vimjax" / "kernels")
  return cache / f"cpu_attention-{key}.so"


def build() -> pathlib.Path:
  """Compiles the kernel into the cache (if not there yet); returns the library's path.

  Raises:
    RuntimeError: no compiler, or the compiler failed (its output included).
  """
  path = library_path()
  if path.exists():
    return path
  compiler = _compiler()
  if shutil.which(compiler) is None:
    raise RuntimeError(f"no C++ compiler {compiler!r} on PATH (set $CXX)")
  path.parent.mkdir(parents=True, exist_ok=True)
  # Built under a temporary name and renamed: concurrent builds (test workers) are safe.
  fd, tmp = tempfile.mkstemp(suffix=".so", dir=path.parent)
  os.close(fd)
  command = [compiler, *_FLAGS, f"-I{jax.ffi.include_dir()}", str(SOURCE), "-o", tmp]
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  if result.returncode != 0:
    os.unlink(tmp)
    raise RuntimeError(f"{' '.join(command)} failed:\n{result.stderr[-2000:]}")
  os.replace(tmp, path)
  return path


def available() -> bool:
  """Whether the kernel is enabled and registered with XLA (built on first call)."""
  global _registered
  if not enabled():
    return False
  with _lock:
    if _registered is None:
      try:
        library = ctypes.cdll.LoadLibrary(str(build()))
        for target, symbol in _TARGETS.items():
          jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(getattr(library, symbol)),
                                      platform="cpu")
        _registered = True
      except (RuntimeError, OSError) as e:
        logging.warning("CPU attention kernel unavailable, attention runs on XLA: %s", e)
        _registered = False
    return _registered


def fits(query, key, mask, causal: bool) -> bool:
  """Whether `cpu_attention(query, key, value)` computes this attention (see module doc)."""
  if mask is not None or causal:
    return False
  batch, q_len, heads, head_dim = query.shape
  if (query.dtype != jnp.float32 or key.dtype != jnp.float32 or head_dim not in HEAD_DIMS
      or q_len % QUERY_BLOCK or key.shape[1] % KEY_BLOCK):
    return False
  if splash.batch_heads_spec(jax.sharding.get_abstract_mesh(), batch, heads) is None:
    return False
  return available()


def _call(target, outputs, *args, scale: float):
  return jax.ffi.ffi_call(target, outputs, vmap_method="sequential")(
      *args, scale=np.float32(scale))


def _forward(query, key, value, scale):
  batch, q_len, heads, _ = query.shape
  return _call("vimjax_attention_forward",
               (jax.ShapeDtypeStruct(query.shape, jnp.float32),
                jax.ShapeDtypeStruct((batch, heads, q_len), jnp.float32)),
               query, key, value, scale=scale)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _attention(query, key, value, scale):
  return _forward(query, key, value, scale)[0]


def _attention_fwd(query, key, value, scale):
  out, lse = _forward(query, key, value, scale)
  return out, (query, key, value, out, lse)


def _attention_bwd(scale, residuals, d_out):
  query, key, value, _, _ = residuals
  shapes = tuple(jax.ShapeDtypeStruct(x.shape, jnp.float32) for x in (query, key, value))
  return tuple(_call("vimjax_attention_backward", shapes, *residuals, d_out, scale=scale))


_attention.defvjp(_attention_fwd, _attention_bwd)


def cpu_attention(query, key, value, scale: float = 1.0):
  """softmax(scale query key^T) value by the kernel (check `fits` first).

  Args:
    query: [b, q, heads, head_dim] float32.
    key, value: [b, k, heads, head_dim] float32.
    scale: of the logits, applied inside the kernel (a Python float).
  Returns:
    [b, q, heads, head_dim] float32.
  """
  if not available():  # Also registers the kernel with XLA on the first call.
    raise RuntimeError(f"cpu_attention: the kernel is not available (${ENABLE_ENV}="
                       f"{os.environ.get(ENABLE_ENV, '1')!r}, or its build failed: see the "
                       "warning above); check cpu_attention.fits first.")
  attention = functools.partial(_attention, scale=float(scale))
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty:
    return attention(query, key, value)
  per_shard = splash.batch_heads_spec(mesh, query.shape[0], query.shape[2])
  if per_shard is None:
    raise ValueError("cpu_attention: activation length / head_dim are sharded; the kernel "
                     "shards over batch and heads only (check cpu_attention.fits first).")
  batch_axes, heads_axes, _, _ = per_shard
  spec = jax.sharding.PartitionSpec(batch_axes, None, heads_axes, None)
  return jax.shard_map(attention, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=False)(query, key, value)
