"""python -m vimjax.demo --workdir=demo_out   (what `make demo` runs)

The main job on the embedded shapes dataset, on CPU in minutes:
tiny ViT-VQGAN -> encode the dataset to tokens -> SentencePiece vocabulary on
the captions -> tiny Parti -> tiny contrastive dual encoder (the reranker) ->
samples for held-out prompts, `--num_candidates` per prompt reranked by the
dual encoder as Parti does (`samples.png`, the prompts as captions), scored by
the shapes dataset's analytic checker, against the same samples scored on
shuffled prompts. Final line: one JSON object with psnr, codebook_usage,
reconstruction_accuracy (the checker, kind included, on the tokenizer's
reconstructions of held-out images; reconstruction_accuracy_ceiling on the
originals), bits_per_token, prompt_adherence, shuffled_adherence (all-or-nothing: exactly
the prompt's cells occupied in the prompt's colours), shape_recall,
shuffled_shape_recall (partial credit per prompt shape) and, when reranking,
prompt_adherence_without_rerank (all the candidates: same seed, same model)
and retrieval accuracies of the reranker. The checker never picks samples.

`--config=configs/vim.py:tiny` runs the class-conditional VIM instead of Parti
(no vocabulary) and reports class_accuracy of its samples against the accuracy
of the same samples scored on shuffled class ids. `--config.*` overrides apply
to the stage-2 config.
"""
import os

from absl import app
from absl import flags
from absl import logging
import flax.linen as nn
import jax
import numpy as np

from vimjax import checkpoint
from vimjax import encoding
from vimjax import errors
from vimjax import generate
from vimjax import parallel
from vimjax import runtime
from vimjax import tasks
from vimjax.configs import contrastive as contrastive_configs
from vimjax.configs import parti as parti_configs
from vimjax.configs import vitvqgan
from vimjax.data import shapes
from vimjax.data import vocab
from vimjax.evaluation import reconstruction
from vimjax.train import loop

def _define_flags():
  """Flags of the binary (defined only when run as a program: --config is shared)."""
  runtime.define_config_file(
      "configs/parti.py:tiny", "Stage-2 config: configs/parti.py:tiny or "
      "configs/vim.py:tiny (class-conditional).")
  flags.DEFINE_string("workdir", "demo_out", "Where every stage writes.")
  flags.DEFINE_integer("tokenizer_steps", 0, "0 = the tiny config's.")
  flags.DEFINE_integer("parti_steps", 0, "0 = the tiny config's (VIM too).")
  flags.DEFINE_integer("num_prompts", 0, "Held-out prompts (Parti) or classes (VIM) to "
                       "sample; 0 = 16 prompts, or every class.")
  flags.DEFINE_integer("samples_per_prompt", 0, "Images per prompt or class; 0 = 2 per "
                       "prompt, 4 per class.")
  flags.DEFINE_integer("num_candidates", NUM_CANDIDATES, "Parti: samples drawn per prompt, "
                       "reranked by the dual encoder; <= samples_per_prompt = no reranking.")
  flags.DEFINE_integer("reranker_steps", 0, "0 = the tiny contrastive config's.")
  flags.DEFINE_integer("seed", None, "Seed of every stage's init, data order and sampling "
                       "(default: each config's, 0); a seed sweep shows how much the "
                       "metrics move between runs.")


NUM_ENCODED = {"train": 10_000, "eval": 512}  # Shapes examples turned into tokens.
NUM_RECONSTRUCTED = 512  # Held-out images the checker reads after the tokenizer.
# Reranking pays on shapes (BUILD_NOTES.md, "Reranking"): candidates per prompt.
NUM_CANDIDATES = 8


def derangement(n: int, seed: int = 0) -> np.ndarray:
  """A permutation of range(n) (n > 1) that moves every index: a cyclic shift."""
  return (np.arange(n) + np.random.default_rng(seed).integers(1, n)) % n


def prompt_scores(images: np.ndarray, scenes: list[dict], seed: int = 0) -> dict[str, float]:
  """Adherence (all-or-nothing: exactly the prompt's cells occupied, each in the
  prompt's colour; `_with_kind`: and of the prompt's kind) and shape recall
  (partial credit per shape), for the prompts and for a derangement of them
  (the same images against other prompts)."""
  n = len(scenes)
  scores = {}
  for prefix, order in (("", np.arange(n)), ("shuffled_", derangement(n, seed))):
    stacked = shapes.stack_scenes([scenes[i] for i in order])
    scores[prefix + "adherence"] = float(np.mean(
        shapes.adherence(images, stacked, check_kind=False)))
    scores[prefix + "adherence_with_kind"] = float(np.mean(shapes.adherence(images, stacked)))
    scores[prefix + "shape_recall"] = float(np.mean(shapes.shape_recall(images, stacked)))
  scores["prompt_adherence"] = scores.pop("adherence")
  scores["prompt_adherence_with_kind"] = scores.pop("adherence_with_kind")
  return scores


