"""Task `tokenizer`: ViT-VQGAN generator and StyleGAN discriminator, one jitted step.

State: params/opt_state/ema_params keyed "generator" and "discriminator";
extra = {"usage_ema": [codebook] float32, "lecam_real": [], "lecam_fake": []}.
Decoder fine-tuning (`config.finetune_decoder_from`): the encoder and codebook
of a trained tokenizer (the weights its `encode` uses: EMA or raw) and its
codebook-usage EMA are loaded and frozen, only the decoder trains; dead-code
restarts and usage updates are off, so the run encodes every image to the same
ids as the tokenizer it started from.
The discriminator's optimizer starts at loss.adversarial_start_step and reads
its schedule at the global step. R1 is lazy, as in StyleGAN2: every
loss.r1_interval-th GAN step (the first one included) adds r1_interval * gamma / 2
* R1 to the discriminator's loss; the steps between skip its gradient of a
gradient (the `r1` metric is NaN on them and left out of the logged average).
"""
import dataclasses
import functools
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from vimjax import checkpoint
from vimjax import losses
from vimjax import parallel
from vimjax.evaluation import codebook as codebook_metrics
from vimjax.evaluation import grid
from vimjax.evaluation import image_metrics
from vimjax.models import discriminator as discriminator_lib
from vimjax.models import perceptual
from vimjax.models import quantizers
from vimjax.models import vit_vqgan
from vimjax.tasks import base
from vimjax.train import optimizers
from vimjax.train.state import TrainState

NAME = "tokenizer"
INPUT = "images"
EVAL_IMAGES = "reconstructions"  # rFID: reconstructions against their originals.
LAYER_KEYS = ("encoder.num_layers", "decoder.num_layers")
make_sampler = None  # It encodes and decodes; the stage-2 families sample.
FROZEN_WHEN_FINETUNING = ("encoder", "quantizer")


def build_model(config) -> vit_vqgan.Model:
  m = config.model
  return vit_vqgan.Model(
      image_size=config.data.image_size, patch_size=m.patch_size,
      encoder_layers=m.encoder.num_layers, encoder_heads=m.encoder.num_heads,
      encoder_dim=m.encoder.emb_dim, encoder_mlp_dim=m.encoder.mlp_dim,
      decoder_layers=m.decoder.num_layers, decoder_heads=m.decoder.num_heads,
      decoder_dim=m.decoder.emb_dim, decoder_mlp_dim=m.decoder.mlp_dim,
      quantizer=m.quantizer, codebook_size=m.codebook_size, lookup_dim=m.lookup_dim,
      fsq_levels=tuple(m.fsq_levels), output=m.output, dropout_rate=m.dropout_rate,
      scan_layers=m.scan_layers, remat_policy=m.remat_policy,
      dtype=jnp.dtype(m.dtype), param_dtype=jnp.dtype(m.param_dtype))


def build_discriminator(config) -> discriminator_lib.Discriminator:
  d = config.discriminator
  return discriminator_lib.Discriminator(
      image_size=config.data.image_size, base_channels=d.base_channels,
      max_channels=d.max_channels, mbstd_group_size=d.mbstd_group_size,
      dtype=jnp.dtype(config.model.dtype), param_dtype=jnp.dtype(config.model.param_dtype))


def num_codes(config) -> int:
  m = config.model
  return m.codebook_size if m.quantizer == "factorized" else int(np.prod(m.fsq_levels))


def load_pretrained(workdir: str) -> tuple[dict, np.ndarray]:
  """(generator params, codebook usage EMA) of a tokenizer workdir's latest checkpoint.

  The params are the ones `python -m vimjax.encode` encodes with: the EMA when
  that run had optimizer.ema_decay > 0, else the raw params. Host numpy.
  """
  source = checkpoint.load_workdir_config(workdir, "--config.finetune_decoder_from")
  group = "ema_params" if source.optimizer.ema_decay > 0 else "params"
  flag = "--config.finetune_decoder_from"
  params, step = checkpoint.restore_params(workdir, f"{group}/generator", flag=flag)
  usage, _ = checkpoint.restore_params(workdir, "extra/usage_ema", step=step, flag=flag)
  return params, usage


