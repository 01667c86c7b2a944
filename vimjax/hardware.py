"""Every accelerator fact vimjax uses, in one table: peak FLOP/s, HBM, ICI, libtpu names.

Rows are keyed by a short name ("v4", "h100"), the name `aot_compile --topology`
takes; `by_device_kind` finds a row from jax's `Device.device_kind`, the only
name a running program has. An unknown device is not an error: `peak_flops`
returns None with a warning, and callers fall back (the training loop measures
a matmul peak; an MFU without a peak is reported as None).

Vendor numbers: dense bf16 FLOP/s per jax device (a v4 / v5p device is one
megacore chip), HBM per device, and the one-way bandwidth of one ICI link (JAX
scaling book, "How to Scale Your Model", part 2).
"""
import dataclasses

from absl import logging

GIB = 1024 ** 3
GB = 1000 ** 3


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator generation.

  Attributes:
    device_kinds: the `jax.Device.device_kind` strings of this chip.
    peak_flops: dense bf16 FLOP/s per device.
    hbm_bytes: HBM per device.
    ici_link_bytes_per_s: one-way bandwidth of one ICI link (TPUs), else None.
    libtpu_name: prefix of libtpu's topology name (TPUs), else None.
    chip_config: libtpu's chip config: "megacore" = one device per two TensorCores.
    dims: torus dimensions of a slice (TPUs), else 0.
  """
  device_kinds: tuple[str, ...]
  peak_flops: float
  hbm_bytes: int
  ici_link_bytes_per_s: float | None = None
  libtpu_name: str | None = None
  chip_config: str | None = None
  dims: int = 0


CHIPS = {
    "v4": Chip(("TPU v4",), 275e12, 32 * GIB, 4.5e10, "v4", "megacore", 3),
    "v5p": Chip(("TPU v5p", "TPU v5"), 459e12, 95 * GIB, 9e10, "v5", "megacore", 3),
    "v5e": Chip(("TPU v5 lite", "TPU v5e"), 197e12, 16 * GIB, 4.5e10, "v5e", "default", 2),
    "v6e": Chip(("TPU v6 lite", "TPU v6e"), 918e12, 32 * GIB, 9e10, "v6e", "default", 2),
    "h100": Chip(("NVIDIA H100 80GB HBM3",), 989e12, 80 * GB),
    "h200": Chip(("NVIDIA H200",), 989e12, 141 * GB),
    "a100-80gb": Chip(("NVIDIA A100-SXM4-80GB",), 312e12, 80 * GB),
    "a100-40gb": Chip(("NVIDIA A100-SXM4-40GB",), 312e12, 40 * GB),
}
# The TPU generations `aot_compile --topology` can compile for.
TPUS = {name: chip for name, chip in CHIPS.items() if chip.libtpu_name}

_warned = set()


def by_device_kind(device_kind: str) -> Chip | None:
  """The row whose `device_kinds` holds `device_kind`, else None."""
  for chip in CHIPS.values():
    if device_kind in chip.device_kinds:
      return chip
  return None


def peak_flops(device_kind: str) -> float | None:
  """Dense bf16 peak FLOP/s of one device of this kind; None (with a warning) if unknown."""
  chip = by_device_kind(device_kind)
  if chip is None:
    if device_kind not in _warned and device_kind != "cpu":  # CPUs: measured, as expected.
      _warned.add(device_kind)
      logging.warning("No peak FLOP/s known for device kind %r (known: %s); set "
                      "--config.peak_flops_per_device for a true MFU.", device_kind,
                      sorted(k for c in CHIPS.values() for k in c.device_kinds))
    return None
  return chip.peak_flops
