r"""python -m vimjax.benchmark --config=configs/parti.py:tiny [--mode=train|sample]

Times a config on the devices at hand with synthetic inputs (no data, no
checkpoint) and prints one final JSON line.

  --mode=train   the task's real train step (sharded state, jitted once with
                 donation), `--warmup` untimed then `--steps` timed steps:
                 step_time_s, examples_per_sec, tokens_per_sec (image tokens for
                 VIM/Parti, patches for the tokenizer), flops_per_step (model
                 FLOPs, see below), peak_flops_per_device (config, known
                 accelerator, else a measured matmul peak) and mfu.
  --mode=sample  VIM/Parti with random-init params: KV-cache and uncached
                 sampling of `--sample_batch_size` images with the same seed;
                 sec_per_image_cached / _uncached, speedup, tokens_identical.

Model FLOPs per step: XLA's cost analysis counts a `while` body once (so a
scanned layer stack once, not num_layers times) and a `cond` as its costliest
branch, and it counts remat recomputation. So flops_per_step is the cost
analysis of the *lowered* (global, unpartitioned) step of a copy of the config
with model.scan_layers=False and model.remat_policy="none": the model's FLOPs.
`compiled_flops_per_device` is what the compiled, partitioned program reports
(what the training loop's MFU uses). The tokenizer's step is a `cond` on the
adversarial phase, so it is timed from `loss.adversarial_start_step` (the GAN
phase, the costlier branch) unless --start_step says otherwise.

Any config field can be overridden, e.g. a ~60M-param Parti:

  python -m vimjax.benchmark --config=configs/parti.py:tiny --config.model.emb_dim=512 \
    --config.model.mlp_dim=2048 --config.model.num_heads=8 \
    --config.model.encoder_layers=8 --config.model.decoder_layers=8 \
    --config.global_batch_size=8 --steps=3
"""
import time

from absl import app
from absl import flags
from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vimjax import errors
from vimjax import flops
from vimjax import parallel
from vimjax import runtime
from vimjax import tasks
from vimjax.data import pipeline
from vimjax.perf import synthetic
from vimjax.train import loop

MODES = ("train", "sample")


def prepare_config(config) -> None:
  """Synthetic data stands in for data.source; checks the rest of the config."""
  synthetic.prepare_config(config, jax.device_count(), jax.process_count())


def _global(batch: dict, mesh) -> dict:
  return pipeline.to_global_batch(
      {k: v[jax.process_index()::jax.process_count()] for k, v in batch.items()}, mesh)


def _timed(fn, repeats: int) -> float:
  """Mean seconds per call of `fn()` (which must return device arrays) over `repeats`."""
  start = time.perf_counter()
  out = None
  for _ in range(repeats):
    out = fn()
  jax.block_until_ready(out)
  return (time.perf_counter() - start) / repeats


def _default_start_step(config) -> int:
  """The task's last phase (the tokenizer's GAN: the branch the cost analysis counts)."""
  return int(tasks.get(config).flops_phases(config)[-1][0])


