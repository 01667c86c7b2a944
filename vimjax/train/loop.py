"""The generic training loop: any task's pure step, sharded, checkpointed, logged.

Restore order: the newest intact checkpoint in `workdir` (same or different
mesh; broken ones are moved aside), else a fresh initialisation. A task (see
vimjax/tasks/base.py) supplies pure functions (`base.Steps`); this module owns jit, shardings, data,
checkpoints, metrics and MFU. Start-up checks (config, data source, workdir
lock, writable checkpoints) come before anything is written or compiled; the
divergence guard is train/guard.py (README "Failure modes").
"""
import dataclasses
import json
import os
import signal
import time
from typing import Any

from absl import logging
from clu import metrics as clu_metrics
from clu import periodic_actions
from etils import epath
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from vimjax import checkpoint
from vimjax import config_lib
from vimjax import errors
from vimjax import flops
from vimjax import flops_cache
from vimjax import log_setup
from vimjax import parallel
from vimjax import tasks
from vimjax import workdir_lock
from vimjax.data import pipeline
from vimjax.evaluation import generative
from vimjax.evaluation import grid
from vimjax.evaluation import sample_grid
from vimjax.tasks import base
from vimjax.train import guard
from vimjax.train import preflight
from vimjax.train import state as state_lib


class _Sigterm:
  """Remembers a SIGTERM so the loop can checkpoint and exit between steps.

  Installed first thing in `train_and_evaluate` (a SIGTERM during start-up or
  compilation must not kill the process); `restore()` puts the previous handler back.
  """

  def __init__(self):
    self.received = False
    self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    logging.warning("SIGTERM received: saving a checkpoint and exiting.")
    self.received = True

  def restore(self):
    signal.signal(signal.SIGTERM, self._previous or signal.SIG_DFL)


# Re-exported: the binaries and tests build states through the loop's names.
state_shardings = state_lib.state_shardings
create_sharded_state = state_lib.create_sharded_state


def jit_train_step(task: base.Steps, state_shardings, mesh):
  """The step jitted once with explicit shardings and the state donated."""
  repl = parallel.replicated(mesh)
  return jax.jit(
      task.train_step,
      in_shardings=(state_shardings, parallel.batch_sharding(mesh), repl, repl),
      out_shardings=(state_shardings, repl),
      donate_argnums=(0,))


def jit_eval_step(task: base.Steps, state_shardings, mesh):
  repl = parallel.replicated(mesh)
  # Replicated outputs: every process can fetch the whole eval batch (per-example
  # arrays sharded over processes are not addressable by device_get).
  return jax.jit(task.eval_step,
                 in_shardings=(state_shardings, parallel.batch_sharding(mesh), repl),
                 out_shardings=repl)


def _device_batch(host_batch: dict, mesh) -> tuple[dict, int]:
  """Drops host-only fields, counts skipped examples, builds global arrays."""
  batch = {k: v for k, v in host_batch.items()
           if isinstance(v, np.ndarray) and v.dtype != object and k != "num_skipped"}
  skipped = int(np.sum(host_batch.get("num_skipped", 0)))
  return pipeline.to_global_batch(batch, mesh), skipped


def evaluate(task: base.Steps, eval_step, state, config, mesh) -> tuple[dict, Any]:
  """Runs `eval_step` over `config.num_eval_images` eval images; returns (metrics, images)."""
  iterator = pipeline.create_iterator(
      config.data, split="eval", global_batch_size=config.global_batch_size,
      seed=config.seed, train=False, transforms=task.data_transforms)
  outputs, seen = [], 0
  for host_batch in iterator:
    if seen >= config.num_eval_images:
      break
    batch, _ = _device_batch(host_batch, mesh)
    out = eval_step(state, batch, task.frozen)
    outputs.append(jax.tree.map(np.asarray, jax.device_get(out)))
    seen += config.global_batch_size
  if not outputs:
    raise ValueError(f"The eval split of data.source={config.data.source!r} yielded no batch.")
  return task.summarize_eval(outputs)


