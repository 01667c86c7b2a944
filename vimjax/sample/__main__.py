r"""python -m vimjax.sample --workdir=DIR --prompt="a red circle at the center" --out=grid.png

Samples images from a trained stage-2 workdir (VIM or Parti) and decodes the
tokens with the stage-1 tokenizer its config names (`tokenizer_workdir`).

  Parti: --prompt="..." (repeatable) or --prompts_file=F (one prompt a line).
  VIM:   --class_id=K (repeatable); none for an unconditional model.
  Both:  --num_samples=N per prompt / class, --cfg_scale, --temperature,
         --top_k, --top_p (defaults: the workdir's config.sampling), --seed,
         --no_cache (the uncached reference path: same seed, same tokens in
         float32, --config.sampling.dtype=float32; in bfloat16, the configs'
         default, rounding can flip a near-tie token),
         --batch_size (images per sampling call, 0 = all), --warmup.
  Parti reranking (as Parti: 16 samples per prompt, reranked by a contrastive
  model): --rerank_workdir=W (a `task: contrastive` run, configs/contrastive.py)
  --num_candidates=K samples K per prompt and keeps the --num_samples
  best-scoring ones (best first; --num_samples=1 keeps the best).

Writes the PNG grid (one row per prompt / class when num_samples <= 16, each
tile captioned with its prompt or class name), the token ids next to it as
`<out stem>_tokens.npy` (int32 [num_conditions * num_samples, grid^2], grouped
by condition) and prints a final JSON line {"out", "tokens", "num_images",
"sec_per_image", ...}; for shapes prompts also `prompt_adherence` (the analytic
checker of vimjax/data/shapes.py: exactly the prompt's cells occupied, each in
its colour, as the demo scores it) and for VIM on shapes `class_accuracy`.
With reranking, `prompt_adherence` is the kept samples'; `candidate_prompt_adherence`
that of all K candidates (the same seed and model without reranking) and
`oracle_prompt_adherence` the fraction of prompts with an adhering candidate.

Sampling runs sharded on the workdir's mesh (config.mesh; override with
--config.mesh.*): only the params (EMA ones when optimizer.ema_decay > 0) are
restored, straight into their shardings. `sec_per_image` includes compilation
unless --warmup.
"""
from absl import app
from absl import flags

from vimjax import checkpoint
from vimjax import errors
from vimjax import generate
from vimjax import runtime

FLAGS = flags.FLAGS


def _define_flags():
  """Flags of the binary, defined when it runs (`--workdir`'s config defines --config)."""
  flags.DEFINE_string("workdir", None, "A VIM or Parti training workdir.")
  flags.DEFINE_multi_string("prompt", [], "Parti prompt (repeatable).")
  flags.DEFINE_string("prompts_file", None, "Parti prompts, one a line.")
  flags.DEFINE_multi_integer("class_id", [], "VIM class id (repeatable).")
  flags.DEFINE_integer("num_samples", 4, "Images per prompt / class.")
  flags.DEFINE_float("cfg_scale", None, "Guidance scale (default: config.sampling).")
  flags.DEFINE_float("temperature", None, "0 = greedy (default: config.sampling).")
  flags.DEFINE_integer("top_k", None, "0 = off (default: config.sampling).")
  flags.DEFINE_float("top_p", None, "1.0 = off (default: config.sampling).")
  flags.DEFINE_integer("seed", 0, "Sampling seed.")
  flags.DEFINE_bool("no_cache", False, "Uncached reference decoding (same tokens, slower).")
  flags.DEFINE_integer("batch_size", 0, "Images per sampling call (0 = all at once).")
  flags.DEFINE_bool("warmup", False, "One untimed call first: sec_per_image without compile.")
  flags.DEFINE_string("out", "samples.png", "PNG grid path; tokens go next to it.")
  flags.DEFINE_string("rerank_workdir", None, "Contrastive workdir that reranks Parti samples.")
  flags.DEFINE_integer("num_candidates", 0, "Samples drawn per prompt when reranking; the "
                       "--num_samples best are kept.")
  runtime.define_config_from_workdir("workdir", checkpoint.load_workdir_config)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = FLAGS
  runtime.initialize()
  try:
    prompts = generate.read_prompts(f.prompt, f.prompts_file)
    result = generate.sample_from_workdir(
        f.config, f.workdir, prompts=prompts, class_ids=f.class_id, num_samples=f.num_samples,
        cfg_scale=f.cfg_scale, temperature=f.temperature, top_k=f.top_k, top_p=f.top_p,
        seed=f.seed, use_cache=not f.no_cache, batch_size=f.batch_size, warmup=f.warmup,
        rerank_workdir=f.rerank_workdir, num_candidates=f.num_candidates)
    summary = generate.write_outputs(result, f.out)
  except (ValueError, FileNotFoundError) as e:
    raise SystemExit(f"error: {e}") from None
  runtime.emit_result(summary, None, "sample_result")


if __name__ == "__main__":
  _define_flags()
  errors.run(main)
