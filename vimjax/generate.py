"""Images from trained workdirs: sample a VIM/Parti workdir, decode with its tokenizer.

The library behind `python -m vimjax.sample` (see vimjax/sample/__main__.py for
the flags and outputs), the demo and the FID evaluation of samples: restoring
params straight into their shardings, loading the stage-1 tokenizer, sampling
with the task's sampler (`base.Task.make_sampler`), reranking with a
contrastive workdir, the shapes checker's scores and the PNG grid.
"""
import functools
import json
import os
import sys
import time

from absl import logging
from etils import epath
import flax.linen as nn
import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import numpy as np

from vimjax import checkpoint
from vimjax import parallel
from vimjax import reranking
from vimjax import tasks
from vimjax.data import shapes
from vimjax.data import text
from vimjax.evaluation import grid
from vimjax.models import vit_vqgan
from vimjax.tasks import base
from vimjax.tasks import tokenizer as tokenizer_task
from vimjax.train import state as state_lib

MAX_GRID_COLUMNS = 16


def read_prompts(prompts: list[str], prompts_file: str | None) -> list[str]:
  """--prompt values then the non-blank lines of --prompts_file."""
  prompts = [p for p in prompts if p.strip()]
  if prompts_file:
    path = epath.Path(prompts_file)
    if not path.exists():
      raise ValueError(f"--prompts_file={prompts_file!r} does not exist.")
    prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
  return prompts


def load_stage2_params(config, workdir: str, mesh, rules):
  """(params sharded on `mesh`, step) of a stage-2 (or contrastive) workdir's latest checkpoint."""
  steps = tasks.build(config, mesh)
  abstract, shardings = state_lib.state_shardings(steps, mesh, rules, jax.random.key(0))
  ema = config.optimizer.ema_decay > 0
  which = (lambda s: s.ema_params["model"]) if ema else (lambda s: s.params["model"])
  return checkpoint.restore_params(workdir, "ema_params/model" if ema else "params/model",
                                   which(abstract), which(shardings))


@functools.partial(jax.jit, static_argnums=0)
def decode_tokens(model: vit_vqgan.Model, params, tokens):
  """tokens [b, n] int32 -> images [b, H, W, 3] float32 (the decoder's mean image)."""
  return model.apply({"params": params}, tokens, method=vit_vqgan.Model.decode_codes)["image"]


def load_tokenizer(tokenizer_workdir: str, mesh, rules):
  """(tokenizer config, vit_vqgan.Model, generator params sharded on `mesh`)."""
  tok_config = tokenizer_task.load_workdir_config(tokenizer_workdir, "tokenizer_workdir")
  model = tokenizer_task.build_model(tok_config)
  size = tok_config.data.image_size
  boxed = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, size, size, 3), jnp.float32), train=False)["params"])
  group = "ema_params" if tok_config.optimizer.ema_decay > 0 else "params"
  params, _ = checkpoint.restore_params(
      tokenizer_workdir, f"{group}/generator", parallel.unbox(boxed),
      parallel.logical_to_shardings(boxed, mesh, rules), flag="--tokenizer_workdir")
  return tok_config, model, params


def _check_compatible(config, model, tok_config, tok_model) -> None:
  codes = tokenizer_task.num_codes(tok_config)
  if config.model.codebook_size != codes:
    raise ValueError(f"model.codebook_size={config.model.codebook_size} does not match the "
                     f"tokenizer in {config.tokenizer_workdir!r} ({codes} codes).")
  if model.num_tokens != tok_model.num_tokens:
    raise ValueError(f"The model samples {model.num_tokens} tokens per image but the tokenizer "
                     f"in {config.tokenizer_workdir!r} decodes {tok_model.num_tokens} "
                     f"((image_size / patch_size)^2); check model.grid_size.")


