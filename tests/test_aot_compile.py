"""aot_compile: real train/sampling steps compiled by libtpu for small TPU slices, on CPU.

libtpu comes with the `test` extra (jax[tpu]); no TPU is needed. Configs are the
tiny variants cut to one layer so that each TPU compile takes seconds.
"""
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from vimjax.configs import parti
from vimjax.configs import vim
from vimjax.configs import vitvqgan
from vimjax import aot_compile
from vimjax import config_lib
from vimjax import tasks

pytestmark = pytest.mark.libtpu

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MEMORY_FIELDS = ("argument_bytes", "output_bytes", "code_bytes", "total_bytes")


def _one_layer(config, **overrides):
  layers = {f"model.{key}": 1 for key in tasks.get(config).LAYER_KEYS}
  return config_lib.override(config, **{**layers, **overrides})


def _check_fits(out: dict):
  for field in MEMORY_FIELDS:
    assert out[field] > 0, field
  assert out["total_bytes"] == (out["argument_bytes"] + out["output_bytes"]
                                - out["alias_bytes"] + out["temp_bytes"] + out["code_bytes"])
  assert out["fits"] and 0 < out["hbm_fraction"] < 1


@pytest.mark.parametrize("topology", ["v4", "v5e:16", "v5p:2x2", "v6e:2x2x1", "tpu:2x2",
                                      "v4:0x2x2", "v5e:2x2;rm"])
def test_bad_topology_is_a_one_line_error_naming_it(topology):
  with pytest.raises(ValueError) as e:
    aot_compile.parse_topology(topology)
  message = str(e.value)
  assert repr(topology) in message and "v4:AxBxC" in message and "\n" not in message


def test_topologies_come_from_libtpu():
  chip, devices = aot_compile.topology_devices("v4:2x2x2")
  assert chip == "v4" and len(devices) == 8 and devices[0].device_kind == "TPU v4"
  assert len({d.process_index for d in devices}) == 2  # Hosts of 2x2 chips.
  chip, devices = aot_compile.topology_devices("v5e:2x2")
  assert chip == "v5e" and len(devices) == 4 and devices[0].device_kind == "TPU v5 lite"
  assert aot_compile.parse_topology("v5p:8x8x8") == ("v5p", (8, 8, 8))
  assert aot_compile.parse_topology("v6e:16x16") == ("v6e", (16, 16))


def test_scanned_vim_train_step_fits_a_v5e_slice():
  config = _one_layer(vim.get_config("tiny"), **{"model.scan_layers": True,
                                                 "model.num_layers": 3})
  result = aot_compile.run(config, topology="v5e:2x2", mode="train")
  assert result["fits"] and result["num_chips"] == 4 and result["num_hosts"] == 1
  assert result["mesh"] == {"data": 4, "fsdp": 1, "tensor": 1}
  assert result["strategy"].startswith("DP4; remat=none, scan")
  assert result["hbm_bytes_per_chip"] == 16 * 2**30
  train = result["train"]
  _check_fits(train)
  assert train["alias_bytes"] > 0  # The donated state is updated in place.
  # Model FLOPs are global, and count all 3 layers; XLA's count of the compiled
  # (per-chip) program sees the scanned stack once.
  assert train["flops_per_step"] == pytest.approx(4 * train["flops_per_step_per_chip"])
  assert train["compiled_flops_per_chip"] < train["flops_per_step_per_chip"]
  # The cost model gives no time for a scan: unscanned 1- and 2-layer probes do.
  assert "extrapolated" in train["step_time_source"]
  assert train["estimated_step_time_s"] > 0
  assert train["mfu"] == pytest.approx(
      train["flops_per_step"] / (train["estimated_step_time_s"] * 4 * 197e12))
  assert "sample" not in result
  json.dumps(result)  # The binary prints it as one JSON line.


