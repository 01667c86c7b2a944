r"""python -m vimjax.aot_compile --config=configs/parti.py:20b --topology=v4:8x8x8

Proof of fit without a TPU: compiles the real, sharded train step (and the
KV-cache sampling call) ahead of time for a Cloud TPU slice described by
libtpu (`jax.experimental.topologies`), with abstract inputs only, and prints a
final JSON line:

  {"fits": true|false, "topology", "chip", "num_chips", "num_hosts",
   "hbm_bytes_per_chip", "mesh", "strategy", "global_batch_size", "num_params",
   "train": {...}, "sample": {...}}

where each mode holds the compiled program's per-chip memory
(`argument_bytes`, `output_bytes`, `alias_bytes`, `temp_bytes`, `code_bytes`,
`total_bytes` = argument + output - alias + temp + code, `hbm_fraction`,
`fits`), `compile_s`, and for the train step `flops_per_step` (the model's
FLOPs, `flops.model_flops_per_step`: XLA's cost analysis of a compiled program
counts a scanned layer stack once), `estimated_step_time_s` and the implied
`mfu` (model FLOPs / (step time x chips x peak bf16 FLOP/s per chip)), and
`roofline` (see below). The exit
code is 1 when a compiled program does not fit the chip's HBM.

  --topology  v4:AxBxC | v5p:AxBxC | v5e:AxB | v6e:AxB (chips per dimension;
              e.g. v4:8x8x8 = v4-1024, v5p:4x4x8, v5e:16x16, v6e:8x16)
  --mode      train | sample | both (default; tokenizer configs: train only)
  --sample_batch_size  images per sampling call (0 = the data-parallel size)
  --hbm_gib   override the chip's HBM (e.g. to test a smaller budget)

The step-time estimate is the TPU compiler's cost model (`cost_analysis()`
"optimal_seconds") where it gives one. It gives none for loops (a scanned
layer stack, the sampling decode loop) nor for sharded programs with
collectives (it then returns a value <= 0): for a scanned stack the binary
compiles the unscanned program with 1 and 2 layers per stack and extrapolates
linearly to the real depth; where that gives nothing too (or with
--noestimate_step_time) the estimate is the roofline of `vimjax.roofline`:
executed FLOPs at peak plus the bytes of the compiled program's collectives
over ICI, no overlap. `step_time_source` says which; `train.roofline` always
holds the roofline's parts (compute_s, collective_s, bytes by collective kind).

The mesh, batch and everything else come from the config; override as usual,
e.g. --config.mesh.fsdp=64 --config.mesh.tensor=8 --config.global_batch_size=2048.
Run as a program it compiles on CPU (it sets JAX_PLATFORMS=cpu unless given,
before jax starts); libtpu must be installed (`pip install -e .[tpu]`).
"""
import importlib.util
import os
import re
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
from etils import epath
import flax.linen as nn
import jax
from jax.experimental import topologies
import numpy as np

from vimjax import errors
from vimjax import flops
from vimjax import hardware
from vimjax import log_setup
from vimjax import parallel
from vimjax import roofline
from vimjax import runtime
from vimjax import tasks
from vimjax.perf import synthetic
from vimjax.train import loop

MODES = ("train", "sample", "both")
GIB = 1024 ** 3


CHIPS = hardware.TPUS  # libtpu names, torus dims and HBM of each TPU generation.
TOPOLOGY_FORMS = "v4:AxBxC, v5p:AxBxC, v5e:AxB or v6e:AxB (e.g. v4:8x8x8, v5e:16x16)"


def parse_topology(topology: str) -> tuple[str, tuple[int, ...]]:
  """'v4:8x8x8' -> ('v4', (8, 8, 8)); a one-line ValueError names the valid forms."""
  match = re.fullmatch(r"(v4|v5p|v5e|v6e):(\d+(?:x\d+)*)", topology.strip().lower())
  if match:
    chip, dims = match.group(1), tuple(int(d) for d in match.group(2).split("x"))
    if len(dims) == CHIPS[chip].dims and all(d > 0 for d in dims):
      return chip, dims
  raise ValueError(f"--topology={topology!r} is not a TPU slice; valid: {TOPOLOGY_FORMS}.")