def _check_pretrained_shapes(config, abstract: dict, pretrained: dict):
  """Raises if the pretrained encoder / codebook do not fit this config's model."""
  for name in FROZEN_WHEN_FINETUNING:
    if name not in abstract:
      continue
    want = {jax.tree_util.keystr(k): v.shape for k, v in
            jax.tree_util.tree_flatten_with_path(parallel.unbox(abstract[name]))[0]}
    have = {jax.tree_util.keystr(k): np.shape(v) for k, v in
            jax.tree_util.tree_flatten_with_path(pretrained.get(name, {}))[0]}
    if want != have:
      diff = sorted(set(want.items()) ^ set(have.items()))[:2]
      raise ValueError(
          f"finetune_decoder_from={config.finetune_decoder_from!r}: its {name} params differ "
          f"from this config's ({diff}); model.encoder, patch_size, quantizer, codebook_size "
          "and lookup_dim must match the pretrained tokenizer.")


@dataclasses.dataclass(frozen=True)
class Parts:
  """What the tokenizer's pure step functions are bound to (`functools.partial`).

  Attributes:
    model: the ViT-VQGAN generator.
    disc: the StyleGAN discriminator.
    lpips: the perceptual net, or None when loss.perceptual_weight is 0.
    loss: the config's `loss` section (weights, R1, LeCam, code restarts).
    g_tx, d_tx: generator / discriminator optimizers.
    g_lr, d_lr: their learning-rate schedules (step -> lr), for the metrics.
    ema_decay: optimizer.ema_decay (0 = no EMA params).
    finetuning: decoder fine-tuning (frozen encoder, codebook and usage).
    restart_codes: dead-code restarts on (factorized quantizer, not fine-tuning).
    num_codes: codebook entries (the FSQ grid's size for FSQ).
  """
  model: vit_vqgan.Model
  disc: discriminator_lib.Discriminator
  lpips: perceptual.LPIPS | None
  loss: Any
  g_tx: optax.GradientTransformation
  d_tx: optax.GradientTransformation
  g_lr: Callable[[Any], Any]
  d_lr: Callable[[Any], Any]
  ema_decay: float
  finetuning: bool
  restart_codes: bool
  num_codes: int

  @property
  def use_adversarial(self) -> bool:
    return self.loss.adversarial_weight > 0

  @property
  def adversarial_metric_keys(self) -> tuple[str, ...]:
    """Metrics of the GAN phase, zero before it (the switch's branches return the same keys)."""
    lw = self.loss
    return (("g_adversarial", "d_loss", "d_real", "d_fake", "d_grad_norm", "d_lr")
            + ("r1",) * (lw.r1_gamma > 0) + ("lecam",) * (lw.lecam_weight > 0))


def init(parts: Parts, rng, *, image_size: int, pretrained=None, pretrained_usage=None):
  """The initial TrainState; with `pretrained`, its encoder and codebook (fine-tuning)."""
  dummy = jnp.zeros((1, image_size, image_size, 3), jnp.float32)
  g_rng, d_rng = jax.random.split(rng)
  g_params = parts.model.init({"params": g_rng}, dummy, train=False)["params"]
  if pretrained is not None:
    g_params = dict(g_params)
    for name in FROZEN_WHEN_FINETUNING:
      g_params[name] = jax.tree.map(
          lambda box, value: box.replace_boxed(jnp.asarray(value))
          if isinstance(box, nn.Partitioned) else jnp.asarray(value),
          g_params[name], pretrained[name], is_leaf=lambda x: isinstance(x, nn.Partitioned))
  d_params = (parts.disc.init({"params": d_rng}, dummy)["params"]
              if parts.use_adversarial else {})
  params = {"generator": g_params, "discriminator": d_params}
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=params,
      opt_state={"generator": optimizers.init_state(parts.g_tx, g_params),
                 "discriminator": optimizers.init_state(parts.d_tx, d_params)},
      ema_params={"generator": g_params} if parts.ema_decay > 0 else {},
      extra={"usage_ema": (jnp.asarray(pretrained_usage, jnp.float32)
                           if pretrained_usage is not None
                           else jnp.zeros((parts.num_codes,), jnp.float32)),
             "lecam_real": jnp.zeros((), jnp.float32),
             "lecam_fake": jnp.zeros((), jnp.float32)})