def evaluate_workdir(config, workdir: str) -> dict:
  """Evaluates the latest checkpoint in `workdir`; writes eval_grid.png there."""
  config_lib.validate(config, jax.device_count(), jax.process_count())
  mesh = parallel.create_mesh(config.mesh)
  rules = parallel.rules_from_config(config.mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    task = tasks.build(config, mesh)
    abstract, shardings = state_shardings(task, mesh, rules, jax.random.key(config.seed))
    ckpt = checkpoint.Checkpointer(workdir, every_steps=config.checkpoint_every_steps,
                                   keep=config.keep_checkpoints, read_only=True)
    try:
      state, step = ckpt.restore_latest(checkpoint.abstract_with_shardings(abstract, shardings),
                                        None, move_broken=False)
    finally:
      ckpt.close()
    if step is None:
      raise ValueError(f"--workdir={workdir!r} has no intact checkpoint to evaluate.")
    metrics, images = evaluate(task, jit_eval_step(task, shardings, mesh), state, config, mesh)
    metrics.update(generative.fid_metrics(config, state, mesh, task))  # {} without weights.
  if images is not None and jax.process_index() == 0:
    grid.write_image_grid(os.path.join(workdir, "eval_grid.png"), images, columns=8,
                          upscale=max(1, 128 // images.shape[1]))
  return {**metrics, "step": step}


def _average_of_computed(name: str):
  """A clu Average of metric `name` over the steps that computed it (NaN: did not)."""
  @flax.struct.dataclass
  class AverageOfComputed(clu_metrics.Average):

    @classmethod
    def from_model_output(cls, **outputs):
      value = jnp.asarray(outputs[name], jnp.float32).reshape(-1)
      computed = jnp.isfinite(value)
      return super().from_model_output(jnp.where(computed, value, 0.0), mask=computed)

  return AverageOfComputed


def metrics_accumulator(names, intermittent: tuple[str, ...] = ()):
  """(empty clu Collection of Averages, jitted accumulate): one dispatch per step.

  `intermittent` metrics (`base.Steps.intermittent_metrics`) average over the
  steps that computed them.
  """
  collection = clu_metrics.Collection.create(
      **{n: _average_of_computed(n) if n in intermittent else clu_metrics.Average.from_output(n)
         for n in names})
  accumulate = jax.jit(lambda acc, m: acc.merge(collection.single_from_model_output(**m)))
  return collection.empty(), accumulate


def train_and_evaluate(config, workdir: str) -> dict:
  """Trains `config.task` in `workdir`, resuming from its latest checkpoint.

  Returns the final metrics, also written to `workdir/train_result.json`. A
  run that already reached `total_steps` returns its saved result untouched.
  """
  # One process: our SIGTERM flag, installed before anything slow. Several: a
  # per-process flag could stop them at different steps (a collective deadlock),
  # so rely on jax's preemption service (started by jax.distributed.initialize;
  # it catches SIGTERM itself) to agree on one step for all processes.
  sigterm = _Sigterm() if jax.process_count() == 1 else None
  try:
    config_lib.validate(config, jax.device_count(), jax.process_count())
    preflight.check_sources(config)  # Before anything is written.
    finished = preflight.finished_result(workdir, config)
    if finished is not None:
      return finished
    with workdir_lock.hold(workdir) as lock:
      return _train(config, workdir, sigterm, lock)
  finally:
    if sigterm is not None:
      sigterm.restore()


def _train(config, workdir: str, sigterm, lock) -> dict:
  """The run itself, in a validated and locked workdir."""
  checkpoint.check_writable(checkpoint.checkpoints_dir(workdir))
  if jax.process_index() == 0:
    (epath.Path(workdir) / "config.json").write_text(config.to_json_best_effort(indent=2))
  mesh = parallel.create_mesh(config.mesh)
  rules = parallel.rules_from_config(config.mesh)
  logging.info("Mesh %s over %d devices in %d processes.", dict(mesh.shape),
               jax.device_count(), jax.process_count())
  writer = log_setup.create_metric_writer(os.path.join(workdir, "tb"),
                                         write=jax.process_index() == 0)
  writer.write_hparams(log_setup.config_hparams(config))  # TensorBoard's HPARAMS tab.

  # Measured (when not configured) on one device, outside the mesh context.
  peak = flops.peak_flops_per_device(config.peak_flops_per_device, config.model.dtype)
  # Model FLOPs of the unrolled, un-remat'ed step: XLA's count of the compiled
  # step sees a scanned stack once (see flops.py), so MFU uses this instead.
  # Per phase: the tokenizer's GAN branch only runs from adversarial_start_step.
  # Read from the workdir, or counted in the background while the step compiles.
  step_flops = flops_cache.StepFlops(tasks.get(config), config, workdir)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    task = tasks.build(config, mesh)
    task = dataclasses.replace(task, train_step=guard.guard_step(
        task.train_step, config.skip_nonfinite_updates))
    rng = jax.random.key(config.seed)
    init_rng, step_rng = jax.random.split(rng)
    state, state_sh = create_sharded_state(task, mesh, rules, init_rng)
    train_iter = pipeline.create_iterator(
        config.data, split="train", global_batch_size=config.global_batch_size,
        seed=config.seed, train=True, transforms=task.data_transforms)
    ckpt = checkpoint.Checkpointer(workdir, every_steps=config.checkpoint_every_steps,
                                   keep=config.keep_checkpoints)
    try:
      restored, _ = ckpt.restore_latest(
          checkpoint.abstract_with_shardings(state, state_sh), train_iter)
      state = state if restored is None else restored
      result = _loop(config, workdir, task, state, state_sh, train_iter, ckpt, writer, mesh,
                     step_rng, sigterm, lock, peak, step_flops)
      ckpt.close()  # Waits for the last async save; raises if it failed.
    except BaseException:
      ckpt.close_quietly()  # Never leave a save half-written behind an error.
      raise
    finally:
      writer.flush()
  # A preempted run exits at once; a finished one has the count (its last log waited).
  model_flops = step_flops.per_step(wait=not result.get("preempted"))
  result.update(flops_per_step=model_flops, peak_flops_per_device=peak,
                flops_per_step_per_device=model_flops and model_flops / jax.device_count())
  if jax.process_index() == 0:
    (epath.Path(workdir) / "train_result.json").write_text(json.dumps(result, indent=2))
  return result


def _loop(config, workdir, task, state, state_sh, train_iter, ckpt, writer, mesh, step_rng,
          sigterm, lock, peak, step_flops) -> dict:
  """Steps from the restored state to total_steps (or a SIGTERM); returns the result."""
  start = int(jax.device_get(state.step))
  if sigterm is not None and sigterm.received:  # During start-up: stop before compiling.
    return {"step": start, "preempted": True}
  step_fn = jit_train_step(task, state_sh, mesh)
  eval_fn = jit_eval_step(task, state_sh, mesh)
  fid_extractor = generative.make_extractor(config, mesh) if generative.enabled(config) else None
  grid_sampler = sample_grid.make_sampler(config, mesh)  # None unless VIM / Parti.
  batch, skipped = _device_batch(next(train_iter), mesh)
  with log_setup.progress("Compiling the train step"):
    compiled = step_fn.lower(state, batch, step_rng, task.frozen).compile()
  compiled_flops = flops.compiled_flops(compiled)
  memory = compiled.memory_analysis()
  logging.info("Compiled train step: %.3g FLOPs/device/step (XLA's count of the compiled "
               "program); memory %s.", compiled_flops, memory)

  preempted = False
  result = {}
  metric_names = jax.eval_shape(step_fn, state, batch, step_rng, task.frozen)[1]
  empty_metrics, accumulate = metrics_accumulator(metric_names, task.intermittent_metrics)
  train_metrics, last_log, last_log_step = empty_metrics, time.perf_counter(), start
  total_skipped = skipped
  # Non-finite steps so far (`health`, on device) and at the last log (host).
  health, logged_nonfinite = guard.empty_health(), 0
  loss_watch, window_loss = guard.LossWatch(config.max_loss_ratio), None
  # "Setting work unit notes: 2.1 steps/s, 40.0% (400/1000), ETA: 4m (6m : 3.1% eval)".
  report_progress = periodic_actions.ReportProgress(
      num_train_steps=config.total_steps, every_secs=60.0)

  def check_health(step):
    """Reads the device-side guard (a sync: only at log and save steps)."""
    first, count = guard.read(health)
    if first and not config.skip_nonfinite_updates:
      raise errors.DivergedError(
          f"non-finite loss or gradient norm at step {first}; nothing from it on was saved. "
          f"Last good checkpoint: {ckpt.last_good()}. Lower optimizer.lr or set "
          "--config.skip_nonfinite_updates=True, then rerun the same command.")
    window = step - last_log_step
    if window > 1 and count - logged_nonfinite >= window:
      raise errors.DivergedError(
          f"every update of steps {last_log_step + 1}..{step} was non-finite (skipped); "
          f"last good checkpoint: {ckpt.last_good()}. Lower optimizer.lr, then rerun.")
    return count

  for step in range(start + 1, config.total_steps + 1):
    if step > start + 1:
      batch, skipped = _device_batch(next(train_iter), mesh)
      total_skipped += skipped
    state, metrics = compiled(state, batch, jax.random.fold_in(step_rng, step), task.frozen)
    train_metrics = accumulate(train_metrics, metrics)
    health = guard.track(health, metrics, step)
    report_progress(step)

    if step % config.log_every_steps == 0 or step == config.total_steps:
      nonfinite_count = check_health(step)
      scalars = {k: float(v) for k, v in train_metrics.compute().items()}
      scalars.pop(guard.NONFINITE, None)
      # A window with skipped (zeroed) steps says nothing about divergence.
      window_loss = scalars.get("loss") if nonfinite_count == logged_nonfinite else None
      logged_nonfinite = nonfinite_count
      elapsed = time.perf_counter() - last_log
      steps_per_sec = (step - last_log_step) / elapsed
      scalars.update(
          steps_per_sec=steps_per_sec,
          examples_per_sec=steps_per_sec * config.global_batch_size,
          skipped_examples=total_skipped, skipped_nonfinite_updates=nonfinite_count)
      # None while the background count runs; the last log waits for it.
      phases = step_flops.phases(wait=step == config.total_steps)
      if phases is not None:
        scalars["mfu"] = (flops.flops_between(phases, last_log_step, step) / jax.device_count()
                          / elapsed / peak if peak else 0.0)
      writer.write_scalars(step, scalars)
      logging.info("step %d/%d loss %.4f | %.2f steps/s %.1f ex/s MFU %s", step,
                   config.total_steps, scalars.get("loss", float("nan")), steps_per_sec,
                   scalars["examples_per_sec"],
                   f"{100 * scalars['mfu']:.2f}%" if "mfu" in scalars else "(counting)")
      result.update(scalars)
      train_metrics, last_log, last_log_step = empty_metrics, time.perf_counter(), step

    # Save before eval: an eval failure must not cost the step's checkpoint.
    preempted = sigterm.received if sigterm is not None else ckpt.reached_preemption(step)
    if ckpt.should_save(step) or step == config.total_steps or preempted:
      nonfinite_count = check_health(step)  # Never save a non-finite state.
      if step != last_log_step:  # Mid-window: this window's mean loss so far.
        window_loss = (float(train_metrics.compute().get("loss", float("nan")))
                       if nonfinite_count == logged_nonfinite else None)
      lock.check()  # Another run took the workdir over: do not overwrite its checkpoints.
      healthy = loss_watch.healthy(window_loss, step)
      ckpt.save(step, state, train_iter, config,
                metrics={"healthy": float(healthy),
                         **({"loss": window_loss} if window_loss is not None else {})})

    if step % config.eval_every_steps == 0 or step == config.total_steps:
      eval_metrics, images = evaluate(task, eval_fn, state, config, mesh)
      if fid_extractor is not None:  # FID / IS / rFID (config.eval), logged as eval/*.
        eval_metrics.update(generative.fid_metrics(config, state, mesh, task, fid_extractor))
      writer.write_scalars(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
      if images is not None and jax.process_index() == 0:
        tiles = grid.write_image_grid(os.path.join(workdir, f"eval_{step}.png"), images,
                                      columns=8, upscale=max(1, 128 // images.shape[1]))
        writer.write_images(step, {"eval/grid": tiles[None]})
      if grid_sampler is not None:
        samples = grid_sampler(state)
        if jax.process_index() == 0:
          tiles = grid.write_image_grid(
              os.path.join(workdir, f"samples_{step}.png"), samples, columns=4,
              captions=grid_sampler.captions, upscale=max(1, 128 // samples.shape[1]))
          writer.write_images(step, {"eval/samples": tiles[None]})
      logging.info("eval step %d: %s", step, json.dumps(eval_metrics))
      result.update({f"eval_{k}": v for k, v in eval_metrics.items()})
      last_log = time.perf_counter()  # Do not count eval time as training time.

    if preempted:
      break
  result.update(step=int(jax.device_get(state.step)), compiled_flops_per_device=compiled_flops,
                preempted=preempted)
  return result