def topology_devices(topology: str):
  """(chip name, compile-only devices of every chip in the slice) from libtpu."""
  chip, dims = parse_topology(topology)
  if importlib.util.find_spec("libtpu") is None:
    raise ValueError(f"--topology={topology!r} needs libtpu, which is not installed: "
                     "pip install -e .[tpu] (it compiles on CPU; no TPU is needed).")
  # Allow other processes (tests, a second aot_compile) to load libtpu at the same time.
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  spec = CHIPS[chip]
  dims3 = dims + (1,) * (3 - len(dims))
  # Hosts hold 2x2 chips (2x1 / 1x1 for the smallest slices); full tori wrap.
  per_host = (min(dims3[0], 2), min(dims3[1], 2), 1)
  if spec.dims == 3:
    wrap = (all(d % 4 == 0 for d in dims),) * 3
  else:
    wrap = (dims == (16, 16),) * 2 + (False,)
  try:
    desc = topologies.get_topology_desc(
        f"{spec.libtpu_name}:{'x'.join(map(str, dims))}", "tpu",
        chip_config_name=spec.chip_config, chips_per_host_bounds=per_host,
        num_slices=1, wrap=wrap)
  except Exception as e:  # pylint: disable=broad-except (libtpu raises several kinds)
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    raise ValueError(f"libtpu rejected --topology={topology!r} ({first}); valid: "
                     f"{TOPOLOGY_FORMS}, with slice sizes Cloud TPU offers.") from None
  return chip, list(desc.devices)


def strategy(config, mesh) -> str:
  """One line: the parallelism and the memory savers in use."""
  names = {"data": "DP", "fsdp": "FSDP", "tensor": "TP"}
  parts = [f"{names[a]}{mesh.shape[a]}" for a in parallel.MESH_AXES if mesh.shape[a] > 1]
  m = config.model
  extras = [f"remat={m.remat_policy}"] + (["scan"] if m.scan_layers else [])
  extras += [f"{m.dtype} compute", config.optimizer.name]
  return " x ".join(parts or ["single chip"]) + "; " + ", ".join(extras)


class OutOfMemory(Exception):
  """The TPU compiler refused a program that cannot fit in HBM."""

  def __init__(self, message: str):
    super().__init__(message)
    self.message = message
    # "... required for HLO temporaries (475.05G) exceeds available HBM (30.75G)."
    match = re.search(r"\(([\d.]+)([KMGT]?)\) exceeds available HBM", message)
    scale = {"": 1, "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}
    self.required_bytes = (int(float(match.group(1)) * scale[match.group(2)])
                           if match else None)


def compile_lowered(lowered):
  """lowered.compile(); raises OutOfMemory when the compiler says it cannot fit."""
  try:
    return lowered.compile()
  except jax.errors.JaxRuntimeError as e:
    if "RESOURCE_EXHAUSTED" in str(e):
      raise OutOfMemory(str(e).strip().splitlines()[0]) from None
    raise


def oom_memory(error: OutOfMemory, hbm_bytes: int) -> dict:
  """The memory fields of a program the compiler refused (only its estimate is known)."""
  required = error.required_bytes
  return {
      "argument_bytes": None, "output_bytes": None, "alias_bytes": None,
      "temp_bytes": required, "code_bytes": None, "total_bytes": required,
      "total_gib": required / GIB if required else None,
      "hbm_fraction": required / hbm_bytes if required else None,
      "fits": False, "compiler_error": error.message,
  }


def memory(compiled, hbm_bytes: int) -> dict:
  """Per-chip bytes of a compiled program against `hbm_bytes`."""
  stats = compiled.memory_analysis()
  out = {
      "argument_bytes": int(stats.argument_size_in_bytes),
      "output_bytes": int(stats.output_size_in_bytes),
      "alias_bytes": int(stats.alias_size_in_bytes),
      "temp_bytes": int(stats.temp_size_in_bytes),
      "code_bytes": int(stats.generated_code_size_in_bytes),
  }
  # Donated state: outputs aliasing arguments occupy the same buffers.
  out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"]
                        + out["temp_bytes"] + out["code_bytes"])
  out["total_gib"] = out["total_bytes"] / GIB
  out["hbm_fraction"] = out["total_bytes"] / hbm_bytes
  out["fits"] = out["total_bytes"] <= hbm_bytes
  return out