def reconstruction_scores(tokenizer_workdir: str, num_images: int = NUM_RECONSTRUCTED) -> dict:
  """The shapes checker (kind, colour, position) on the tokenizer's reconstructions
  of held-out images, with its accuracy on the originals as the ceiling."""
  tok_config = checkpoint.load_workdir_config(tokenizer_workdir, "--tokenizer_workdir")
  mesh = parallel.create_mesh(tok_config.mesh)
  rules = parallel.rules_from_config(tok_config.mesh)
  with jax.set_mesh(mesh), nn.logical_axis_rules(rules):
    tok_config, model, params = generate.load_tokenizer(tokenizer_workdir, mesh, rules)
    images, scenes = reconstruction.held_out_shapes(tok_config.data.image_size, num_images)
    recons = reconstruction.reconstruct(model, params, images)
  return reconstruction.shapes_scores(images, recons, scenes)


def held_out_prompts(num: int) -> list[str]:
  """Distinct captions of the validation split (never trained on)."""
  source = shapes.ShapesSource("validation", 32, 10 * num)
  prompts = []
  for i in range(len(source)):
    caption = str(source[i]["caption"])
    if caption not in prompts:
      prompts.append(caption)
    if len(prompts) == num:
      break
  return prompts


def shuffled_class_accuracy(images: np.ndarray, labels: np.ndarray, seed: int = 0) -> float:
  """Class accuracy of the same images against a derangement of their class ids."""
  return float(np.mean(shapes.classify_images(images) == labels[derangement(len(labels), seed)]))


def train_reranker(workdir: str, config, steps: int = 0) -> dict:
  """Trains the tiny dual encoder on the Parti config's tokens and vocabulary."""
  rerank_config = contrastive_configs.get_config("tiny")
  with rerank_config.unlocked():
    rerank_config.seed = config.seed
    rerank_config.tokenizer_workdir = config.tokenizer_workdir
    rerank_config.data.source = config.data.source
    rerank_config.data.text_tokenizer = config.data.text_tokenizer
    if steps:
      rerank_config.total_steps = steps
  loop.train_and_evaluate(rerank_config, workdir)
  return loop.evaluate_workdir(rerank_config, workdir)