def benchmark_train(config, *, steps: int, warmup: int, start_step: int | None = None) -> dict:
  """Times the task's compiled train step on a synthetic batch (see module docstring)."""
  if steps < 1 or warmup < 0:
    raise ValueError(f"--steps={steps} must be >= 1 and --warmup={warmup} >= 0.")
  prepare_config(config)
  task = tasks.get(config)
  start_step = _default_start_step(config) if start_step is None else start_step
  # Measured outside the mesh context: the matmul runs on one device.
  peak = flops.peak_flops_per_device(config.peak_flops_per_device, config.model.dtype)
  host_batch = task.synthetic_batch(config, config.global_batch_size, config.seed)
  model_flops = flops.model_flops_per_step(task, config, host_batch)
  mesh = parallel.create_mesh(config.mesh)
  rules = parallel.rules_from_config(config.mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    built = task.build(config, mesh)
    init_rng, step_rng = jax.random.split(jax.random.key(config.seed))
    state, shardings = loop.create_sharded_state(built, mesh, rules, init_rng)
    if start_step:
      state = state.replace(step=jax.device_put(jnp.int32(start_step), shardings.step))
    batch = _global(host_batch, mesh)
    start = time.perf_counter()
    compiled = loop.jit_train_step(built, shardings, mesh).lower(
        state, batch, step_rng, built.frozen).compile()
    compile_s = time.perf_counter() - start
    for i in range(warmup):
      state, _ = compiled(state, batch, jax.random.fold_in(step_rng, i), built.frozen)
    jax.block_until_ready(state)

    def run_steps():
      nonlocal state
      for i in range(steps):
        state, metrics = compiled(state, batch, jax.random.fold_in(step_rng, warmup + i),
                                  built.frozen)
      return state, metrics

    step_time = _timed(run_steps, 1) / steps
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
  num_devices = jax.device_count()
  examples_per_sec = config.global_batch_size / step_time
  per_device = model_flops / num_devices
  return {
      "mode": "train", "task": config.task, "num_devices": num_devices,
      "device_kind": jax.devices()[0].device_kind, "mesh": dict(mesh.shape),
      "global_batch_size": config.global_batch_size, "num_params": int(num_params),
      "start_step": start_step, "steps": steps, "warmup": warmup, "compile_s": compile_s,
      "step_time_s": step_time, "examples_per_sec": examples_per_sec,
      "tokens_per_sec": examples_per_sec * task.tokens_per_example(config),
      "flops_per_step": model_flops, "flops_per_step_per_device": per_device,
      "compiled_flops_per_device": flops.compiled_flops(compiled),
      "peak_flops_per_device": peak,
      "mfu": per_device / step_time / peak if peak else 0.0,
  }


def _sampler(config, task, model, params, batch_size: int, mesh):
  """(use_cache, rng) -> tokens [b, n]: the task's sampler with random conditions."""
  dp = parallel.data_parallel_size(mesh)
  sharding = parallel.batch_sharding(mesh) if batch_size % dp == 0 else parallel.replicated(mesh)
  conditions = task.synthetic_conditions(config, batch_size, config.seed)
  conditions = None if conditions is None else jax.device_put(conditions, sharding)
  samplers = {use_cache: task.make_sampler(config, model, batch_size=batch_size,
                                           use_cache=use_cache) for use_cache in (True, False)}
  return lambda use_cache, rng: samplers[use_cache](params, conditions, rng)


def benchmark_sample(config, *, repeats: int, batch_size: int) -> dict:
  """Times KV-cache vs uncached sampling with random-init params and one seed."""
  task = tasks.get_sampling(config, "--mode=sample: --config")
  if repeats < 1 or batch_size < 1:
    raise ValueError(f"--steps={repeats} and --sample_batch_size={batch_size} must be >= 1.")
  prepare_config(config)
  mesh = parallel.create_mesh(config.mesh)
  rules = parallel.rules_from_config(config.mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state, _ = loop.create_sharded_state(task.build(config, mesh), mesh, rules,
                                         jax.random.key(config.seed))
    params = state.params["model"]
    del state  # Optimizer moments are not needed for sampling.
    model = task.build_model(config)
    sample = _sampler(config, task, model, params, batch_size, mesh)
    rng = jax.random.key(config.seed + 1)
    result = {}
    tokens = {}
    for name, use_cache in (("cached", True), ("uncached", False)):
      start = time.perf_counter()
      tokens[name] = np.asarray(jax.device_get(sample(use_cache, rng)))  # Compiles.
      result[f"first_call_s_{name}"] = time.perf_counter() - start
      seconds = _timed(lambda use_cache=use_cache: sample(use_cache, rng), repeats)
      result[f"sec_per_image_{name}"] = seconds / batch_size
  identical = bool(np.array_equal(tokens["cached"], tokens["uncached"]))
  if not identical:
    logging.error("Cached and uncached sampling differ in %d of %d tokens.",
                  int((tokens["cached"] != tokens["uncached"]).sum()), tokens["cached"].size)
  return {
      "mode": "sample", "task": config.task, "num_devices": jax.device_count(),
      "device_kind": jax.devices()[0].device_kind, "mesh": dict(mesh.shape),
      "num_params": int(sum(x.size for x in jax.tree.leaves(params))),
      "sample_batch_size": batch_size, "repeats": repeats,
      "tokens_per_image": model.num_tokens, "cfg_scale": float(config.sampling.cfg_scale),
      **result,
      "speedup": result["sec_per_image_uncached"] / result["sec_per_image_cached"],
      "tokens_identical": identical,
      # Float32 paths agree exactly; in bfloat16 the two round differently and a
      # near-tie can flip a token, so the count is reported, not asserted.
      "tokens_differing": int((tokens["cached"] != tokens["uncached"]).sum()),
  }


def run(config, *, mode: str, steps: int, warmup: int, start_step: int | None = None,
        sample_batch_size: int = 8) -> dict:
  """The benchmark the flags describe; returns the result dict."""
  if mode == "train":
    return benchmark_train(config, steps=steps, warmup=warmup, start_step=start_step)
  if mode == "sample":
    return benchmark_sample(config, repeats=steps, batch_size=sample_batch_size)
  raise ValueError(f"--mode={mode!r}; valid: {MODES}.")


def _define_flags():
  """Flags of the binary (defined only when run as a program: --config is shared)."""
  runtime.define_config_file()
  flags.DEFINE_enum("mode", "train", MODES, "What to time.")
  flags.DEFINE_integer("steps", 10, "Timed train steps / sampling calls per path.")
  flags.DEFINE_integer("warmup", 2, "Untimed train steps after compilation.")
  flags.DEFINE_integer("start_step", None, "Train-state step counter to time from (default: "
                       "the tokenizer's loss.adversarial_start_step when it has a GAN phase, "
                       "else 0).")
  flags.DEFINE_integer("sample_batch_size", 8, "Images per sampling call.")
  flags.DEFINE_string("workdir", None, "If set, the result also goes to "
                      "WORKDIR/benchmark_result.json.")
  flags.mark_flags_as_required(["config"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = flags.FLAGS
  runtime.initialize()
  try:
    result = run(f.config, mode=f.mode, steps=f.steps, warmup=f.warmup,
                 start_step=f.start_step, sample_batch_size=f.sample_batch_size)
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"error: {e}") from None
  runtime.emit_result(result, f.workdir, "benchmark_result")


if __name__ == "__main__":
  _define_flags()
  errors.run(main)