def _conditions(config, kind: str, prompts, class_ids):
  """(condition values, their captions) for the conditioning `kind`; raises on a bad request."""
  if kind == "prompt":
    if class_ids:
      raise ValueError(f"--class_id is for class-conditional models; {config.task!r} takes "
                       "--prompt / --prompts_file.")
    if not prompts:
      raise ValueError(f"{config.task.capitalize()} needs prompts: pass --prompt=\"...\" "
                       "(repeatable) or --prompts_file=FILE (one prompt a line).")
    return list(prompts), list(prompts)
  if prompts:
    raise ValueError(f"--prompt/--prompts_file are for text-conditioned models; {config.task!r} "
                     "takes --class_id=K (class-conditional) or nothing.")
  num_classes = config.model.get("num_classes", 0)
  if kind == "none":
    if class_ids:
      raise ValueError(f"--class_id={class_ids[0]}: this {config.task!r} model is unconditional "
                       "(model.num_classes=0); pass no --class_id.")
    return [None], ["unconditional"]
  if not class_ids:
    raise ValueError(f"This {config.task!r} model is class-conditional (model.num_classes="
                     f"{num_classes}): pass --class_id=K with K in [0, {num_classes}).")
  for k in class_ids:
    if not 0 <= k < num_classes:
      raise ValueError(f"--class_id={k} out of range; valid: 0..{num_classes - 1}.")
  return list(class_ids), [_class_caption(config, k) for k in class_ids]


def _is_shapes(config) -> bool:
  """Whether the tokens come from the embedded shapes dataset (via the tokenizer's config)."""
  if config.data.source == "shapes":
    return True
  path = epath.Path(config.tokenizer_workdir) / "config.json"
  if not config.tokenizer_workdir or not path.exists():
    return False
  return json.loads(path.read_text()).get("data", {}).get("source") == "shapes"


def _class_caption(config, label: int) -> str:
  if _is_shapes(config) and config.model.num_classes == shapes.NUM_CLASSES:
    return shapes.class_name(label)
  return f"class {label}"


def _shapes_metrics(config, kind: str, conditions, num_samples, images) -> dict:
  """prompt_adherence (prompts, every one in the grammar) or class_accuracy (classes)."""
  if kind == "prompt":
    try:
      scenes = [shapes.parse_caption(p) for p in conditions]
    except ValueError:
      return {}
    stacked = shapes.stack_scenes([s for s in scenes for _ in range(num_samples)])
    # As the demo scores it: the prompt's cells occupied, each in its colour.
    hits = np.asarray(shapes.adherence(images, stacked, check_kind=False), bool)
    return {"prompt_adherence": float(np.mean(hits)),
            # Prompts with at least one adhering sample: what a perfect reranker keeps.
            "oracle_prompt_adherence": float(np.mean(hits.reshape(-1, num_samples).any(1)))}
  if conditions == [None] or not _is_shapes(config):
    return {}
  labels = np.repeat(np.asarray(conditions), num_samples)
  return {"class_accuracy": float(np.mean(shapes.classify_images(images) == labels))}


def load_reranker(rerank_workdir: str, config, mesh, rules):
  """(scorer: (tokens, text_ids) -> [b] scores, its TextTokenizer) of a contrastive workdir."""
  rerank_config = checkpoint.load_workdir_config(rerank_workdir, "--rerank_workdir")
  reranking.check_compatible(rerank_config, config, rerank_workdir)
  model = tasks.get(rerank_config).build_model(rerank_config)
  params, _ = load_stage2_params(rerank_config, rerank_workdir, mesh, rules)
  tokenizer = text.TextTokenizer(rerank_config.data.text_tokenizer,
                                 rerank_config.model.max_text_length)
  return reranking.make_scorer(model, params, parallel.replicated(mesh)), tokenizer


def _host(x) -> np.ndarray:
  """A (possibly multi-process) global array -> the whole thing as numpy."""
  if jax.process_count() > 1:
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(jax.device_get(x))


