"""Tests for vimjax/data/text.py and the train_vocab binary (tiny vocab on shapes captions)."""
import json
import os
import pickle
import subprocess
import sys

import grain
import numpy as np
import pytest
import sentencepiece as spm

from vimjax.data import shapes
from vimjax.data import text


def _captions(n, split="train"):
  # Scenes only: rendering images would dominate the test time.
  return [shapes.caption_from_scene(shapes.sample_scene(split, i)) for i in range(n)]


@pytest.fixture(scope="module")
def vocab(tmp_path_factory):
  prefix = str(tmp_path_factory.mktemp("vocab") / "spm")
  return text.train_sentencepiece(_captions(500), prefix, vocab_size=16000)


@pytest.fixture(scope="module")
def raw_sp(vocab):
  """The same model through plain SentencePiece: the independent reference."""
  return spm.SentencePieceProcessor(model_file=vocab["model"])


def test_trained_vocab_is_soft_limited_with_fixed_special_ids(vocab, raw_sp):
  assert vocab["num_captions"] == 500 and vocab["num_empty"] == 0
  assert vocab["requested_vocab_size"] == 16000
  # The grammar has ~20 words: far fewer pieces than requested, and reported as such.
  assert 30 < vocab["vocab_size"] < 1000
  assert vocab["vocab_size"] == raw_sp.get_piece_size()
  assert os.path.exists(vocab["model"][:-len(".model")] + ".vocab")
  assert [raw_sp.id_to_piece(i) for i in range(3)] == ["<pad>", "</s>", "<unk>"]
  assert (raw_sp.pad_id(), raw_sp.eos_id(), raw_sp.unk_id(), raw_sp.bos_id()) == (0, 1, 2, -1)
  assert text.TextTokenizer(vocab["model"], 8).vocab_size == vocab["vocab_size"]


def test_bpe_keeps_grammar_words_whole(vocab):
  tok = text.TextTokenizer(vocab["model"], 32)
  words = shapes.COLORS + shapes.KINDS + ("small", "at", "the", "and", "top", "left", "center")
  ids, _ = tok.encode(list(words))
  # One piece, then EOS.
  np.testing.assert_array_equal(ids[:, 1], text.EOS_ID)
  assert (ids[:, 0] > text.UNK_ID).all()


def test_encode_pads_appends_eos_and_round_trips(vocab, raw_sp):
  captions = _captions(64, "validation")
  tok = text.TextTokenizer(vocab["model"], max_length=48)
  ids, num_truncated = tok.encode(captions)
  assert ids.dtype == np.int32 and ids.shape == (64, 48)
  assert num_truncated == 0
  for row, caption in zip(ids, captions):
    pieces = raw_sp.encode(caption)
    n = len(pieces)
    np.testing.assert_array_equal(row[:n], pieces)
    assert row[n] == text.EOS_ID
    assert (row[n + 1:] == text.PAD_ID).all()
    assert not np.isin(row[:n], [text.PAD_ID, text.EOS_ID]).any()
  assert tok.decode(ids) == captions
  assert tok.decode(ids[3]) == [captions[3]]


def test_truncation_is_counted_exactly(vocab, raw_sp):
  captions = _captions(100, "validation")
  max_length = 15
  lengths = np.array([len(raw_sp.encode(c)) for c in captions])
  expected = int((lengths + 1 > max_length).sum())
  # Both sides of the boundary: fits with EOS exactly / one piece too many.
  assert (lengths == max_length - 1).any() and (lengths == max_length).any()
  ids, num_truncated = text.TextTokenizer(vocab["model"], max_length).encode(captions)
  assert num_truncated == expected
  for row, caption, n in zip(ids, captions, lengths):
    kept = min(n, max_length - 1)
    np.testing.assert_array_equal(row[:kept], raw_sp.encode(caption)[:kept])
    assert row[kept] == text.EOS_ID  # Truncated rows still end with EOS.


def test_decode_stops_at_eos_and_rejects_unknown_ids(vocab):
  tok = text.TextTokenizer(vocab["model"], 16)
  ids, _ = tok.encode(["a red circle at the top", "a blue square at the left"])
  tail = ids[1, :5]
  ids[0, -5:] = tail  # Garbage after EOS is ignored.
  assert tok.decode(ids) == ["a red circle at the top", "a blue square at the left"]
  with pytest.raises(ValueError, match=f"outside the vocabulary \\[0, {tok.vocab_size}\\)"):
    tok.decode(np.array([[3, tok.vocab_size]]))


def test_pickle_round_trip_needs_no_model_file(vocab, tmp_path):
  path = tmp_path / "copy.model"
  path.write_bytes(open(vocab["model"], "rb").read())
  tok = text.TextTokenizer(str(path), 12)
  captions = _captions(20)
  blob = pickle.dumps(tok)
  path.unlink()  # A grain worker on another host may not see the file.
  clone = pickle.loads(blob)
  assert (clone.model_path, clone.max_length, clone.vocab_size) == (str(path), 12, tok.vocab_size)
  for a, b in zip(clone.encode(captions), tok.encode(captions)):
    np.testing.assert_array_equal(a, b)


def test_tokenize_captions_transform_in_a_batched_pipeline(vocab):
  source = shapes.ShapesSource("validation", image_size=12, num_examples=16)
  transform = pickle.loads(pickle.dumps(text.TokenizeCaptions(vocab["model"], 10)))
  example = transform.map(source[0])
  assert "caption" not in example
  assert example["text_ids"].dtype == np.int32 and example["text_ids"].shape == (10,)
  assert example["text_truncated"].dtype == np.int32 and example["text_truncated"].shape == ()
  assert example["image"].shape == (12, 12, 3)  # Other keys pass through.

  batches = list(grain.MapDataset.source(source).map(transform).batch(8))
  expected_ids, expected_truncated = text.TextTokenizer(vocab["model"], 10).encode(
      [source[i]["caption"] for i in range(16)])
  np.testing.assert_array_equal(np.concatenate([b["text_ids"] for b in batches]), expected_ids)
  assert batches[0]["text_truncated"].shape == (8,)
  assert sum(int(b["text_truncated"].sum()) for b in batches) == expected_truncated
  with pytest.raises(ValueError, match="needs a 'caption' key"):
    transform.map({"image": example["image"]})


