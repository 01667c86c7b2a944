"""A SentencePiece vocabulary trained on the captions of a data source.

The library behind `python -m vimjax.train_vocab` (vimjax/train_vocab/__main__.py)
and the demo: reads captions with `sources.make_source` and trains with
`text.train_sentencepiece`.
"""
from collections.abc import Iterator
import os
from typing import Any

from vimjax.data import sources
from vimjax.data import text

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
