"""Batch fields the token-reading families share (VIM, Parti, contrastive).

Token records (`python -m vimjax.encode`): `tokens` int32 [b, grid_size^2];
captions turned into `text_ids` int32 [b, max_text_length] and `text_truncated`
int32 [b] by `text.TokenizeCaptions`; every batch has `mask` int32 [b]. Here:
their specs, synthetic values and the config checks of their sources.
"""

import jax
import numpy as np

from vimjax.data import sources
from vimjax.data import text
from vimjax.tasks import base


def token_spec(config, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """`mask` and `tokens` of a token-record batch."""
  return {"mask": base.spec((batch_size,)),
          "tokens": base.spec((batch_size, config.model.grid_size ** 2))}


def caption_spec(config, batch_size: int) -> dict[str, jax.ShapeDtypeStruct]:
  """`text_ids` and `text_truncated` of a captioned batch."""
  return {"text_ids": base.spec((batch_size, config.model.max_text_length)),
          "text_truncated": base.spec((batch_size,))}


def synthetic_tokens(config, batch_size: int, rs: np.random.RandomState) -> dict[str, np.ndarray]:
  """`mask` (ones) and `tokens` uniform over the codebook."""
  m = config.model
  return {"mask": np.ones((batch_size,), np.int32),
          "tokens": rs.randint(0, m.codebook_size, (batch_size, m.grid_size ** 2)).astype(np.int32)}


def synthetic_text_ids(config, batch_size: int, rs: np.random.RandomState) -> np.ndarray:
  """[b, max_text_length] int32: random non-special pieces, EOS, then PAD (lengths vary)."""
  m = config.model
  length = m.max_text_length
  ids = rs.randint(text.UNK_ID + 1, m.text_vocab_size, (batch_size, length)).astype(np.int32)
  ends = rs.randint(max(1, length // 2), length, (batch_size,))
  positions = np.arange(length)[None]
  ids = np.where(positions == ends[:, None], text.EOS_ID, ids)
  return np.where(positions > ends[:, None], text.PAD_ID, ids).astype(np.int32)


def synthetic_captions(config, batch_size: int, rs: np.random.RandomState) -> dict[str, np.ndarray]:
  return {"text_ids": synthetic_text_ids(config, batch_size, rs),
          "text_truncated": np.zeros((batch_size,), np.int32)}


def validate_token_source(config) -> None:
  """data.source is not a placeholder; its metadata.json matches the model's grid and codebook."""
  source = config.data.source
  if "<dir>" in source:
    raise ValueError(f"data.source={source!r} is a placeholder; point it at the shards of "
                     "`python -m vimjax.encode`, e.g. "
                     "'array_record:OUT/tokens-{split}-*.array_record'.")
  # Local metadata only: validation also runs offline (launch scripts); a gs://
  # one is checked when the run opens its data (train/preflight.py).
  sources.check_tokens_metadata(config, remote=False)


def validate_text_tokenizer(config) -> None:
  """data.text_tokenizer exists and fits model.text_vocab_size."""
  path = config.data.text_tokenizer
  if "<dir>" in path or not base.exists(path):
    raise ValueError(f"data.text_tokenizer={path!r} does not exist; {text.TRAIN_HINT}.")
  vocab = text.TextTokenizer(path, config.model.max_text_length).vocab_size
  if vocab > config.model.text_vocab_size:
    raise ValueError(f"data.text_tokenizer={path!r} has {vocab} pieces, more than "
                     f"model.text_vocab_size={config.model.text_vocab_size}.")
