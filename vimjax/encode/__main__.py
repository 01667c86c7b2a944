r"""python -m vimjax.encode --tokenizer_workdir=/tmp/vq_tiny --output=/tmp/tokens_tiny

Runs a trained, frozen ViT-VQGAN once over a dataset and writes its token ids
as ArrayRecord shards for stage 2 (VIM, Parti):

  OUTPUT/tokens-{split}-{shard:05d}-of-{n:05d}.array_record
      records {"tokens": int32 [grid^2], "label": int32 [], "caption": str}
  OUTPUT/metadata.json
      grid_size, codebook_size, image_size, counts, tokenizer workdir and step

The dataset, image size and batch size come from the tokenizer's saved config,
overridable (typed by it) with --config.*, e.g. --config.data.source=tfds:imagenet2012
--config.global_batch_size=1024. Point stage 2 at the output with
--config.data.source='array_record:OUTPUT/tokens-{split}-*.array_record'.

Each split is read once in order by the eval pipeline (center crops; padding
rows dropped, corrupt images counted), batches are sharded over the mesh, and
each JAX process writes its own shards. An OUTPUT that already holds shards is
refused unless --overwrite. Final line: {"output": ..., "num_examples":
{split: n}, "shards": k}.
"""
from absl import app
from absl import flags

from vimjax import encoding
from vimjax import errors
from vimjax import runtime

FLAGS = flags.FLAGS


def _define_flags():
  """Flags of the binary, defined when it runs (the tokenizer's config defines --config)."""
  flags.DEFINE_string("tokenizer_workdir", None,
                      "Workdir of a `python -m vimjax.train` tokenizer run.")
  flags.DEFINE_string("output", None, "Directory for the token shards.")
  flags.DEFINE_list("splits", ["train", "eval"], "Splits to encode.")
  flags.DEFINE_integer("num_examples", 0, "Examples per split (0 = all).")
  flags.DEFINE_integer("examples_per_shard", 100_000, "At most this many records per shard file.")
  flags.DEFINE_bool("overwrite", False, "Replace the shards already in --output.")
  runtime.define_config_from_workdir("tokenizer_workdir", encoding.load_tokenizer_config)
  flags.mark_flags_as_required(["tokenizer_workdir", "output"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = FLAGS
  runtime.initialize()
  result = encoding.run(f.config, f.tokenizer_workdir, f.output, splits=tuple(f.splits),
                        num_examples=f.num_examples, examples_per_shard=f.examples_per_shard,
                        overwrite=f.overwrite)
  runtime.emit_result(result, None, "encode_result")


if __name__ == "__main__":
  _define_flags()
  errors.run(main)