def test_parti_and_tokenizer_train_steps_fit_a_v4_slice():
  config = _one_layer(parti.get_config("tiny"), **{"global_batch_size": 8})
  result = aot_compile.run(config, topology="v4:2x2x1", mode="both")
  assert result["fits"] and result["device_kind"] == "TPU v4"
  train = result["train"]
  _check_fits(train)
  _check_fits(result["sample"])  # KV-cache decoding with classifier-free guidance.
  # Guided (the tiny config's cfg_scale > 1): the conditional and unconditional rows.
  assert result["sample"]["cfg_scale"] == config.sampling.cfg_scale > 1
  assert result["sample"]["sample_batch_size"] == 4
  assert train["step_time_source"] == "compiler" and 0 < train["mfu"] < 1
  assert train["compiled_flops_per_chip"] == pytest.approx(train["flops_per_step_per_chip"],
                                                           rel=0.2)

  config = _one_layer(vitvqgan.get_config("tiny"), **{
      "global_batch_size": 8, "mesh.data": 2, "mesh.fsdp": 2})
  result = aot_compile.run(config, topology="v4:2x2x1", mode="both",
                           estimate_step_time_=False)
  assert result["fits"] and "sample" not in result  # A tokenizer has no sampling call.
  assert result["strategy"].startswith("DP2 x FSDP2")
  train = result["train"]
  _check_fits(train)
  # Without the cost model's time, the step time is the roofline's.
  assert train["step_time_source"].startswith("roofline (cost model: not requested")
  roof = train["roofline"]
  assert train["estimated_step_time_s"] == roof["step_time_s"] > roof["compute_s"] > 0
  # DP2 x FSDP2 gathers the FSDP-sharded weights and reduces the gradients.
  assert roof["collective_bytes_by_kind"]["all-gather"] > 0
  # Rings along 1 or 2 of the 2x2 slice's torus dims.
  bytes_ = roof["collective_bytes_per_chip"]
  assert bytes_ / 18e10 * 0.999 <= roof["collective_s"] <= bytes_ / 9e10 * 1.001
  assert train["mfu"] == pytest.approx(
      train["flops_per_step"] / (roof["step_time_s"] * 4 * 275e12))


def test_a_program_too_large_for_hbm_is_reported_not_raised():
  _, devices = aot_compile.topology_devices("v5e:2x2")
  mesh = jax.sharding.Mesh(np.array(devices), ("d",))
  sharded = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("d"))
  big = jax.ShapeDtypeStruct((4 * 2**33,), jnp.float32)  # 32 GiB per chip.
  lowered = jax.jit(lambda x: jnp.cumsum(x * 2), in_shardings=sharded,
                    out_shardings=sharded).lower(big)
  with pytest.raises(aot_compile.OutOfMemory) as e:
    aot_compile.compile_lowered(lowered)
  assert e.value.required_bytes > 16 * 2**30
  memory = aot_compile.oom_memory(e.value, 16 * 2**30)
  assert not memory["fits"] and memory["hbm_fraction"] > 1
  assert "RESOURCE_EXHAUSTED" in memory["compiler_error"]
  parsed = aot_compile.OutOfMemory(
      "RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory required for HLO "
      "temporaries (475.05G) exceeds available HBM (30.75G).")
  assert parsed.required_bytes == int(475.05 * 2**30)


def test_binary_exits_1_and_prints_fits_false_when_over_the_hbm_budget():
  cmd = [sys.executable, "-m", "vimjax.aot_compile", "--config=configs/vim.py:tiny",
         "--config.model.num_layers=1", "--topology=v5e:2x2", "--mode=sample",
         "--hbm_gib=0.001"]
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1, proc.stderr[-2000:]
  result = json.loads(proc.stdout.strip().splitlines()[-1])
  assert result["fits"] is False and result["hbm_bytes_per_chip"] == int(0.001 * 2**30)
  assert "train" not in result and result["sample"]["sample_batch_size"] == 4
  assert result["sample"]["total_bytes"] > result["hbm_bytes_per_chip"]