def sample_from_workdir(config, workdir: str, *, prompts=(), class_ids=(), num_samples: int = 4,
                        cfg_scale: float | None = None, temperature: float | None = None,
                        top_k: int | None = None, top_p: float | None = None, seed: int = 0,
                        use_cache: bool | None = None, batch_size: int = 0,
                        warmup: bool = False, rerank_workdir: str | None = None,
                        num_candidates: int = 0) -> dict:
  """Samples and decodes images from a VIM/Parti workdir.

  Args:
    config: the workdir's config (`checkpoint.load_workdir_config`, possibly overridden).
    workdir: the stage-2 training workdir (latest checkpoint is used).
    prompts: Parti prompts.
    class_ids: VIM class ids (empty for an unconditional VIM).
    num_samples: images per prompt / class.
    cfg_scale, temperature, top_k, top_p: None = config.sampling's.
    seed: sampling seed; call c of the batched loop uses fold_in(key(seed), c).
    use_cache: KV-cache decoding (None = config.sampling.use_cache); False is
      the uncached reference path: the same tokens in float32 (tested); in
      bfloat16 the paths round differently and a near-tie can flip a token.
    batch_size: images per sampling call (0 = all at once); rounded up to a
      multiple of the data-parallel size.
    warmup: compile with one untimed call first.
    rerank_workdir: a contrastive workdir (Parti only): sample `num_candidates`
      per prompt and keep the `num_samples` best-scoring ones, best first.
    num_candidates: candidates per prompt when reranking.
  Returns:
    dict: tokens int32 [N, n], images float32 [N, H, W, 3] in [0, 1],
    captions (N str), conditions, num_samples, step, sec_per_image, timing and
    sampling settings, and prompt_adherence / class_accuracy when they apply
    (N = len(conditions) * num_samples, grouped by condition).
  """
  task = tasks.get_sampling(config, f"--workdir={workdir!r}")
  kind = task.conditioning(config)
  if num_samples < 1:
    raise ValueError(f"--num_samples={num_samples} must be >= 1.")
  if rerank_workdir:
    if kind != "prompt":
      raise ValueError(f"--rerank_workdir scores prompts; {config.task!r} has none (Parti only).")
    if num_candidates < num_samples:
      raise ValueError(f"--num_candidates={num_candidates} must be >= --num_samples="
                       f"{num_samples} with --rerank_workdir.")
  elif num_candidates:
    raise ValueError(f"--num_candidates={num_candidates} needs --rerank_workdir=DIR.")
  per_condition = num_candidates if rerank_workdir else num_samples
  if not config.tokenizer_workdir or not epath.Path(config.tokenizer_workdir).is_dir():
    raise ValueError(f"tokenizer_workdir={config.tokenizer_workdir!r} (from {workdir!r}'s "
                     "config) does not exist; pass --config.tokenizer_workdir=DIR.")
  overrides = dict(cfg_scale=cfg_scale, temperature=temperature, top_k=top_k, top_p=top_p,
                   use_cache=use_cache)
  settings = base.sampling_settings(config, **overrides)
  use_cache = settings.pop("use_cache")

  model = task.build_model(config)
  conditions, captions = _conditions(config, kind, list(prompts), list(class_ids))
  mesh = parallel.create_mesh(config.mesh)
  rules = parallel.rules_from_config(config.mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    tok_config, tok_model, tok_params = load_tokenizer(config.tokenizer_workdir, mesh, rules)
    _check_compatible(config, model, tok_config, tok_model)
    params, step = load_stage2_params(config, workdir, mesh, rules)
    rows = [c for c in conditions for _ in range(per_condition)]
    num_images = len(rows)
    dp = parallel.data_parallel_size(mesh)
    chunk = -(-(batch_size or num_images) // dp) * dp
    num_chunks = -(-num_images // chunk)
    padded = rows + [rows[-1]] * (num_chunks * chunk - num_images)
    extra = {}
    if kind == "prompt":
      tokenizer = text.TextTokenizer(config.data.text_tokenizer, config.model.max_text_length)
      inputs = tokenizer.encode(padded)[0]
      extra["text_truncated"] = warn_truncated(tokenizer, conditions)
    else:
      inputs = None if rows[0] is None else np.asarray(padded, np.int32)
    sampler = task.make_sampler(config, model, batch_size=chunk, **overrides)
    sample = lambda x, rng: sampler(params, x, rng)
    batch_sharding = parallel.batch_sharding(mesh)

    def call(c):
      x = None if inputs is None else jax.device_put(inputs[c * chunk:(c + 1) * chunk],
                                                     batch_sharding)
      return sample(x, jax.random.fold_in(jax.random.key(seed), c))

    if warmup:
      jax.block_until_ready(call(0))
    start = time.perf_counter()
    token_chunks = [call(c) for c in range(num_chunks)]
    jax.block_until_ready(token_chunks)
    sample_s = time.perf_counter() - start
    start = time.perf_counter()
    image_chunks = [decode_tokens(tok_model, tok_params, t) for t in token_chunks]
    jax.block_until_ready(image_chunks)
    decode_s = time.perf_counter() - start
    tokens = np.concatenate([_host(t) for t in token_chunks])[:num_images].astype(np.int32)
    images = np.concatenate([_host(x) for x in image_chunks])[:num_images]
    if rerank_workdir:
      score, rerank_tokenizer = load_reranker(rerank_workdir, config, mesh, rules)
      prompt_ids = rerank_tokenizer.encode(padded)[0]
      scores = np.concatenate([_host(score(t, jax.device_put(
          prompt_ids[c * chunk:(c + 1) * chunk], batch_sharding)))
                               for c, t in enumerate(token_chunks)])[:num_images]
  images = np.clip(images.astype(np.float32), 0.0, 1.0)
  if rerank_workdir:
    candidates = _shapes_metrics(config, kind, conditions, per_condition, images)
    kept = reranking.best_per_condition(scores, per_condition, num_samples)
    tokens, images, num_images = tokens[kept], images[kept], len(kept)
    extra.update(rerank_workdir=rerank_workdir, num_candidates=per_condition,
                 rerank_scores=scores[kept].tolist())
    if "prompt_adherence" in candidates:
      extra["candidate_prompt_adherence"] = candidates["prompt_adherence"]
      extra["oracle_prompt_adherence"] = candidates["oracle_prompt_adherence"]
  result = {
      "task": config.task, "step": int(step), "tokens": tokens, "images": images,
      "captions": [c for c in captions for _ in range(num_samples)],
      "conditions": conditions, "num_samples": num_samples, "num_images": num_images,
      "use_cache": use_cache, "seed": seed, **settings, **extra,
      # Per kept image: with reranking it includes the discarded candidates.
      "sample_s": sample_s, "decode_s": decode_s, "sec_per_image": sample_s / num_images,
      "includes_compile": not warmup,
  }
  scores = _shapes_metrics(config, kind, conditions, num_samples, images)
  scores.pop("oracle_prompt_adherence", None)  # Only meaningful over the candidates.
  result.update(scores)
  return result


def tokens_path(out: str) -> str:
  """Where the token ids of the grid at `out` go: `<out stem>_tokens.npy`."""
  return os.path.splitext(out)[0] + "_tokens.npy"


def write_outputs(result: dict, out: str) -> dict:
  """Writes the captioned PNG grid and the tokens .npy; returns the JSON summary."""
  images, n = result["images"], result["num_samples"]
  columns = n if n <= MAX_GRID_COLUMNS else min(8, result["num_images"])
  if jax.process_index() == 0:
    grid.write_image_grid(out, images, columns=columns, captions=result["captions"],
                          upscale=max(1, 128 // images.shape[1]))
    with epath.Path(tokens_path(out)).open("wb") as f:
      np.save(f, result["tokens"])
  summary = {k: v for k, v in result.items() if k not in ("tokens", "images", "captions")}
  summary.update(out=out, tokens=tokens_path(out), tokens_shape=list(result["tokens"].shape))
  return summary


def warn_truncated(tokenizer, prompts: list[str]) -> int:
  """Counts prompts cut to the model's max_text_length, with a warning naming them."""
  cut = [p for p in prompts if tokenizer.encode([p])[1]]
  if cut:
    shown = "; ".join(repr(p[:40] + ("..." if len(p) > 40 else "")) for p in cut[:3])
    message = (f"warning: {len(cut)} prompt(s) are longer than model.max_text_length="
               f"{tokenizer.max_length} tokens and were cut to fit: {shown}")
    logging.warning(message)
    print(message, file=sys.stderr, flush=True)
  return len(cut)
