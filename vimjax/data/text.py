"""SentencePiece text tokenizer for Parti: training, encoding, a grain transform.

Id conventions (fixed when a vocabulary is trained by `train_sentencepiece`,
checked when one is loaded; they match T5's SentencePiece models):

  PAD_ID = 0   fills every position after EOS; the text encoder masks it out.
  EOS_ID = 1   appended to every encoded text, truncated ones included.
  UNK_ID = 2   characters outside the vocabulary.
  BOS: none (id -1); the encoder is bidirectional, so it needs no start token.

A text longer than `max_length - 1` pieces is truncated to its first
`max_length - 1` pieces plus EOS, and counted: `TextTokenizer.encode` returns the
count and `TokenizeCaptions` adds a 0/1 `text_truncated` per example, so the
training loop can sum it over batches and report it.
"""
from collections.abc import Iterable, Iterator, Sequence
import itertools
import os
from typing import Any

from absl import logging
from etils import epath
import grain
import numpy as np
import sentencepiece as spm

from vimjax.data import sources

PAD_ID, EOS_ID, UNK_ID, BOS_ID = 0, 1, 2, -1
TRAIN_HINT = ("make one with `python -m vimjax.train_vocab --source=shapes "
              "--output=DIR/spm` (writes DIR/spm.model)")


def _as_str(text: Any) -> str:
  """Captions arrive as str, bytes (tfds) or 0-d numpy arrays of either."""
  if isinstance(text, np.ndarray):
    text = text.item()
  if isinstance(text, bytes):
    text = text.decode("utf-8")
  if not isinstance(text, str):
    raise ValueError(f"Expected a caption string; got {type(text).__name__}: {text!r:.80}.")
  return text


class TextTokenizer:
  """A SentencePiece model with fixed-length, EOS-terminated, zero-padded output.

  Pickles as the serialized model proto (a few KB to ~0.5 MB), so grain worker
  processes rebuild it without reading `model_path` again.
  """

  def __init__(self, model_path: str, max_length: int):
    """Loads `model_path` (local or any `etils.epath` path, e.g. gs://).

    Args:
      model_path: a SentencePiece `.model` file with the module's id conventions.
      max_length: length of every encoded row, EOS included; >= 2.

    Raises:
      FileNotFoundError: `model_path` does not exist.
      ValueError: it is not a SentencePiece model, or its ids differ from
        PAD_ID/EOS_ID/UNK_ID, or `max_length` < 2.
    """
    if max_length < 2:
      raise ValueError(f"Text max_length={max_length} must be >= 2 (one piece plus EOS).")
    path = epath.Path(model_path)
    if not path.exists():
      raise FileNotFoundError(f"SentencePiece model {model_path!r} not found; {TRAIN_HINT}.")
    self.model_path, self.max_length = str(model_path), int(max_length)
    self._load(path.read_bytes())

  def _load(self, proto: bytes) -> None:
    self._proto = proto
    try:
      self._sp = spm.SentencePieceProcessor(model_proto=proto)
    except Exception as e:  # SentencePiece raises RuntimeError/OSError variants.
      raise ValueError(f"{self.model_path!r} is not a readable SentencePiece model "
                       f"({str(e).splitlines()[0]}); {TRAIN_HINT}.") from None
    ids = (self._sp.pad_id(), self._sp.eos_id(), self._sp.unk_id())
    if ids != (PAD_ID, EOS_ID, UNK_ID):
      raise ValueError(f"SentencePiece model {self.model_path!r} has pad/eos/unk ids {ids}; "
                       f"vimjax needs {(PAD_ID, EOS_ID, UNK_ID)}: {TRAIN_HINT}.")

  def __getstate__(self) -> dict[str, Any]:
    return {"model_path": self.model_path, "max_length": self.max_length, "proto": self._proto}

  def __setstate__(self, state: dict[str, Any]) -> None:
    self.model_path, self.max_length = state["model_path"], state["max_length"]
    self._load(state["proto"])

  @property
  def vocab_size(self) -> int:
    """Number of pieces, specials included; text embeddings need this many rows."""
    return self._sp.get_piece_size()

  def encode(self, texts: Sequence[str | bytes]) -> tuple[np.ndarray, int]:
    """Tokenizes a batch of texts.

    Args:
      texts: n strings (bytes are decoded as UTF-8).

    Returns:
      (ids, num_truncated): ids int32 [n, max_length], each row the pieces, then
      EOS_ID, then PAD_ID; num_truncated counts rows that lost pieces.
    """
    pieces = self._sp.encode([_as_str(t) for t in texts], out_type=int)
    ids = np.full((len(pieces), self.max_length), PAD_ID, np.int32)
    num_truncated = 0
    for row, p in zip(ids, pieces):
      if len(p) >= self.max_length:
        p = p[:self.max_length - 1]  # Keep room for EOS, so every row ends the same way.
        num_truncated += 1
      row[:len(p)] = p
      row[len(p)] = EOS_ID
    return ids, num_truncated

  def decode(self, ids: np.ndarray) -> list[str]:
    """Inverse of `encode` (up to truncation and normalisation).

    Args:
      ids: int [n, length] (or [length] for one text); each row is read up to
        its first EOS_ID, and PAD_IDs are dropped.

    Returns:
      n strings.
    """
    ids = np.asarray(ids)
    if ids.ndim == 1:
      ids = ids[None]
    if ids.ndim != 2:
      raise ValueError(f"decode expects ids [n, length] or [length]; got shape {ids.shape}.")
    bad = ids[(ids < 0) | (ids >= self.vocab_size)]
    if bad.size:
      raise ValueError(f"Text id {int(bad[0])} is outside the vocabulary [0, {self.vocab_size}).")
    rows = []
    for row in ids.tolist():
      row = row[:row.index(EOS_ID)] if EOS_ID in row else row
      rows.append([i for i in row if i != PAD_ID])
    return self._sp.decode(rows)

  def __repr__(self) -> str:
    return (f"TextTokenizer({self.model_path!r}, max_length={self.max_length}, "
            f"vocab_size={self.vocab_size})")