def generator_loss(parts: Parts, g_params, d_params, lpips_params, images, rng,
                   adversarial: bool):
  """(total loss, (terms, reconstructions, quantizer aux)) of the generator."""
  lw = parts.loss
  decoded, aux = parts.model.apply({"params": g_params}, images, train=True,
                                   rngs={"dropout": rng})
  recon = decoded["image"]
  vq = losses.vq_loss(aux["latents"], aux["quantized_latents"], lw.vq_beta)
  terms = {"l2": losses.l2_loss(recon, images), "vq": vq["loss"],
           "codebook": vq["codebook"], "commitment": vq["commitment"]}
  total = lw.l2_weight * terms["l2"] + vq["loss"]
  if "mu_logit" in decoded:  # model.output == "logit_laplace".
    terms["logit_laplace"] = losses.logit_laplace_loss(
        decoded["mu_logit"], decoded["log_scale"], images)
    total += lw.logit_laplace_weight * terms["logit_laplace"]
  if parts.lpips is not None:
    terms["perceptual"] = losses.perceptual_loss(parts.lpips, lpips_params, recon, images)
    total += lw.perceptual_weight * terms["perceptual"]
  if lw.entropy_weight > 0:
    terms["entropy"] = losses.entropy_penalty(aux["similarity"], lw.entropy_temperature)
    total += lw.entropy_weight * terms["entropy"]
  if adversarial:
    terms["g_adversarial"] = losses.generator_adversarial_loss(
        parts.disc.apply({"params": d_params}, recon))
    total += lw.adversarial_weight * terms["g_adversarial"]
  terms["loss"] = total
  return total, (terms, recon, aux)


def discriminator_loss(parts: Parts, d_params, images, fakes, extra, with_r1: bool = True):
  """(total loss, (terms, updated LeCam EMAs)) of the discriminator.

  `with_r1` (a Python bool): this step pays R1, weighted r1_interval * gamma / 2
  (lazy R1); without it, terms["r1"] is NaN (not computed this step).
  """
  lw = parts.loss
  apply = lambda x: parts.disc.apply({"params": d_params}, x)
  if lw.r1_gamma > 0 and with_r1:  # The reals' pass serves the logits and R1's gradient.
    real_logits, r1 = losses.logits_and_r1_penalty(apply, images)
  else:
    real_logits, r1 = apply(images), None
  fake_logits = apply(jax.lax.stop_gradient(fakes))
  terms = {"d_loss": losses.discriminator_loss(real_logits, fake_logits),
           "d_real": jnp.mean(real_logits), "d_fake": jnp.mean(fake_logits)}
  total = terms["d_loss"]
  if r1 is not None:
    terms["r1"] = r1
    total += 0.5 * lw.r1_gamma * lw.r1_interval * r1
  elif lw.r1_gamma > 0:
    terms["r1"] = jnp.full((), jnp.nan, jnp.float32)
  lecam_ema = (extra["lecam_real"], extra["lecam_fake"])
  if lw.lecam_weight > 0:
    # The EMAs updated with this step's logits, as the LeCam authors' code does.
    lecam_ema = losses.update_lecam_ema(*lecam_ema, real_logits, fake_logits,
                                        lw.lecam_ema_decay)
    terms["lecam"] = losses.lecam_regularizer(real_logits, fake_logits, *lecam_ema)
    total += lw.lecam_weight * terms["lecam"]
  return total, (terms, lecam_ema)


