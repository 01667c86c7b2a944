"""python -m vimjax.train_vocab --source=shapes --split=train --num_examples=20000 --vocab_size=16000 --output=DIR/spm

Trains the SentencePiece vocabulary of Parti's text encoder on the captions of
a data source and writes `<output>.model` and `<output>.vocab`. Parti uses
16,000 pieces on real captions; the shapes grammar supports only ~180, and the
model gets what the corpus supports (see `text.train_sentencepiece`). Runs on
the host CPU only (no accelerator is touched). Final line:
{"model": path, "vocab_size": N, "num_captions": M, ...}.
"""
import json

from absl import app
from absl import flags

from vimjax import errors
from vimjax.data import vocab

FLAGS = flags.FLAGS


def _define_flags():
  """Flags of the binary, defined when it runs."""
  flags.DEFINE_string("source", "shapes", "Data source spec, as for data.source.")
  flags.DEFINE_string("split", "train", "Split to read captions from.")
  flags.DEFINE_integer("num_examples", 20000,
                       "Read the first N examples; 0 = all (shapes: its default size).")
  flags.DEFINE_integer("vocab_size", 16000, "Requested pieces (a soft limit).")
  flags.DEFINE_string("output", None, "Writes <output>.model and <output>.vocab.")
  flags.DEFINE_bool("overwrite", False, "Replace an existing <output>.model.")
  flags.DEFINE_enum("model_type", "bpe", ["bpe", "unigram"], "SentencePiece type.")
  flags.DEFINE_integer("image_size", 32,
                       "Passed to the source; images are unused, so keep it small.")
  flags.mark_flags_as_required(["output"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  f = FLAGS
  try:
    result = vocab.run(f.source, f.split, f.num_examples, f.vocab_size, f.output,
                       overwrite=f.overwrite, model_type=f.model_type, image_size=f.image_size)
  except (ValueError, FileExistsError) as e:
    raise SystemExit(f"error: {e}") from None
  # Printed directly, not via runtime.emit_result: that would initialise a jax backend.
  print(json.dumps(result, sort_keys=True), flush=True)


if __name__ == "__main__":
  _define_flags()
  errors.run(main)
