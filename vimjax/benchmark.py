r"""python -m vimjax.benchmark --config=configs/parti.py:tiny [--mode=train|sample|gan]

Times a config on the devices at hand with synthetic inputs (no data, no
checkpoint) and prints one final JSON line.

  --mode=train   the task's real train step (sharded state, jitted once with
                 donation), `--warmup` untimed then `--steps` timed steps:
                 step_time_s, examples_per_sec, tokens_per_sec (image tokens for
                 VIM/Parti, patches for the tokenizer), flops_per_step (model
                 FLOPs, see below), peak_flops_per_device (config, known
                 accelerator, else a measured matmul peak) and mfu.
  --mode=sample  VIM/Parti with random-init params: KV-cache and/or uncached
                 sampling (`--paths=cached,uncached`) of `--sample_batch_size`
                 images with the same seed; sec_per_image_cached / _uncached,
                 and with both paths speedup and tokens_identical.
  --mode=gan     the tokenizer's whole GAN step (perceptual loss, StyleGAN
                 discriminator, R1, LeCam): train mode timed from
                 loss.adversarial_start_step; refuses a config without the GAN.
                 With lazy R1 (loss.r1_interval > 1, R1 on one GAN step in
                 r1_interval) --steps must be a multiple of r1_interval, so
                 that step_time_s and mfu are those of the mean step (in
                 train mode too, when the timed steps are GAN steps).
                 Missing LPIPS weights: zeros of the same shapes stand in (timing only).
  --profile_dir  after the timed steps, traces `--profile_steps` more under
                 jax.profiler (TensorBoard / XProf trace in that directory) and
                 prints the per-op time table (vimjax/perf/op_profile.py),
                 also written to PROFILE_DIR/op_breakdown.txt.

The allocator the process ran with is reported ("allocator": "tcmalloc" or
"system"; perf/allocator.py): on the CPU it moves a step by up to 20%.

Start-up phases are timed too: flops_count_s (the model-FLOPs cost analysis),
compile_s, first_step_s (the first call, blocked on).

Model FLOPs per step: XLA's cost analysis counts a `while` body once (so a
scanned layer stack once, not num_layers times) and a `cond` as its costliest
branch, and it counts remat recomputation. So flops_per_step is the cost
analysis of the *lowered* (global, unpartitioned) step of a copy of the config
with model.scan_layers=False and model.remat_policy="none": the model's FLOPs.
`compiled_flops_per_device` is what the compiled, partitioned program reports
(what the training loop's MFU uses). The tokenizer's step is a `switch` on the
adversarial phase, so it is timed from `loss.adversarial_start_step` (the GAN
phase, the costlier branch) unless --start_step says otherwise; with lazy R1
flops_per_step is the mean of the R1 and the plain GAN step (`task.flops_mix`).

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
from vimjax.perf import allocator
from vimjax.perf import op_profile
from vimjax.perf import synthetic
from vimjax.train import loop

MODES = ("train", "sample", "gan")
PATHS = ("cached", "uncached")


def prepare_config(config) -> None:
  """Synthetic data (and stand-in vocabulary / LPIPS files) for the config; checks it."""
  synthetic.prepare_config(config, jax.device_count(), jax.process_count())


def _global(batch: dict, mesh) -> dict:
  return pipeline.to_global_batch(
      {k: v[jax.process_index()::jax.process_count()] for k, v in batch.items()}, mesh)


def _timed(fn, repeats: int) -> float:
  """Mean seconds per call of `fn()` (which must return device arrays) over `repeats`."""
  return _timed_with_cpu(fn, repeats)[0]


def _timed_with_cpu(fn, repeats: int) -> tuple[float, float]:
  """(wall, process CPU) mean seconds per call of `fn()` over `repeats`.

  On a shared machine the CPU seconds are the steadier number: wall time grows
  with other processes' load, the work done per call much less.
  """
  start, start_cpu = time.perf_counter(), time.process_time()
  out = None
  for _ in range(repeats):
    out = fn()
  jax.block_until_ready(out)
  return ((time.perf_counter() - start) / repeats, (time.process_time() - start_cpu) / repeats)


def matmul_flops_per_cpu_second(size: int = 2048, repeats: int = 5) -> float:
  """FLOPs per process-CPU-second of a jitted float32 size^3 matmul on one device.

  The CPU-time counterpart of the measured peak: `cpu_mfu` divides the step's
  model FLOPs per CPU-second by it, a ratio that other processes' load hardly
  moves (wall-clock MFU drops when they take the cores away).
  """
  a = jax.device_put(jnp.ones((size, size), jnp.float32), jax.local_devices()[0])
  matmul = jax.jit(lambda x: x @ x)
  jax.block_until_ready(matmul(a))
  _, cpu = _timed_with_cpu(lambda: matmul(a), repeats)
  return 2 * size ** 3 / cpu


def _default_start_step(config) -> int:
  """The task's last phase (the tokenizer's GAN: the branch the cost analysis counts)."""
  return int(tasks.get(config).flops_phases(config)[-1][0])


def check_gan_config(config) -> None:
  """--mode=gan needs a config with an adversarial phase (the tokenizer's GAN)."""
  weight = config.get("loss", {}).get("adversarial_weight", 0.0)
  if weight <= 0:
    raise ValueError(f"--mode=gan times the tokenizer's GAN step; task={config.task!r}, "
                     f"loss.adversarial_weight={weight if 'loss' in config else None} (needs a "
                     "tokenizer config with loss.adversarial_weight > 0, e.g. "
                     "--config.loss.adversarial_weight=0.1).")


def check_r1_periods(config, steps: int, start_step: int) -> None:
  """Timed GAN steps with lazy R1 must hold whole R1 periods (their mean is the mean step)."""
  loss = config.get("loss", {})
  interval = loss.get("r1_interval", 1)
  if (loss.get("adversarial_weight", 0.0) > 0 and loss.get("r1_gamma", 0.0) > 0
      and start_step >= loss.get("adversarial_start_step", 0) and steps % interval):
    raise ValueError(f"--steps={steps} with lazy R1 (loss.r1_interval={interval}): the timed "
                     f"GAN steps must hold whole R1 periods; use --steps={interval} (or a "
                     "multiple), or --config.loss.r1_interval=1 to time R1 on every step.")


def benchmark_train(config, *, steps: int, warmup: int, start_step: int | None = None,
                    profile_dir: str | None = None, profile_steps: int = 1) -> dict:
  """Times the task's compiled train step on a synthetic batch (see module docstring)."""
  if steps < 1 or warmup < 0 or profile_steps < 1:
    raise ValueError(f"--steps={steps} and --profile_steps={profile_steps} must be >= 1, "
                     f"--warmup={warmup} >= 0.")
  prepare_config(config)
  task = tasks.get(config)
  start_step = _default_start_step(config) if start_step is None else start_step
  check_r1_periods(config, steps, start_step)
  # Measured outside the mesh context: the matmul runs on one device.
  peak = flops.peak_flops_per_device(config.peak_flops_per_device, config.model.dtype)
  cpu_peak = matmul_flops_per_cpu_second() if jax.default_backend() == "cpu" else 0.0
  host_batch = task.synthetic_batch(config, config.global_batch_size, config.seed)
  start = time.perf_counter()
  model_flops = flops.model_flops_per_step(task, config, host_batch)
  flops_count_s = time.perf_counter() - start
  logging.info("Model FLOPs per step %.4g, counted in %.1f s.", model_flops, flops_count_s)
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
    logging.info("Compiled the train step in %.1f s.", compile_s)
    # Step rngs made up front: nothing but the step itself in the timed loop.
    rngs = list(jax.random.split(step_rng, warmup + steps + profile_steps))

    def run_steps(first, count):
      nonlocal state
      metrics = None
      for i in range(first, first + count):
        state, metrics = compiled(state, batch, rngs[i], built.frozen)
      return state, metrics

    first_step_s = None  # Only measured apart from the timed steps when there is a warm-up.
    if warmup:
      first_step_s = _timed(lambda: run_steps(0, 1), 1)
      logging.info("First step in %.1f s.", first_step_s)
      run_steps(1, warmup - 1)
      jax.block_until_ready(state)
    step_time, step_cpu = _timed_with_cpu(lambda: run_steps(warmup, steps), 1)
    step_time, step_cpu = step_time / steps, step_cpu / steps
    profile = None
    if profile_dir:
      profile = op_profile.trace(lambda: run_steps(warmup + steps, profile_steps), profile_dir,
                                 hlo_texts=[compiled.as_text()], calls=profile_steps)
    num_params = sum(x.size for x in jax.tree.leaves(state.params))
  if flops.peak_is_measured(config.peak_flops_per_device):
    # A measured peak moves with the machine's load (316-360 GFLOP/s between runs on
    # the 2-core VM): measured again after the steps (outside the mesh, like the
    # first), the higher reading counts, so a slow start-up reading cannot inflate MFU.
    again = flops.measure_peak_flops(config.model.dtype)
    logging.info("Peak FLOP/s measured %.4g before and %.4g after the steps.", peak, again)
    peak = max(peak, again)
  num_devices = jax.device_count()
  examples_per_sec = config.global_batch_size / step_time
  per_device = model_flops / num_devices
  result = {
      "mode": "train", "task": config.task, "num_devices": num_devices,
      "allocator": allocator.loaded(),
      "device_kind": jax.devices()[0].device_kind, "mesh": dict(mesh.shape),
      "global_batch_size": config.global_batch_size, "num_params": int(num_params),
      "start_step": start_step, "steps": steps, "warmup": warmup,
      "flops_count_s": flops_count_s, "compile_s": compile_s, "first_step_s": first_step_s,
      "step_time_s": step_time, "step_cpu_s": step_cpu, "examples_per_sec": examples_per_sec,
      "tokens_per_sec": examples_per_sec * task.tokens_per_example(config),
      "flops_per_step": model_flops, "flops_per_step_per_device": per_device,
      "compiled_flops_per_device": flops.compiled_flops(compiled),
      "peak_flops_per_device": peak,
      "mfu": per_device / step_time / peak if peak else 0.0,
      # CPU only: this process's model FLOPs per CPU-second of the step / those
      # of a big matmul (all of the process's devices share its cores).
      "cpu_mfu": model_flops / jax.process_count() / step_cpu / cpu_peak if cpu_peak else 0.0,
  }
  return _with_profile(result, profile)


def _with_profile(result: dict, profile: dict | None) -> dict:
  """Prints the per-op table; the result names the trace and the top ops."""
  if profile is None:
    return result
  print(profile["table"], flush=True)
  return {**result, "profile_xplane": profile["xplane"], "profile_top_ops": profile["top_ops"]}


def _sampler(config, task, model, params, batch_size: int, mesh, paths):
  """(use_cache, rng, lower=False) -> tokens [b, n] (or the lowered call): the task's
  sampler with random conditions."""
  dp = parallel.data_parallel_size(mesh)
  sharding = parallel.batch_sharding(mesh) if batch_size % dp == 0 else parallel.replicated(mesh)
  conditions = task.synthetic_conditions(config, batch_size, config.seed)
  conditions = None if conditions is None else jax.device_put(conditions, sharding)
  samplers = {name == "cached": task.make_sampler(config, model, batch_size=batch_size,
                                                  use_cache=name == "cached")
              for name in paths}
  return lambda use_cache, rng, lower=False: samplers[use_cache](
      params, conditions, rng, lower=lower)


def parse_paths(paths) -> tuple[str, ...]:
  """"cached,uncached" (or a sequence) -> validated tuple of sampling paths."""
  names = tuple(p.strip() for p in (paths.split(",") if isinstance(paths, str) else paths))
  bad = [p for p in names if p not in PATHS]
  if not names or bad or len(set(names)) != len(names):
    raise ValueError(f"--paths={','.join(names)!r}; valid: a comma-separated subset of "
                     f"{','.join(PATHS)} without repeats.")
  return names


def benchmark_sample(config, *, repeats: int, batch_size: int,
                     paths: tuple[str, ...] = PATHS, profile_dir: str | None = None) -> dict:
  """Times KV-cache and/or uncached sampling with random-init params and one seed."""
  task = tasks.get_sampling(config, "--mode=sample: --config")
  if repeats < 1 or batch_size < 1:
    raise ValueError(f"--steps={repeats} and --sample_batch_size={batch_size} must be >= 1.")
  paths = parse_paths(paths)
  prepare_config(config)
  mesh = parallel.create_mesh(config.mesh)
  rules = parallel.rules_from_config(config.mesh)
  profile = None
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    state, _ = loop.create_sharded_state(task.build(config, mesh), mesh, rules,
                                         jax.random.key(config.seed))
    params = state.params["model"]
    del state  # Optimizer moments are not needed for sampling.
    model = task.build_model(config)
    sample = _sampler(config, task, model, params, batch_size, mesh, paths)
    rng = jax.random.key(config.seed + 1)
    result = {}
    tokens = {}
    for name in paths:
      use_cache = name == "cached"
      start = time.perf_counter()
      tokens[name] = np.asarray(jax.device_get(sample(use_cache, rng)))  # Compiles.
      result[f"first_call_s_{name}"] = time.perf_counter() - start
      seconds, cpu = _timed_with_cpu(lambda use_cache=use_cache: sample(use_cache, rng),
                                     repeats)
      result[f"sec_per_image_{name}"] = seconds / batch_size
      result[f"cpu_sec_per_image_{name}"] = cpu / batch_size
    if profile_dir:  # The first path's sampling call, once.
      use_cache = paths[0] == "cached"
      compiled = sample(use_cache, rng, lower=True).compile()  # The cached executable.
      profile = op_profile.trace(lambda: sample(use_cache, rng), profile_dir,
                                 hlo_texts=[compiled.as_text()])
  if len(paths) == 2:
    differing = int((tokens["cached"] != tokens["uncached"]).sum())
    if differing:
      logging.error("Cached and uncached sampling differ in %d of %d tokens.", differing,
                    tokens["cached"].size)
    result.update(
        speedup=result["sec_per_image_uncached"] / result["sec_per_image_cached"],
        tokens_identical=not differing,
        # Float32 paths agree exactly; in bfloat16 the two round differently and a
        # near-tie can flip a token, so the count is reported, not asserted.
        tokens_differing=differing)
  return _with_profile({
      "mode": "sample", "task": config.task, "num_devices": jax.device_count(),
      "allocator": allocator.loaded(),
      "device_kind": jax.devices()[0].device_kind, "mesh": dict(mesh.shape),
      "num_params": int(sum(x.size for x in jax.tree.leaves(params))),
      "sample_batch_size": batch_size, "repeats": repeats, "paths": list(paths),
      "tokens_per_image": model.num_tokens, "cfg_scale": float(config.sampling.cfg_scale),
      "sampling_dtype": jnp.dtype(task.sampling_settings(config)["dtype"]
                                  or config.model.dtype).name,
      **result}, profile)


def run(config, *, mode: str, steps: int, warmup: int, start_step: int | None = None,
        sample_batch_size: int = 8, paths=PATHS, profile_dir: str | None = None,
        profile_steps: int = 1) -> dict:
  """The benchmark the flags describe; returns the result dict."""
  if mode not in MODES:
    raise ValueError(f"--mode={mode!r}; valid: {MODES}.")
  if mode == "sample":
    return benchmark_sample(config, repeats=steps, batch_size=sample_batch_size, paths=paths,
                            profile_dir=profile_dir)
  if mode == "gan":
    check_gan_config(config)
  result = benchmark_train(config, steps=steps, warmup=warmup, start_step=start_step,
                           profile_dir=profile_dir, profile_steps=profile_steps)
  return {**result, "mode": mode}


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
  flags.DEFINE_list("paths", list(PATHS), "--mode=sample: the sampling paths to time, "
                    "cached (KV cache) and/or uncached (full forward per token: slow).")
  flags.DEFINE_string("profile_dir", None, "If set, trace --profile_steps more steps (one "
                      "sampling call) with jax.profiler into this directory and print the "
                      "per-op time table.")
  flags.DEFINE_integer("profile_steps", 1, "Train steps traced with --profile_dir.")
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
                 start_step=f.start_step, sample_batch_size=f.sample_batch_size,
                 paths=f.paths, profile_dir=f.profile_dir, profile_steps=f.profile_steps)
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"error: {e}") from None
  runtime.emit_result(result, f.workdir, "benchmark_result")


if __name__ == "__main__":
  _define_flags()
  errors.run(main)