def update(parts: Parts, state, batch, rng, lpips_params, adversarial: bool,
           with_r1: bool = True):
  """One G (+ D when `adversarial`, a Python bool) update: (state, metrics).

  `with_r1`: the D update pays R1 (see `discriminator_loss`).
  """
  lw = parts.loss
  images = batch["image"]
  g_rng, code_rng = jax.random.split(rng)
  g_params, d_params = state.params["generator"], state.params["discriminator"]
  (_, (metrics, recon, aux)), g_grads = jax.value_and_grad(
      functools.partial(generator_loss, parts), has_aux=True)(
          g_params, d_params, lpips_params, images, g_rng, adversarial)
  g_updates, g_opt = parts.g_tx.update(g_grads, state.opt_state["generator"], g_params)
  new_g = optax.apply_updates(g_params, g_updates)

  extra = dict(state.extra)
  if not parts.finetuning:  # Fine-tuning: the codebook and its statistics are frozen.
    extra["usage_ema"] = quantizers.update_usage_ema(
        extra["usage_ema"], aux["code_counts"], lw.usage_ema_decay)
  if parts.restart_codes:
    codebook, extra["usage_ema"] = quantizers.restart_dead_codes(
        new_g["quantizer"]["codebook"], extra["usage_ema"],
        aux["latents"].reshape(-1, aux["latents"].shape[-1]), code_rng,
        lw.dead_code_threshold, aux["quantized_latents"])
    new_g = {**new_g, "quantizer": {**new_g["quantizer"], "codebook": codebook}}

  params = {**state.params, "generator": new_g}
  opt_state = {**state.opt_state, "generator": g_opt}
  if adversarial:
    (_, (d_terms, lecam_ema)), d_grads = jax.value_and_grad(
        functools.partial(discriminator_loss, parts, with_r1=with_r1), has_aux=True)(
            d_params, images, recon, state.extra)
    d_updates, opt_state["discriminator"] = parts.d_tx.update(
        d_grads, state.opt_state["discriminator"], d_params)
    params["discriminator"] = optax.apply_updates(d_params, d_updates)
    extra["lecam_real"], extra["lecam_fake"] = lecam_ema
    metrics.update(d_terms, d_grad_norm=optax.global_norm(d_grads), d_lr=parts.d_lr(state.step))
  elif parts.use_adversarial:  # Same metric keys in both branches of the cond; 0 before the start.
    metrics.update({k: jnp.zeros((), jnp.float32) for k in parts.adversarial_metric_keys})

  ema_params = state.ema_params
  if parts.ema_decay > 0:
    ema_g = optimizers.update_ema(ema_params["generator"], params["generator"], parts.ema_decay)
    if parts.finetuning:  # Bit-exact frozen weights (an EMA of a constant may move by an ulp).
      ema_g = {**ema_g, **{k: params["generator"][k] for k in FROZEN_WHEN_FINETUNING
                           if k in ema_g}}
    ema_params = {"generator": ema_g}
  counts = aux["code_counts"]
  metrics.update(
      g_grad_norm=optax.global_norm(g_grads), g_param_norm=optax.global_norm(new_g),
      g_update_norm=optax.global_norm(g_updates), lr=parts.g_lr(state.step),
      batch_codebook_usage=jnp.mean(counts > 0),
      batch_perplexity=codebook_metrics.perplexity(counts))
  new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                            ema_params=ema_params, extra=extra)
  return new_state, metrics


def lazy_r1(loss) -> bool:
  """R1 on every r1_interval-th GAN step only (a third branch of the step's switch)."""
  return loss.adversarial_weight > 0 and loss.r1_gamma > 0 and loss.r1_interval > 1


def is_r1_step(loss, step):
  """Whether the GAN step `step` (>= adversarial_start_step) pays lazy R1."""
  return (step - loss.adversarial_start_step) % loss.r1_interval == 0


def train_step(parts: Parts, state, batch, rng, lpips_params):
  """`update`, with the GAN from loss.adversarial_start_step on (one compiled step)."""
  if not parts.use_adversarial:
    return update(parts, state, batch, rng, lpips_params, adversarial=False)
  # The discriminator and the adversarial loss start together; before that the
  # switch skips their compute entirely, as it skips R1 between lazy R1 steps.
  branches = [functools.partial(update, parts, adversarial=False),
              functools.partial(update, parts, adversarial=True)]
  gan = state.step >= parts.loss.adversarial_start_step
  index = gan.astype(jnp.int32)
  if lazy_r1(parts.loss):
    branches.append(functools.partial(update, parts, adversarial=True, with_r1=False))
    index = jnp.where(gan & ~is_r1_step(parts.loss, state.step), 2, index)
  return jax.lax.switch(index, branches, state, batch, rng, lpips_params)


