"""Task `tokenizer`: ViT-VQGAN generator and StyleGAN discriminator, one jitted step.

State: params/opt_state/ema_params keyed "generator" and "discriminator";
extra = {"usage_ema": [codebook] float32, "lecam_real": [], "lecam_fake": []}.
Decoder fine-tuning (`config.finetune_decoder_from`): the encoder and codebook
of a trained tokenizer (the weights its `encode` uses: EMA or raw) and its
codebook-usage EMA are loaded and frozen, only the decoder trains; dead-code
restarts and usage updates are off, so the run encodes every image to the same
ids as the tokenizer it started from.
The discriminator's optimizer starts at loss.adversarial_start_step and reads
its schedule at the global step.
"""
import functools

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
from vimjax.train import loop
from vimjax.train import optimizers
from vimjax.train.state import TrainState

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


def build(config, mesh) -> loop.Task:
  """Returns the tokenizer's pure init/step/eval functions."""
  del mesh  # Shardings come from logical names; nothing here is mesh-specific.
  model = build_model(config)
  disc = build_discriminator(config)
  lw = config.loss
  use_adv = lw.adversarial_weight > 0
  use_ll = config.model.output == "logit_laplace"
  frozen = None
  lpips = perceptual.LPIPS() if lw.perceptual_weight > 0 else None
  if lpips is not None:
    frozen = perceptual.load_lpips_params(lw.perceptual_weights)

  pretrained, pretrained_usage = None, None
  finetuning = bool(config.finetune_decoder_from)
  g_tx = optimizers.create_optimizer(config.optimizer, config.total_steps)
  size = config.data.image_size
  dummy = jnp.zeros((1, size, size, 3), jnp.float32)
  if finetuning:
    pretrained, pretrained_usage = load_pretrained(config.finetune_decoder_from)
    _check_pretrained_shapes(config, jax.eval_shape(
        lambda: model.init({"params": jax.random.key(0)}, dummy, train=False)["params"]),
                             pretrained)
    labels = lambda p: {k: jax.tree.map(  # pylint: disable=g-long-lambda
        lambda _: "frozen" if k in FROZEN_WHEN_FINETUNING else "train", v) for k, v in p.items()}
    g_tx = optax.multi_transform({"train": g_tx, "frozen": optax.set_to_zero()}, labels)
  # The discriminator updates from adversarial_start_step on; its schedule is
  # read at the global step (no second warm-up, and it reaches end_lr).
  d_tx = optimizers.create_optimizer(config.disc_optimizer, config.total_steps,
                                     start_step=lw.adversarial_start_step)
  g_lr = optimizers.learning_rate_fn(config.optimizer, config.total_steps)
  d_lr = optimizers.learning_rate_fn(config.disc_optimizer, config.total_steps)
  ema_decay = config.optimizer.ema_decay

  def init(rng):
    g_rng, d_rng = jax.random.split(rng)
    g_params = model.init({"params": g_rng}, dummy, train=False)["params"]
    if pretrained is not None:
      g_params = dict(g_params)
      for name in FROZEN_WHEN_FINETUNING:
        g_params[name] = jax.tree.map(
            lambda box, value: box.replace_boxed(jnp.asarray(value))
            if isinstance(box, nn.Partitioned) else jnp.asarray(value),
            g_params[name], pretrained[name], is_leaf=lambda x: isinstance(x, nn.Partitioned))
    d_params = disc.init({"params": d_rng}, dummy)["params"] if use_adv else {}
    params = {"generator": g_params, "discriminator": d_params}
    return TrainState(
        step=jnp.zeros((), jnp.int32), params=params,
        opt_state={"generator": optimizers.init_state(g_tx, g_params),
                   "discriminator": optimizers.init_state(d_tx, d_params)},
        ema_params={"generator": g_params} if ema_decay > 0 else {},
        extra={"usage_ema": (jnp.asarray(pretrained_usage, jnp.float32) if finetuning
                             else jnp.zeros((num_codes(config),), jnp.float32)),
               "lecam_real": jnp.zeros((), jnp.float32),
               "lecam_fake": jnp.zeros((), jnp.float32)})

  def generator_loss(g_params, d_params, lpips_params, images, rng, adversarial):
    decoded, aux = model.apply({"params": g_params}, images, train=True,
                               rngs={"dropout": rng})
    recon = decoded["image"]
    vq = losses.vq_loss(aux["latents"], aux["quantized_latents"], lw.vq_beta)
    terms = {"l2": losses.l2_loss(recon, images), "vq": vq["loss"],
             "codebook": vq["codebook"], "commitment": vq["commitment"]}
    total = lw.l2_weight * terms["l2"] + vq["loss"]
    if use_ll:
      terms["logit_laplace"] = losses.logit_laplace_loss(
          decoded["mu_logit"], decoded["log_scale"], images)
      total += lw.logit_laplace_weight * terms["logit_laplace"]
    if lpips is not None:
      terms["perceptual"] = losses.perceptual_loss(lpips, lpips_params, recon, images)
      total += lw.perceptual_weight * terms["perceptual"]
    if lw.entropy_weight > 0:
      terms["entropy"] = losses.entropy_penalty(aux["similarity"], lw.entropy_temperature)
      total += lw.entropy_weight * terms["entropy"]
    if adversarial:
      terms["g_adversarial"] = losses.generator_adversarial_loss(
          disc.apply({"params": d_params}, recon))
      total += lw.adversarial_weight * terms["g_adversarial"]
    terms["loss"] = total
    return total, (terms, recon, aux)

  def discriminator_loss(d_params, images, fakes, extra):
    apply = lambda x: disc.apply({"params": d_params}, x)
    real_logits, fake_logits = apply(images), apply(jax.lax.stop_gradient(fakes))
    terms = {"d_loss": losses.discriminator_loss(real_logits, fake_logits),
             "d_real": jnp.mean(real_logits), "d_fake": jnp.mean(fake_logits)}
    total = terms["d_loss"]
    if lw.r1_gamma > 0:
      terms["r1"] = losses.r1_penalty(apply, images)
      total += 0.5 * lw.r1_gamma * terms["r1"]
    lecam_ema = (extra["lecam_real"], extra["lecam_fake"])
    if lw.lecam_weight > 0:
      # The EMAs updated with this step's logits, as the LeCam authors' code does.
      lecam_ema = losses.update_lecam_ema(*lecam_ema, real_logits, fake_logits,
                                          lw.lecam_ema_decay)
      terms["lecam"] = losses.lecam_regularizer(real_logits, fake_logits, *lecam_ema)
      total += lw.lecam_weight * terms["lecam"]
    return total, (terms, lecam_ema)

  def step(state, batch, rng, lpips_params, adversarial: bool):
    """One G (+ D when `adversarial`) update; `adversarial` is static."""
    images = batch["image"]
    g_rng, code_rng = jax.random.split(rng)
    g_params, d_params = state.params["generator"], state.params["discriminator"]
    (_, (metrics, recon, aux)), g_grads = jax.value_and_grad(generator_loss, has_aux=True)(
        g_params, d_params, lpips_params, images, g_rng, adversarial)
    g_updates, g_opt = g_tx.update(g_grads, state.opt_state["generator"], g_params)
    new_g = optax.apply_updates(g_params, g_updates)

    extra = dict(state.extra)
    if not finetuning:  # Fine-tuning: the codebook and its statistics are frozen.
      extra["usage_ema"] = quantizers.update_usage_ema(
          extra["usage_ema"], aux["code_counts"], lw.usage_ema_decay)
    if lw.restart_dead_codes and config.model.quantizer == "factorized" and not finetuning:
      codebook, extra["usage_ema"] = quantizers.restart_dead_codes(
          new_g["quantizer"]["codebook"], extra["usage_ema"],
          aux["latents"].reshape(-1, aux["latents"].shape[-1]), code_rng,
          lw.dead_code_threshold, aux["quantized_latents"])
      new_g = {**new_g, "quantizer": {**new_g["quantizer"], "codebook": codebook}}

    params = {**state.params, "generator": new_g}
    opt_state = {**state.opt_state, "generator": g_opt}
    if adversarial:
      (_, (d_terms, lecam_ema)), d_grads = jax.value_and_grad(
          discriminator_loss, has_aux=True)(d_params, images, recon, state.extra)
      d_updates, opt_state["discriminator"] = d_tx.update(
          d_grads, state.opt_state["discriminator"], d_params)
      params["discriminator"] = optax.apply_updates(d_params, d_updates)
      extra["lecam_real"], extra["lecam_fake"] = lecam_ema
      metrics.update(d_terms, d_grad_norm=optax.global_norm(d_grads), d_lr=d_lr(state.step))
    elif use_adv:  # Same metric keys in both branches of the cond; 0 before the start.
      metrics.update({k: jnp.zeros((), jnp.float32) for k in adversarial_metric_keys})

    ema_params = state.ema_params
    if ema_decay > 0:
      ema_g = optimizers.update_ema(ema_params["generator"], params["generator"], ema_decay)
      if finetuning:  # Bit-exact frozen weights (an EMA of a constant may move by an ulp).
        ema_g = {**ema_g, **{k: params["generator"][k] for k in FROZEN_WHEN_FINETUNING
                             if k in ema_g}}
      ema_params = {"generator": ema_g}
    counts = aux["code_counts"]
    metrics.update(
        g_grad_norm=optax.global_norm(g_grads), g_param_norm=optax.global_norm(new_g),
        g_update_norm=optax.global_norm(g_updates), lr=g_lr(state.step),
        batch_codebook_usage=jnp.mean(counts > 0), batch_perplexity=codebook_metrics.perplexity(counts))
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              ema_params=ema_params, extra=extra)
    return new_state, metrics

  adversarial_metric_keys = ["g_adversarial", "d_loss", "d_real", "d_fake", "d_grad_norm",
                             "d_lr"]
  adversarial_metric_keys += ["r1"] * (lw.r1_gamma > 0) + ["lecam"] * (lw.lecam_weight > 0)

  def train_step(state, batch, rng, lpips_params):
    if not use_adv:
      return step(state, batch, rng, lpips_params, adversarial=False)
    # The discriminator and the adversarial loss start together; before that the
    # cond skips their compute entirely (one compiled step for the whole run).
    return jax.lax.cond(
        state.step >= lw.adversarial_start_step,
        functools.partial(step, adversarial=True), functools.partial(step, adversarial=False),
        state, batch, rng, lpips_params)

  def eval_step(state, batch, lpips_params):
    del lpips_params
    params = state.ema_params["generator"] if ema_decay > 0 else state.params["generator"]
    images = batch["image"]
    decoded, aux = model.apply({"params": params}, images, train=False)
    recon = jnp.clip(decoded["image"], 0.0, 1.0)
    return {"psnr": image_metrics.psnr(recon, images), "ssim": image_metrics.ssim(recon, images),
            "l1": image_metrics.l1(recon, images), "l2": image_metrics.l2(recon, images),
            "codes": aux["codes"], "mask": batch["mask"],
            "originals": images[:8], "reconstructions": recon[:8]}

  def summarize_eval(outputs):
    # Eval batches are padded to whole global batches; padding rows have mask 0.
    stats = codebook_metrics.CodebookStats(num_codes(config))
    for out in outputs:
      stats.update(out["codes"][out["mask"] > 0])
    valid = np.concatenate([o["mask"] for o in outputs]) > 0
    metrics = {k: float(np.mean(np.concatenate([o[k] for o in outputs])[valid]))
               for k in ("psnr", "ssim", "l1", "l2")}
    metrics["num_images"] = int(valid.sum())
    metrics.update({k: float(v) for k, v in stats.result().items()})
    images = grid.side_by_side(outputs[0]["originals"], outputs[0]["reconstructions"])
    return metrics, images

  return loop.Task(init=init, train_step=train_step, eval_step=eval_step,
                   summarize_eval=summarize_eval, frozen=frozen,
                   compute_dtype=config.model.dtype)


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