def optimal_seconds(compiled) -> float | None:
  """The TPU cost model's step time; None when it gives none (it does not for loops)."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  seconds = (analysis or {}).get("optimal_seconds")
  return float(seconds) if seconds is not None and seconds > 0 else None


def _abstract(tree):
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def _compile(lowered) -> tuple[Any, float]:
  """(compiled program or the compiler's OutOfMemory, seconds)."""
  start = time.perf_counter()
  try:
    with log_setup.progress("Compiling for the slice (minutes for the paper sizes)"):
      compiled = compile_lowered(lowered)
  except OutOfMemory as e:
    compiled = e
  return compiled, time.perf_counter() - start


def _compile_train(config, devices):
  """(compiled train step or OutOfMemory, abstract state, mesh, seconds) on `devices`."""
  mesh = parallel.create_mesh(config.mesh, devices)
  rules = parallel.rules_from_config(config.mesh)
  # Built off-mesh: concrete constants must not be placed on compile-only devices.
  task = tasks.get(config)
  built = task.build(config, mesh)
  rng = jax.random.key(config.seed)
  abstract_rng = jax.eval_shape(lambda: jax.random.key(0))
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state, shardings = loop.state_shardings(built, mesh, rules, rng)
    step = loop.jit_train_step(built, shardings, mesh)
    batch = task.batch_spec(config, config.global_batch_size)
    compiled, seconds = _compile(step.lower(state, batch, abstract_rng,
                                            _abstract(built.frozen)))
  return compiled, state, mesh, seconds


def _model_node(model, key: str):
  """(parent ConfigDict, last name) of a dotted key under config.model."""
  *path, last = key.split(".")
  for part in path:
    model = model[part]
  return model, last


def _probe_config(config, layers: dict[str, int]):
  """An unscanned copy of `config` with the given layer counts."""
  probe = config.copy_and_resolve_references()
  with probe.unlocked():
    probe.model.scan_layers = False
    for key, n in layers.items():
      node, last = _model_node(probe.model, key)
      node[last] = n
  return probe


def _probe_seconds(config, devices, layers: dict[str, int]) -> float | None:
  compiled = _compile_train(_probe_config(config, layers), devices)[0]
  return None if isinstance(compiled, OutOfMemory) else optimal_seconds(compiled)


def estimate_step_time(config, devices, compiled) -> tuple[float | None, str]:
  """(seconds, source): the cost model's time of the train step (see the docstring).

  Unscanned: the compiled step's own estimate. Scanned stacks: t(1 layer each)
  + sum over stacks of (depth - 1) x (t(2 layers in that stack) - t(1 each)).
  """
  unavailable = "unavailable: the TPU cost model gave no time (optimal_seconds <= 0)"
  if not config.model.scan_layers:
    seconds = optimal_seconds(compiled)
    return seconds, "compiler" if seconds else unavailable
  keys = tasks.get(config).LAYER_KEYS
  ones = {k: 1 for k in keys}
  base = _probe_seconds(config, devices, ones)
  if base is None:
    return None, unavailable + " for the unscanned probe"
  total = base
  for key in keys:
    two = _probe_seconds(config, devices, {**ones, key: 2})
    if two is None:
      return None, unavailable + " for the unscanned probe"
    node, last = _model_node(config.model, key)
    total += (int(node[last]) - 1) * (two - base)
  return total, "compiler, unscanned 1- and 2-layer probes extrapolated to the depth"


def roofline_estimate(config, hlo_text: str, mesh, chip: str, peak: float,
                      model_flops: float) -> dict:
  """`roofline.estimate` of a compiled train step (its HLO text) on `mesh`'s devices."""
  # The program's logical device i is the mesh's i-th device (flattened).
  coords = np.array([d.coords for d in mesh.devices.flat])
  colls = roofline.collectives(hlo_text, mesh.size, coords)
  executed = (model_flops if config.model.remat_policy == "none"
              else flops.model_flops_per_step(tasks.get(config), config, executed=True))
  return roofline.estimate(model_flops=model_flops, executed_flops=executed,
                           num_chips=mesh.size, peak_flops=peak, colls=colls, chip=chip)


def aot_train(config, devices, chip: str, hbm_bytes: int, peak: float, estimate: bool,
              hlo_dir: str | None = None) -> dict:
  """Compiles the train step on the slice; memory, FLOPs, estimated time and MFU."""
  compiled, state, mesh, compile_s = _compile_train(config, devices)
  oom = isinstance(compiled, OutOfMemory)
  hlo_text = None if oom else compiled.as_text()  # Tens of MB for the paper sizes.
  if hlo_dir and hlo_text:
    epath.Path(hlo_dir).mkdir(parents=True, exist_ok=True)
    (epath.Path(hlo_dir) / "train_step.hlo.txt").write_text(hlo_text)
  logging.info("Compiled the train step in %.1f s%s.", compile_s,
               " (does not fit)" if oom else "")
  logging.info("Counting model FLOPs and the compiled program's collectives (the roofline).")
  model_flops = flops.model_flops_per_step(tasks.get(config), config)
  chips = len(devices)
  rl = None if oom else roofline_estimate(config, hlo_text, mesh, chip, peak, model_flops)
  if oom:
    seconds, source = None, "does not fit"
  elif estimate:
    seconds, source = estimate_step_time(config, devices, compiled)
  else:
    seconds, source = None, "not requested (--noestimate_step_time)"
  if rl and not seconds:
    seconds, source = rl["step_time_s"], f"roofline (cost model: {source})"
  return {
      "compile_s": compile_s,
      **(oom_memory(compiled, hbm_bytes) if oom else memory(compiled, hbm_bytes)),
      "num_params": int(sum(x.size for x in jax.tree.leaves(state.params))),
      "flops_per_step": model_flops,
      "flops_per_step_per_chip": model_flops / chips,
      "compiled_flops_per_chip": None if oom else flops.compiled_flops(compiled),
      "estimated_step_time_s": seconds,
      "step_time_source": source,
      "mfu": model_flops / (seconds * chips * peak) if seconds else None,
      "roofline": rl,
  }


def aot_sample(config, devices, hbm_bytes: int, batch_size: int) -> dict:
  """Compiles one sampling call (KV cache, the config's sampling settings) on the slice."""
  mesh = parallel.create_mesh(config.mesh, devices)
  rules = parallel.rules_from_config(config.mesh)
  dp = parallel.data_parallel_size(mesh)
  batch_size = batch_size or dp
  task = tasks.get_sampling(config, "--mode=sample: --config")
  built = task.build(config, mesh)
  model = task.build_model(config)
  settings = task.sampling_settings(config)
  sample = task.make_sampler(config, model, batch_size=batch_size)
  cond = task.condition_spec(config, batch_size)
  rng = jax.random.key(config.seed)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state, shardings = loop.state_shardings(built, mesh, rules, rng)
    repl = parallel.replicated(mesh)
    cond_sharding = parallel.batch_sharding(mesh) if batch_size % dp == 0 else repl
    fn = jax.jit(sample, in_shardings=(shardings.params["model"], cond_sharding, repl))
    compiled, compile_s = _compile(fn.lower(state.params["model"], cond,
                                            jax.eval_shape(lambda: jax.random.key(0))))
  oom = isinstance(compiled, OutOfMemory)
  logging.info("Compiled the sampling call in %.1f s%s.", compile_s,
               " (does not fit)" if oom else "")
  return {
      "compile_s": compile_s,
      **(oom_memory(compiled, hbm_bytes) if oom else memory(compiled, hbm_bytes)),
      "sample_batch_size": batch_size, "tokens_per_image": model.num_tokens,
      "cfg_scale": settings["cfg_scale"], "use_cache": settings["use_cache"],
      "estimated_step_time_s": None,
      "step_time_source": "unavailable: the cost model gives no time for the decode loop",
  }


def run(config, *, topology: str, mode: str = "both", sample_batch_size: int = 0,
        hbm_gib: float = 0.0, estimate_step_time_: bool = True,
        hlo_dir: str | None = None) -> dict:
  """The proof of fit the flags describe; returns the result dict (see the docstring)."""
  if mode not in MODES:
    raise ValueError(f"--mode={mode!r}; valid: {MODES}.")
  if mode == "sample":
    tasks.get_sampling(config, "--mode=sample: --config")
  if sample_batch_size < 0 or hbm_gib < 0:
    raise ValueError(f"--sample_batch_size={sample_batch_size} and --hbm_gib={hbm_gib} "
                     "must be >= 0.")
  chip, devices = topology_devices(topology)
  num_hosts = len({d.process_index for d in devices})
  synthetic.prepare_config(config, len(devices), num_hosts)
  hbm_bytes = int(hbm_gib * GIB) if hbm_gib else CHIPS[chip].hbm_bytes
  kind = devices[0].device_kind
  peak = config.peak_flops_per_device or CHIPS[chip].peak_flops
  mesh = parallel.create_mesh(config.mesh, devices)
  result = {
      "topology": topology, "chip": chip, "device_kind": kind, "num_chips": len(devices),
      "num_hosts": num_hosts, "hbm_bytes_per_chip": hbm_bytes,
      "peak_flops_per_chip": peak, "task": config.task, "mesh": dict(mesh.shape),
      "strategy": strategy(config, mesh), "global_batch_size": config.global_batch_size,
  }
  modes = [m for m in ("train", "sample") if mode in (m, "both")]
  if tasks.get(config).make_sampler is None:
    modes = [m for m in modes if m == "train"]
  if "train" in modes:
    result["train"] = aot_train(config, devices, chip, hbm_bytes, peak, estimate_step_time_,
                                hlo_dir)
    result["num_params"] = result["train"]["num_params"]
  if "sample" in modes:
    result["sample"] = aot_sample(config, devices, hbm_bytes, sample_batch_size)
  result["fits"] = all(result[m]["fits"] for m in modes)
  return result


def _define_flags():
  """Flags of the binary (defined only when run as a program: --config is shared)."""
  runtime.define_config_file()
  flags.DEFINE_string("topology", None, f"TPU slice: {TOPOLOGY_FORMS}.")
  flags.DEFINE_enum("mode", "both", MODES, "What to compile (tokenizer configs: train).")
  flags.DEFINE_integer("sample_batch_size", 0, "Images per sampling call "
                       "(0 = the mesh's data-parallel size).")
  flags.DEFINE_float("hbm_gib", 0.0, "HBM per chip in GiB (0 = the chip's: "
                     + ", ".join(f"{k} {v.hbm_bytes // GIB}" for k, v in CHIPS.items()) + ").")
  flags.DEFINE_bool("estimate_step_time", True, "Also compile the small unscanned probes "
                    "that give a scanned model's cost-model step time (else: the roofline).")
  flags.DEFINE_string("workdir", None, "If set, the result also goes to "
                      "WORKDIR/aot_compile_result.json and the compiled train step's HLO "
                      "to WORKDIR/train_step.hlo.txt.")
  flags.mark_flags_as_required(["config", "topology"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  try:
    result = run(f.config, topology=f.topology, mode=f.mode,
                 sample_batch_size=f.sample_batch_size, hbm_gib=f.hbm_gib,
                 estimate_step_time_=f.estimate_step_time, hlo_dir=f.workdir)
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"error: {e}") from None
  runtime.emit_result(result, f.workdir, "aot_compile_result")
  if not result["fits"]:
    raise SystemExit(1)


if __name__ == "__main__":
  # Compile-only use of libtpu: never probe for a local TPU (before jax starts a backend).
  if not os.environ.get("JAX_PLATFORMS"):
    jax.config.update("jax_platforms", "cpu")
  _define_flags()
  errors.run(main)