def test_bytes_captions_are_decoded(vocab):
  tok = text.TextTokenizer(vocab["model"], 16)
  caption = "a red circle at the top"
  for a, b in zip(tok.encode([caption.encode(), np.array(caption)]), tok.encode([caption] * 2)):
    np.testing.assert_array_equal(a, b)


def test_missing_unreadable_and_foreign_models_fail_clearly(vocab, tmp_path):
  missing = str(tmp_path / "nope.model")
  with pytest.raises(FileNotFoundError, match=r"nope\.model.*python -m vimjax\.train_vocab"):
    text.TextTokenizer(missing, 16)
  with pytest.raises(FileNotFoundError):
    text.TokenizeCaptions(missing, 16)
  corrupt = tmp_path / "corrupt.model"
  corrupt.write_bytes(b"not a model")
  with pytest.raises(ValueError, match="corrupt.model.*not a readable SentencePiece model"):
    text.TextTokenizer(str(corrupt), 16)
  # SentencePiece's default ids (unk=0, bos=1, eos=2) differ from vimjax's.
  spm.SentencePieceTrainer.train(sentence_iterator=iter(_captions(200)), vocab_size=30,
                                 model_type="bpe", model_prefix=str(tmp_path / "foreign"),
                                 minloglevel=2)
  with pytest.raises(ValueError, match=r"pad/eos/unk ids \(-1, 2, 0\)"):
    text.TextTokenizer(str(tmp_path / "foreign.model"), 16)
  with pytest.raises(ValueError, match="max_length=1"):
    text.TextTokenizer(vocab["model"], 1)


def test_training_errors(tmp_path):
  with pytest.raises(ValueError, match=r"No non-empty caption.*\(2 empty\)"):
    text.train_sentencepiece(["", "   "], str(tmp_path / "a"), 100)
  with pytest.raises(ValueError, match="training failed: Vocabulary size .* 10 vs"):
    text.train_sentencepiece(_captions(50), str(tmp_path / "b"), 10)
  with pytest.raises(ValueError, match="model_type='word'"):
    text.train_sentencepiece(_captions(50), str(tmp_path / "c"), 100, model_type="word")


# --- The train_vocab binary. -------------------------------------------------


def test_train_vocab_refuses_to_overwrite(tmp_path):
  from vimjax.data import vocab  # pylint: disable=g-import-not-at-top
  output = str(tmp_path / "out" / "spm")
  result = vocab.run("shapes", "train", 100, 16000, output)
  assert result["num_captions"] == 100 and result["model"] == output + ".model"
  mtime = os.path.getmtime(output + ".model")
  with pytest.raises(FileExistsError, match="spm.model.*--overwrite"):
    vocab.run("shapes", "train", 100, 16000, output)
  assert os.path.getmtime(output + ".model") == mtime
  again = vocab.run("shapes", "train", 120, 50, output, overwrite=True)
  assert again["num_captions"] == 120 and again["vocab_size"] == 50


def test_train_vocab_source_without_captions(tmp_path, monkeypatch):
  from vimjax.data import vocab  # pylint: disable=g-import-not-at-top
  # An image folder without .txt files: every caption is "".
  images = tmp_path / "images"
  images.mkdir()
  for name in ("a.png", "b.png"):
    (images / name).write_bytes(b"never decoded")
  with pytest.raises(ValueError, match=r"folder:.*split 'train' has no captions.*\(2 empty\)"):
    vocab.run(f"folder:{images}", "train", 0, 100, str(tmp_path / "spm"))
  # Records without a caption field at all.
  no_captions = [{"tokens": np.zeros((4,), np.int32), "label": np.int32(0)}]
  monkeypatch.setattr(vocab.sources, "make_source", lambda *a, **k: no_captions)
  with pytest.raises(ValueError, match=r"--source='recs' has no captions.*\['label', 'tokens'\]"):
    vocab.run("recs", "train", 1, 100, str(tmp_path / "spm"))
  assert not os.path.exists(tmp_path / "spm.model")


def test_train_vocab_command_line(tmp_path):
  output = str(tmp_path / "spm")
  cmd = [sys.executable, "-m", "vimjax.train_vocab", "--source=shapes", "--num_examples=50",
         "--vocab_size=16000", f"--output={output}"]
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  ok = subprocess.run(cmd, capture_output=True, text=True, env=env, check=True)
  result = json.loads(ok.stdout.strip().splitlines()[-1])
  assert result["model"] == output + ".model" and result["num_captions"] == 50
  assert result["vocab_size"] == text.TextTokenizer(result["model"], 8).vocab_size
  refused = subprocess.run(cmd, capture_output=True, text=True, env=env)
  assert refused.returncode != 0
  assert refused.stderr.strip().splitlines()[-1].startswith(f"error: '{output}.model' already")


def test_multi_caption_eval_examples_tokenize_their_first_caption(vocab):
  transform = text.TokenizeCaptions(vocab["model"], 12)
  first, second = "a red circle at the top", "a blue square"
  got = transform.map({"caption": f"{first}\n{second}"})["text_ids"]
  np.testing.assert_array_equal(got, text.TextTokenizer(vocab["model"], 12).encode([first])[0][0])
