"""python -m vimjax.train_vocab --source=shapes --split=train --num_examples=20000 --vocab_size=16000 --output=DIR/spm

Trains the SentencePiece vocabulary of Parti's text encoder on the captions of
a data source and writes `<output>.model` and `<output>.vocab`. Parti uses
16,000 pieces on real captions; the shapes grammar supports only ~180, and the
model gets what the corpus supports (see `text.train_sentencepiece`). Runs on
the host CPU only (no accelerator is touched). Final line:
{"model": path, "vocab_size": N, "num_captions": M, ...}.
"""
from collections.abc import Iterator
import json
import os
from typing import Any

from absl import app
from absl import flags

from vimjax import errors
from vimjax.data import sources
from vimjax.data import text

def _define_flags():
  """Flags of the binary (defined only when run as a program: demo.py imports this module)."""
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


def _captions(source, spec: str) -> Iterator[Any]:
  for index in range(len(source)):
    example = source[index]
    if "caption" not in example:
      raise ValueError(f"--source={spec!r} has no captions (example keys: {sorted(example)}); "
                       "train the vocabulary on a captioned source, e.g. --source=shapes.")
    yield from sources.split_captions(example["caption"]) or [""]


def run(source: str, split: str, num_examples: int, vocab_size: int, output: str, *,
        overwrite: bool = False, model_type: str = "bpe", image_size: int = 32) -> dict:
  """Reads captions from `sources.make_source(...)` and trains the vocabulary.

  Returns:
    `text.train_sentencepiece`'s summary: model path, vocab_size reached,
    requested_vocab_size, num_captions, num_empty.

  Raises:
    FileExistsError: `<output>.model` exists and `overwrite` is False.
    ValueError: the source has no (non-empty) captions, a bad spec or bad sizes.
  """
  model = f"{output}.model"
  # Checked before reading any caption: a Parti run may already depend on this file.
  if os.path.exists(model) and not overwrite:
    raise FileExistsError(f"{model!r} already exists; pass --overwrite to replace it "
                          "(Parti checkpoints trained with it would no longer match).")
  src = sources.make_source(source, split, image_size=image_size,
                            num_examples=num_examples or None)
  try:
    return text.train_sentencepiece(_captions(src, source), output, vocab_size,
                                    model_type=model_type)
  except text.EmptyCorpusError as e:  # Image-only sources yield caption "".
    raise ValueError(f"--source={source!r} split {split!r} has no captions: {e}") from None


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    f = flags.FLAGS
    result = run(f.source, f.split, f.num_examples, f.vocab_size, f.output,
                 overwrite=f.overwrite, model_type=f.model_type, image_size=f.image_size)
  except (ValueError, FileExistsError) as e:
    raise SystemExit(f"error: {e}") from None
  # Printed directly, not via runtime.emit_result: that would initialise a jax backend.
  print(json.dumps(result, sort_keys=True), flush=True)


if __name__ == "__main__":
  _define_flags()
  flags.mark_flags_as_required(["output"])
  errors.run(main)
