"""Test setup: 8 fake CPU devices, set before jax is imported anywhere."""
import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def pytest_configure(config):
  # Tiers: `make test-fast` deselects these; `make test` (and CI) runs everything.
  config.addinivalue_line("markers", "slow: trains through the real loop or runs binaries")
  config.addinivalue_line("markers", "multiprocess: starts several jax.distributed processes")
  config.addinivalue_line("markers", "libtpu: compiles for TPU topologies with libtpu")