def eval_step(parts: Parts, state, batch, lpips_params):
  """Per-example PSNR/SSIM/L1/L2, codes and the first 8 reconstructions."""
  del lpips_params
  group = state.ema_params if parts.ema_decay > 0 else state.params
  images = batch["image"]
  decoded, aux = parts.model.apply({"params": group["generator"]}, images, train=False)
  recon = jnp.clip(decoded["image"], 0.0, 1.0)
  return {"psnr": image_metrics.psnr(recon, images), "ssim": image_metrics.ssim(recon, images),
          "l1": image_metrics.l1(recon, images), "l2": image_metrics.l2(recon, images),
          "codes": aux["codes"], "mask": batch["mask"],
          "originals": images[:8], "reconstructions": recon[:8]}


def summarize_eval(parts: Parts, outputs):
  # Eval batches are padded to whole global batches; padding rows have mask 0.
  stats = codebook_metrics.CodebookStats(parts.num_codes)
  for out in outputs:
    stats.update(out["codes"][out["mask"] > 0])
  valid = np.concatenate([o["mask"] for o in outputs]) > 0
  metrics = {k: float(np.mean(np.concatenate([o[k] for o in outputs])[valid]))
             for k in ("psnr", "ssim", "l1", "l2")}
  metrics["num_images"] = int(valid.sum())
  metrics.update({k: float(v) for k, v in stats.result().items()})
  images = grid.side_by_side(outputs[0]["originals"], outputs[0]["reconstructions"])
  return metrics, images


def build_parts(config) -> Parts:
  """The models, optimizers and settings the steps are bound to (no weights loaded)."""
  lw = config.loss
  finetuning = bool(config.finetune_decoder_from)
  g_tx = optimizers.create_optimizer(config.optimizer, config.total_steps)
  if finetuning:
    labels = lambda p: {k: jax.tree.map(  # pylint: disable=g-long-lambda
        lambda _: "frozen" if k in FROZEN_WHEN_FINETUNING else "train", v) for k, v in p.items()}
    g_tx = optax.multi_transform({"train": g_tx, "frozen": optax.set_to_zero()}, labels)
  return Parts(
      model=build_model(config), disc=build_discriminator(config),
      lpips=perceptual.LPIPS() if lw.perceptual_weight > 0 else None, loss=lw, g_tx=g_tx,
      # The discriminator updates from adversarial_start_step on; its schedule is
      # read at the global step (no second warm-up, and it reaches end_lr).
      d_tx=optimizers.create_optimizer(config.disc_optimizer, config.total_steps,
                                       start_step=lw.adversarial_start_step),
      g_lr=optimizers.learning_rate_fn(config.optimizer, config.total_steps),
      d_lr=optimizers.learning_rate_fn(config.disc_optimizer, config.total_steps),
      ema_decay=config.optimizer.ema_decay, finetuning=finetuning,
      restart_codes=(lw.restart_dead_codes and config.model.quantizer == "factorized"
                     and not finetuning),
      num_codes=num_codes(config))


def build(config, mesh) -> base.Steps:
  """Returns the tokenizer's pure init/step/eval functions."""
  del mesh  # Shardings come from logical names; nothing here is mesh-specific.
  parts = build_parts(config)
  frozen = None
  if parts.lpips is not None:
    frozen = perceptual.load_lpips_params(config.loss.perceptual_weights)
  pretrained, pretrained_usage = None, None
  if parts.finetuning:
    pretrained, pretrained_usage = load_pretrained(config.finetune_decoder_from)
    _check_pretrained_shapes(config, abstract_params(config), pretrained)
  return base.Steps(
      init=functools.partial(init, parts, image_size=config.data.image_size,
                             pretrained=pretrained, pretrained_usage=pretrained_usage),
      train_step=functools.partial(train_step, parts),
      eval_step=functools.partial(eval_step, parts),
      summarize_eval=functools.partial(summarize_eval, parts), frozen=frozen,
      compute_dtype=config.model.dtype,
      intermittent_metrics=("r1",) if lazy_r1(parts.loss) else ())


