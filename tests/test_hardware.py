"""hardware: one table of chip facts; an unknown device falls back instead of raising."""
import logging

import jax
import pytest

from vimjax import flops
from vimjax import hardware
from vimjax import roofline


def test_device_kinds_map_to_one_row_each():
  kinds = [k for chip in hardware.CHIPS.values() for k in chip.device_kinds]
  assert len(kinds) == len(set(kinds))
  assert hardware.by_device_kind("TPU v5 lite") is hardware.CHIPS["v5e"]
  assert hardware.peak_flops("TPU v4") == 275e12
  assert set(hardware.TPUS) == {"v4", "v5p", "v5e", "v6e"}
  assert all(c.ici_link_bytes_per_s and c.dims in (2, 3) for c in hardware.TPUS.values())


def test_unknown_device_warns_and_the_loop_measures_its_peak(monkeypatch, caplog):
  with caplog.at_level(logging.WARNING):
    assert hardware.peak_flops("Imaginary TPU v99") is None
  assert "No peak FLOP/s known for device kind 'Imaginary TPU v99'" in caplog.text
  assert jax.devices()[0].device_kind not in {
      k for c in hardware.CHIPS.values() for k in c.device_kinds}  # CPU: unknown.
  monkeypatch.setattr(flops, "measured_peak_flops", lambda dtype: 1.5e9)
  assert flops.peak_flops_per_device(0.0, "float32") == 1.5e9
  assert flops.peak_flops_per_device(2e12, "float32") == 2e12


def test_roofline_reads_link_bandwidth_from_the_table():
  coll = roofline.Collective("all-reduce", "main", 4, bytes_per_chip=9e10, executions=1)
  assert roofline.collective_seconds([coll], "v5p") == pytest.approx(0.5)
  with pytest.raises(ValueError, match="No ICI bandwidth for chip 'h100'"):
    roofline.collective_seconds([coll], "h100")
