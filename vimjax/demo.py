"""python -m vimjax.demo --workdir=demo_out   (what `make demo` runs)

The main job on the embedded shapes dataset, on CPU in minutes:
tiny ViT-VQGAN -> encode the dataset to tokens -> SentencePiece vocabulary on
the captions -> tiny Parti -> samples for held-out prompts (`samples.png`, the
prompts as captions) scored by the shapes dataset's analytic checker, against
the same samples scored on shuffled prompts. Final line: one JSON object with
psnr, codebook_usage, bits_per_token, prompt_adherence, shuffled_adherence.
"""
import os

from absl import app
from absl import flags
from absl import logging
import numpy as np

from configs import parti as parti_configs
from configs import vitvqgan
from vimjax import encode
from vimjax import runtime
from vimjax import sample
from vimjax import train_vocab
from vimjax.data import shapes
from vimjax.train import loop

_WORKDIR = flags.DEFINE_string("workdir", "demo_out", "Where every stage writes.")
_TOKENIZER_STEPS = flags.DEFINE_integer("tokenizer_steps", 0, "0 = the tiny config's.")
_PARTI_STEPS = flags.DEFINE_integer("parti_steps", 0, "0 = the tiny config's.")
_NUM_PROMPTS = flags.DEFINE_integer("num_prompts", 16, "Held-out prompts to sample.")
_SAMPLES_PER_PROMPT = flags.DEFINE_integer("samples_per_prompt", 2, "Images per prompt.")

NUM_ENCODED = {"train": 10_000, "eval": 512}  # Shapes examples turned into tokens.


def shuffled_adherence(images: np.ndarray, scenes: list[dict], seed: int = 0) -> float:
  """Adherence of the same images to a derangement of their prompts' scenes."""
  n = len(scenes)
  perm = (np.arange(n) + np.random.default_rng(seed).integers(1, n)) % n
  return float(np.mean(shapes.adherence(images, [scenes[i] for i in perm])))


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


def run(workdir: str, *, tokenizer_steps: int = 0, parti_steps: int = 0,
        num_prompts: int = 16, samples_per_prompt: int = 2) -> dict:
  """Runs every stage under `workdir`; returns the final metrics."""
  tok_dir, tokens_dir = os.path.join(workdir, "tokenizer"), os.path.join(workdir, "tokens")
  parti_dir, spm = os.path.join(workdir, "parti"), os.path.join(workdir, "spm")

  logging.info("[1/5] Training the tiny ViT-VQGAN.")
  tok_config = vitvqgan.get_config("tiny")
  if tokenizer_steps:
    tok_config.total_steps = tokenizer_steps
  tok_train = loop.train_and_evaluate(tok_config, tok_dir)
  tok_eval = loop.evaluate_workdir(tok_config, tok_dir)

  logging.info("[2/5] Encoding shapes to token ids.")
  for split, n in NUM_ENCODED.items():
    encode.run(tok_config, tok_dir, os.path.join(tokens_dir, split), splits=(split,),
               num_examples=n, overwrite=True)

  logging.info("[3/5] Training the SentencePiece vocabulary on the captions.")
  vocab = train_vocab.run("shapes", "train", 2000, 256, spm, overwrite=True)

  logging.info("[4/5] Training tiny Parti.")
  config = parti_configs.get_config("tiny")
  config.tokenizer_workdir = tok_dir
  config.data.source = f"array_record:{tokens_dir}/{{split}}/tokens-{{split}}-*.array_record"
  config.data.text_tokenizer = vocab["model"]
  if parti_steps:
    config.total_steps = parti_steps
  parti_train = loop.train_and_evaluate(config, parti_dir)

  logging.info("[5/5] Sampling held-out prompts.")
  prompts = held_out_prompts(num_prompts)
  result = sample.sample_from_workdir(config, parti_dir, prompts=prompts,
                                      num_samples=samples_per_prompt, seed=0)
  out = os.path.join(workdir, "samples.png")
  sample.write_outputs(result, out)
  scenes = [shapes.parse_caption(p) for p in prompts for _ in range(samples_per_prompt)]
  adherence = float(np.mean(shapes.adherence(result["images"], scenes)))
  return {
      "psnr": tok_eval["psnr"], "ssim": tok_eval["ssim"],
      "codebook_usage": tok_eval["codebook_usage"], "perplexity": tok_eval["perplexity"],
      "bits_per_token": parti_train["eval_bits_per_token"],
      "prompt_adherence": adherence,
      "shuffled_adherence": shuffled_adherence(result["images"], scenes),
      "tokenizer_steps_per_sec": tok_train["steps_per_sec"], "tokenizer_mfu": tok_train["mfu"],
      "parti_steps_per_sec": parti_train["steps_per_sec"], "parti_mfu": parti_train["mfu"],
      "samples": out, "reconstructions": os.path.join(tok_dir, "eval_grid.png"),
  }


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  runtime.initialize()
  result = run(_WORKDIR.value, tokenizer_steps=_TOKENIZER_STEPS.value,
               parti_steps=_PARTI_STEPS.value, num_prompts=_NUM_PROMPTS.value,
               samples_per_prompt=_SAMPLES_PER_PROMPT.value)
  runtime.emit_result(result, _WORKDIR.value, "demo_result")


if __name__ == "__main__":
  app.run(main)