def run(workdir: str, config=None, *, tokenizer_steps: int = 0, parti_steps: int = 0,
        num_prompts: int = 0, samples_per_prompt: int = 0,
        num_candidates: int = NUM_CANDIDATES, reranker_steps: int = 0,
        seed: int | None = None) -> dict:
  """Runs every stage under `workdir`; returns the final metrics.

  `config` is the stage-2 config (default: configs/parti.py:tiny); a `vim` one
  trains the class-conditional VIM instead and scores class accuracy. Parti
  samples are reranked (the best samples_per_prompt of num_candidates) when
  num_candidates > samples_per_prompt. `seed`, when given, seeds every stage
  (init, data order, sampling) in place of the configs' seeds. num_prompts /
  samples_per_prompt 0: 16 prompts x 2 (Parti), or every class x 4 (VIM: with 32
  samples, class accuracy moved by ~0.1 with one gradient's float rounding).
  """
  config = parti_configs.get_config("tiny") if config is None else config
  task = tasks.get_sampling(config, "--config (configs/parti.py:tiny or configs/vim.py:tiny)")
  kind = task.conditioning(config)
  if num_prompts < 0 or samples_per_prompt < 0:
    raise ValueError(f"demo: num_prompts={num_prompts}, samples_per_prompt="
                     f"{samples_per_prompt}; valid: >= 0 (0 = the task's default).")
  if kind == "prompt":
    num_prompts, samples_per_prompt = num_prompts or 16, samples_per_prompt or 2
  else:
    num_prompts = num_prompts or config.model.num_classes
    samples_per_prompt = samples_per_prompt or 4
  tok_dir, tokens_dir = os.path.join(workdir, "tokenizer"), os.path.join(workdir, "tokens")
  stage2_dir, spm = os.path.join(workdir, config.task), os.path.join(workdir, "spm")

  logging.info("[1/5] Training the tiny ViT-VQGAN.")
  tok_config = vitvqgan.get_config("tiny")
  if seed is not None:
    tok_config.seed = seed
  if tokenizer_steps:
    tok_config.total_steps = tokenizer_steps
  tok_train = loop.train_and_evaluate(tok_config, tok_dir)
  tok_eval = loop.evaluate_workdir(tok_config, tok_dir)
  tok_eval.update(reconstruction_scores(tok_dir))

  logging.info("[2/5] Encoding shapes to token ids.")
  for split, n in NUM_ENCODED.items():
    encoding.run(tok_config, tok_dir, os.path.join(tokens_dir, split), splits=(split,),
               num_examples=n, overwrite=True)

  with config.unlocked():
    config.tokenizer_workdir = tok_dir
    if seed is not None:
      config.seed = seed
    config.data.source = f"array_record:{tokens_dir}/{{split}}/tokens-{{split}}-*.array_record"
    if parti_steps:
      config.total_steps = parti_steps
    if "text_tokenizer" in config.data:
      logging.info("[3/5] Training the SentencePiece vocabulary on the captions.")
      config.data.text_tokenizer = vocab.run("shapes", "train", 2000, 256, spm,
                                             overwrite=True)["model"]

  logging.info("[4/5] Training tiny %s.", config.task)
  stage2_train = loop.train_and_evaluate(config, stage2_dir)
  stage2_eval = loop.evaluate_workdir(config, stage2_dir)  # Also after a resumed, finished run.

  rerank = kind == "prompt" and num_candidates > samples_per_prompt
  rerank_dir = os.path.join(workdir, "contrastive")
  if rerank:
    logging.info("[5/5] Training the reranker (tiny dual encoder), then sampling.")
    rerank_eval = train_reranker(rerank_dir, config, reranker_steps)
  else:
    logging.info("[5/5] Sampling.")
  out = os.path.join(workdir, "samples.png")
  if kind == "prompt":
    prompts = held_out_prompts(num_prompts)
    result = generate.sample_from_workdir(
        config, stage2_dir, prompts=prompts, num_samples=samples_per_prompt, seed=config.seed,
        rerank_workdir=rerank_dir if rerank else None,
        num_candidates=num_candidates if rerank else 0)
    scenes = [shapes.parse_caption(p) for p in prompts for _ in range(samples_per_prompt)]
    scores = prompt_scores(result["images"], scenes)
    if rerank:
      scores.update(prompt_adherence_without_rerank=result["candidate_prompt_adherence"],
                    oracle_prompt_adherence=result["oracle_prompt_adherence"],
                    num_candidates=num_candidates,
                    reranker_image_to_text=rerank_eval["image_to_text"],
                    reranker_text_to_image=rerank_eval["text_to_image"],
                    reranker_chance=rerank_eval["chance"])
  else:
    class_ids = [i % config.model.num_classes for i in range(num_prompts)]
    result = generate.sample_from_workdir(config, stage2_dir, class_ids=class_ids,
                                          num_samples=samples_per_prompt, seed=config.seed)
    labels = np.repeat(np.asarray(class_ids), samples_per_prompt)
    scores = {"class_accuracy": result["class_accuracy"],
              "shuffled_class_accuracy": shuffled_class_accuracy(result["images"], labels)}
  generate.write_outputs(result, out)
  return {
      "psnr": tok_eval["psnr"], "ssim": tok_eval["ssim"],
      "codebook_usage": tok_eval["codebook_usage"], "perplexity": tok_eval["perplexity"],
      **{k: v for k, v in tok_eval.items() if k.startswith("reconstruction_")},
      "bits_per_token": stage2_eval["bits_per_token"], **scores,
      "tokenizer_steps_per_sec": tok_train.get("steps_per_sec"),
      "tokenizer_mfu": tok_train.get("mfu"),
      f"{config.task}_steps_per_sec": stage2_train.get("steps_per_sec"),
      f"{config.task}_mfu": stage2_train.get("mfu"),
      "samples": out, "reconstructions": os.path.join(tok_dir, "eval_grid.png"),
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  runtime.initialize()
  f = flags.FLAGS
  result = run(f.workdir, f.config, tokenizer_steps=f.tokenizer_steps,
               parti_steps=f.parti_steps, num_prompts=f.num_prompts,
               samples_per_prompt=f.samples_per_prompt, num_candidates=f.num_candidates,
               reranker_steps=f.reranker_steps, seed=f.seed)
  runtime.emit_result(result, flags.FLAGS.workdir, "demo_result")


if __name__ == "__main__":
  _define_flags()
  errors.run(main)