def abstract_params(config) -> dict:
  """Top-level module -> abstract params (jax.eval_shape; nothing materialised)."""
  size = config.data.image_size
  images = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  rng = jax.random.key(0)
  generator = jax.eval_shape(
      lambda x: build_model(config).init({"params": rng}, x, train=False)["params"], images)
  modules = dict(parallel.unbox(generator))
  if config.loss.adversarial_weight > 0:
    modules["discriminator"] = parallel.unbox(jax.eval_shape(
        lambda x: build_discriminator(config).init({"params": rng}, x)["params"], images))
  return modules


def batch_spec(config, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """`image` float32 [b, S, S, 3], `label` int32 [b], `mask` int32 [b]."""
  size = config.data.image_size
  return {"mask": base.spec((batch_size,)), "image": base.spec((batch_size, size, size, 3),
                                                              np.float32),
          "label": base.spec((batch_size,))}


def synthetic_batch(config, batch_size: int, seed: int = 0) -> dict[str, np.ndarray]:
  """Uniform images in [0, 1], label 0, mask 1."""
  size = config.data.image_size
  rs = np.random.RandomState(seed)
  return {"mask": np.ones((batch_size,), np.int32),
          "image": rs.uniform(size=(batch_size, size, size, 3)).astype(np.float32),
          "label": np.zeros((batch_size,), np.int32)}


def tokens_per_example(config) -> int:
  """Patches per image (the codes one image encodes to)."""
  return (config.data.image_size // config.model.patch_size) ** 2


def validate(config) -> None:
  """Quantizer, perceptual weights and patch size."""
  m, lw = config.model, config.loss
  if m.quantizer not in vit_vqgan.QUANTIZERS:
    raise ValueError(f"model.quantizer={m.quantizer!r}; valid: {vit_vqgan.QUANTIZERS}.")
  if m.quantizer == "fsq" and lw.entropy_weight > 0:
    raise ValueError(f"loss.entropy_weight={lw.entropy_weight} needs "
                     "model.quantizer='factorized' (FSQ has no code similarities); set it to 0.")
  if config.data.image_size % m.patch_size:
    raise ValueError(f"data.image_size={config.data.image_size} is not divisible by "
                     f"model.patch_size={m.patch_size}.")
  if lw.perceptual_weight > 0:
    path = lw.perceptual_weights
    if not path:
      raise ValueError("loss.perceptual_weight > 0 needs loss.perceptual_weights=PATH.npz "
                       "(make it with `python -m vimjax.convert_weights`), or set "
                       "loss.perceptual_weight=0.")
    if not base.exists(path):
      raise ValueError(f"loss.perceptual_weights={path!r} does not exist "
                       "(make it with `python -m vimjax.convert_weights`).")


def flops_phases(config) -> tuple[tuple[int, Any], ...]:
  """The GAN phase (discriminator, adversarial loss) starts at loss.adversarial_start_step;
  before it the step is the one of the same config without the GAN."""
  lw = config.loss
  if lw.adversarial_weight <= 0 or lw.adversarial_start_step <= 0:
    return base.single_phase(config)
  before = config.copy_and_resolve_references()
  with before.unlocked():
    before.loss.adversarial_weight = 0.0
  return ((0, before), (int(lw.adversarial_start_step), config))


def flops_mix(config) -> tuple[tuple[float, Any], ...]:
  """With lazy R1, one GAN step in r1_interval pays R1: the mean of the two programs."""
  lw = config.loss
  if not lazy_r1(lw):
    return base.single_program(config)
  every, without = config.copy_and_resolve_references(), config.copy_and_resolve_references()
  with every.unlocked(), without.unlocked():
    every.loss.r1_interval = 1
    without.loss.r1_gamma = 0.0
  return ((1.0 / lw.r1_interval, every), (1.0 - 1.0 / lw.r1_interval, without))


def conditioning(config) -> str:
  del config
  return "none"


def condition_spec(config, batch_size: int) -> None:
  del config, batch_size


def synthetic_conditions(config, batch_size: int, seed: int = 0) -> None:
  del config, batch_size, seed


def load_workdir_config(workdir: str, flag: str):
  """The config a tokenizer run saved in `workdir`; raises if it is another task's."""
  config = checkpoint.load_workdir_config(workdir, flag)
  if config.get("task") != NAME:
    raise ValueError(f"{flag}={workdir!r} holds task={config.get('task')!r}; it must be a "
                     f"{NAME!r} workdir.")
  return config
