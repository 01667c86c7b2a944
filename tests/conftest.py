"""Test setup, before jax is imported anywhere: 8 fake CPU devices, cheap CPU codegen and one
compilation cache per test run; session fixtures that train a model once per run."""
import contextlib
import fcntl
import os
import shutil
import tempfile

import pytest

# LLVM at -O0 without its expensive passes: ~40% less CPU per tiny training run (measured:
# 66 s -> 39 s of CPU for a 4-step micro tokenizer run). XLA's HLO passes (fusion, layout,
# sharding) are unchanged; that run's loss agrees to all 7 printed digits, PSNR to 1e-7.
# Subprocesses inherit these flags (and the cache below) through the environment.
os.environ["XLA_FLAGS"] = " ".join([
    os.environ.get("XLA_FLAGS", ""), "--xla_force_host_platform_device_count=8",
    "--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true"]).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

# A persistent compilation cache that lives for one test run only (a fresh folder, removed
# at the end, so nothing compiled by other code can be served): a program compiled again
# (the same config trained twice, a binary rerunning what its test compiled in-process) is
# read back instead. Entries are keyed by the program, compile options and flags, so a
# changed program always compiles. The xdist workers inherit the controller's folder.
_OWN_CACHE = None
if "PYTEST_XDIST_WORKER" not in os.environ:
  _OWN_CACHE = tempfile.mkdtemp(prefix="vimjax_test_xla_cache_")
  os.environ.update(JAX_COMPILATION_CACHE_DIR=_OWN_CACHE,
                    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
                    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")


def pytest_configure(config):
  # Tiers: `make test-fast` deselects these; `make test` (and CI) runs everything.
  config.addinivalue_line("markers", "slow: trains through the real loop or runs binaries")
  config.addinivalue_line("markers", "multiprocess: starts several jax.distributed processes")
  config.addinivalue_line("markers", "libtpu: compiles for TPU topologies with libtpu")


# The slowest files first (seconds of `make test` before these cuts, --durations), so that
# `-n 2 --dist=loadfile --no-loadscope-reorder` (the Makefile) starts the long ones early
# and ends on short files on both workers; xdist's default order (most tests first) left
# test_chaos's single 120 s test for the end. The rest keep their alphabetical order.
SLOWEST_FILES = (
    "test_train_tokenizer.py",  # 354 s
    "test_chaos.py",  # 120 s
    "test_sample_binary.py",  # 116 s
    "test_multihost.py",  # 99 s
    "test_finetune.py",  # 94 s
    "test_strategies.py",  # 87 s
    "test_train_stage2.py",  # 74 s
    "test_survive.py",  # 66 s
    "test_fid_workflow.py",  # 62 s
    "test_aot_compile.py",  # 57 s
    "test_tokenizer_step.py",  # 54 s
    "test_levers.py",  # 44 s
    "test_benchmark.py",  # 43 s
    "test_contrastive.py",  # 41 s
    "test_linear_probe.py",  # 35 s
)


def pytest_collection_modifyitems(items):
  rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # Stable: keeps the rest.


def pytest_unconfigure(config):
  del config
  if _OWN_CACHE:
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


@contextlib.contextmanager
def _run_once(tmp_path_factory, name):
  """Yields (path, done) under an exclusive lock on `name` in the run's shared tmp folder.

  Under xdist each worker has its own basetemp; their parent is shared by the run, so
  the first worker builds `path` and the others wait on the lock, then reuse it.
  """
  root = tmp_path_factory.getbasetemp()
  if "PYTEST_XDIST_WORKER" in os.environ:
    root = root.parent
  path, done = root / name, root / f"{name}.done"
  with open(root / f"{name}.lock", "w") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    try:
      yield path, done.exists()
    except BaseException:
      shutil.rmtree(path, ignore_errors=True)  # A half-built folder is never reused.
      raise
    done.touch()


def tiny_tokenizer_config():
  """The shared tiny tokenizer: 16 px, 4x4 grid of 64 codes, 1 block of dim 32, no GAN."""
  from vimjax.configs import vitvqgan  # pylint: disable=g-import-not-at-top
  from vimjax import config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.override(vitvqgan.get_config("tiny"), **{
      "total_steps": 2, "global_batch_size": 8, "log_every_steps": 2,
      "checkpoint_every_steps": 2, "eval_every_steps": 2, "num_eval_images": 8,
      "peak_flops_per_device": 1e12, "data.image_size": 16, "data.num_train_examples": 16,
      "data.num_eval_examples": 8, "model.patch_size": 4, "model.codebook_size": 64,
      "model.lookup_dim": 8, "loss.adversarial_weight": 0.0})
  with config.unlocked():
    for side in (config.model.encoder, config.model.decoder):
      side.update(num_layers=1, num_heads=2, emb_dim=32, mlp_dim=64)
  return config


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> str:
  """Workdir of `tiny_tokenizer_config()` trained 2 steps by the real loop, once per test run.

  Shared: read it, or copy it (shutil.copytree) before anything writes into it.
  """
  from vimjax.train import loop  # pylint: disable=g-import-not-at-top
  with _run_once(tmp_path_factory, "tiny_tokenizer") as (workdir, done):
    if not done:
      loop.train_and_evaluate(tiny_tokenizer_config(), str(workdir))
  return str(workdir)