class TokenizeCaptions(grain.transforms.Map):
  """grain map: `caption` str -> `text_ids` int32 [max_length], `text_truncated` int32 [].

  The string is removed, so batches hold only arrays; `text_truncated` is 0/1,
  so the sum over a batch is the number of truncated captions in it.
  """

  def __init__(self, tokenizer_path: str, max_length: int):
    # Loaded here, not lazily: a bad path fails when the pipeline is built.
    self.tokenizer = TextTokenizer(tokenizer_path, max_length)

  def map(self, element: dict[str, Any]) -> dict[str, Any]:
    if "caption" not in element:
      raise ValueError(f"TokenizeCaptions needs a 'caption' key; the example has "
                       f"{sorted(element)}. Use a captioned source.")
    out = dict(element)
    # Several captions (an eval example of a multi-caption source): the first.
    caption = _as_str(out.pop("caption")).split(sources.CAPTION_SEPARATOR)[0]
    ids, num_truncated = self.tokenizer.encode([caption])
    out["text_ids"] = ids[0]
    out["text_truncated"] = np.int32(num_truncated)
    return out


class EmptyCorpusError(ValueError):
  """No non-empty caption to train on (e.g. an image-only source, whose captions are "")."""


def _clean(captions: Iterable[Any], counts: dict[str, int]) -> Iterator[str]:
  """Yields non-empty captions as str, counting kept and empty ones."""
  for caption in captions:
    caption = _as_str(caption).strip()
    if caption:
      counts["num_captions"] += 1
      yield caption
    else:
      counts["num_empty"] += 1


def train_sentencepiece(captions: Iterable[Any], model_prefix: str, vocab_size: int, *,
                        model_type: str = "bpe",
                        character_coverage: float = 0.9995) -> dict[str, Any]:
  """Trains a SentencePiece model in-process with the module's id conventions.

  `vocab_size` is a soft limit (`hard_vocab_limit=False`): a small corpus such
  as the shapes captions (~20 distinct words) supports only ~180 BPE pieces, and
  a hard limit would make SentencePiece fail with "Vocabulary size too high".
  The size actually reached is returned and logged; size the text embedding
  from `TextTokenizer.vocab_size`, never from the requested number.

  BPE is the default because unigram degenerates on tiny, repetitive corpora
  (on shapes: 44 pieces, ~38 tokens per caption, versus BPE's whole words,
  ~15 tokens per caption); on large corpora both work, pass "unigram" for it.

  Args:
    captions: texts (str, or UTF-8 bytes); blank ones are skipped and counted.
    model_prefix: writes `<model_prefix>.model` and `<model_prefix>.vocab`
      (local path; parent folders are created).
    vocab_size: requested number of pieces, specials included (Parti: 16,000).
    model_type: "bpe" or "unigram".
    character_coverage: fraction of characters covered by single-char pieces
      (the rest map to UNK_ID); 0.9995 suits most corpora, 1.0 tiny alphabets.

  Returns:
    {"model": path of the .model, "vocab_size": pieces reached,
     "requested_vocab_size": vocab_size, "num_captions": texts used,
     "num_empty": blank texts skipped}.

  Raises:
    EmptyCorpusError: (a ValueError) no non-blank caption.
    ValueError: a bad `vocab_size` or `model_type`, or SentencePiece failed.
  """
  if model_type not in ("bpe", "unigram"):
    raise ValueError(f"model_type={model_type!r}; valid: 'bpe', 'unigram'.")
  if vocab_size < 4:
    raise ValueError(f"vocab_size={vocab_size} must be >= 4 (3 special ids plus pieces).")
  counts = {"num_captions": 0, "num_empty": 0}
  stream = _clean(captions, counts)
  first = next(stream, None)
  if first is None:
    raise EmptyCorpusError(f"No non-empty caption to train a vocabulary on "
                           f"({counts['num_empty']} empty); use a captioned source.")
  os.makedirs(os.path.dirname(os.path.abspath(model_prefix)), exist_ok=True)
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=itertools.chain([first], stream),
        model_prefix=model_prefix, vocab_size=vocab_size, hard_vocab_limit=False,
        model_type=model_type, character_coverage=character_coverage,
        pad_id=PAD_ID, eos_id=EOS_ID, unk_id=UNK_ID, bos_id=BOS_ID,
        minloglevel=1)  # SentencePiece's INFO lines would flood the logs.
  except RuntimeError as e:
    # e.g. "INTERNAL: src/x.cc(638) [check] Vocabulary size is smaller than required_chars..."
    # or "INTERNAL: KeyError: ..." when reading `captions` raised.
    reason = str(e).splitlines()[0].split("] ", 1)[-1]
    raise ValueError(f"SentencePiece training failed: {reason}") from None
  if counts["num_empty"]:
    logging.warning("Skipped %d empty captions (trained on %d).", counts["num_empty"],
                    counts["num_captions"])
  model = f"{model_prefix}.model"
  size = spm.SentencePieceProcessor(model_file=model).get_piece_size()
  if size < vocab_size:
    logging.warning("Requested vocab_size=%d, but %d captions support only %d pieces: "
                    "the model's size.", vocab_size, counts["num_captions"], size)
  return {"model": model, "vocab_size": size, "requested_vocab_size": vocab_size, **counts}
